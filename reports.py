"""Reports for people to look at: sample grids, progressive sampling, interpolation, and the
bound in bits/dim with its plot.

Every sampling function takes a `GaussianDiffusionSampler` (diffusion.py) whose model is in
eval mode. Images are tensors in [-1, 1]; files are 8-bit PNG/GIF written by PIL, a pixel x
stored as round((x + 1) * 127.5).
"""
import json
import math
import os

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid
from tqdm import tqdm


def enlarge(images, min_size=32):
    """Images (N, C, H, W) under min_size pixels wide enlarged by a whole factor (nearest
    neighbour), so that a person can see 8x8 digits; larger images unchanged."""
    size = images.shape[-1]
    if size >= min_size:
        return images
    return torch.nn.functional.interpolate(images, scale_factor=-(-min_size // size), mode="nearest")


def grid(images):
    """[-1, 1] images -> one square [0, 1] grid image (for save_png and TensorBoard), small
    images enlarged."""
    return make_grid((enlarge(images) + 1) / 2, nrow=math.ceil(math.sqrt(len(images))), pad_value=1.0)


def to_pil(images, nrow):
    """A grid of images (N, C, H, W) in [-1, 1], enlarged when small, nrow per row and 2 px of
    white between."""
    grid = make_grid(enlarge(images.float().cpu()), nrow=nrow, padding=2, pad_value=1.0)
    pixels = ((grid + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


@torch.no_grad()
def progressive_samples(sampler, x_T, every=50, generator=None):
    """Sample from x_T, recording x_t and x0_hat at every `every`-th sampler step.

    As the official p_sample_loop_progressive (include_xstartpred_freq), the steps recorded are
    the kept steps i with i % every == 0 (t = 0, 50, ..., 950 for the full 1000-step chain),
    here in sampling order, t descending. The last record's x0_hat is the sample (up to rounding).
    Returns a dict: samples (B, C, H, W); x_t and pred_xstart (B, N, C, H, W), x_t the input of
    the recorded step; timesteps (N,).
    """
    x_ts, pred_xstarts, timesteps = [], [], []
    x_t = x_T
    for i in reversed(range(len(sampler.timesteps))):
        x_prev, pred_xstart = sampler.step(x_t, i, generator)
        if i % every == 0:
            x_ts.append(x_t)
            pred_xstarts.append(pred_xstart)
            timesteps.append(sampler.timesteps[i])
        x_t = x_prev
    return {"samples": x_t.clamp(-1.0, 1.0), "x_t": torch.stack(x_ts, 1),
            "pred_xstart": torch.stack(pred_xstarts, 1), "timesteps": torch.tensor(timesteps)}


def save_progressive(progressive, logdir, prefix="progressive", frame_ms=100):
    """Write progressive_samples' records as images; returns the paths written.

    {prefix}_{b:04d}.png, one strip per sample b: top row x_t, bottom row x0_hat, one column per
    recorded step, noisy to clean. {prefix}.gif: the whole batch's trajectory, one frame per
    recorded step, each cell x_t beside x0_hat.
    """
    os.makedirs(logdir, exist_ok=True)
    x_t, pred_xstart = progressive["x_t"], progressive["pred_xstart"]
    batch, steps = x_t.shape[:2]
    paths = []
    for b in range(batch):
        path = os.path.join(logdir, f"{prefix}_{b:04d}.png")
        to_pil(torch.cat([x_t[b], pred_xstart[b]]), nrow=steps).save(path)
        paths.append(path)
    nrow = math.ceil(math.sqrt(batch))
    frames = [to_pil(torch.cat([x_t[:, n], pred_xstart[:, n]], dim=-1), nrow=nrow)
              for n in range(steps)]
    path = os.path.join(logdir, f"{prefix}.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return paths + [path]


@torch.no_grad()
def interpolate(sampler, x0_a, x0_b, t, lambdas, generator=None):
    """Interpolation in the latent x_t (Ho et al. sec. 4.3, the official interpolate).

    x_t^a, x_t^b ~ q(x_t | x_0), each endpoint diffused with its own noise as the official
    code does, mixed linearly as (1 - lambda) x_t^a + lambda x_t^b and denoised by the sampler
    from t (one of its timesteps). With a generator, every lambda gets the same reverse-process
    noise (the generator restarts from one state), so the results differ only through lambda.
    Returns (B, L, C, H, W).
    """
    batch_t = torch.full((x0_a.shape[0],), t, dtype=torch.long, device=x0_a.device)
    noise_a, noise_b = (torch.randn(x0_a.shape, generator=generator, device=x0_a.device, dtype=x0_a.dtype)
                        for _ in range(2))
    x_t_a = sampler.q_sample(x0_a, batch_t, noise_a)
    x_t_b = sampler.q_sample(x0_b, batch_t, noise_b)
    state = None if generator is None else generator.get_state()
    mixed = []
    for lam in lambdas:
        if generator is not None:
            generator.set_state(state)
        mixed.append(sampler.denoise((1.0 - lam) * x_t_a + lam * x_t_b, t, generator))
    return torch.stack(mixed, 1)


def save_interpolation(path, x0_a, x0_b, mixed):
    """One PNG: a row per pair, columns x0_a, the interpolations in lambda order, x0_b."""
    rows = torch.cat([x0_a[:, None], mixed, x0_b[:, None]], dim=1)
    to_pil(rows.flatten(0, 1), nrow=rows.shape[1]).save(path)


def bpd_sums(sampler, loader, progress=False, generator=None):
    """calc_bpd_loop over a loader of (image, label) batches, summed over images (float64).

    Returns count, total_bpd, total_bpd_sq (its square, for the standard error), prior_bpd,
    terms_bpd (T,) and mse (T,) as tensors on the sampler's device: under DDP all_reduce each
    with SUM across the ranks' shards, then pass the sums to save_bpd. generator: a
    torch.Generator, or a function of the batch number n that returns batch n's.
    """
    device = sampler.betas.device
    sums = {}
    for n, (x_0, _) in enumerate(tqdm(loader, desc="bits/dim batches", disable=not progress)):
        result = sampler.calc_bpd_loop(x_0.to(device), progress=progress,
                                       generator=generator(n) if callable(generator) else generator)
        batch = {
            "count": torch.tensor(float(x_0.shape[0]), dtype=torch.float64, device=device),
            "total_bpd": result["total_bpd"].sum(),
            "total_bpd_sq": (result["total_bpd"] ** 2).sum(),
            "prior_bpd": result["prior_bpd"].sum(),
            "terms_bpd": result["terms_bpd"].sum(0),
            "mse": result["mse"].sum(0),
        }
        for name, value in batch.items():
            sums[name] = sums.get(name, 0.0) + value
    return sums


def save_bpd(sums, logdir):
    """Means over the images of bpd_sums' totals, as logdir/bpd.json and logdir/bpd.png.

    The JSON holds num_images, total_bpd and its standard error, prior_bpd, and the per-t
    means terms_bpd and mse (index t, 0-based); the PNG plots those two against t. Returns the
    JSON's dict.
    """
    count = float(sums["count"])
    means = {name: (value / count).cpu() for name, value in sums.items() if name != "count"}
    total = means["total_bpd"].item()
    variance = max(means["total_bpd_sq"].item() - total ** 2, 0.0)
    summary = {
        "num_images": int(count),
        "total_bpd": total,
        "total_bpd_stderr": math.sqrt(variance / count),
        "prior_bpd": means["prior_bpd"].item(),
        "terms_bpd": means["terms_bpd"].tolist(),
        "mse": means["mse"].tolist(),
    }
    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, "bpd.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_per_t(os.path.join(logdir, "bpd.png"), [("VB term L_t (bits/dim)", summary["terms_bpd"]),
                                                  ("x0_hat MSE", summary["mse"])])
    return summary


def plot_per_t(path, curves, width=480, height=320, margin=48):
    """A minimal PIL line plot: one panel per (title, values), t on x, log10 of values on y."""
    image = Image.new("RGB", (width * len(curves), height), "white")
    draw = ImageDraw.Draw(image)
    for panel, (title, values) in enumerate(curves):
        logs = [math.log10(max(v, 1e-30)) for v in values]
        low, high = min(logs), max(logs)
        span = max(high - low, 1e-12)
        left, top = panel * width + margin, margin // 2
        right, bottom = (panel + 1) * width - margin // 2, height - margin
        draw.rectangle((left, top, right, bottom), outline="black")
        step = (right - left) / max(len(logs) - 1, 1)
        draw.line([(left + n * step, bottom - (v - low) / span * (bottom - top))
                   for n, v in enumerate(logs)], fill="blue", width=2)
        draw.text((left, 4), f"{title}, log scale", fill="black")
        draw.text((panel * width + 2, top), f"{10 ** high:.2g}", fill="black")
        draw.text((panel * width + 2, bottom - 10), f"{10 ** low:.2g}", fill="black")
        draw.text((left, bottom + 4), "t = 0", fill="black")
        draw.text((right - 60, bottom + 4), f"t = {len(logs) - 1}", fill="black")
    image.save(path)
