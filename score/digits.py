"""An offline stand-in for Inception on the 8x8 digits: a small CNN trained on the train split.

Its penultimate activations play the part of Inception's pool3 features (Frechet distance)
and its 10-way logits the part of Inception's 1008-way logits (Inception-style score, at most
10), so the digits demo is scored by the same code as CIFAR10, with no weights to download.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import files

CLASSIFIER = "data/digits_classifier.pt"
# Training recipe; it is saved with the weights and a cached file with another one is retrained.
RECIPE = dict(seed=0, epochs=15, batch_size=50, lr=2e-3, weight_decay=1e-4, features=64)


SPATIAL_CHANNELS = 7
SPATIAL_DIM = 8 * 8 * SPATIAL_CHANNELS


class DigitsNet(nn.Module):
    """Images in [0, 1] (N, 1 or 3, H, W) -> (features (N, RECIPE['features']), logits (N, 10),
    spatial features (N, 448)).

    The spatial features stand in for sFID's Inception ones: as those are the first 7
    channels of a convolution below the pooled features, these are the first 7 of the 64
    channels of the last convolution (after its ReLU, before the pooling), at all 8 x 8
    positions, flattened in (H, W, C) order."""

    def __init__(self, features):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, 10)

    def forward(self, x):
        if x.shape[1] == 3:  # grayscale digits read back from RGB image files
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (8, 8):  # as datasets.py resizes the digits for other image sizes
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        grid = self.body[:4](x)  # the two convolutions: (N, 64, 8, 8)
        features = self.body[4:](grid)
        spatial = grid[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return features, self.head(features), spatial


def train_classifier(recipe=RECIPE):
    """AdamW on the 1500 training digits, on the CPU, seeded: the same weights on every run.

    The global RNG is forked so that training leaves the caller's random stream untouched.
    """
    images, labels = datasets.digits_array(train=True)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    # One thread: the same summation order on every machine, and no OpenMP threads spinning
    # against each other on a busy CPU (measured 6x slower with 2 threads on 2 loaded cores).
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe["seed"])
            net = DigitsNet(recipe["features"])
            optimizer = torch.optim.AdamW(net.parameters(), lr=recipe["lr"],
                                          weight_decay=recipe["weight_decay"])
            for _ in range(recipe["epochs"]):
                for batch in torch.randperm(len(images)).split(recipe["batch_size"]):
                    logits = net(images[batch])[1]
                    loss = F.cross_entropy(logits, labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    return net.requires_grad_(False).eval()


def load_classifier(path=CLASSIFIER):
    """The classifier cached at path, trained (a few seconds) and saved there if absent,
    stale or unreadable (a cache: retraining gives the same weights)."""
    if os.path.isfile(path):
        try:
            with files.open_regular(path) as file:
                cached = torch.load(file, map_location="cpu", weights_only=True)
            if cached["recipe"] == RECIPE:
                net = DigitsNet(RECIPE["features"])
                net.load_state_dict(cached["state_dict"])
                return net.requires_grad_(False).eval()
        except Exception as error:  # truncated, corrupt, refused by weights_only, other keys
            print(f"note: the cached digits classifier {path} is unreadable "
                  f"({type(error).__name__}); training it again", file=sys.stderr)
    net = train_classifier()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    # written whole, then renamed: ranks that all train at once never read a half-written file
    state = {"recipe": RECIPE, "state_dict": net.state_dict()}
    files.write_atomically(path, lambda file: torch.save(state, file), files.state_size(state))
    return net
