"""What training and evaluation both build from the flags: the UNet, the sampler, and the
seeds of the random streams.

Every random draw comes from a generator seeded by (--seed, stream, index...), so that a run
is the same on 1 or N processes, resumes exactly, and an evaluation can restart at any batch.
"""
import numpy as np

from diffusion import GaussianDiffusionSampler
from model import UNet

# The independent random streams: training data order, per-step flips/timesteps/noise, the
# fixed x_T of the training-time grids and their sampling noise, evaluation batches,
# bits/dim batches, progressive and interpolation runs.
DATA_ORDER, TIMESTEP_NOISE, X_T, SAMPLE_NOISE, EVAL_NOISE, BPD_NOISE, INSPECT_NOISE = range(7)


def stream_seed(*key):
    """A 63-bit seed for one (seed, stream, index...) key: distinct keys give unrelated streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def build_model(flags, layout=None):
    """The UNet of the flags; layout: the checkpoint's, else --layout, else official."""
    var_channels = 2 if flags.var_type == "learned" else 1
    return UNet(T=flags.T, ch=flags.ch, ch_mult=flags.ch_mult, attn=flags.attn,
                num_res_blocks=flags.num_res_blocks, dropout=flags.dropout,
                in_ch=flags.img_channels, out_ch=var_channels * flags.img_channels,
                img_size=flags.img_size, layout=layout or flags.layout or "official")


def build_sampler(flags, net, full_chain=False):
    """The sampler the flags ask for; full_chain: T-step ancestral (for bits/dim)."""
    fast = {} if full_chain else dict(sampler=flags.sampler, sample_steps=flags.sample_steps or None,
                                      eta=flags.eta, skip_type=flags.skip_type)
    return GaussianDiffusionSampler(net, flags.beta_1, flags.beta_T, flags.T, flags.img_size,
                                    flags.mean_type, flags.var_type, flags.clip_denoised, **fast)
