"""The variational bound in bits/dim of a network (Ho et al. 2020, sec. 4.2; the official
calc_bpd_loop), its sums over a data set, and their report: a JSON file and a plot per t.

The network is passed in, called as net(x_t, t) on the full T-step chain of a
`GaussianDiffusion` (diffusion.py); every bound term is float64.
"""
import json
import math
import os

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import files
from diffusion import MEAN_TYPES, VAR_TYPES, check_choice, mean_flat


@torch.no_grad()
def calc_bpd_loop(net, diffusion, x_0, mean_type, var_type, clip_denoised, progress=False,
                  generator=None):
    """The variational bound of x_0 (official calc_bpd_loop), every term in bits/dim.

    Over the full chain of `diffusion`, with x0_hat clipped if clip_denoised:
        terms_bpd (B, T): L_{t-1} at column t (L_0, the decoder NLL, at t = 0)
        prior_bpd (B,):   L_T = KL(q(x_T | x_0) || N(0, I))
        total_bpd (B,):   sum of terms_bpd + prior_bpd
        mse (B, T):       mean squared error of x0_hat to x_0 at each t
    All float64; x_t ~ q(x_t | x_0) is drawn afresh for every t, t descending.
    """
    check_choice("mean_type", mean_type, MEAN_TYPES)
    check_choice("var_type", var_type, VAR_TYPES)
    terms = x_0.new_zeros((x_0.shape[0], diffusion.T), dtype=torch.float64)
    mse = torch.zeros_like(terms)
    for time_step in tqdm(reversed(range(diffusion.T)), total=diffusion.T, desc="bits/dim",
                          disable=not progress, leave=False):
        t = torch.full((x_0.shape[0],), time_step, dtype=torch.long, device=x_0.device)
        noise = torch.randn(x_0.shape, generator=generator, device=x_0.device, dtype=x_0.dtype)
        x_t = diffusion.q_sample(x_0, t, noise)
        terms[:, time_step], pred_x_0 = diffusion.vb_terms_bpd(
            net(x_t, t), x_0, x_t, t, mean_type, var_type, clip_denoised)
        mse[:, time_step] = mean_flat((pred_x_0 - x_0.double()) ** 2)
    prior = diffusion.prior_bpd(x_0)
    return {"total_bpd": terms.sum(1) + prior, "prior_bpd": prior, "terms_bpd": terms,
            "mse": mse}


def bpd_sums(net, diffusion, loader, mean_type, var_type, clip_denoised, progress=False,
             generator=None, conditional=False):
    """calc_bpd_loop over a loader of (image, label) batches, summed over images (float64);
    conditional: a class-conditional network given each image's label, so the bound is of
    log p(x | y), the conditional likelihood.

    Returns count, total_bpd, total_bpd_sq (its square, for the standard error), prior_bpd,
    terms_bpd (T,) and mse (T,) as tensors on the diffusion's device: under DDP all_reduce each
    with SUM across the ranks' shards, then pass the sums to save_bpd. generator: a
    torch.Generator, or a function of the batch number n that returns batch n's.
    """
    device = diffusion.betas.device
    sums = {}
    for n, (x_0, y) in enumerate(tqdm(loader, desc="bits/dim batches", disable=not progress)):
        batch_net = (lambda x, t, y=y.to(device): net(x, t, y)) if conditional else net
        result = calc_bpd_loop(batch_net, diffusion, x_0.to(device), mean_type, var_type, clip_denoised,
                               progress=progress,
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


def save_bpd(sums, logdir, conditional=False):
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
    if conditional:
        summary["conditional"] = "log p(x | y): each image given its own class"
    os.makedirs(logdir, exist_ok=True)
    files.write_bytes(os.path.join(logdir, "bpd.json"), json.dumps(summary, indent=1).encode())
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
    files.save_image(image, path)
