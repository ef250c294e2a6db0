"""The resumable evaluation store: the finished sample batches of one --eval, kept on disk
in <logdir>/eval_state/<key>/ so that an interrupted evaluation continues where it stopped.
evaluate.py decides what a batch holds and what the key depends on; this module keeps the
batches, checks them before they are used, and deletes only what it wrote.
"""
import hashlib
import json
import os
import re
import shlex
import stat
import sys

import torch

import distributed
import files
import logdir_files
from errors import UserError

STORE_MARKER = "ddpm-eval"  # identity.json's "store": a folder this program made and may delete from
OWN_FILE = re.compile(r"(identity\.json|batch_\d{6,}\.pt)(\.\d+\.tmp)?")  # what a store writes
BATCH_FILE = re.compile(r"batch_(\d{6,})\.pt")
IDENTITY_LIMIT = 2 ** 20


class StoreError(UserError, RuntimeError):
    """An evaluation store that cannot be made, or a finished batch that cannot be used."""


def read_identity(folder):
    """The JSON of folder/identity.json if it is a regular file (a symlink is not followed),
    else None."""
    try:
        return json.loads(files.read_regular(os.path.join(folder, "identity.json"), IDENTITY_LIMIT,
                                             follow_links=False))
    except (OSError, ValueError):  # files.NotARegularFile is an OSError
        return None


def is_store(folder):
    """Whether folder is a folder (not a symlink to one) with a store's identity record."""
    record = read_identity(folder) if os.path.isdir(folder) and not os.path.islink(folder) else None
    return isinstance(record, dict) and record.get("store") == STORE_MARKER


def other_stores(root, key):
    """[(path, finished batches, bytes)] of the stores in root but key's, by name."""
    found = []
    for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
        if entry.name != key and is_store(entry.path):
            inside = [item for item in os.scandir(entry.path) if item.is_file(follow_symlinks=False)]
            found.append((entry.path, sum(1 for item in inside if item.name.startswith("batch_")),
                          sum(item.stat(follow_symlinks=False).st_size for item in inside)))
    return found


def mismatch(record, layout):
    """Why a loaded batch is not what this evaluation writes (keys, each tensor's dtype and
    shape, finite numbers), or None when it is."""
    if not isinstance(record, dict) or set(record) != set(layout):
        found = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        return f"keys {found}, expected {sorted(layout)}"
    for name, (dtype, shape) in layout.items():
        tensor = record[name]
        if not torch.is_tensor(tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            found = (f"{str(tensor.dtype)[6:]} {tuple(tensor.shape)}" if torch.is_tensor(tensor)
                     else type(tensor).__name__)
            return f"{name} is {found}, expected {str(dtype)[6:]} {shape}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} holds NaN or inf"
    return None


class BatchStore:
    """The finished batches of one --eval: <logdir>/eval_state/<key>/batch_<i>.pt, each a dict
    of tensors written atomically, beside identity.json (marked "store": STORE_MARKER), which
    makes the folder this store's. key: a hash of `identity`, everything the batches depend
    on. layout(i): {name: (dtype, shape)} of batch i; a batch is used only once it fits.

    It deletes only what it wrote: a finished batch that does not fit (to draw it again), and
    at the end its own files and then its folder. Other stores (other flags or another
    checkpoint) are kept, since a quick check must not cost an interrupted long evaluation
    its batches, and listed; whatever else is in eval_state is left alone. eval_state may be
    a symlink to scratch storage for a large evaluation: it is used, not refused (that is why
    it was linked), the store deletes there only what it wrote, as anywhere, and the link and
    the folder it points to are never removed."""

    def __init__(self, logdir, identity, layout):
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.root = os.path.join(logdir, logdir_files.EVAL_STATE)
        self.folder = os.path.join(self.root, self.key)
        self.layout = layout
        if distributed.is_main():
            self.open(identity)
        distributed.barrier()

    def open(self, identity):
        """Make this store's folder, or take it up again (main process); list the others."""
        expected = json.loads(json.dumps(identity))  # as identity.json holds it: lists, not tuples
        record = read_identity(self.folder)
        mine = is_store(self.folder) and record.get("identity") == expected
        legacy = record == expected and not os.path.islink(self.folder)  # before stores were marked
        try:
            os.makedirs(self.root, exist_ok=True)
            if not os.path.lexists(self.folder):
                os.mkdir(self.folder)
            elif not (mine or legacy or (os.path.isdir(self.folder) and not os.path.islink(self.folder)
                                         and not os.listdir(self.folder))):
                raise StoreError(f"{self.folder} is not this evaluation's store (it has no identity.json "
                                 "of it): move it away, or use another --logdir; nothing was changed")
        except OSError as error:
            broken = os.path.islink(self.root) and not os.path.exists(self.root)  # purged scratch storage
            raise StoreError(f"cannot make {self.folder}: " + (
                f"{self.root} links to {os.readlink(self.root)}, which does not exist" if broken
                else error.strerror or str(error))) from None
        files.write_bytes(os.path.join(self.folder, "identity.json"), json.dumps(
            {"store": STORE_MARKER, "identity": identity}, indent=1, sort_keys=True).encode())
        others = other_stores(self.root, self.key)
        if others:
            listed = "; ".join(f"{os.path.basename(path)}: {count} batches, {files.readable(size)}"
                               for path, count, size in others)
            print(f"note: {len(others)} other unfinished evaluation(s) kept in {self.root} ({listed}): "
                  f"remove them with rm -r {' '.join(shlex.quote(path) for path, _, _ in others)}",
                  file=sys.stderr)

    def path(self, i):
        return os.path.join(self.folder, f"batch_{i:06d}.pt")

    def read(self, i):
        """(batch i, None), or (None, why it cannot be used). Only a regular file is read, never
        a link: what the store did not write (a link to a file elsewhere) is not a batch."""
        try:
            with files.open_regular(self.path(i), follow_links=False) as file:
                record = torch.load(file, map_location="cpu", weights_only=True)
        except files.NotARegularFile as error:
            return None, str(error)
        except Exception as error:
            detail = str(error).splitlines()[0] if str(error) else "no detail"
            return None, f"{type(error).__name__}: {detail}"
        why = mismatch(record, self.layout(i))
        return (None, why) if why else (record, None)

    def finished(self, batches):
        """Those of `batches` (a range) already on disk and sound, found in one listing of the
        folder. Each is loaded and checked against its layout; one that does not fit, or is no
        regular file (a link, a FIFO, an empty folder), is removed with a note, to be drawn
        again (batch i's noise is seeded by i: the same batch). A folder that holds something
        in a batch's place is not the store's to delete: one line."""
        done = set()
        found = sorted(int(match[1]) for name in os.listdir(self.folder) if (match := BATCH_FILE.fullmatch(name)))
        for i in (i for i in found if i in batches):
            why = self.read(i)[1]
            if why is None:
                done.add(i)
                continue
            print(f"note: {self.path(i)} is unreadable or malformed ({why}); drawing batch {i} again",
                  file=sys.stderr)
            try:  # os.remove takes a link away, never what it points to
                if stat.S_ISDIR(os.lstat(self.path(i)).st_mode):
                    os.rmdir(self.path(i))
                else:
                    os.remove(self.path(i))
            except OSError as error:
                raise StoreError(f"{self.path(i)} is in the place of batch {i} and cannot be removed "
                                 f"({error.strerror}): move it away and run the command again") from None
        return done

    def save(self, i, tensors):
        files.write_atomically(self.path(i), lambda file: torch.save(tensors, file),
                               files.state_size(tensors))

    def load(self, i):
        record, why = self.read(i)
        if why:
            raise StoreError(f"{self.path(i)} is unreadable or malformed ({why}); run the same command "
                             "again to draw that batch again")
        return record

    def remove(self):
        """Delete the files this store writes and then its folder, and eval_state once empty
        unless it is a symlink. os.remove never follows a symlink; a folder that holds anything
        else stays."""
        for entry in os.scandir(self.folder):
            if OWN_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
        try:
            os.rmdir(self.folder)
        except OSError:
            print(f"note: kept {self.folder}: it holds files this evaluation did not write", file=sys.stderr)
            return
        if not os.path.islink(self.root) and not os.listdir(self.root):
            os.rmdir(self.root)
