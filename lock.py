"""One command per logdir. A command that writes into a logdir (training, evaluation, the
looking-inside runs, convert.py) first takes an advisory lock on <logdir>/.lock (fcntl.flock)
and keeps it until it exits, however it exits: the kernel drops the lock with the process,
so a killed command never leaves the logdir locked. A second command finds it taken and stops
with one line naming the holder (pid, host, command) before it touches anything.

flock locks are per host: on a shared filesystem two machines are not kept apart by it
(NFS may or may not pass the lock on); run each logdir's commands from one machine.
"""
import fcntl
import json
import os
import socket
import sys
import time

from errors import UserError

NAME = ".lock"
_held = {}  # real path of the logdir -> the open file that holds its lock, for this process's life


class LogdirBusy(UserError):
    """Another command holds the logdir."""


def holder(path):
    """'pid P on HOST (COMMAND), since TIME' of the lock file's record, or a plain phrase."""
    try:
        with open(path) as file:
            record = json.load(file)
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
    try:
        file = open(path, "a+")
    except OSError as error:
        raise LogdirBusy(f"cannot lock {logdir}: {error.strerror}") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise LogdirBusy(f"{logdir} is in use by {holder(path)}: wait until it ends, or use another "
                         "--logdir; nothing was changed") from None
    file.truncate(0)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
              "command": command or " ".join(sys.argv)}
    file.write(json.dumps(record))
    file.flush()
    _held[key] = file
