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
import stat

import torch

from errors import UserError

TEMPORARY = ".tmp"


class WriteError(UserError, RuntimeError):
    """A file that could not be written; the message names it and the space it needed."""


def readable(size):
    for unit, scale in (("TB", 2 ** 40), ("GB", 2 ** 30), ("MB", 2 ** 20), ("kB", 2 ** 10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
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


class NotARegularFile(UserError, OSError):
    """A file to read that is not a regular file (a FIFO, a device, a folder, a link where
    none may be) or is larger than its format allows. An OSError too, so that code which
    treats an unreadable file as absent (a cache, say) treats this one so."""


KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
TEXT_LIMIT = 2 ** 20  # a flagfile or a JSON config of a megabyte is not one


def kind_of(mode):
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def open_regular(path, limit=None, follow_links=True):
    """path opened for binary reading if it is a regular file of at most `limit` bytes (None:
    any size), else NotARegularFile naming it. The kind is checked on the opened descriptor,
    not on the name, so that nothing swapped in meanwhile is read; the open itself cannot
    block (O_NONBLOCK: a FIFO would wait for a writer). follow_links=False refuses a
    symbolic link; otherwise a link to a regular file is that file. Other failures (absent,
    no permission) are the OSError of open."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_links:
            raise NotARegularFile(f"{path} is a symbolic link, not a regular file") from None
        raise
    info = os.fstat(descriptor)
    why = None
    if not stat.S_ISREG(info.st_mode):
        why = f"{path} is {kind_of(info.st_mode)}, not a regular file"
    elif limit is not None and info.st_size > limit:
        why = f"{path} is {readable(info.st_size)}, more than the {readable(limit)} such a file can be"
    if why:
        os.close(descriptor)
        raise NotARegularFile(why)
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_regular(path, limit=None, follow_links=True):
    """The bytes of a regular file (open_regular); at most limit + 1 are read, so that a file
    that grows while it is read is refused too, not read without end."""
    with open_regular(path, limit, follow_links) as file:
        content = file.read() if limit is None else file.read(limit + 1)
    if limit is not None and len(content) > limit:
        raise NotARegularFile(f"{path} is more than the {readable(limit)} such a file can be")
    return content


def read_text(path):
    """A small text file (a flagfile) as a string; one line if it is not a regular file of
    at most TEXT_LIMIT bytes of UTF-8 text."""
    try:
        return read_regular(path, TEXT_LIMIT).decode("utf-8")
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
