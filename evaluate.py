"""Evaluation: draw samples with the EMA model, sharded over processes, and score them.

Sample batch i is drawn from a generator seeded by (--seed, i), and process r draws the
r-th contiguous block of batches: the images, and their order once gathered, are the same
whatever the number of processes.
"""
import json
import os
import time

import torch
from torchvision.utils import save_image
from tqdm import tqdm

import checkpoint
import distributed
import speed
from score import Evaluator, gather, load_images, save_images
from train import build_model, build_sampler, grid, stream_seed

EVAL_NOISE = 4  # a stream beside train.py's
GRID_IMAGES = 256


def make_evaluator(flags, device):
    """The scorer for this run's data; raises ScoreError for missing weights or statistics."""
    feature = flags.fid_feature or ("digits" if flags.dataset == "digits" else "inception")
    return Evaluator(feature, flags.fid_cache or None, device, flags.inception_weights,
                     quantize=flags.fid_quantize, dataset=flags.dataset,
                     data_root=flags.data_root, img_size=flags.img_size)


def my_block(count):
    """This process's contiguous share [first, last) of count items."""
    rank, world_size = distributed.rank(), distributed.world_size()
    return count * rank // world_size, count * (rank + 1) // world_size


@torch.no_grad()
def generate(flags, sampler, num_images, device, desc="generating"):
    """This process's share of num_images samples in [-1, 1], the index of its first
    sample, and the first GRID_IMAGES samples of all processes (on every process)."""
    shape = (flags.img_channels, flags.img_size, flags.img_size)
    batch = flags.eval_batch_size
    first_batch, last_batch = my_block(-(-num_images // batch))
    images, grid_part = [], []
    for i in tqdm(range(first_batch, last_batch), desc=desc, disable=not distributed.is_main(),
                  dynamic_ncols=True, leave=False):
        size = min(batch, num_images - i * batch)
        generator = torch.Generator(device).manual_seed(stream_seed(flags.seed, EVAL_NOISE, i))
        x_T = torch.randn((size, *shape), generator=generator, device=device)
        x_0 = sampler(x_T, generator=generator)
        images.append(x_0)
        grid_part += [(i * batch + k, x.cpu()) for k, x in enumerate(x_0) if i * batch + k < GRID_IMAGES]
    first = sorted((pair for part in distributed.gather_objects(grid_part) for pair in part),
                   key=lambda pair: pair[0])
    mine = torch.cat(images) if images else torch.empty((0, *shape), device=device)
    return mine, first_batch * batch, torch.stack([x for _, x in first])


def score(evaluator, images):
    """Scores of every process's images (in [0, 1]); the same dict on every process."""
    features, logits = evaluator.features(images, progress=distributed.is_main())
    return evaluator.score(gather(features), gather(logits))


def report(flags, scores, step, writer=None):
    """Print, append a JSON line to <logdir>/eval.txt and log to TensorBoard (main process)."""
    if not distributed.is_main():
        return
    print(", ".join(f"{name} {value:.4f}" for name, value in scores.items()))
    with open(os.path.join(flags.logdir, "eval.txt"), "a") as file:
        file.write(json.dumps({"step": step, "time": time.time(), **scores}) + "\n")
    if writer is not None:
        for name, value in scores.items():
            writer.add_scalar(name, value, step)


def load_ema(flags, device):
    path = os.path.join(flags.logdir, "ckpt.pt")
    state = checkpoint.load(path)
    ema = build_model(flags)
    checkpoint.load_weights(ema, state["ema_model"], path)
    return ema.to(device).eval(), state.get("step")


def evaluate(flags, device_type):
    """--eval: score --eval_dir, or draw --num_images samples with the EMA model and score them."""
    device = distributed.local_device(device_type)
    evaluator = make_evaluator(flags, device)  # missing weights or statistics fail before sampling
    if flags.eval_dir:
        everything = load_images(flags.eval_dir)
        first, last = my_block(len(everything))
        report(flags, score(evaluator, everything[first:last]), step=None)
        return
    fast = speed.settings(flags, device_type, distributed.world_size())
    ema, step = load_ema(flags, device)
    sampler = build_sampler(flags, speed.fast(speed.to_layout(ema, fast), fast)).to(device)
    images, first_index, first = generate(flags, sampler, flags.num_images, device)
    images = (images + 1) / 2
    if distributed.is_main():
        save_image(grid(first), os.path.join(flags.logdir, "samples_ema.png"))
    if flags.save_samples:
        save_samples(flags.save_samples, images, first_index)
    report(flags, score(evaluator, images), step)


def save_samples(path, images, first_index):
    """A folder of PNGs, each process writing its own; or one .npz, written by the main process."""
    if path.endswith(".npz"):
        everything = gather(images)
        if distributed.is_main():
            save_images(everything, path)
    else:
        save_images(images, path, start=first_index)


def evaluate_during_training(flags, evaluator, sampler, step, writer):
    images, _, _ = generate(flags, sampler, flags.eval_num_images, sampler.betas.device,
                            desc=f"evaluating step {step}")
    report(flags, score(evaluator, (images + 1) / 2), step, writer)
