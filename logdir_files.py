"""A run's logdir: the names of the files in it, written once here, and what start-up makes
in it (the folder, its lock, flagfile.txt) and takes back after a command that failed.

    <logdir>/ckpt.pt          the checkpoint (train.py; read by --eval, --resume, convert.py)
    <logdir>/flagfile.txt     the run's flags (`python main.py --flagfile <logdir>/flagfile.txt`)
    <logdir>/eval.txt         one JSON line per score, with its protocol record
    <logdir>/eval_state/      the resumable evaluation stores (store.py)
    <logdir>/samples_ema.png  the first samples of the last --eval
    <logdir>/classes.txt      a class-conditional run's class names, line k naming class k
"""
import contextlib
import os
import sys

import files
import lock
from config import ConfigError

CKPT = "ckpt.pt"
FLAGFILE = "flagfile.txt"
EVAL_LOG = "eval.txt"
EVAL_STATE = "eval_state"
SAMPLES_GRID = "samples_ema.png"
CLASSES = "classes.txt"


def ckpt_path(logdir):
    return os.path.join(logdir, CKPT)


def flagfile_path(logdir):
    return os.path.join(logdir, FLAGFILE)


def check_writable(folder):
    """--logdir can be written, checked without making it: a probe file in it, or in its nearest
    existing parent while it is still to be made (rank 0 makes it once every check passed)."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    try:
        probe = os.path.join(existing, f".write_test.{os.getpid()}")  # one per process: no race
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--logdir {folder} is not writable: {error.strerror}") from None


class StartUpFiles:
    """What start-up made in the logdir (rank 0): its folders, when new, and flagfile.txt.
    take_back() removes them after a failed command unless something else came of it."""

    def __init__(self):
        self.logdir, self.folders, self.files = None, [], []

    def take_back(self):
        """Best effort: the command's own error is what it reports."""
        if self.logdir is None:
            return
        ours = {os.path.basename(path) for path in self.files} | {lock.NAME}
        with contextlib.suppress(OSError):
            if set(os.listdir(self.logdir)) - ours:
                return  # a checkpoint, TensorBoard's file, samples: kept, with the flagfile that explains them
            for path in self.files:
                os.remove(path)
            if self.folders:
                os.remove(os.path.join(self.logdir, lock.NAME))
                for folder in self.folders:  # the deepest first
                    os.rmdir(folder)


def prepare(logdir, train, resume, flagfile_text, made):
    """Rank 0, once its checks have passed: the logdir made if new and locked, stale temporary
    files removed (train), flagfile.txt written (train but not resume: flagfile_text);
    `made` (StartUpFiles) notes what this made."""
    missing, folder = [], os.path.abspath(logdir)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--logdir {logdir} is not writable: {error.strerror}") from None
    lock.hold(logdir)
    made.logdir, made.folders = logdir, missing
    if train:
        # a killed save's ckpt.pt.tmp would keep a full disk full
        for name in files.remove_stale_temporaries(logdir):
            print(f"note: removed {name} in {logdir}, left by an interrupted write", file=sys.stderr)
    if train and not resume:
        # replaces a stale file (a run that died before its first checkpoint) in one rename
        path = flagfile_path(logdir)
        files.write_bytes(path, flagfile_text.encode())
        made.files.append(path)
