"""Checkpoints: written atomically, read with one-line errors.

ckpt.pt is a dict with the seed port's keys (net_model, ema_model, sched, optim, step, x_T)
plus rng (every process's RNG states) and world_size.
"""
import os

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the flags."""


def save(path, state):
    """Write to a temporary file beside path, then rename: a crash mid-write leaves the
    previous checkpoint in place."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load(path):
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: the checkpoint holds numpy/python RNG states. Only load
        # checkpoints you trust.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None


def load_weights(module, state_dict, path):
    """load_state_dict(strict=True), with the first mismatch named in one line."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the flags: "
            + (f"{len(missing)} tensors missing (first: {missing[0]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else ""))
    for name, tensor in expected.items():
        if state_dict[name].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {path} does not fit the flags: {name} has shape "
                f"{tuple(state_dict[name].shape)} there, the flags build {tuple(tensor.shape)}")
    module.load_state_dict(state_dict, strict=True)
