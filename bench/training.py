"""Side-by-side speed of the reference path (fp32 eager) and the fast path, in one process.

    python -m bench.training                 # the paper's CIFAR10 sizes on a GPU, tiny sizes on a CPU
    python -m bench.training --sizes tiny    # a quick look anywhere

Measures training images/s (batch 128 and 512), sampling image-steps/s, peak memory, and the
FID cost (Inception features of a batch, Frechet distance by float64 eigh against scipy's
sqrtm), for the reference path and the fast path in bf16 and in fp16 (with its loss scaling,
as a pre-Ampere GPU trains by default). Prints a markdown table with the fast/reference
ratios, for BENCHMARKS.md.
"""
import argparse
import copy
import time

import numpy as np
import scipy.linalg
import torch

import speed
from config import FastPathConfig
from diffusion import GaussianDiffusionTrainer, beta_schedule
from sampling import GaussianDiffusionSampler
from model import UNet
from score import frechet_distance
from score.inception import fid_inception_v3
from train import LossScaling, apply_gradients, warmup_lr

SIZES = {  # model, image size, train batches, sampling batch, timed steps, FID images/dim
    "paper": dict(ch=128, ch_mult=[1, 2, 2, 2], attn=[1], img=32, batches=[128, 512],
                  sample_batch=1024, steps=50, fid_images=500, fid_dim=2048),
    "tiny": dict(ch=32, ch_mult=[1, 2], attn=[1], img=8, batches=[64], sample_batch=256,
                 steps=10, fid_images=16, fid_dim=256),
}
FAST = dict(compile=None, cuda_graphs=None, channels_last=None, fused_adam=None, data_on_device=True)
PATHS = {
    "reference (fp32 eager)": dict(precision="fp32", compile=False, cuda_graphs=False, channels_last=False,
                                   fused_adam=False, data_on_device=True),
    "fast, bf16": dict(precision="bf16", **FAST),
    "fast, fp16": dict(precision="fp16", **FAST),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps, warmup, device):
    """Seconds per call of fn, after warmup calls (compilation, CUDA-graph capture)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def unet(size):
    return UNet(T=1000, ch=size["ch"], ch_mult=size["ch_mult"], attn=size["attn"],
                num_res_blocks=2, dropout=0.1)


def train_speed(size, path, batch, device, steps):
    """Images per second of whole optimizer steps (forward, backward, Adam, EMA)."""
    fast = speed.resolve(FastPathConfig(**path), device.type)
    net = speed.to_layout(unet(size).to(device), fast)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = speed.adam(net.parameters(), 2e-4, fast)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lr(0))
    trainer = GaussianDiffusionTrainer(speed.wrap(net, fast), beta_schedule("linear", 1e-4, 0.02, 1000)).to(device)
    x_0 = torch.rand(batch, 3, size["img"], size["img"], device=device) * 2 - 1
    scaling = LossScaling(device.type, fast.precision == "fp16")

    def step():
        loss = trainer(x_0).mean()
        scaling.scale(loss).backward()
        apply_gradients(net, ema, optimizer, scheduler, 1.0, 0.9999, scaling, loss.detach())

    reset_memory(device)
    seconds = timed(step, steps, warmup=3 if fast.compile else 1, device=device)
    return batch / seconds, peak_memory_gib(device)


@torch.no_grad()
def sample_speed(size, path, device, steps):
    """Image-steps per second of the ancestral sampler (one model call per image-step)."""
    fast = speed.resolve(FastPathConfig(**path), device.type)
    net = speed.to_layout(unet(size).to(device).eval(), fast)
    model = speed.wrap(net, fast)
    sampler = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, 1000)).to(device)
    x_t = torch.randn(size["sample_batch"], 3, size["img"], size["img"], device=device)
    reset_memory(device)
    # one step of the chain: x_t at t = 500 to t = 499
    seconds = timed(lambda: next(sampler.chain(model, x_t, 500)), steps, warmup=3 if fast.compile else 1,
                    device=device)
    return size["sample_batch"] / seconds, peak_memory_gib(device)


def fid_speed(size, device):
    """Inception images/s (random weights; the speed is the same) and Frechet distance
    seconds, float64 eigh on the device against scipy's sqrtm."""
    net = fid_inception_v3().to(device).eval()
    images = torch.rand(size["fid_images"], 3, 32, 32, device=device)

    @torch.no_grad()
    def features():
        net(torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear"))

    per_batch = timed(features, 2, warmup=1, device=device)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size["fid_dim"] * 2, size["fid_dim"])) for _ in range(2))
    sigma1, sigma2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu = np.zeros(size["fid_dim"])
    gpu = [torch.from_numpy(m).to(device) for m in (mu, sigma1, mu, sigma2)]
    eigh_seconds = timed(lambda: frechet_distance(*gpu), 3, warmup=1, device=device)
    start = time.perf_counter()
    scipy.linalg.sqrtm(sigma1 @ sigma2)
    sqrtm_seconds = time.perf_counter() - start
    return size["fid_images"] / per_batch, eigh_seconds, sqrtm_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", choices=list(SIZES), default=None,
                        help="default: paper on CUDA, tiny on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--skip_fid", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[args.sizes or ("paper" if device.type == "cuda" else "tiny")]
    steps = args.steps or size["steps"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"# bench/training.py on {name}, torch {torch.__version__}, sizes {args.sizes or 'auto'}, {steps} steps\n")
    print(f"| measurement | {' | '.join(PATHS)} | bf16 / reference | fp16 / reference |")
    print("|---|---|---|---|---|---|")

    def row(label, values, unit, digits=1):
        ratios = " | ".join(f"{value / values[0]:.2f}x" for value in values[1:])
        print(f"| {label} | {' | '.join(f'{value:,.{digits}f} {unit}' for value in values)} | {ratios} |", flush=True)

    for batch in size["batches"]:
        speeds, memory = zip(*(train_speed(size, PATHS[p], batch, device, steps) for p in PATHS))
        row(f"train, batch {batch}", speeds, "img/s")
        if device.type == "cuda":
            row(f"peak memory, train batch {batch}", memory, "GiB", digits=2)
    rates = [sample_speed(size, PATHS[p], device, steps)[0] for p in PATHS]
    row(f"sampling, batch {size['sample_batch']}", rates, "image-steps/s")
    row("50k samples x 1000 steps", [50_000 * 1000 / rate / 3600 for rate in rates], "h", digits=2)
    if not args.skip_fid:
        images_per_s, eigh_s, sqrtm_s = fid_speed(size, device)
        print(f"| FID Inception features | {images_per_s:,.0f} img/s | | |")
        print(f"| Frechet distance, {size['fid_dim']}-d | scipy sqrtm {sqrtm_s:.3f} s | "
              f"float64 eigh {eigh_s:.3f} s | {sqrtm_s / eigh_s:.1f}x faster |")


if __name__ == "__main__":
    main()
