"""Evaluation: draw samples with the EMA model, sharded over processes, and score them.

Sample batch i is drawn from a generator seeded by (--seed, i), and process r draws the
r-th contiguous block of batches: the images, and their order once gathered, are the same
whatever the number of processes.
"""
import json
import os
import sys
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import checkpoint
import data
import distributed
import files
import speed
import tools
from score import Evaluator, default_feature, gather, load_images, save_images
from train import build_model, build_sampler, grid, stream_seed

EVAL_NOISE, BPD_NOISE, INSPECT_NOISE = 4, 5, 6  # streams beside train.py's
GRID_IMAGES = 256


def make_evaluator(flags, device):
    """The scorer for this run's data; raises ScoreError for missing weights or statistics."""
    feature = flags.fid_feature or default_feature(flags.dataset)
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
    numbers = {name: value for name, value in scores.items() if name != "warning"}
    if "warning" in scores:
        print(f"warning: {scores['warning']}", file=sys.stderr)
    print(", ".join(f"{name} {value:.4f}" for name, value in numbers.items()))
    files.append_line(os.path.join(flags.logdir, "eval.txt"),
                      json.dumps({"step": step, "time": time.time(), **scores}))
    if writer is not None:
        for name, value in numbers.items():
            writer.add_scalar(name, value, step)


def load_ema(flags, device):
    path = os.path.join(flags.logdir, "ckpt.pt")
    state = checkpoint.load(path, required=("ema_model",))
    ema = build_model(flags, checkpoint.layout_of(state, path, flags.layout))
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
        files.save_png(grid(first), os.path.join(flags.logdir, "samples_ema.png"))
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


def bits_per_dim(flags, device_type):
    """--bpd: the variational bound of the EMA model on a dataset split (official
    calc_bpd_loop), each process on its contiguous share, the sums combined."""
    device = distributed.local_device(device_type)
    ema, _ = load_ema(flags, device)
    # fp32 network: every bound term after it is float64
    sampler = build_sampler(flags, ema, full_chain=True).to(device)
    dataset = data.build_dataset(flags.dataset, flags.data_root, flags.img_size,
                                 train=flags.bpd_split == "train", flip=False, channels=flags.img_channels)
    # whole batches per process, each batch's noise seeded by its global index: the same
    # sums on any number of processes
    count, batch = min(len(dataset), flags.bpd_num_images or len(dataset)), flags.eval_batch_size
    first_batch, last_batch = my_block(-(-count // batch))
    loader = DataLoader(Subset(dataset, range(first_batch * batch, min(last_batch * batch, count))),
                        batch_size=batch, num_workers=flags.num_workers)

    def generator(n):
        return torch.Generator(device).manual_seed(stream_seed(flags.seed, BPD_NOISE, first_batch + n))
    sums = tools.bpd_sums(sampler, loader, progress=distributed.is_main(), generator=generator)
    sums = {name: distributed.all_reduce_sum(value) for name, value in sums.items()}
    if distributed.is_main():
        summary = tools.save_bpd(sums, flags.logdir)
        print(f"bits/dim {summary['total_bpd']:.4f} +- {summary['total_bpd_stderr']:.4f} "
              f"(prior {summary['prior_bpd']:.2e}) over {summary['num_images']} {flags.bpd_split} "
              f"images; wrote {os.path.join(flags.logdir, 'bpd.json')} and bpd.png")


def interpolation_image(flags, name, dataset):
    """--interp_images entry: an index into the training set, or an image file."""
    if name.isdigit():
        return dataset[int(name)][0]
    try:
        with Image.open(name) as image:
            return data.image_transform(flags.img_size, False, flags.img_channels)(image.convert("RGB"))
    except OSError as error:
        raise data.DatasetError(f"--interp_images: {name} is neither a training-set index nor a "
                                f"readable image ({error})") from None


def look_inside(flags, device_type):
    """--progressive_every and --interp_t with the EMA model, on the main process."""
    if not distributed.is_main():
        return
    device = distributed.local_device(device_type)
    ema, _ = load_ema(flags, device)
    sampler = build_sampler(flags, ema).to(device)
    generator = torch.Generator(device).manual_seed(stream_seed(flags.seed, INSPECT_NOISE))
    if flags.progressive_every > 0:
        x_T = torch.randn((flags.sample_size, flags.img_channels, flags.img_size, flags.img_size),
                          generator=generator, device=device)
        progressive = tools.progressive_samples(sampler, x_T, flags.progressive_every, generator)
        paths = tools.save_progressive(progressive, os.path.join(flags.logdir, "progressive"))
        print(f"wrote {len(paths) - 1} strips and {paths[-1]}")
    if flags.interp_t:
        dataset = data.build_dataset(flags.dataset, flags.data_root, flags.img_size, train=True,
                                     flip=False, channels=flags.img_channels)
        x0_a, x0_b = (interpolation_image(flags, name, dataset)[None].to(device)
                      for name in flags.interp_images)
        lambdas = torch.linspace(0, 1, flags.interp_lambdas).tolist()
        folder = os.path.join(flags.logdir, "interpolation")
        os.makedirs(folder, exist_ok=True)
        for t in map(int, flags.interp_t):
            mixed = tools.interpolate(sampler, x0_a, x0_b, t, lambdas, generator)
            tools.save_interpolation(os.path.join(folder, f"t{t}.png"), x0_a, x0_b, mixed)
        print(f"wrote {len(flags.interp_t)} interpolation grids under {folder}")
