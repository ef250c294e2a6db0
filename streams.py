"""The random streams. Every random draw comes from a generator seeded by (--seed, stream,
index...), so that a run is the same on 1 or N processes and with any number of micro-batches,
resumes exactly, and an evaluation can restart at any batch. Only dropout draws from the
per-process RNG, whose state the checkpoint keeps (rng_state).
"""
import random

import numpy as np
import torch

# The independent streams: training data order, per-step flips/timesteps/noise, the fixed x_T
# of the training-time grids and their sampling noise, evaluation batches, bits/dim batches,
# progressive and interpolation runs, the labels a class-conditional run drops.
DATA_ORDER, TIMESTEP_NOISE, X_T, SAMPLE_NOISE, EVAL_NOISE, BPD_NOISE, INSPECT_NOISE, LABEL_DROP = range(8)


def stream_seed(*key):
    """A 63-bit seed for one (seed, stream, index...) key: distinct keys give unrelated streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(device, *key):
    """A torch.Generator on device seeded by stream_seed(*key)."""
    return torch.Generator(device).manual_seed(stream_seed(*key))


def step_draws(seed, step, global_batch, img_shape, T, device, t_probabilities=None):
    """Flip mask, timesteps and noise for the whole global batch of a training step, drawn on
    the device (seeding a generator there needs no synchronisation); each process slices it.
    t is uniform, or drawn from t_probabilities (float64 (T,), the same on every process) by
    inverting its cumulative sum at uniform draws."""
    gen = generator(device, seed, TIMESTEP_NOISE, step)
    flip = torch.rand(global_batch, generator=gen, device=device) < 0.5
    if t_probabilities is None:
        t = torch.randint(T, (global_batch,), generator=gen, device=device)
    else:
        u = torch.rand(global_batch, generator=gen, device=device, dtype=torch.float64)
        cumulative = torch.cumsum(t_probabilities.to(device), 0)
        # the sum may end a rounding short of 1: a draw above it is the last step
        t = torch.searchsorted(cumulative, u, right=True).clamp(max=T - 1)
    noise = torch.randn((global_batch, *img_shape), generator=gen, device=device)
    return flip, t, noise


def label_drops(seed, step, global_batch, probability, device):
    """Which examples of a training step's global batch lose their label (True: trained as
    "no label", for classifier-free guidance), each with the given probability; a stream of
    its own, so that an unconditional run draws exactly what it drew before."""
    gen = generator(device, seed, LABEL_DROP, step)
    return torch.rand(global_batch, generator=gen, device=device) < probability


def rng_state():
    """This process's RNG states as tensors and plain values, which weights_only loading reads."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restores rng_state(), or the ndarray numpy state of checkpoints before it."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
