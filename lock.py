"""One command per logdir. A command that writes into a logdir (training, evaluation, the
looking-inside runs, convert.py) first takes an advisory lock on <logdir>/.lock (fcntl.flock)
and keeps it until it exits, however it exits: the kernel drops the lock with the process,
so a killed command never leaves the logdir locked. A second command finds it taken and stops
with one line naming the holder (pid, host, command) before it touches anything.

flock locks are per host: on a shared filesystem two machines are not kept apart by it
(NFS may or may not pass the lock on); run each logdir's commands from one machine.

The lock file is opened without following a symbolic link and written only if it is a
regular file with no other name (hard link): in a shared logdir, a `.lock` planted as a link
to someone's file must not make a command overwrite that file with the lock's record.
"""
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time

import files
from errors import UserError

NAME = ".lock"
_held = {}  # real path of the logdir -> the open file that holds its lock, for this process's life


class LogdirBusy(UserError):
    """Another command holds the logdir, or its lock file is not one."""


RECORD_LIMIT = 2 ** 16


def holder(path):
    """'pid P on HOST (COMMAND), since TIME' of the lock file's record, or a plain phrase."""
    try:
        record = json.loads(files.read_regular(path, RECORD_LIMIT, follow_links=False))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
        return f"pid {record['pid']} on {record['host']} ({record['command']}), since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def hold(logdir, command=None):
    """Take the logdir's lock for the rest of this process's life (again: no-op); LogdirBusy
    if another process holds it. The logdir must exist."""
    key = os.path.realpath(logdir)
    if key in _held:
        return
    path = os.path.join(logdir, NAME)
    not_a_lock = (f"{path} is {{}}, not the lock file this program writes: remove it (rm {path}) "
                  "and run the command again; nothing was written")
    try:  # O_NONBLOCK: a FIFO would block the open; O_NOFOLLOW: a link is refused, its target untouched
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR):
            raise LogdirBusy(not_a_lock.format("a symbolic link" if error.errno == errno.ELOOP
                                               else "a folder")) from None
        raise LogdirBusy(f"cannot lock {logdir}: {error.strerror}") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(descriptor)
        kind = files.kind_of(info.st_mode) if not stat.S_ISREG(info.st_mode) else "a file with other names (hard links)"
        raise LogdirBusy(not_a_lock.format(kind))
    file = os.fdopen(descriptor, "r+b")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise LogdirBusy(f"{logdir} is in use by {holder(path)}: wait until it ends, or use another "
                         "--logdir; nothing was changed") from None
    os.set_blocking(descriptor, True)
    file.truncate(0)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
              "command": command or " ".join(sys.argv)}
    file.write(json.dumps(record).encode())
    file.flush()
    _held[key] = file


def release_all():
    """Give up every lock this process holds: for a caller that runs several commands in its
    own process, one after another (the tests), as each process's exit would."""
    while _held:
        _held.popitem()[1].close()
