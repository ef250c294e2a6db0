"""The 256x256 datasets on data the tests make: an LSUN-format lmdb, a CelebA-HQ-style folder
and a nested folder of images, read, trained on through main.py and summarised by the FID
statistics command; corrupt entries named in one line. The labels of class-conditional training:
a folder's classes (its subfolders), every dataset's labels paired with their images on both
training paths, their refusals and their console summary."""
import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import batches
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


# ---------------------------------------------------------------- labels (--num_classes)

# a class folder's images: {subfolder: number of images}; "a_dog-x" sorts after "a_dog" by
# name but its paths before a_dog's, which sorting whole paths would confuse
CLASS_IMAGES = {"b_cat": 4, "a_dog": 3, "c_owl": 2, "a_dog-x": 3}
SORTED_CLASSES = ["a_dog", "a_dog-x", "b_cat", "c_owl"]


def class_picture(label, index):
    """8x8 of one colour: red says the class (its index in SORTED_CLASSES), green the image."""
    return Image.new("RGB", (8, 8), (60 * (label + 1), 20 * index, 90))


def label_from_pixels(image):
    """The class a class_picture shows, from a batch's image in [-1, 1]."""
    red = (image[0, 0, 0] + 1) * 127.5
    return round(float(red) / 60) - 1


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """A folder of the classes of CLASS_IMAGES, with a nested folder, upper-case suffixes and
    a file that is no image."""
    root = tmp_path_factory.mktemp("classes")
    for name, count in CLASS_IMAGES.items():
        label = SORTED_CLASSES.index(name)
        for index in range(count):
            folder = root / name / ("nested" if index % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            class_picture(label, index).save(folder / f"{index}{'.PNG' if index == 2 else '.png'}")
    (root / "b_cat" / "notes.txt").write_text("not an image")
    return str(root)


def test_class_folders_are_labelled_as_image_folder_labels_them(class_folder):
    """Class i is the i-th subfolder name in sorted order, each image labelled by the
    subfolder it lies in: torchvision's ImageFolder (an independent reference) agrees on the
    classes and on every image's label, and so do the colours the test drew. Catches classes in
    the order of the file system or of CLASS_IMAGES, a label shifted by one, images of another
    class, and a nested folder taken for a class."""
    from torchvision.datasets import ImageFolder
    dataset = datasets.build_dataset("folder", class_folder, 8, flip=False, labels=True)
    reference = ImageFolder(class_folder)
    assert dataset.classes == reference.classes == SORTED_CLASSES
    assert reference.class_to_idx == {name: index for index, name in enumerate(dataset.classes)}
    assert len(dataset) == sum(CLASS_IMAGES.values()) == len(reference.samples)
    assert dict(zip(dataset.paths, datasets.labels_of(dataset).tolist())) == dict(reference.samples)
    for index in range(len(dataset)):
        image, label = dataset[index]
        top = os.path.relpath(dataset.paths[index], class_folder).split(os.sep)[0]
        assert top == dataset.classes[label] and label_from_pixels(image) == label, dataset.paths[index]
    # class by class, each class's images sorted
    assert dataset.paths == [path for name in SORTED_CLASSES for path in flat_files(os.path.join(class_folder, name))]


def test_an_unconditional_folder_is_every_image_labelled_0(class_folder):
    """Without labels a folder of class subfolders is what it always was: every image under it
    in sorted order, each labelled 0. Catches unconditional runs that changed images or order."""
    dataset = datasets.build_dataset("folder", class_folder, 8, flip=False)
    expected = sorted(os.path.join(folder, name) for folder, _, names in os.walk(class_folder)
                      for name in names if not name.endswith(".txt"))
    assert type(dataset) is datasets.ImageFiles and dataset.paths == expected
    assert [dataset[index][1] for index in range(len(dataset))] == [0] * len(expected)
    assert datasets.labels_of(dataset).tolist() == [0] * len(expected)


def folder_of(tmp_path, layout):
    """A folder of 8x8 images at the relative paths of layout (a name ending in / is an empty
    folder, one in .txt a text file)."""
    for relative in layout:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith("/"):
            path.mkdir(exist_ok=True)
        elif relative.endswith(".txt"):
            path.write_text("not an image")
        else:
            class_picture(0, 0).save(path)
    return str(tmp_path)


@pytest.mark.parametrize("layout, parts", [
    ([], ["--num_classes needs one subfolder per class under", "found none"]),
    (["0.png", "1.png"], ["--num_classes needs one subfolder per class under", "found none"]),
    (["cat/", "dog/notes.txt"], ["--num_classes needs one subfolder per class under", "found none"]),
    (["cat/0.png", "dog/1.png", "stray.jpg"], ["1 image(s) lie directly in", "stray.jpg"]),
    (["cat/0.png", "dog/deeper/1.png", "empty/notes.txt", "owl/"], ["without image files", ": empty, owl;"]),
])
def test_a_folder_that_is_no_set_of_classes_is_refused_in_one_line(tmp_path, layout, parts):
    """No class subfolder with images, images in no class, a class without images: each one
    DatasetError of one line that says which. Catches a class folder silently dropped (the
    labels would shift) and loose images given some class."""
    root = folder_of(tmp_path, layout)
    with pytest.raises(datasets.DatasetError) as refused:
        datasets.build_dataset("folder", root, 8, labels=True)
    message = str(refused.value)
    assert "\n" not in message and root in message and all(part in message for part in parts), message


def test_a_refused_class_folder_stops_main_before_it_writes(tmp_path):
    """main.py reads the dataset among its checks: a folder of images without classes stops a
    conditional run in one error line, before the logdir exists."""
    root = folder_of(tmp_path / "data", ["0.png", "1.png"])
    logdir = tmp_path / "run"
    result = run_main("--train", "--dataset", "folder", "--data_root", root, "--num_classes", "2",
                      "--logdir", logdir, expect_ok=False)
    assert_one_line_error(result, "--num_classes needs one subfolder per class under", root)
    assert not logdir.exists()


def fake_cifar10(labels):
    """A torchvision CIFAR10 of random 32x32 images and the given labels, made without its files."""
    from torchvision.datasets import CIFAR10
    cifar = CIFAR10.__new__(CIFAR10)
    cifar.data = np.random.default_rng(0).integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    cifar.targets, cifar.classes = list(labels), [f"class{index}" for index in range(10)]
    cifar.transform = cifar.target_transform = None
    return cifar


def test_check_classes_wants_the_datasets_number_of_classes(class_folder):
    """Catches a model of more or fewer classes than the data (labels past its embedding, or
    classes it never sees) and a dataset without labels taken for one class."""
    folder = datasets.build_dataset("folder", class_folder, 8, labels=True)
    digits = datasets.build_dataset("digits", None, 8)
    datasets.check_classes(folder, 4)
    datasets.check_classes(digits, 10)
    datasets.check_classes(fake_cifar10([3, 1]), 10)
    for dataset, count, parts in [(folder, 5, ["--num_classes 5", "data's 4 classes", class_folder, "a_dog-x"]),
                                  (digits, 9, ["--num_classes 9", "data's 10 classes"]),
                                  (datasets.build_dataset("folder", class_folder, 8), 4, ["no classes"])]:
        with pytest.raises(datasets.DatasetError) as refused:
            datasets.check_classes(dataset, count)
        assert "\n" not in str(refused.value) and all(part in str(refused.value) for part in parts), refused.value
    assert datasets.class_names(digits) == [str(digit) for digit in range(10)]
    assert datasets.class_names(folder) == SORTED_CLASSES


def test_configured_labels_a_folder_only_for_a_conditional_model(class_folder):
    from types import SimpleNamespace
    data = SimpleNamespace(dataset="folder", data_root=class_folder)

    def model(num_classes):
        return SimpleNamespace(img_size=8, img_channels=3, num_classes=num_classes)

    assert type(datasets.configured(data, model(0))) is datasets.ImageFiles
    assert datasets.configured(data, model(4)).classes == SORTED_CLASSES
    with pytest.raises(datasets.DatasetError, match="--num_classes 3 does not match the data's 4 classes"):
        datasets.configured(data, model(3))


def test_labels_of_are_the_labels_iterating_gives(class_folder, monkeypatch):
    """Every dataset's labels in its order, as int64, without decoding an image. Catches labels
    in another order than the images (a sorted or shuffled copy) and a folder decoded to label it."""
    labelled = {"digits train": datasets.build_dataset("digits", None, 8, flip=False),
                "digits held out": datasets.build_dataset("digits", None, 8, train=False, flip=False),
                "cifar10": fake_cifar10([3, 9, 0, 3, 7, 1]),
                "class folder": datasets.build_dataset("folder", class_folder, 8, flip=False, labels=True),
                "folder": datasets.build_dataset("folder", class_folder, 8, flip=False)}
    iterated = {name: [int(dataset[index][1]) for index in range(len(dataset))] for name, dataset in labelled.items()}

    def no_decoding(self, index):
        raise AssertionError("labels_of decoded an image")

    monkeypatch.setattr(datasets.EncodedImages, "pixels", no_decoding)
    for name, dataset in labelled.items():
        labels = datasets.labels_of(dataset)
        assert labels.dtype == np.int64 and labels.tolist() == iterated[name], name
    assert len(set(iterated["class folder"])) == 4 and len(set(iterated["digits held out"])) == 10


def test_digits_labels_are_scikit_learns_in_the_held_out_permutation():
    """Recomputed from load_digits: the fixed permutation (seed 0) with the last 297 held out,
    and each image matched to its nearest scikit-learn digit, whose target must be its label.
    Catches labels permuted apart from the images or taken from the other split."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    originals = torch.from_numpy(bunch.images.reshape(len(bunch.images), -1) / 16.0).float()
    for train, part in [(True, order[:-297]), (False, order[-297:])]:
        dataset = datasets.build_dataset("digits", None, 8, train=train, flip=False)
        labels = datasets.labels_of(dataset)
        np.testing.assert_array_equal(labels, bunch.target[part])
        distances = torch.cdist(dataset.images.reshape(len(dataset), -1), originals)
        assert distances.min(1).values.max() < 0.01  # 8-bit rounding of the 17 levels only
        np.testing.assert_array_equal(labels, bunch.target[distances.argmin(1).numpy()])


def paired_batches(dataset, stored, labels, steps):
    """steps (image, label) batches of the device path and of the loader path, each from its
    own GlobalBatchSampler of one seed (4 images per batch, over an epoch boundary)."""
    def order():
        return batches.GlobalBatchSampler(len(dataset), 4, 1, 0, 1, seed=11, start=1)

    device = batches.device_batches(stored, order(), labels)
    loader = batches.loader_batches(dataset, order(), 0, 11, torch.device("cpu"))
    return [(next(device), next(loader)) for _ in range(steps)]


@pytest.mark.parametrize("name", ["digits", "class folder"])
def test_each_image_keeps_its_label_on_both_training_paths(class_folder, name):
    """--data_on_device and the loader give the same images and the same labels, and each
    label is that image's own (the pairs iterating the dataset gives: the colour of a class
    folder's images, a digit's bytes): a shuffle of the labels against the images on either path
    fails, and so does a label left off the device or not int64."""
    dataset = (datasets.build_dataset("digits", None, 8, flip=False) if name == "digits" else
               datasets.build_dataset("folder", class_folder, 8, flip=False, labels=True))
    stored = datasets.as_tensor(dataset, "cpu", decode=True)
    labels = torch.from_numpy(datasets.labels_of(dataset))
    own = {}
    for index in range(len(dataset)):
        image, label = dataset[index]
        own.setdefault(image.numpy().tobytes(), set()).add(int(label))
    mixed = 0
    for (ours, our_labels), (theirs, their_labels) in paired_batches(dataset, stored, labels, 6):
        assert torch.equal(ours, theirs) and torch.equal(our_labels, their_labels)
        for y in (our_labels, their_labels):
            assert y.dtype == torch.long and y.device == stored.device
        for image, label in zip(ours, our_labels.tolist()):
            assert own[image.numpy().tobytes()] == {label}
        mixed += len(set(our_labels.tolist())) > 1
    assert mixed >= 3  # batches of several classes, where a shuffle shows


def test_device_batches_without_labels_hold_none():
    stored = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1)
    (batch, labels), = [next(batches.device_batches(stored, [torch.tensor([4, 1])]))]
    assert labels is None and torch.equal(batch, datasets.from_stored(stored[[4, 1]]))


def balance_counts(line):
    """{class name: count} of a class_balance line that lists every class."""
    listed = line.split(": ", 1)[1].rsplit(" (min ", 1)[0]
    return {name: int(count.replace(",", "")) for name, count in (item.rsplit(" ", 1) for item in listed.split(", "))}


def test_class_balance_counts_each_class_in_one_line():
    """Counted as numpy's bincount counts, every class named up to 20 classes, a class without
    images among them; 1,000 classes summarised by their range and its ends. Catches counts
    given to the wrong class, an empty class left out, and a line of 1,000 entries."""
    digits = datasets.build_dataset("digits", None, 8)
    labels, names = datasets.labels_of(digits), datasets.class_names(digits)
    line = datasets.class_balance(labels, names)
    counts = np.bincount(labels)
    assert line.startswith("10 classes: ") and "\n" not in line
    assert balance_counts(line) == dict(zip(names, counts.tolist()))
    assert line.endswith(f"(min {counts.min()}, max {counts.max()})")
    no_nines = labels[labels != 9]  # the last class: only bincount's minlength counts it
    assert balance_counts(datasets.class_balance(no_nines, names))["9"] == 0
    per_class = np.random.default_rng(1).integers(5, 50, 1000)
    per_class[17], per_class[603] = 1, 1300
    many = np.random.default_rng(2).permutation(np.repeat(np.arange(1000), per_class))
    names = [f"n{index:08d}" for index in range(1000)]
    line = datasets.class_balance(many, names)
    assert len(line) < 200 and "\n" not in line, line
    assert f"1,000 classes of {per_class.sum():,} images: 1 to 1,300 per class" in line
    assert "n00000017" in line and "n00000603" in line
