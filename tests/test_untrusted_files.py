"""Files a user or another user hands in, as a hostile one would (issue 24): the logdir's lock
never follows a link, no reader opens what is not a regular file (a FIFO blocks a read for
ever, /dev/zero never ends one), a text or JSON file has a bounded size, images of 16 bits
are scaled, not clipped, and a refused pickle does not invite the unsafe way to load it.
In-process, on files the tests make."""
import io
import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import convert
import datasets
import files
import lock
import inspection
from config import Config
from score import ScoreError, load_images, load_statistics


def outcome_within(call, seconds=20):
    """call()'s exception (None if it returned), or "hung" if it had not ended after seconds:
    run in a daemon thread, so that a read blocked on a FIFO cannot hang the suite."""
    result = {}

    def target():
        try:
            call()
            result["error"] = None
        except BaseException as error:  # noqa: B036 - whatever it raised is the outcome
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return result.get("error", "hung")


# ---------------------------------------------------------------- the lock


def planted_lock(logdir, kind, tmp_path):
    """<logdir>/.lock made into `kind`; the file a link points to (its content: b"precious")."""
    target = tmp_path / "precious.txt"
    path = os.path.join(logdir, lock.NAME)
    if kind in ("link", "hard link"):
        target.write_bytes(b"precious")
        (os.symlink if kind == "link" else os.link)(target, path)
    elif kind == "dangling link":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)
    return target


@pytest.mark.parametrize("kind", ["link", "dangling link", "hard link", "fifo", "folder"])
def test_the_lock_follows_no_link_and_writes_nothing_but_its_own_regular_file(tmp_path, kind):
    """A `.lock` planted as a link to someone's file made every command truncate that file and
    write the lock's record into it; a dangling one created its target; a FIFO gave "cannot
    lock: None". Each is one line naming the path, and nothing is written anywhere."""
    logdir = str(tmp_path / "run")
    os.makedirs(logdir)
    target = planted_lock(logdir, kind, tmp_path)
    error = outcome_within(lambda: lock.hold(logdir, command="test"))
    assert isinstance(error, lock.LogdirBusy), error
    assert str(error).startswith(f"{os.path.join(logdir, lock.NAME)} is ") and "nothing was written" in str(error)
    assert "None" not in str(error)
    if kind == "dangling link":
        assert not os.path.lexists(target)
    elif kind in ("link", "hard link"):
        assert target.read_bytes() == b"precious"


def test_the_lock_on_its_own_file_names_its_holder(tmp_path):
    """The regular lock file still works: its record names the holder."""
    logdir = str(tmp_path / "run")
    os.makedirs(logdir)
    lock.hold(logdir, command="python main.py --train")
    record = json.loads(open(os.path.join(logdir, lock.NAME)).read())
    assert record["pid"] == os.getpid() and record["command"] == "python main.py --train"
    assert lock.holder(os.path.join(logdir, lock.NAME)).startswith(f"pid {os.getpid()} on ")


# ---------------------------------------------------------------- readers of a user's files


def not_a_file(path, kind):
    """path made into a FIFO, a link to /dev/zero (a device that never ends), or a folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)
    return path


def interp_image(path):
    config = Config.make(dataset="digits", img_size=8, img_channels=1)
    inspection.interpolation_image(config.model, path, dataset=None)


READERS = {  # what reads a user's file: (the file's name, the call, the error it must raise)
    "checkpoint": ("ckpt.pt", checkpoint.load, checkpoint.CheckpointError),
    "flagfile": ("flagfile.txt", files.read_text, files.NotARegularFile),
    "diffusers config": ("config.json", convert.read_json, convert.ConversionError),
    "safetensors": ("diffusion_pytorch_model.safetensors",
                    lambda path: convert.read_weights(os.path.dirname(path)), convert.ConversionError),
    "pickled weights": ("diffusion_pytorch_model.bin",
                        lambda path: convert.read_weights(os.path.dirname(path)), convert.ConversionError),
    "interpolation image": ("a.png", interp_image, datasets.DatasetError),
    "FID statistics": ("stats.npz", lambda path: load_statistics(path, "make them"), ScoreError),
    "images to score": ("x.png", lambda path: load_images(os.path.dirname(path)), ScoreError),
}


# a folder named x.png among the images to score is a folder to search, not an image
NOT_FILES = [(reader, kind) for reader in READERS for kind in ("fifo", "/dev/zero", "folder")
             if (reader, kind) != ("images to score", "folder")]


@pytest.mark.parametrize("reader,kind", NOT_FILES)
def test_no_reader_opens_what_is_not_a_regular_file(tmp_path, reader, kind):
    """Today a FIFO hung the read (a FIFO safetensors ignored SIGTERM for minutes), /dev/zero
    read until memory ran out, a folder was a traceback: each is one line naming the file and
    what it is, at once."""
    name, read, expected = READERS[reader]
    path = not_a_file(str(tmp_path / "in" / name), kind)
    error = outcome_within(lambda: read(path))
    assert isinstance(error, expected), error
    what = {"fifo": "a FIFO", "/dev/zero": "a character device", "folder": "a folder"}[kind]
    assert path in str(error) and what in str(error) and "\n" not in str(error), error


def test_a_linked_regular_file_is_read_as_that_file(tmp_path):
    """A checkpoint linked from elsewhere is a checkpoint: links to regular files are followed
    (only the lock and the evaluation store refuse links)."""
    state = {"ema_model": {"w": torch.ones(2)}, "step": 3}
    torch.save(state, tmp_path / "real.pt")
    os.symlink(tmp_path / "real.pt", tmp_path / "ckpt.pt")
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["step"] == 3


def test_a_text_file_past_its_bound_is_refused_without_reading_it_whole(tmp_path):
    """A config.json or flagfile of megabytes is not one: refused by its size."""
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": "' + b"x" * (files.TEXT_LIMIT + 1) + b'"}')
    with pytest.raises(convert.ConversionError, match="config.json is 1.0 MB, more than the 1.0 MB"):
        convert.read_json(str(path))
    flagfile = tmp_path / "flagfile.txt"
    flagfile.write_bytes(b"--ch=32\n" * (files.TEXT_LIMIT // 8 + 1))
    with pytest.raises(files.NotARegularFile, match="flagfile.txt is"):
        files.read_text(str(flagfile))
    small = tmp_path / "small.json"
    small.write_text('{"sample_size": 8}')
    assert convert.read_json(str(small)) == {"sample_size": 8}


class Payload:
    """Unpickling it would create a folder: the code a malicious file runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("zipped", [True, False])
def test_a_refused_pickled_bin_runs_nothing_and_does_not_invite_weights_only_false(tmp_path, zipped):
    """torch's refusal advises rerunning with weights_only=False, which would run the payload:
    the line names what the file calls and never repeats that advice."""
    marker = str(tmp_path / "payload_ran")
    folder = tmp_path / "unet"
    folder.mkdir()
    torch.save({"conv_in.weight": torch.ones(1), "extra": Payload(marker)},
               folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    with pytest.raises(convert.ConversionError) as refused:
        convert.read_weights(str(folder))
    assert "posix.mkdir" in str(refused.value) and "weights_only" not in str(refused.value)
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- 16-bit images


def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """PIL converts a 16-bit PNG (mode I;16) to 8 bits by clipping at 255: a folder of them
    trained on saturated images (95% of pixels 255). Here each pixel is round(v * 255 / 65535),
    the 8-bit value of the same brightness."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, size=(3, 8, 8), dtype=np.uint16)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode == "I;16"
    dataset = datasets.ImageFiles(str(tmp_path), img_size=8, flip=False, channels=1)
    expected = np.rint(pixels.astype(np.float64) * 255 / 65535)
    for i in range(3):
        np.testing.assert_array_equal(dataset.pixels(i)[0].numpy(), expected[i])
    scored = load_images(str(tmp_path))  # --eval_dir reads them the same way, as RGB
    np.testing.assert_array_equal((scored[:, 0] * 255).round().numpy(), expected)


def test_pixels_of_no_known_range_are_one_line(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "deep.tiff")
    dataset = datasets.ImageFiles(str(tmp_path), img_size=8, flip=False, channels=1)
    with pytest.raises(datasets.DatasetError, match="deep.tiff: its pixels are 32-bit integer"):
        dataset.pixels(0)


def test_the_readers_that_existed_still_read_their_files(tmp_path):
    """The same files through the new way of opening: statistics, a folder of images."""
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    mu, sigma = load_statistics(str(tmp_path / "stats.npz"), "make them")
    assert mu.tolist() == [0, 0, 0] and sigma.shape == (3, 3)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((4, 4, 3), 128, dtype=np.uint8)).save(folder / "a.png")
    assert load_images(str(folder)).shape == (1, 3, 4, 4)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buffer)
    (tmp_path / "ckpt.pt").write_bytes(buffer.getvalue())
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["w"].tolist() == [1.0]
