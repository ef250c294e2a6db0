"""The 256x256 datasets on data the tests make: an LSUN-format lmdb, a CelebA-HQ-style folder
and a nested folder of images, read, trained on through main.py and summarised by the FID
statistics command; corrupt entries named in one line."""
import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from conftest import ROOT, assert_one_line_error, assert_same_weights, run_main
from score import fid_cache

lmdb = pytest.importorskip("lmdb")

DIGITS_CLASSIFIER = os.path.join(ROOT, "data", "digits_classifier.pt")
# odd sizes, landscape and portrait, one below 256 on the short side; 300x257 and 260x263
# have a centre crop offset of 21.5 and 1.5 pixels, which rounding (not flooring) moves
SIZES = [(301, 257), (257, 389), (300, 257), (260, 263), (417, 240), (263, 263)]


def picture(index, width, height):
    """A smooth picture with a mark off its vertical axis (so a mirror image differs)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = index * 0.7
    channels = [127 + 120 * np.sin(x / (17 + index) + phase), 127 + 120 * np.cos(y / 23 - phase),
                255 * x / width]
    image = np.stack(channels, -1)
    image[height // 4:height // 2, width // 8:width // 3] = (250, 20, 20)
    return Image.fromarray(image.astype(np.uint8))


def encoded(index, fmt):
    width, height = SIZES[index % len(SIZES)]
    buffer = io.BytesIO()
    picture(index, width, height).save(buffer, fmt, quality=90)
    return buffer.getvalue()


def close_databases():
    """datasets.py keeps each lmdb database open (one environment per process): writing to one,
    in a test, needs it closed."""
    for env in datasets.LMDB_ENVS.values():
        env.close()
    datasets.LMDB_ENVS.clear()


@pytest.fixture(autouse=True)
def databases_closed():
    yield
    close_databases()


def lsun_key(index):
    return hashlib.sha1(str(index).encode()).hexdigest().encode()  # LSUN's keys: 40 hex digits


def write_lmdb(path, values):
    """An LSUN-format database: keys -> encoded image bytes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with lmdb.open(path, map_size=1 << 28) as env, env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)


def official_preparation(encoded_bytes, size):
    """StyleGAN2's dataset tool on one LSUN image, as the official DDPM code's data was made:
    numpy centre crop to the short side, then PIL's Lanczos (antialiasing) resize."""
    img = np.asarray(Image.open(io.BytesIO(encoded_bytes)).convert("RGB"))
    crop = min(img.shape[:2])
    img = img[(img.shape[0] - crop) // 2:(img.shape[0] + crop) // 2,
              (img.shape[1] - crop) // 2:(img.shape[1] + crop) // 2]
    img = Image.fromarray(img, "RGB").resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    """{dataset name: data_root} for lsun_church, celebahq and folder, 36 images each."""
    root = tmp_path_factory.mktemp("datasets")
    lsun_root = root / "lsun"
    lsun_root.mkdir()
    write_lmdb(str(lsun_root / "church_outdoor_train_lmdb"),
               {lsun_key(i): encoded(i, "JPEG" if i % 2 else "WEBP") for i in range(36)})
    celebahq = root / "celebahq"
    celebahq.mkdir()
    for i in range(36):  # CelebA-HQ: square JPEGs numbered from 0
        picture(i, 288, 288).save(celebahq / f"{i:05d}.jpg", quality=90)
    nested = root / "folder"
    for i in range(36):
        folder = nested / f"part{i % 3}" / ("deeper" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = [".png", ".JPG", ".webp"][i % 3]
        width, height = SIZES[i % len(SIZES)]
        picture(i, width, height).save(folder / f"{i:03d}{suffix}")
    (nested / "part0" / "notes.txt").write_text("not an image")
    return {"lsun_church": str(lsun_root), "celebahq": str(celebahq), "folder": str(nested)}


def flat_files(root):
    """Every image file under root in the order datasets.ImageFiles reads them."""
    return datasets.ImageFiles(root, 8, False, 3).paths


def stored_bytes(name, root):
    """Each image's encoded bytes, in the dataset's order."""
    if name.startswith("lsun"):
        values = {lsun_key(i): encoded(i, "JPEG" if i % 2 else "WEBP") for i in range(36)}
        return [values[key] for key in sorted(values)]  # lmdb keeps its keys sorted
    return [open(path, "rb").read() for path in flat_files(root)]


@pytest.mark.parametrize("name", ["lsun_church", "celebahq", "folder"])
@pytest.mark.parametrize("size", [256, 64])
def test_images_are_prepared_as_the_official_lsun_data(datasets_dir, name, size):
    dataset = datasets.build_dataset(name, datasets_dir[name], size)
    expected = stored_bytes(name, datasets_dir[name])
    assert len(dataset) == 36  # nested folders, upper-case suffixes found; notes.txt not
    for index, encoded_bytes in enumerate(expected):
        assert torch.equal(dataset.pixels(index), official_preparation(encoded_bytes, size)), index


def test_random_flips_follow_the_dataset_default(datasets_dir, tmp_path):
    lsun_root = tmp_path / "lsun"
    lsun_root.mkdir()
    os.symlink(os.path.join(datasets_dir["lsun_church"], "church_outdoor_train_lmdb"),
               lsun_root / "bedroom_train_lmdb")
    roots = {**datasets_dir, "lsun_bedroom": str(lsun_root)}
    torch.manual_seed(0)
    for name, root in roots.items():
        dataset = datasets.build_dataset(name, root, 32)
        upright = datasets.to_model_input(dataset.pixels(0), flip=False)
        draws = [dataset[0][0] for _ in range(16)]
        mirrored = sum(torch.equal(x, upright.flip(-1)) for x in draws)
        assert mirrored + sum(torch.equal(x, upright) for x in draws) == 16, name
        assert (0 < mirrored < 16) == datasets.default_flip(name) == (name != "lsun_bedroom"), name


def test_the_key_list_is_cached_once_and_never_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    db = tmp_path / "lsun" / "cat_train_lmdb"
    write_lmdb(str(db), {lsun_key(i): encoded(i, "JPEG") for i in range(3)})
    assert len(datasets.build_dataset("lsun_cat", str(tmp_path / "lsun"), 16)) == 3
    assert os.path.exists(str(db) + ".keys.npz")
    listings = []
    monkeypatch.setattr(datasets, "tqdm", lambda keys, **_: listings.append(1) or keys)
    assert len(datasets.build_dataset("lsun_cat", str(tmp_path / "lsun"), 16)) == 3
    assert listings == []  # read from the cache
    close_databases()
    write_lmdb(str(db), {lsun_key(3): encoded(3, "WEBP")})  # the database grew: listed afresh
    assert len(datasets.build_dataset("lsun_cat", str(tmp_path / "lsun"), 16)) == 4 and listings == [1]
    # nothing can be written next to the database: the user's cache folder takes the list
    os.remove(str(db) + ".keys.npz")
    os.mkdir(str(db) + ".keys.npz")
    assert len(datasets.build_dataset("lsun_cat", str(tmp_path / "lsun"), 16)) == 4
    assert [name for name in os.listdir(tmp_path / "cache" / "ddpm") if name.endswith(".keys.npz")]
    assert os.listdir(tmp_path / "cwd") == []


@pytest.mark.slow  # a process of its own
def test_a_truncated_database_is_refused_at_open(tmp_path):
    """lmdb maps data.mdb into memory: reading past the end of a truncated file (an interrupted
    copy) kills Python with SIGBUS. Opening it is one DatasetError naming the sizes; run in a
    child process, so that a missing check shows as its death by signal, not this one's."""
    db = tmp_path / "lsun" / "church_outdoor_train_lmdb"
    write_lmdb(str(db), {lsun_key(i): encoded(i, "JPEG") for i in range(40)})
    with open(db / "data.mdb", "r+b") as file:
        file.truncate(os.path.getsize(db / "data.mdb") // 2)
    read_all = ("import sys; sys.path.insert(0, sys.argv[1]); import datasets\n"
                "try:\n"
                "    images = datasets.build_dataset('lsun_church', sys.argv[2], 16)\n"
                "    [images[i] for i in range(len(images))]\n"
                "except datasets.DatasetError as error:\n"
                "    sys.exit(f'error: {error}')\n")
    result = subprocess.run([sys.executable, "-c", read_all, ROOT, str(tmp_path / "lsun")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert f"{db}/data.mdb is truncated" in result.stderr and result.stderr.count("\n") == 1


def test_only_regular_files_count_as_images(tmp_path):
    """A FIFO named x.png would block the loader forever on its first read."""
    picture(0, 8, 8).save(tmp_path / "real.png")
    os.mkfifo(tmp_path / "x.png")
    images = datasets.build_dataset("folder", str(tmp_path), 8)
    assert images.paths == [str(tmp_path / "real.png")]


def train_command(name, root, size, logdir, *extra):
    """main.py training 2 steps of a small UNet: 32 channels, levels down to 8x8, where its one
    attention block sits; at 256x256, a batch of one image (a step costs ~1 s on one core)."""
    levels, batch = {256: (6, "1"), 64: (4, "2")}[size]
    return [sys.executable, os.path.join(ROOT, "main.py"), "--train", "--dataset", name,
            "--data_root", root, "--img_size", str(size), "--ch", "32", *["--ch_mult", "1"] * levels,
            "--attn", str(levels - 1), "--num_res_blocks", "1", "--T", "10", "--dropout", "0",
            "--batch_size", batch, "--sample_size", batch, "--total_steps", "2", "--warmup", "0",
            "--log_step", "1", "--sample_step", "0", "--save_step", "0", "--num_workers", "0",
            "--device", "cpu", "--logdir", logdir, *extra]


def fid_cache_command(name, root, size, output):
    # the offline digits classifier as the feature network: no Inception weights needed
    return [sys.executable, "-m", "score.fid_cache", "--dataset", name, "--data_root", root,
            "--img_size", str(size), "--feature", "digits", "--digits_classifier", DIGITS_CLASSIFIER,
            "--num_workers", "0", "--device", "cpu", "--output", output]


def run_commands(commands):
    """{name: CompletedProcess} of {name: command}: main.py's in this process (run_main), one
    after another, while python -m score.fid_cache (the command itself is its subject) runs in
    a process of its own, with one thread."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    own = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=environment)
           for name, command in commands.items() if command[1] == "-m"}
    results = {name: run_main(*command[2:], expect_ok=False, tiny=False)
               for name, command in commands.items() if name not in own}
    for name, process in own.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(commands[name], process.returncode, stdout, stderr)
    return results


@pytest.fixture(scope="module")
def runs(datasets_dir, tmp_path_factory):
    """Every main.py and fid_cache run of the tests below, made once: {name: (result, output)}."""
    out = tmp_path_factory.mktemp("runs")
    commands, outputs = {}, {}
    for name, root in datasets_dir.items():
        for size in (256, 64):
            # LSUN with a loader worker: it reads the database its parent opened for the sample grid
            workers = ["--num_workers", "1"] if name.startswith("lsun") else []
            outputs[name, size] = str(out / f"{name}{size}")
            commands[name, size] = train_command(name, root, size, outputs[name, size], *workers)
    outputs["on device"] = str(out / "on_device")
    commands["on device"] = train_command("folder", datasets_dir["folder"], 64, outputs["on device"],
                                          "--data_on_device")
    outputs["fid_cache"] = str(out / "lsun_church.npz")
    commands["fid_cache"] = fid_cache_command("lsun_church", datasets_dir["lsun_church"], 64,
                                              outputs["fid_cache"])
    # a database with an entry that is no image, read last by a loader worker
    broken = out / "broken"
    write_lmdb(str(broken / "church_outdoor_train_lmdb"),
               {**{lsun_key(i): encoded(i, "JPEG") for i in range(3)}, b"f" * 40: b"\xff\xd8 not a JPEG"})
    commands["corrupt"] = train_command("lsun_church", str(broken), 64, str(out / "corrupt"),
                                        "--batch_size", "4", "--sample_size", "1", "--num_workers", "1")
    results = run_commands(commands)
    return {name: (result, outputs.get(name)) for name, result in results.items()}


def checkpoint_of(logdir):
    return torch.load(os.path.join(logdir, "ckpt.pt"), weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lsun_church", "celebahq", "folder"])
@pytest.mark.parametrize("size", [256, 64])
def test_main_trains_two_steps(runs, name, size):
    result, logdir = runs[name, size]
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint_of(logdir)
    assert state["step"] == 2
    weights = torch.cat([tensor.flatten() for tensor in state["net_model"].values()])
    assert weights.isfinite().all()


@pytest.mark.slow
def test_data_on_device_trains_as_the_loader_does(runs):
    result, logdir = runs["on device"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoding 36 images onto cpu" in result.stderr  # held whole, not through the loader
    # the same pixels, flips and order: the same weights, bit for bit
    assert_same_weights(checkpoint_of(runs["folder", 64][1]), checkpoint_of(logdir), atol=0)


def test_data_on_device_refuses_what_does_not_fit(datasets_dir, monkeypatch):
    monkeypatch.setattr(datasets, "free_memory", lambda device: 2 * 36 * 3 * 64 * 64 - 2)
    dataset = datasets.build_dataset("folder", datasets_dir["folder"], 64, flip=False)
    with pytest.raises(datasets.DatasetError, match="take 0.0 GiB as uint8, more than half of the"):
        datasets.as_tensor(dataset, "cpu", decode=True)
    monkeypatch.setattr(datasets, "free_memory", lambda device: 2 * 36 * 3 * 64 * 64)
    stored = datasets.as_tensor(dataset, "cpu", decode=True)
    assert stored.dtype == torch.uint8 and torch.equal(stored[5], dataset.pixels(5))
    assert datasets.as_tensor(dataset, "cpu") is None  # decoding them all only when asked


@pytest.mark.slow
def test_a_corrupt_database_entry_is_named_in_one_line(runs):
    result, _ = runs["corrupt"]
    assert_one_line_error(result, "cannot read image ffffffffff", "(entry 3 of ",
                          "church_outdoor_train_lmdb): not an image format PIL reads", last=True)


def reference_statistics(images, size):
    """FID statistics of the official preparation of the images, with the digits features."""
    from score.scorer import Evaluator
    from score.metrics import statistics
    evaluator = Evaluator("digits", None, "cpu", digits_classifier=DIGITS_CLASSIFIER)
    pixels = torch.stack([official_preparation(image, size) for image in images])
    return statistics(evaluator.features(pixels.float() / 255)[0])


def assert_statistics_of(output, name, root, size):
    with np.load(output) as stats:
        mu, sigma = stats["mu"], stats["sigma"]
    reference_mu, reference_sigma = reference_statistics(stored_bytes(name, root), size)
    np.testing.assert_allclose(mu, reference_mu.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, reference_sigma.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lsun_church", "celebahq", "folder"])
@pytest.mark.parametrize("size", [256, 64])
def test_fid_statistics_of_every_image(datasets_dir, tmp_path, name, size):
    """The command's main() in this process; the test below runs it as python -m once."""
    output = str(tmp_path / "stats.npz")
    fid_cache.main(fid_cache_command(name, datasets_dir[name], size, output)[3:])
    assert_statistics_of(output, name, datasets_dir[name], size)


@pytest.mark.slow
def test_fid_statistics_command(datasets_dir, runs):
    result, output = runs["fid_cache"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert_statistics_of(output, "lsun_church", datasets_dir["lsun_church"], 64)


def test_a_truncated_file_is_named_in_one_line(datasets_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, path in enumerate(flat_files(datasets_dir["celebahq"])[:3]):
        content = open(path, "rb").read()
        (folder / f"{index}.jpg").write_bytes(content[:len(content) // 2] if index == 2 else content)
    command = fid_cache_command("celebahq", str(folder), 64, str(tmp_path / "s.npz"))
    with pytest.raises(SystemExit) as stopped:  # read by a loader worker, which wraps the error
        fid_cache.main(command[3:] + ["--num_workers", "1"])
    message = str(stopped.value.code)
    assert "\n" not in message and f"{folder}/2.jpg" in message and "truncated" in message
