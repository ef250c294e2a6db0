"""The FID Inception network (TF Inception of 2015-12-05, as pytorch_gan_metrics ports it).

pytorch_gan_metrics' own InceptionV3 downloads its weights while it is built; here the same
architecture (torchvision's Inception v3 with its FID-patched blocks) is built without
weights and loaded from a file found up front, so nothing ever waits on the network during a
run. With a connection, `python -m score.download` fetches them into the torch hub cache.
"""
import os

import torch
import torch.nn.functional as F
from pytorch_gan_metrics.inception import (FID_WEIGHTS_URL, FIDInceptionA, FIDInceptionC,
                                           FIDInceptionE_1, FIDInceptionE_2)
from torch import nn
from torchvision import models

import files
from .metrics import ScoreError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
POOL_DIM, LOGITS_DIM = 2048, 1008  # pool3 features for FID; the 1008-way classifier for IS
# sFID (Nash et al. 2021) as guided-diffusion's evaluator computes it: the TF graph's tensor
# "mixed_6/conv" (the 1x1 branch of the seventh mixed block, Mixed_6d here, after its ReLU),
# 17 x 17 positions, of which the first 7 channels: 17 * 17 * 7 = 2,023 numbers per image,
# flattened in the TF graph's (H, W, C) order so that its spatial statistics are theirs.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


def hub_weights_path():
    """Where torch.hub (and pytorch_gan_metrics) caches the weights: $TORCH_HOME/hub/checkpoints."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def find_weights(path=None):
    """The weights file: path if given, else the torch hub cache; ScoreError if it is absent."""
    if path is not None:
        if not os.path.isfile(path):
            raise ScoreError(f"--inception_weights {path}: no such file; it should be "
                             f"{WEIGHTS_FILE} from {FID_WEIGHTS_URL}")
        return path
    if not os.path.isfile(hub_weights_path()):
        raise ScoreError(
            f"FID Inception weights {WEIGHTS_FILE} not found: download {FID_WEIGHTS_URL} into "
            f"{os.path.dirname(hub_weights_path())}/ or pass --inception_weights PATH")
    return hub_weights_path()


def fid_inception_v3():
    """torchvision's Inception v3 with the blocks the TF graph computes differently; random init.

    Its state_dict has exactly the keys of the weights file.
    """
    net = models.inception_v3(weights=None, aux_logits=False, num_classes=LOGITS_DIM,
                              init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def spatial_features(feature_map):
    """The first SPATIAL_CHANNELS channels of an (N, C, H, W) map, flattened as (N, H * W * 7)."""
    return feature_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


class FIDInception(nn.Module):
    """Images in [0, 1] (N, 1 or 3, H, W) -> (pool3 features (N, 2048), logits (N, 1008),
    spatial features (N, 2023) for sFID)."""

    def __init__(self, weights_path):
        super().__init__()
        net = fid_inception_v3()
        try:
            with files.open_regular(weights_path) as file:
                net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as error:  # truncated download, wrong file, ...
            raise ScoreError(f"could not load the FID Inception weights {weights_path} ({error}); "
                             f"expected {WEIGHTS_FILE} from {FID_WEIGHTS_URL}") from None
        # The TF Inception Score multiplies pool3 by the softmax weights with no bias (as
        # pytorch_gan_metrics does by dropping fc.bias), so keep only the weight matrix.
        self.register_buffer("fc_weight", net.fc.weight.detach().clone())
        net.fc = nn.Identity()  # net(x) now ends at the 2048-d average pool
        self.net = net.requires_grad_(False).eval()
        self.spatial = None
        net.Mixed_6d.branch1x1.register_forward_hook(self.keep_spatial)

    def keep_spatial(self, module, inputs, output):
        self.spatial = spatial_features(output)

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        pool = self.net(2 * x - 1)  # the network expects [-1, 1]
        spatial, self.spatial = self.spatial, None
        return pool, F.linear(pool, self.fc_weight), spatial

