"""Scoring images: the Evaluator (features -> IS and FID), and images to and from disk."""
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import datasets
import files
from . import digits, inception, metrics
from .metrics import (ScoreError, frechet_distance, inception_score, load_statistics, statistics,
                      to_uint8)

FEATURES = ("inception", "digits")


def default_feature(dataset):
    """The feature network a dataset is scored with unless one is named: the offline digits
    classifier for the digits, the FID Inception network for everything else."""
    return "digits" if dataset == "digits" else "inception"
PUBLISHED_SAMPLES = 50000  # the sample count of published FIDs


def small_sample_warning(feature, count):
    """One line saying why an Inception FID of `count` samples misleads, or None."""
    if feature != "inception" or count >= PUBLISHED_SAMPLES:
        return None
    if count < inception.POOL_DIM:
        return (f"FID of {count} samples, fewer than the {inception.POOL_DIM} Inception features: the "
                "covariance is singular and the FID biased high; not comparable with published FIDs "
                f"({PUBLISHED_SAMPLES:,} samples)")
    return (f"FID of {count} samples is not comparable with published FIDs, which use "
            f"{PUBLISHED_SAMPLES:,} samples (fewer samples give a higher FID)")


def fid_cache_command(output, feature, dataset=None, data_root=None, img_size=None,
                      inception_weights=None):
    """The shell command that writes the FID statistics `output` (for error messages)."""
    command = f"python -m score.fid_cache --dataset {dataset or '<dataset>'}"
    if data_root is not None:
        command += f" --data_root {data_root}"
    if img_size is not None:
        command += f" --img_size {img_size}"
    if feature != "inception":
        command += f" --feature {feature}"
    if inception_weights is not None:
        command += f" --inception_weights {inception_weights}"
    return command + f" --output {output}"


class Evaluator:
    """One feature network and the reference statistics to score images against.

    feature: "inception" (FID Inception pool3 + 1008 logits) or "digits" (the offline digits
        classifier's penultimate features + 10 logits).
    fid_cache: .npz of the reference mu and sigma. None: for "digits", the statistics of the
        digits train split, computed here (they take milliseconds); for "inception", no
        reference, so score() gives the Inception Score only.
    quantize: round samples to 8 bits before scoring, as saving them as PNG would.
    dataset, data_root, img_size: only to spell out the exact fid_cache command in the error
        raised when fid_cache does not exist.
    Every missing input (weights, statistics) raises ScoreError here, before any real work.
    """

    def __init__(self, feature, fid_cache=None, device="cpu", inception_weights=None,
                 quantize=True, batch_size=250, digits_classifier=digits.CLASSIFIER,
                 dataset=None, data_root=None, img_size=None):
        if feature not in FEATURES:
            raise ScoreError(f"unknown feature {feature!r}: expected one of {', '.join(FEATURES)}")
        self.device = torch.device(device)
        self.feature = feature
        self.quantize = quantize
        self.batch_size = batch_size
        weights = inception.find_weights(inception_weights) if feature == "inception" else None
        self.weights_path = weights if feature == "inception" else digits_classifier
        self.reference = None
        if fid_cache is not None:
            self.reference = load_statistics(fid_cache, fid_cache_command(
                fid_cache, feature, dataset, data_root, img_size, inception_weights))
        if feature == "inception":
            self.net = inception.FIDInception(weights)
        else:
            self.net = digits.load_classifier(digits_classifier)
        self.net.to(self.device).eval()
        if feature == "digits" and fid_cache is None:
            real = torch.from_numpy(datasets.digits_array(train=True)[0])
            # the reference is real data as stored in 8 bits, whatever self.quantize says
            self.reference = statistics(self.features(metrics.quantize(real))[0])
        dim = inception.POOL_DIM if feature == "inception" else digits.RECIPE["features"]
        if self.reference is not None and len(self.reference[0]) != dim:
            raise ScoreError(f"FID statistics {fid_cache} have {len(self.reference[0])} features "
                             f"but the {feature} network gives {dim}: made with another --feature?")

    @torch.no_grad()
    def features(self, images, progress=False):
        """(features (N, D), logits (N, K)) in float64 on self.device, for this rank's images.

        images: float in [0, 1], (N, C, H, W), on any device: a tensor (run in batches of
        batch_size) or an iterable of such batches.
        """
        if torch.is_tensor(images):
            images = images.split(self.batch_size)
        pools, logits = [], []
        count, nonfinite = 0, torch.zeros((), dtype=torch.long, device=self.device)
        for batch in tqdm(images, desc="features", disable=not progress, leave=False):
            # one memory layout: a channels-last input would take other conv kernels and
            # round differently, so the same images could give different features
            batch = batch.to(self.device, torch.float32).contiguous()
            # counted on the device, read once at the end: quantizing would hide NaN
            nonfinite += (~torch.isfinite(batch)).flatten(1).any(1).sum()
            count += len(batch)
            if self.quantize:
                batch = metrics.quantize(batch)
            pool, logit = self.net(batch)
            pools.append(pool.double())
            logits.append(logit.double())
        if not pools:
            raise ScoreError("no images to score")
        if nonfinite:
            raise ScoreError(f"{int(nonfinite)} of {count} samples contain NaN or inf values, so "
                             "nothing was scored (a diverged model?)")
        return torch.cat(pools), torch.cat(logits)

    def score(self, features, logits):
        """{'IS', 'IS_std'} and, with reference statistics, 'FID', from all ranks' features;
        'warning' too for an Inception FID of too few samples (small_sample_warning)."""
        scores = dict(zip(("IS", "IS_std"), inception_score(logits)))
        if self.reference is not None:
            scores["FID"] = frechet_distance(*statistics(features), *self.reference)
            warning = small_sample_warning(self.feature, len(features))
            if warning:
                scores["warning"] = warning
        return scores


def load_images(path):
    """Every image of a folder (recursively, sorted by path) or of an .npz written by
    save_images, as float (N, C, H, W) in [0, 1]. Image files are read as RGB."""
    if os.path.isfile(path) and path.endswith(".npz"):
        try:
            with files.open_regular(path) as file, np.load(file, allow_pickle=False) as stored:
                array = stored["arr_0"]
        except (OSError, ValueError, KeyError) as error:
            raise ScoreError(f"{path}: not an .npz of images under 'arr_0' ({error})") from None
        if array.dtype != np.uint8 or array.ndim != 4 or len(array) == 0 or array.shape[-1] not in (1, 3):
            raise ScoreError(f"{path}: expected non-empty uint8 images (N, H, W, C) with C 1 or 3 under "
                             f"'arr_0', got {array.dtype} {array.shape}"
                             + (" (channels first?)" if array.ndim == 4 and array.shape[1] in (1, 3) else ""))
        return torch.from_numpy(array).permute(0, 3, 1, 2).float().contiguous() / 255
    if not os.path.isdir(path):
        raise ScoreError(f"{path}: not a folder of images or an .npz file")
    paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                   for name in names if name.lower().endswith(datasets.IMAGE_EXTENSIONS))
    if not paths:
        raise ScoreError(f"no image files ({', '.join(datasets.IMAGE_EXTENSIONS)}) under {path}")
    arrays = []
    for file in paths:
        try:
            with files.open_regular(file) as opened, Image.open(opened) as image:
                arrays.append(np.asarray(datasets.to_8_bits(image).convert("RGB")))
        except (OSError, ValueError) as error:  # not a regular file (a FIFO named x.png), pixels of no known range
            raise ScoreError(f"cannot read image {file}: {error}") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ScoreError(f"{file} is {arrays[-1].shape[:2]} but {paths[0]} is "
                             f"{arrays[0].shape[:2]}: images to score must share one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().contiguous() / 255


def save_images(images, path, start=0):
    """Float (N, C, H, W) in [0, 1] -> 8-bit images, rounded exactly as `quantize` rounds.

    path ending in .npz: one file, uint8 (N, H, W, C) under the key 'arr_0' (the layout of
    OpenAI's guided-diffusion evaluation suite). Otherwise a folder of PNG files named
    {start:06d}.png, {start+1:06d}.png, ... so that ranks can write their shares side by side.
    """
    array = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    if path.endswith(".npz"):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_atomically(path, lambda file: np.savez(file, arr_0=array), array.nbytes)
        return
    os.makedirs(path, exist_ok=True)
    for i, image in enumerate(array, start):
        files.save_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image),
                         os.path.join(path, f"{i:06d}.png"))
