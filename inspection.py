"""Looking inside a trained model: bits/dim on a dataset split (--bpd), progressive sampling
(--progressive_every) and interpolation (--interp_t), each with the EMA weights of
<logdir>/ckpt.pt.
"""
import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import bpd
import datasets
import distributed
import files
import reports
from builders import build_diffusion, build_sampler
from checkpoint import load_ema
from streams import BPD_NOISE, INSPECT_NOISE, generator

def bits_per_dim(config, device_type):
    """--bpd: the variational bound of the EMA model on a dataset split (official
    calc_bpd_loop), each process on its contiguous share, the sums combined."""
    device = distributed.local_device(device_type)
    ema, _, _ = load_ema(config, device)  # fp32 network: every bound term after it is float64
    diffusion, inspect, logdir = build_diffusion(config.diffusion).to(device), config.inspect, config.run.logdir
    dataset = datasets.configured(config.data, config.model, train=inspect.bpd_split == "train", flip=False)
    # whole batches per process, each batch's noise seeded by its global index: the same
    # sums on any number of processes
    count = min(len(dataset), inspect.bpd_num_images or len(dataset))
    batch = config.eval.eval_batch_size
    first_batch, last_batch = distributed.my_block(-(-count // batch))
    loader = DataLoader(Subset(dataset, range(first_batch * batch, min(last_batch * batch, count))),
                        batch_size=batch, num_workers=config.data.num_workers)
    conditional = config.model.num_classes > 0
    sums = bpd.bpd_sums(ema, diffusion, loader, config.diffusion.mean_type, config.diffusion.var_type,
                        config.sampling.clip_denoised, progress=distributed.is_main(),
                        generator=lambda n: generator(device, config.run.seed, BPD_NOISE, first_batch + n),
                        conditional=conditional)
    sums = {name: distributed.all_reduce_sum(value) for name, value in sums.items()}
    if distributed.is_main():
        summary = bpd.save_bpd(sums, logdir, conditional)
        print(f"{'conditional ' if conditional else ''}bits/dim {summary['total_bpd']:.4f} +- {summary['total_bpd_stderr']:.4f} "
              f"(prior {summary['prior_bpd']:.2e}) over {summary['num_images']} {inspect.bpd_split} "
              f"images; wrote {os.path.join(logdir, 'bpd.json')} and bpd.png")


def interpolation_image(model, name, dataset):
    """--interp_images entry as (image, its class): an index into the training set, or an
    image file (class None: a file has no label)."""
    if name.isdigit():
        image, label = dataset[int(name)]
        return image, int(label)
    if model.num_classes:
        raise datasets.DatasetError(f"--interp_images {name}: a class-conditional model interpolates "
                                    "training-set images, whose classes are known; give their indices")
    try:
        with files.open_regular(name) as file, Image.open(file) as image:
            return datasets.image_transform(model.img_size, False, model.img_channels)(image), None
    except (OSError, ValueError) as error:  # not a regular file (a FIFO would block), pixels of no known range
        raise datasets.DatasetError(f"--interp_images: {name} is neither a training-set index nor a "
                                f"readable image ({error})") from None


def look_inside(config, device_type):
    """--progressive_every and --interp_t with the EMA model, on the main process."""
    if not distributed.is_main():
        return
    device = distributed.local_device(device_type)
    ema, _, _ = load_ema(config, device)
    sampler = build_sampler(config.sampling, config.diffusion, config.model.num_classes).to(device)
    noise = generator(device, config.run.seed, INSPECT_NOISE)
    model, actions, logdir = config.model, config.actions, config.run.logdir
    if actions.progressive_every > 0:
        x_T = torch.randn((config.training.sample_size, *model.image_shape), generator=noise, device=device)
        labels = None
        if model.num_classes:  # a row of strips per class, as the training-time grids
            labels, _ = reports.class_rows(model.num_classes, len(x_T), device)
            x_T = x_T[:len(labels)]
        progressive = reports.progressive_samples(sampler, ema, x_T, actions.progressive_every, noise, labels)
        paths = reports.save_progressive(progressive, os.path.join(logdir, "progressive"))
        print(f"wrote {len(paths) - 1} strips and {paths[-1]}")
    if actions.interp_t:
        dataset = datasets.configured(config.data, model, flip=False)
        (x0_a, class_a), (x0_b, class_b) = (interpolation_image(model, name, dataset)
                                            for name in config.inspect.interp_images)
        x0_a, x0_b = x0_a[None].to(device), x0_b[None].to(device)
        ends = None
        if model.num_classes:  # the class embedding is mixed as the latents are
            ends = torch.nn.functional.one_hot(torch.tensor([class_a, class_b]), model.num_classes + 1)
            ends = ends.double().to(device)
        lambdas = torch.linspace(0, 1, config.inspect.interp_lambdas).tolist()
        folder = os.path.join(logdir, "interpolation")
        os.makedirs(folder, exist_ok=True)
        for t in map(int, actions.interp_t):
            mixed = reports.interpolate(sampler, ema, x0_a, x0_b, t, lambdas, noise, ends)
            reports.save_interpolation(os.path.join(folder, f"t{t}.png"), x0_a, x0_b, mixed)
        print(f"wrote {len(actions.interp_t)} interpolation grids under {folder}")
