"""Random horizontal flips in training (Ho et al. sec. 4: on for CIFAR10, church, CelebA-HQ and
folders). The flip of image i of step s is bit i of a mask seeded by (--seed, s) for the
global batch, which every process and micro-batch slices; these tests run a flip-on image
folder through one process, two processes and gradient accumulation, and look at the
flipped images themselves."""

import numpy as np
import pytest
import torch
from PIL import Image

import batches
import datasets
import diffusion
import streams
import train
import cli
from conftest import TINY_ARGS, assert_same_updates, run_main, run_main_process, weights

STEPS, BATCH = 3, 16
FORWARD = diffusion.GaussianDiffusionTrainer.forward


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """48 random RGB 8x8 PNGs: no image equals its mirror image."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return str(root)


def folder_args(folder):
    return ["--dataset", "folder", "--data_root", folder, "--img_channels", "3"]


def test_an_image_folder_flips_by_default():
    """The CLI flips what datasets.default_flip says; the CLI tests below rely on folders flipping."""
    assert datasets.default_flip("folder") and datasets.default_flip("cifar10")
    assert not datasets.default_flip("digits")


def recorded_batches(monkeypatch, tmp_path, *args):
    """train.train in this process with TINY_ARGS and args for STEPS steps; the x_0 of every
    micro-batch, in order, as the trainer received it."""
    seen = []

    def recording(self, x_0, t=None, noise=None, y=None):
        seen.append(x_0.detach().clone())
        return FORWARD(self, x_0, t, noise, y)
    monkeypatch.setattr(diffusion.GaussianDiffusionTrainer, "forward", recording)
    train.train(cli.configuration(["main.py", *TINY_ARGS, "--train", "--logdir", str(tmp_path), "--total_steps",
                                    str(STEPS), "--sample_step", "0", "--save_step", "0", "--batch_size",
                                    str(BATCH), *args]), "cpu")
    return seen


def expected_batches(dataset, accum_steps, seed=0):
    """Every micro-batch as the loop must build it: the seeded permutation's images, each
    mirrored where the step's seeded mask says. Also the masks (one per step)."""
    sampler = iter(batches.GlobalBatchSampler(len(dataset), BATCH, 1, 0, accum_steps, seed, start=0))
    expected, masks = [], []
    for step in range(STEPS):
        flip = streams.step_draws(seed, step, BATCH, dataset[0][0].shape, 20, "cpu")[0]
        masks.append(flip)
        micro = BATCH // accum_steps
        for m in range(accum_steps):
            images = torch.stack([dataset[int(i)][0] for i in next(sampler)])
            mask = flip[m * micro:(m + 1) * micro, None, None, None]
            expected.append(torch.where(mask, images.flip(-1), images))
    return expected, masks


def test_flips_follow_the_seeded_mask_in_every_micro_batch(folder, monkeypatch, tmp_path):
    """The images training sees are mirrored exactly where the mask of their step says, and
    the mask flips some images of each step and not others. Catches flips that never happen,
    always happen, flip the wrong axis, or take micro-batch 0's slice of the mask for every
    micro-batch."""
    seen = recorded_batches(monkeypatch, tmp_path, *folder_args(folder), "--accum_steps", "2")
    dataset = datasets.build_dataset("folder", folder, 8, train=True, flip=False, channels=3)
    expected, masks = expected_batches(dataset, accum_steps=2)
    assert len(seen) == len(expected) == 2 * STEPS
    for ours, theirs in zip(seen, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for mask in masks:
        assert 0 < int(mask.sum()) < BATCH  # some images flipped, some not
        assert mask[:BATCH // 2].tolist() != mask[BATCH // 2:].tolist()  # the micro-batches differ


@pytest.mark.slow  # over a second on 2 cores
def test_data_on_device_gives_the_loaders_images_and_flips(monkeypatch, tmp_path):
    """--data_on_device (digits held whole as one tensor) against the data loader, flips on:
    the same images, mirrored the same way, at every micro-batch. Catches a device path that
    skips the flips or cuts other images."""
    monkeypatch.setattr(datasets, "default_flip", lambda name: True)  # digits do not flip by default
    loader = recorded_batches(monkeypatch, tmp_path / "loader", "--accum_steps", "2")
    device = recorded_batches(monkeypatch, tmp_path / "device", "--accum_steps", "2", "--data_on_device")
    assert len(loader) == len(device) == 2 * STEPS
    for ours, theirs in zip(device, loader):
        assert torch.equal(ours, theirs)
    dataset = datasets.build_dataset("digits", None, 8, train=True, flip=False)
    expected, _ = expected_batches(dataset, accum_steps=2)
    for ours, theirs in zip(device, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.slow
def test_flipped_training_is_the_same_update_on_two_processes_and_in_micro_batches(folder, tmp_path):
    """One process, one process with 4 micro-batches, and two processes (Gloo) train the same
    weights from a flip-on folder: each rank and micro-batch flips its own slice of the global
    mask. Measured after 3 steps: 1 of the 703k weights differs from the one-process run by
    more than 1e-5 (by 1.06e-5), on two processes as in micro-batches; with rank 1 flipping by
    rank 0's part of the mask, 96% do, by up to 5e-3. assert_same_updates allows 1 in 10^4,
    and none beyond 2e-4."""
    common = ["--train", "--total_steps", str(STEPS), "--dropout", "0", "--save_step", "0",
              "--sample_step", "0", *folder_args(folder)]
    runs = {"one": [], "micro": ["--accum_steps", "4"], "two": ["--nprocs", "2", "--device", "cpu"]}
    for name, split in runs.items():  # two processes: spawned, so a command of their own
        (run_main_process if name == "two" else run_main)(*common, "--logdir", str(tmp_path / name), *split)
    for name in ("micro", "two"):
        assert_same_updates(weights(tmp_path / "one"), weights(tmp_path / name))
