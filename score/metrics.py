"""The numbers: 8-bit quantization, feature statistics, Frechet distance, Inception Score.

Everything is float64 and runs on whatever device its inputs are on, so the 2048 x 2048
Frechet distance runs on the GPU when the features are there (~0.1 s on an H200 against
~10 s for scipy's CPU sqrtm).
"""
import os

import numpy as np
import torch
import torch.distributed as dist

import files
from errors import UserError

IS_SPLITS = 10  # Inception Score: mean and std over this many equal parts (Salimans et al.)


class ScoreError(UserError, RuntimeError):
    """A missing or unusable input to scoring; the message says how to fix it."""


def to_uint8(images):
    """[0, 1] floats -> 0..255 uint8, rounding as torchvision's save_image writes a PNG."""
    return (images.clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8)


def quantize(images):
    """[0, 1] floats -> the same images as they would read back from an 8-bit PNG."""
    return to_uint8(images).to(images.dtype) / 255


def statistics(features):
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (as np.cov)."""
    if len(features) < 2:
        raise ScoreError(f"feature statistics need at least 2 images, got {len(features)}")
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def psd_sqrt_eigenvalues(eigenvalues):
    """Square roots of a PSD matrix's computed eigenvalues, those within rounding of 0 set to 0.

    A zero eigenvalue comes out as +-n eps |lambda_max| and its square root would add
    sqrt(n eps |lambda_max|) each; the cutoff is numpy's matrix_rank tolerance.
    """
    cutoff = len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max()
    return torch.where(eigenvalues > cutoff, eigenvalues, 0).sqrt()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), exactly, in float64 on mu1's device.

    tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2: the right side is a symmetric PSD matrix, so
    both square roots come from symmetric eigendecompositions. Singular covariances (fewer
    images than dimensions, dead features) need no diagonal offset: their zero eigenvalues
    are set to exactly 0 (psd_sqrt_eigenvalues).
    """
    device = mu1.device
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64, device=device)
                                for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ScoreError(f"statistics of different feature sizes: {tuple(mu1.shape)} and "
                         f"{tuple(mu2.shape)}")
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
    root1 = (eigenvectors * psd_sqrt_eigenvalues(eigenvalues)) @ eigenvectors.T
    middle = root1 @ sigma2 @ root1
    # eigvalsh reads one triangle; make the rounding in the products symmetric first
    middle = (middle + middle.T) / 2
    trace_sqrt = psd_sqrt_eigenvalues(torch.linalg.eigvalsh(middle)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def inception_score(logits, splits=IS_SPLITS):
    """exp(E_x KL(p(y|x) || p(y))) per split of the images in order: (mean, std) over splits.

    p(y|x) = softmax(logits); p(y) is the split's mean of p(y|x). The std is numpy's (ddof 0),
    as in pytorch_gan_metrics and the original TF code. Log-probabilities come from
    log_softmax so a probability that underflows to 0 adds 0 rather than NaN.
    """
    if len(logits) < splits:
        raise ScoreError(f"the Inception Score needs at least {splits} images, got {len(logits)}")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * len(log_p) // splits:(i + 1) * len(log_p) // splits]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(correction=0))


def save_statistics(path, mu, sigma, **extras):
    """The .npz pytorch_gan_metrics reads: mu (D,) and sigma (D, D), float64; `extras` (the
    reference features of the metrics beyond FID, REFERENCE_EXTRAS) are stored beside them."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {"mu": mu, "sigma": sigma, **extras}
    arrays = {name: np.asarray(value.cpu() if torch.is_tensor(value) else value) for name, value in arrays.items()}
    arrays["mu"], arrays["sigma"] = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    files.write_atomically(path, lambda file: np.savez_compressed(file, **arrays),
                           sum(array.nbytes for array in arrays.values()))


# What a statistics file may hold beyond mu and sigma, and the metrics that need it:
# pool3 features of a seeded random subset of the data (precision/recall, density/coverage,
# KID), and the statistics of the spatial features (sFID, under guided-diffusion's names).
REFERENCE_EXTRAS = {"features": ("pr", "kid"), "mu_s": ("sfid",), "sigma_s": ("sfid",)}


def load_statistics(path, create_command):
    """(mu, sigma) as float64 CPU tensors; create_command goes into the error if path is absent."""
    reference = load_reference(path, create_command)
    return reference["mu"], reference["sigma"]


def load_reference(path, create_command):
    """{mu, sigma} and whichever REFERENCE_EXTRAS the file holds (with features_seed and
    features_of when it holds features), as float64 CPU tensors, each checked: shapes that
    fit together, finite numbers. create_command goes into every error."""
    if not os.path.exists(path):
        raise ScoreError(f"FID statistics {path} not found; create them with: {create_command}")
    try:
        with files.open_regular(path) as file, np.load(file, allow_pickle=False) as stats:
            present = [name for name in (*REFERENCE_EXTRAS, "features_seed", "features_of") if name in stats.files]
            arrays = {name: stats[name] for name in ("mu", "sigma", *present)}
    except files.NotARegularFile as error:
        raise ScoreError(f"FID statistics: {error}; create them with: {create_command}") from None
    except (OSError, ValueError, KeyError) as error:
        raise ScoreError(f"FID statistics {path} are unreadable ({error}); recreate them with: "
                         f"{create_command}") from None
    mu, sigma = arrays["mu"], arrays["sigma"]
    problem = None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        problem = f"mu {mu.shape} and sigma {sigma.shape} do not match"
    elif "features" in arrays and (arrays["features"].ndim != 2 or arrays["features"].shape[1] != len(mu)):
        problem = f"features {arrays['features'].shape} are not (N, {len(mu)}) like mu"
    elif ("mu_s" in arrays) != ("sigma_s" in arrays) or ("mu_s" in arrays and (
            arrays["mu_s"].ndim != 1 or arrays["sigma_s"].shape != (len(arrays["mu_s"]),) * 2)):
        problem = "mu_s and sigma_s (the spatial statistics) do not match"
    else:
        bad = [name for name, array in arrays.items()
               if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all()]
        if bad:
            problem = f"{', '.join(bad)} hold NaN, inf or no numbers"
    if problem:
        raise ScoreError(f"FID statistics {path}: {problem}; recreate them with: {create_command}")
    return {name: torch.from_numpy(np.asarray(array, dtype=np.float64)) for name, array in arrays.items()}


class Moments:
    """Mean and unbiased covariance of features that arrive in batches, without holding them:
    sums of (x - shift) and (x - shift)(x - shift)^T in float64. A shift near the mean (the
    reference's) keeps the subtraction in the covariance from cancelling; across processes
    every rank adds its batches and all_reduce adds the ranks (the same shift on each)."""

    def __init__(self, shift):
        self.shift = shift.double()
        self.count, self.total = 0, torch.zeros_like(self.shift)
        self.outer = torch.zeros(len(shift), len(shift), dtype=torch.float64, device=shift.device)

    def add(self, features):
        centred = features.to(self.shift.device, torch.float64) - self.shift
        self.count += len(centred)
        self.total += centred.sum(0)
        self.outer += centred.T @ centred

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.shift.device)
            for tensor in (count, self.total, self.outer):
                dist.all_reduce(tensor)
            self.count = int(count.item())
        return self

    def statistics(self):
        """(mu, sigma) as `statistics` gives them for all the features added."""
        if self.count < 2:
            raise ScoreError(f"feature statistics need at least 2 images, got {self.count}")
        mean = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return self.shift + mean, (sigma + sigma.T) / 2


def gather(tensor):
    """Every rank's tensor concatenated along dim 0 in rank order, on every rank.

    Ranks may hold different numbers of rows: each pads to the longest, all_gathers and
    trims. Identity when torch.distributed is not initialised. Statistics computed from the
    result are identical on every rank; give rank r the r-th contiguous block of the images
    so that the Inception Score splits also match a single-process run.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    world_size = dist.get_world_size()
    length = torch.tensor([len(tensor)], device=tensor.device)
    lengths = [torch.empty_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])
