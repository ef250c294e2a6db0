"""Files written whole or not at all, with one clear line when the disk is full.

Each file goes to `<path>.<pid>.tmp` (one per process, so that processes writing the same file
at once never mix their bytes), is flushed to disk and renamed over `path`: a crash or a full
disk leaves the previous version in place, and a failed write removes its temporary file so
that it does not keep the disk full.
"""
import errno
import glob
import io
import os
import shutil

import torch

from errors import UserError

TEMPORARY = ".tmp"


class WriteError(UserError, RuntimeError):
    """A file that could not be written; the message names it and the space it needed."""


def readable(size):
    for unit, scale in (("MB", 2 ** 20), ("kB", 2 ** 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def write_atomically(path, write, size):
    """write(file) into a temporary file, fsync, rename over path; size: about how many bytes
    it writes.

    On failure the temporary file is removed, path is untouched, and WriteError says which
    file and, when the disk is full, how much space it needed and how much was free.
    """
    temporary = f"{path}.{os.getpid()}{TEMPORARY}"
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        if os.path.exists(temporary):
            os.remove(temporary)
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free
        # torch.save turns the OSError of a full disk into an uninformative RuntimeError
        if getattr(error, "errno", None) == errno.ENOSPC or free < size:
            reason = (f"the disk is full: it needs about {readable(size)}, {readable(free)} are "
                      f"free in {folder}")
        else:
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise WriteError(f"cannot write {path}: {reason}; nothing was changed there") from None


def read_text(path):
    """A small text file (a flagfile) as a string; one line if it is not UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}): a flagfile holds lines "
                        "--name=value") from None


def write_bytes(path, content):
    write_atomically(path, lambda file: file.write(content), len(content))


def append_line(path, line):
    """Append line (no newline) to a small text file: the old lines plus the new one are
    written afresh, so a full disk cannot leave a half-written line."""
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as file:
            old = file.read()
    write_bytes(path, old + line.encode() + b"\n")


def state_size(state):
    """About how many bytes torch.save writes for state: its tensors' storages, each once."""
    storages = {}

    def visit(value):
        if torch.is_tensor(value):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(state)
    return sum(storages.values()) + 2 ** 16  # plus the pickled structure, roughly


def remove_stale_temporaries(folder):
    """Temporary files of writes that a killed process left in folder: their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), "*" + TEMPORARY)))
    for path in stale:
        os.remove(path)
    return [os.path.basename(path) for path in stale]


def save_image(image, path, **options):
    """A PIL image (options: PIL's save options, format included) written whole or not at all."""
    buffer = io.BytesIO()
    image.save(buffer, **{"format": "png", **options})
    write_bytes(path, buffer.getvalue())


def save_png(image, path):
    """A [0, 1] (C, H, W) image or grid as a PNG file, written whole or not at all."""
    from torchvision.utils import save_image
    buffer = io.BytesIO()
    save_image(image, buffer, format="png")
    write_bytes(path, buffer.getvalue())
