"""Karras et al. (2022)'s samplers (heun, euler_ancestral) and spacing (karras) against
references written from the paper's Algorithm 2 and eq. 5 and from k-diffusion's documented
Euler-ancestral step, in numpy float64 and independently of edm.py: the same deterministic
toy network (tests/test_samplers.py), the same noise replayed in the same order. On Gaussian
data (the exact-eps oracle) Heun's output distribution is known exactly and converges at
second order.
"""
import math

import numpy as np
import pytest
import torch

import evaluate
from config import Config, ConfigError
from diffusion import GaussianDiffusionSampler
from sampling import karras_sigmas, sample_timesteps
from test_samplers import BETAS, PAPER_BETAS, SHAPE, schedule, toy_output
from test_solvers import flow_error


def sigmas_of(kept, alphas_bar):
    return np.sqrt((1.0 - alphas_bar[kept]) / alphas_bar[kept])


def reference_heun(x_T, kept, alphas_bar, noise, churn=0.0, tmin=0.0, tmax=math.inf, s_noise=1.0, clip=True):
    """Algorithm 2 of Karras et al. on sigma_i = sigma(kept[i]), descending, then 0, with
    D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)) of the toy eps network,
    t(sigma) the training step nearest in log sigma; noise: the z of each churned step."""
    grid = np.sqrt((1.0 - alphas_bar) / alphas_bar)
    sigmas = list(sigmas_of(kept, alphas_bar)[::-1]) + [0.0]
    steps = len(sigmas) - 1

    def D(x, sigma):
        t = int(np.abs(np.log(grid) - np.log(sigma)).argmin())
        x0 = x - sigma * toy_output(x / np.sqrt(1 + sigma ** 2), t)
        return np.clip(x0, -1, 1) if clip else x0
    x = x_T * np.sqrt(1 + sigmas[0] ** 2)
    draws = iter(noise)
    for i in range(steps):
        gamma = min(churn / steps, np.sqrt(2) - 1) if tmin <= sigmas[i] <= tmax else 0.0
        sigma_hat = sigmas[i] * (1 + gamma)
        if gamma > 0:
            x = x + np.sqrt(sigma_hat ** 2 - sigmas[i] ** 2) * s_noise * next(draws)
        d = (x - D(x, sigma_hat)) / sigma_hat
        x_next = x + (sigmas[i + 1] - sigma_hat) * d
        if sigmas[i + 1] > 0:
            d_next = (x_next - D(x_next, sigmas[i + 1])) / sigmas[i + 1]
            x_next = x + (sigmas[i + 1] - sigma_hat) * (d + d_next) / 2
        x = x_next
    return x


def reference_euler_ancestral(x_T, kept, alphas_bar, noise, clip=True):
    """k-diffusion's sample_euler_ancestral (eta 1) on the same sigmas."""
    sigmas = list(sigmas_of(kept, alphas_bar)[::-1]) + [0.0]
    x = x_T * np.sqrt(1 + sigmas[0] ** 2)
    draws = iter(noise)
    for i, t in enumerate(kept[::-1]):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = x - s * toy_output(x / np.sqrt(1 + s ** 2), t)
        x0 = np.clip(x0, -1, 1) if clip else x0
        up = min(s_next, np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        x = x + (np.sqrt(s_next ** 2 - up ** 2) - s) * (x - x0) / s
        if s_next > 0:
            x = x + up * next(draws)
    return x


class EpsToy(torch.nn.Module):
    def forward(self, x, t):
        return torch.from_numpy(toy_output(x.numpy(), t.numpy().reshape(-1, 1, 1, 1)))


class XstartToy(torch.nn.Module):
    """An xstart model whose x0 prediction is the one EpsToy's eps implies: the same sampler."""

    def __init__(self, alphas_bar):
        super().__init__()
        self.alphas_bar = torch.from_numpy(alphas_bar)

    def forward(self, x, t):
        a = self.alphas_bar[t].view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * EpsToy()(x, t)) / a.sqrt()


def noise_draws(generator, count):
    return [torch.randn(SHAPE, generator=generator, dtype=torch.float64).numpy() for _ in range(count)]


@pytest.mark.parametrize("skip_type,steps", [("karras", 9), ("quadratic", 10), ("uniform", 7)])
@pytest.mark.parametrize("clip", [True, False])
def test_heun_is_algorithm_1(skip_type, steps, clip):
    """Every update, the Heun correction (skipped into sigma = 0), the VP/VE conversions and
    the clip of D: against the float64 reference. Catches a missing correction, a correction
    at the last step, d taken at the wrong sigma, or the input not scaled by 1/sqrt(1 + sigma^2)."""
    _, alphas_bar = schedule()
    sampler = GaussianDiffusionSampler(BETAS, sampler="heun", sample_steps=steps, skip_type=skip_type,
                                       clip_denoised=clip)
    assert len(sampler.timesteps) == (steps + 1) // 2
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sampler.chain(EpsToy(), x_T)
    for record in ours:
        out = record.x_prev
    np.testing.assert_allclose(out.numpy(), reference_heun(x_T.numpy(), sampler.timesteps, alphas_bar, [],
                                                           clip=clip), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("churn,tmin,tmax", [(10.0, 0.0, 0.0), (40.0, 0.5, 3.0), (2.0, 0.0, 0.0)])
def test_heun_with_churn_is_algorithm_2(churn, tmin, tmax):
    """The churned sigma_hat, the fresh noise only where tmin <= sigma <= tmax (0: no bound),
    gamma capped at sqrt(2) - 1, and the network asked at the timestep nearest sigma_hat.
    Catches gamma uncapped or not divided by N, noise added outside the window, and D at
    sigma_i instead of sigma_hat."""
    _, alphas_bar = schedule()
    sampler = GaussianDiffusionSampler(BETAS, sampler="heun", sample_steps=11, skip_type="karras", churn=churn,
                                       churn_tmin=tmin, churn_tmax=tmax, churn_noise=1.003)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = sampler(EpsToy(), x_T, generator=torch.Generator().manual_seed(2))
    sigmas = sigmas_of(sampler.timesteps, alphas_bar)
    churned = int(sum(tmin <= s <= (tmax or math.inf) for s in sigmas))
    assert 0 < churned
    expected = reference_heun(x_T.numpy(), sampler.timesteps, alphas_bar,
                              noise_draws(torch.Generator().manual_seed(2), churned), churn=churn, tmin=tmin,
                              tmax=tmax or math.inf, s_noise=1.003)
    np.testing.assert_allclose(ours.numpy(), np.clip(expected, -1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("skip_type", ["karras", "quadratic"])
def test_euler_ancestral_is_k_diffusions_step(skip_type):
    """sigma_up and sigma_down of an ancestral step, the Euler step to sigma_down and the noise
    (none into sigma = 0). Catches sigma_up and sigma_down swapped or noise at the last step."""
    _, alphas_bar = schedule()
    sampler = GaussianDiffusionSampler(BETAS, sampler="euler_ancestral", sample_steps=8, skip_type=skip_type)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = sampler(EpsToy(), x_T, generator=torch.Generator().manual_seed(4))
    expected = reference_euler_ancestral(x_T.numpy(), sampler.timesteps, alphas_bar,
                                         noise_draws(torch.Generator().manual_seed(4), 7))
    np.testing.assert_allclose(ours.numpy(), np.clip(expected, -1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["heun", "euler_ancestral"])
def test_every_mean_type_is_sampled_through_its_own_x0_prediction(name):
    """An xstart model predicting the x0 that the eps model's output implies is sampled to the
    same samples, also where churn asks between training steps. Catches D of a non-eps model
    read as if its output were eps."""
    _, alphas_bar = schedule()
    options = dict(sampler=name, sample_steps=9, skip_type="karras", churn=5.0 if name == "heun" else 0.0)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = GaussianDiffusionSampler(BETAS, **options)(EpsToy(), x_T, generator=torch.Generator().manual_seed(6))
    xstart = GaussianDiffusionSampler(BETAS, mean_type="xstart", **options)(
        XstartToy(alphas_bar), x_T, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(xstart, eps, rtol=1e-10, atol=1e-10)


def test_karras_sigmas_are_eq_5_and_the_spacing_the_nearest_training_steps():
    """sigma_max first, sigma_min last, sigma^(1/rho) evenly spaced between; each kept
    timestep is the training step nearest its target in log sigma (no repeats at these
    counts), and sigma_min / sigma_max narrow the range. Catches rho inverted, the ramp
    reversed, nearest in sigma instead of log sigma, or the range ignored."""
    sigmas = karras_sigmas(6, 0.02, 80.0, rho=7.0)
    assert sigmas[0] == pytest.approx(80.0, rel=1e-14) and sigmas[-1] == pytest.approx(0.02, rel=1e-14)
    np.testing.assert_allclose(np.diff(sigmas ** (1 / 7)), (0.02 ** (1 / 7) - 80 ** (1 / 7)) / 5, rtol=1e-12)
    _, alphas_bar = schedule(1e-4, 0.02, 1000)
    grid = np.log(np.sqrt((1 - alphas_bar) / alphas_bar))
    for rho, low, high in ((7.0, 0.0, 0.0), (3.0, 0.1, 20.0)):
        kept = sample_timesteps(alphas_bar, 12, "karras", (rho, low, high))
        targets = np.log(karras_sigmas(12, low or np.exp(grid[0]), high or np.exp(grid[-1]), rho))[::-1]
        assert len(kept) == 12
        for t, target in zip(kept, targets):
            assert abs(grid[t] - target) == np.abs(grid - target).min()
    assert sample_timesteps(alphas_bar, 12, "karras")[::11] == [0, 999]
    # a coarse chain of sigmas 0.1, 1, 10, 100: the target 4 is nearer 1 in sigma, 10 in log sigma
    coarse = 1 / (1 + np.array([0.1, 1.0, 10.0, 100.0]) ** 2)
    assert sample_timesteps(coarse, 2, "karras", (1.0, 0.1, 4.0)) == [0, 2]


def test_heun_converges_at_second_order_on_gaussian_data():
    """With the exact eps of N(M, S^2) data the output is affine in x_T, so its distribution is
    known from two runs; its error against the exact flow from the same start falls about 4x
    per doubling of the steps (second order), where DDIM's (first order) halves. Measured on
    the karras spacing at 5, 10, 20, 40 steps: Heun 1.42, 0.325, 0.065, 0.013; DDIM 0.60,
    0.32, 0.17, 0.085. Catches a Heun step that is Euler's."""
    _, alphas_bar = schedule(1e-4, 0.02, 1000)
    errors, ddim = [], []
    for steps in (5, 10, 20):
        heun = GaussianDiffusionSampler(PAPER_BETAS, sampler="heun", sample_steps=2 * steps - 1,
                                        skip_type="karras", clip_denoised=False)
        assert len(heun.timesteps) == steps
        errors.append(flow_error(heun, alphas_bar))
        ddim.append(flow_error(GaussianDiffusionSampler(PAPER_BETAS, sampler="ddim", sample_steps=steps,
                                                        skip_type="karras", clip_denoised=False), alphas_bar))
    ratios = [errors[k] / errors[k + 1] for k in range(2)]
    assert all(ratio > 3 for ratio in ratios), (errors, ddim)
    assert all(ddim[k] / ddim[k + 1] < 2.5 for k in range(2)), ddim


def test_options_that_cannot_work_are_one_line_and_heuns_record_counts_its_evaluations():
    """Churn given to a sampler without it, a rho that is no exponent, a sigma range upside
    down: each one ConfigError line. Heun's protocol record and line count the evaluations
    that ran (2N - 1, the even count's one fewer), not its steps. Catches churn silently
    ignored by ddim and the record claiming --sample_steps."""
    for values, words in ((dict(sampler="ddim", churn=1.0), "--churn is an option of sampler(s) heun"),
                          (dict(sampler="heun", karras_rho=0.0), "--karras_rho must be a finite number > 0"),
                          (dict(sampler="heun", sigma_min=2.0, sigma_max=1.0), "--sigma_min 2.0 must be below"),
                          (dict(sampler="heun", churn_noise=float("nan")), "--churn_noise of sampler 'heun'")):
        with pytest.raises(ConfigError) as refused:
            Config.make(**values)
        assert words in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    sampler = GaussianDiffusionSampler(BETAS, sampler="heun", sample_steps=10, churn=3.0)
    record = sampler.step.record()
    assert len(sampler.timesteps) == 5 and record["evaluations"] == 9 and record["churn"] == 3.0
    assert "9 evaluations, churn 3.0 in [0.0, inf]" in type(sampler.step).describe(record)


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_a_learned_variance_is_ignored_and_only_its_mean_half_sampled(var_type):
    """Both samplers take D from the mean half of a learned-variance model's 2C channels: the
    same samples as the fixed-variance eps model, whatever the variance half says. Catches the
    two halves read as one output."""
    class Learned(torch.nn.Module):
        def forward(self, x, t):
            return torch.cat([EpsToy()(x, t), torch.sin(7 * x) + t.view(-1, 1, 1, 1)], dim=1)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for name, churn in (("heun", 4.0), ("euler_ancestral", 0.0)):
        options = dict(sampler=name, sample_steps=9, skip_type="karras", churn=churn)
        fixed = GaussianDiffusionSampler(BETAS, **options)(EpsToy(), x_T, generator=torch.Generator().manual_seed(8))
        learned = GaussianDiffusionSampler(BETAS, var_type=var_type, **options)(
            Learned(), x_T, generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(learned, fixed, rtol=0, atol=0)


def test_the_protocol_record_names_the_karras_spacing_and_heuns_evaluations(tmp_path):
    """eval.txt's record of a karras-spaced heun run holds rho, the sigma range and the
    evaluations, and its line says them. Catches a karras score recorded as if spaced by
    the defaults."""
    config = Config.make(dataset="digits", img_size=8, img_channels=1, T=40, sampler="heun", sample_steps=9,
                         skip_type="karras", karras_rho=3.0, sigma_max=5.0, logdir=str(tmp_path))
    record = evaluate.protocol_record(config, config.sampler(), None, 10, 0, "abc", 0.0)
    assert (record["karras_rho"], record["sigma_min"], record["sigma_max"]) == (3.0, "chain's", 5.0)
    assert record["evaluations"] == 9 and record["steps"] == 5
    assert "heun sampler (9 evaluations), 5 steps" in evaluate.describe(record)
    assert "karras skips (rho 3.0, sigma chain's to 5.0)" in evaluate.describe(record)
