"""The EDM samplers and spacing against k-diffusion 0.1.1.post1 (crowsonkb), step by step in
float64: its `get_sigmas_karras`, `sample_heun` (with and without churn, given the same noise)
and `sample_euler_ancestral`, driving the same deterministic eps network through its own
wrapper for discrete DDPM models, `DiscreteEpsDDPMDenoiser(quantize=True)`.

k-diffusion is a test-only dependency, installed without its dependencies (the set-up command
in the README): its metadata pins numpy < 2 through dctorch, which none of the modules used
here imports. Its package __init__ imports every submodule (kornia, clean-fid, CLIP, ...), so
the two modules used are imported without it (bench.samplers.k_diffusion_sampling, which the
benchmark's reference rows use too).

The definitions are the same but for one: k-diffusion's wrapper does not clip D, so the
comparison runs with --noclip_denoised (test_edm.py checks the clipped D against Algorithm 2).
"""
import numpy as np
import pytest
import torch

from bench.samplers import k_diffusion_sampling
from diffusion import GaussianDiffusionSampler
from sampling import karras_sigmas
from test_edm import EpsToy
from test_samplers import BETAS, SHAPE, schedule


def k_diffusion_modules():
    try:
        return k_diffusion_sampling()
    except ImportError as error:
        pytest.skip(str(error))


class Draws:
    """torch as k-diffusion's sampling module sees it, but randn_like draws from our generator
    in our order (k-diffusion's sample_heun draws one z per step from the global RNG)."""

    def __init__(self, generator):
        self.generator = generator

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


def both(name, monkeypatch, seed=0, **options):
    """Our chain's records and k-diffusion's per-step callbacks and output on the same sigmas."""
    k_sampling, k_external = k_diffusion_modules()
    _, alphas_bar = schedule()
    sampler = GaussianDiffusionSampler(BETAS, sampler=name, clip_denoised=False, **options)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = list(sampler.chain(EpsToy(), x_T, generator=torch.Generator().manual_seed(seed + 1)))
    sigmas = torch.from_numpy(np.sqrt((1 - alphas_bar[sampler.timesteps]) / alphas_bar[sampler.timesteps]))
    sigmas = torch.cat([sigmas.flip(0), sigmas.new_zeros(1)])
    denoiser = k_external.DiscreteEpsDDPMDenoiser(EpsToy(), torch.from_numpy(alphas_bar), quantize=True)
    theirs, x = [], x_T * (1 + sigmas[0] ** 2).sqrt()
    generator = torch.Generator().manual_seed(seed + 1)
    if name == "heun":
        monkeypatch.setattr(k_sampling, "torch", Draws(generator))
        out = k_sampling.sample_heun(denoiser, x, sigmas, callback=theirs.append, disable=True,
                                     s_churn=options.get("churn", 0.0), s_noise=options.get("churn_noise", 1.0))
    else:
        noise = lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, dtype=x.dtype)  # noqa: E731
        out = k_sampling.sample_euler_ancestral(denoiser, x, sigmas, callback=theirs.append, disable=True,
                                                noise_sampler=noise)
    return ours, theirs, out, sigmas


@pytest.mark.parametrize("name,options", [
    ("heun", dict(sample_steps=9, skip_type="karras")),
    ("heun", dict(sample_steps=11, skip_type="quadratic")),
    ("heun", dict(sample_steps=9, skip_type="karras", churn=10.0, churn_noise=1.007)),
    ("euler_ancestral", dict(sample_steps=8, skip_type="karras")),
    ("euler_ancestral", dict(sample_steps=8, skip_type="uniform")),
], ids=["heun", "heun_quadratic", "heun_churn", "euler_ancestral", "euler_ancestral_uniform"])
def test_every_step_equals_k_diffusion(name, options, monkeypatch):
    """Each step's D (x0_hat) and the output, to 1e-10 relative. Catches any difference of
    update, noise, churn, or the sigma-to-timestep mapping from k-diffusion's."""
    ours, theirs, out, sigmas = both(name, monkeypatch, **options)
    assert len(ours) == len(theirs) == len(sigmas) - 1
    for record, step in zip(ours, theirs):
        torch.testing.assert_close(record.x0_hat, step["denoised"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[-1].x_prev, out, rtol=1e-10, atol=1e-12)


def test_karras_sigmas_equal_get_sigmas_karras():
    k_sampling, _ = k_diffusion_modules()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its ramp is torch.linspace in the default dtype
    try:
        for n, low, high, rho in ((10, 0.002, 80.0, 7.0), (25, 0.0101, 157.4, 3.0), (1, 0.1, 10.0, 7.0)):
            theirs = k_sampling.get_sigmas_karras(n, low, high, rho).numpy()
            np.testing.assert_allclose(karras_sigmas(n, low, high, rho), theirs[:-1], rtol=1e-12)
            assert theirs[-1] == 0
    finally:
        torch.set_default_dtype(previous)
