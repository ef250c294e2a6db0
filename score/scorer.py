"""Scoring images: the Evaluator (features -> IS and FID), and images to and from disk."""
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import datasets
import files
from . import digits, inception
from .distribution import kernel_inception_distance, precision_recall_density_coverage
from .metrics import (REFERENCE_EXTRAS, ScoreError, frechet_distance, inception_score, load_reference,
                      statistics, to_uint8)
from .metrics import quantize as round_to_8_bits  # `quantize` is the Evaluator's flag

FEATURES = ("inception", "digits")
# --metrics: what a score may hold. fid: FID; is: Inception Score; pr: improved precision and
# recall (k = 3) with density and coverage (k = 5); kid: kernel inception distance; sfid: the
# Frechet distance of spatial features.
METRICS = ("fid", "is", "pr", "kid", "sfid")
DEFAULT_METRICS = ("fid", "is")
K_PRECISION_RECALL, K_DENSITY_COVERAGE = 3, 5  # Kynkäänniemi et al. 2019; Naeem et al. 2020
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Bińkowski et al. 2018


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
    return command + f" --output {output or '<stats.npz>'}"


def is_main_process():
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


class Evaluator:
    """One feature network and the reference to score images against.

    feature: "inception" (FID Inception pool3 + 1008 logits + mixed_6/conv spatial features)
        or "digits" (the offline digits classifier's penultimate features + 10 logits + its
        last convolution's spatial features).
    fid_cache: .npz of the reference mu and sigma, and of the reference features the metrics
        beyond FID need (score.fid_cache writes them). None: for "digits", everything from the
        digits train split, computed here (milliseconds); for "inception", no reference, so
        score() gives the Inception Score only.
    metrics: of METRICS, those to compute. Those the reference cannot give (a file written
        before reference features were) are dropped with one line saying so, here.
    quantize: round samples to 8 bits before scoring, as saving them as PNG would.
    dataset, data_root, img_size: only to spell out the exact fid_cache command in the error
        raised when fid_cache does not exist.
    Every missing input (weights, statistics) raises ScoreError here, before any real work.
    """

    def __init__(self, feature, fid_cache=None, device="cpu", inception_weights=None,
                 quantize=True, batch_size=250, digits_classifier=digits.CLASSIFIER,
                 dataset=None, data_root=None, img_size=None, metrics=DEFAULT_METRICS):
        if feature not in FEATURES:
            raise ScoreError(f"unknown feature {feature!r}: expected one of {', '.join(FEATURES)}")
        unknown = [name for name in metrics if name not in METRICS]
        if unknown or not metrics:
            raise ScoreError(f"unknown metrics {unknown or 'none'}: expected some of {', '.join(METRICS)}")
        self.device = torch.device(device)
        self.feature = feature
        self.quantize = quantize
        self.batch_size = batch_size
        weights = inception.find_weights(inception_weights) if feature == "inception" else None
        self.weights_path = weights if feature == "inception" else digits_classifier
        self.reference = self.reference_features = self.reference_spatial = None
        command = fid_cache_command(fid_cache, feature, dataset, data_root, img_size, inception_weights)
        stored = load_reference(fid_cache, command) if fid_cache is not None else {}
        if feature == "inception":
            self.net = inception.FIDInception(weights)
        else:
            self.net = digits.load_classifier(digits_classifier)
        self.net.to(self.device).eval()
        if stored:
            self.reference = stored["mu"], stored["sigma"]
            if "features" in stored:
                self.reference_features = stored["features"].to(self.device)
                self.reference_seed = int(stored["features_seed"]) if "features_seed" in stored else None
            if "mu_s" in stored:
                self.reference_spatial = stored["mu_s"], stored["sigma_s"]
        elif feature == "digits":
            real = torch.from_numpy(datasets.digits_array(train=True)[0])
            # the reference is real data as stored in 8 bits, whatever self.quantize says
            features, _, spatial = self.run(round_to_8_bits(real), spatial=True)
            self.reference, self.reference_features = statistics(features), features
            self.reference_spatial, self.reference_seed = statistics(spatial), None
        self.check_widths(fid_cache)
        self.metrics = self.available(metrics, fid_cache, command)
        self.spatial = "sfid" in self.metrics

    def check_widths(self, fid_cache):
        net = inception if self.feature == "inception" else digits
        dim = inception.POOL_DIM if self.feature == "inception" else digits.RECIPE["features"]
        for what, found, expected in (("FID statistics", self.reference, dim),
                                      ("spatial statistics", self.reference_spatial, net.SPATIAL_DIM)):
            if found is not None and len(found[0]) != expected:
                raise ScoreError(f"{what} {fid_cache} have {len(found[0])} features but the {self.feature} "
                                 f"network gives {expected}: made with another --feature?")

    def available(self, metrics, fid_cache, command):
        """The metrics asked for, but those this reference cannot give, with one line about them."""
        have = {"features": self.reference_features, "mu_s": self.reference_spatial,
                "sigma_s": self.reference_spatial}
        missing = [metric for metric in metrics if any(
            metric in wanted and have[name] is None for name, wanted in REFERENCE_EXTRAS.items())]
        if missing and is_main_process():
            print(f"note: {fid_cache}: no reference features for {', '.join(missing)}, so they are not "
                  f"scored (a statistics file written before they were holds only mu and sigma); for "
                  f"them, write it again with: {command}" if fid_cache else
                  f"note: no --fid_cache, so no reference for {', '.join(missing)}: they are not scored; "
                  f"write one with: {command}", file=sys.stderr)
        return tuple(metric for metric in METRICS if metric in metrics and metric not in missing)

    @torch.no_grad()
    def run(self, images, progress=False, spatial=False):
        """(features, logits, spatial features or None) in float64 on self.device."""
        if torch.is_tensor(images):
            images = images.split(self.batch_size)
        pools, logits, grids = [], [], []
        count, nonfinite = 0, torch.zeros((), dtype=torch.long, device=self.device)
        for batch in tqdm(images, desc="features", disable=not progress, leave=False):
            # one memory layout: a channels-last input would take other conv kernels and
            # round differently, so the same images could give different features
            batch = batch.to(self.device, torch.float32).contiguous()
            # counted on the device, read once at the end: quantizing would hide NaN
            nonfinite += (~torch.isfinite(batch)).flatten(1).any(1).sum()
            count += len(batch)
            if self.quantize:
                batch = round_to_8_bits(batch)
            pool, logit, grid = self.net(batch)
            pools.append(pool.double())
            logits.append(logit.double())
            if spatial:
                grids.append(grid.double())
        if not pools:
            raise ScoreError("no images to score")
        if nonfinite:
            raise ScoreError(f"{int(nonfinite)} of {count} samples contain NaN or inf values, so "
                             "nothing was scored (a diverged model?)")
        return torch.cat(pools), torch.cat(logits), torch.cat(grids) if spatial else None

    def features(self, images, progress=False):
        """(features (N, D), logits (N, K)) in float64 on self.device, for this rank's images,
        and their spatial features (N, S) third when sFID is scored (self.spatial).

        images: float in [0, 1], (N, C, H, W), on any device: a tensor (run in batches of
        batch_size) or an iterable of such batches.
        """
        features, logits, spatial = self.run(images, progress, self.spatial)
        return (features, logits, spatial) if self.spatial else (features, logits)

    def score(self, features, logits, spatial=None):
        """The metrics asked for, from all ranks' features and logits: 'IS', 'IS_std'; with a
        reference, 'FID' ('warning' too for an Inception FID of too few samples:
        small_sample_warning), 'precision', 'recall', 'density', 'coverage', 'KID', 'KID_std'
        and, from spatial (the samples' spatial features, or their (mean, covariance)), 'sFID'."""
        scores = {}
        if "is" in self.metrics:
            scores.update(zip(("IS", "IS_std"), inception_score(logits)))
        if "fid" in self.metrics and self.reference is not None:
            scores["FID"] = frechet_distance(*statistics(features), *self.reference)
            warning = small_sample_warning(self.feature, len(features))
            if warning:
                scores["warning"] = warning
        if "pr" in self.metrics:
            scores.update(precision_recall_density_coverage(self.reference_features, features,
                                                            K_PRECISION_RECALL, K_DENSITY_COVERAGE))
        if "kid" in self.metrics:
            scores.update(kernel_inception_distance(self.reference_features, features, KID_SUBSETS,
                                                    self.kid_subset_size(len(features))))
        if "sfid" in self.metrics:
            spatial = statistics(spatial) if torch.is_tensor(spatial) else spatial
            scores["sFID"] = frechet_distance(*spatial, *self.reference_spatial)
        return scores

    def kid_subset_size(self, num_samples):
        """KID_SUBSET_SIZE, or fewer where either set has fewer."""
        return min(KID_SUBSET_SIZE, num_samples, len(self.reference_features))

    def record(self, num_samples):
        """What the protocol record says of the metrics beyond FID and IS."""
        record = {"metrics": list(self.metrics)}
        if {"pr", "kid"} & set(self.metrics):
            record["reference_features"] = len(self.reference_features)
            record["reference_features_seed"] = self.reference_seed
        if "pr" in self.metrics:
            record["pr_k"] = [K_PRECISION_RECALL, K_DENSITY_COVERAGE]
        if "kid" in self.metrics:
            record["kid_subsets"] = [KID_SUBSETS, self.kid_subset_size(num_samples)]
        return record


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
