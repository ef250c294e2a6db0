"""Evaluation: draw samples with the EMA model, sharded over processes, and score them.

Sample batch i is drawn from a generator seeded by (--seed, i), and process r draws the
batches i = r, r + P, ...: the images are the same whatever the number of processes.
"""
import os

import torch
from torchvision.utils import save_image
from tqdm import tqdm

import checkpoint
import distributed
from train import build_model, build_sampler, grid, stream_seed

EVAL_NOISE = 5  # a stream beside train.py's
GRID_IMAGES = 256


@torch.no_grad()
def generate(flags, sampler, num_images, device, desc="generating"):
    """This process's share of num_images samples in [-1, 1], and the first GRID_IMAGES
    samples of all processes (on every process), in order."""
    rank, world_size = distributed.rank(), distributed.world_size()
    shape = (flags.img_channels, flags.img_size, flags.img_size)
    batch = flags.eval_batch_size
    batch_indices = range(rank, -(-num_images // batch), world_size)
    images, grid_part = [], []
    for i in tqdm(batch_indices, desc=desc, disable=rank != 0, dynamic_ncols=True):
        size = min(batch, num_images - i * batch)
        generator = torch.Generator(device).manual_seed(stream_seed(flags.seed, EVAL_NOISE, i))
        x_T = torch.randn((size, *shape), generator=generator, device=device)
        x_0 = sampler(x_T, generator=generator)
        images.append(x_0)
        grid_part += [(i * batch + k, x.cpu()) for k, x in enumerate(x_0) if i * batch + k < GRID_IMAGES]
    first = sorted((pair for part in distributed.gather_objects(grid_part) for pair in part),
                   key=lambda pair: pair[0])
    mine = torch.cat(images) if images else torch.empty((0, *shape), device=device)
    return mine, torch.stack([x for _, x in first])


def load_ema(flags, device):
    path = os.path.join(flags.logdir, "ckpt.pt")
    state = checkpoint.load(path)
    ema = build_model(flags)
    checkpoint.load_weights(ema, state["ema_model"], path)
    return ema.to(device).eval()


def evaluate(flags, device_type):
    device = distributed.local_device(device_type)
    ema = load_ema(flags, device)
    sampler = build_sampler(flags, ema).to(device)
    images, first = generate(flags, sampler, flags.num_images, device)
    if distributed.is_main():
        save_image(grid(first), os.path.join(flags.logdir, "samples_ema.png"))
        print(f"saved {os.path.join(flags.logdir, 'samples_ema.png')}")
    return images


def evaluate_during_training(flags, ema, step, writer):
    raise NotImplementedError
