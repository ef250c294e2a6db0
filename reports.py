"""Pictures for people to look at: sample grids, progressive sampling and interpolation.

The two walks take a `GaussianDiffusionSampler` (sampling.py) and the network, in eval mode,
and read the sampler's one reverse chain (`chain`). Images are tensors in [-1, 1]; files are
8-bit PNG/GIF written by PIL, a pixel x stored as round((x + 1) * 127.5). The walks refuse
what is not finite (`require_finite`) before anything of it can be written.
"""
import math
import os

import torch
from PIL import Image
from torchvision.utils import make_grid

import files
from errors import UserError


class NonFiniteSamples(UserError, ArithmeticError):
    """Samples with NaN or inf values: never written and never scored. A PNG or .npz would
    hold them as black pixels (NaN rounds to 0), which looks like a result."""


def require_finite(images, what, consequence):
    """Raise NonFiniteSamples, one line naming `what` and `consequence`, unless every image of
    `images` (N, ...) is finite; one read of the device."""
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if bad:
        raise NonFiniteSamples(f"{what}: {bad} of {len(images)} samples contain NaN or inf values, so "
                               f"{consequence} (NaN weights, or a diverged model?)")


def enlarge(images, min_size=32):
    """Images (N, C, H, W) under min_size pixels wide enlarged by a whole factor (nearest
    neighbour), so that a person can see 8x8 digits; larger images unchanged."""
    size = images.shape[-1]
    if size >= min_size:
        return images
    return torch.nn.functional.interpolate(images, scale_factor=-(-min_size // size), mode="nearest")


def class_rows(num_classes, count, device):
    """The classes of a conditional model's grid of count samples: one row per class,
    count // num_classes samples each (the last count % num_classes are left out)."""
    per_row = count // num_classes
    return torch.arange(num_classes, device=device).repeat_interleave(per_row), per_row


def grid(images, per_row=None):
    """[-1, 1] images -> one [0, 1] grid image (for save_png and TensorBoard), small images
    enlarged; per_row images in each row (None: a square)."""
    return make_grid((enlarge(images) + 1) / 2, nrow=per_row or math.ceil(math.sqrt(len(images))), pad_value=1.0)


def to_pil(images, nrow):
    """A grid of images (N, C, H, W) in [-1, 1], enlarged when small, nrow per row and 2 px of
    white between."""
    grid = make_grid(enlarge(images.float().cpu()), nrow=nrow, padding=2, pad_value=1.0)
    pixels = ((grid + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


@torch.no_grad()
def progressive_samples(sampler, net, x_T, every=50, generator=None, labels=None):
    """Sample from x_T, recording x_t and x0_hat at every `every`-th sampler step.

    As the official p_sample_loop_progressive (include_xstartpred_freq), the steps recorded are
    the kept steps i with i % every == 0 (t = 0, 50, ..., 950 for the full 1000-step chain),
    here in sampling order, t descending. The samples are the sampler's for the same x_T and
    generator (and a conditional network's labels); the last record's x0_hat is the sample
    (up to rounding).
    Returns a dict: samples (B, C, H, W); x_t and pred_xstart (B, N, C, H, W), x_t the input of
    the recorded step; timesteps (N,).
    """
    x_ts, pred_xstarts, timesteps = [], [], []
    for record in sampler.chain(net, x_T, generator=generator, labels=labels):
        if record.i % every == 0:
            x_ts.append(record.x_t)
            pred_xstarts.append(record.x0_hat)
            timesteps.append(record.t)
    progressive = {"samples": record.x_prev.clamp(-1.0, 1.0), "x_t": torch.stack(x_ts, 1),
                   "pred_xstart": torch.stack(pred_xstarts, 1), "timesteps": torch.tensor(timesteps)}
    require_finite(torch.cat([progressive[name].flatten(1) for name in ("samples", "x_t", "pred_xstart")], 1),
                   "progressive sampling", "no strip or GIF was written")
    return progressive


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
        files.save_image(to_pil(torch.cat([x_t[b], pred_xstart[b]]), nrow=steps), path)
        paths.append(path)
    nrow = math.ceil(math.sqrt(batch))
    frames = [to_pil(torch.cat([x_t[:, n], pred_xstart[:, n]], dim=-1), nrow=nrow)
              for n in range(steps)]
    path = os.path.join(logdir, f"{prefix}.gif")
    files.save_image(frames[0], path, format="gif", save_all=True, append_images=frames[1:], duration=frame_ms,
                     loop=0)
    return paths + [path]


@torch.no_grad()
def interpolate(sampler, net, x0_a, x0_b, t, lambdas, generator=None, ends=None):
    """Interpolation in the latent x_t (Ho et al. sec. 4.3, the official interpolate).

    x_t^a, x_t^b ~ q(x_t | x_0), each endpoint diffused with its own noise as the official
    code does, mixed linearly as (1 - lambda) x_t^a + lambda x_t^b and denoised by the sampler
    from t (one of its timesteps). With a generator, every lambda gets the same reverse-process
    noise (the generator restarts from one state), so the results differ only through lambda.
    ends: a conditional network's class weights (2, num_classes + 1) of the two ends (one-hot
    rows), mixed with the same lambda and given as labels. Returns (B, L, C, H, W).
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
        labels = None if ends is None else ((1.0 - lam) * ends[0] + lam * ends[1])[None].expand(len(x0_a), -1)
        mixed.append(sampler.denoise(net, (1.0 - lam) * x_t_a + lam * x_t_b, t, generator, labels))
    mixed = torch.stack(mixed, 1)
    require_finite(mixed, f"the interpolation at t = {t}", "its grid was not written")
    return mixed


def save_interpolation(path, x0_a, x0_b, mixed):
    """One PNG: a row per pair, columns x0_a, the interpolations in lambda order, x0_b."""
    rows = torch.cat([x0_a[:, None], mixed, x0_b[:, None]], dim=1)
    files.save_image(to_pil(rows.flatten(0, 1), nrow=rows.shape[1]), path)
