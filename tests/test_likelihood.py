"""The variational bound in bits/dim, the "kl" loss and the learned variance.

References are written independently with numpy/scipy from the formulas of Ho et al. 2020
(eqs. 4-7 and 13) and the official code (diffusion_utils_2.py: normal_kl,
discretized_gaussian_log_likelihood, calc_bpd_loop).
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import integrate
from scipy.stats import norm

from bpd import bpd_sums, calc_bpd_loop, save_bpd
from datasets import digits_array
from diffusion import (GaussianDiffusion, GaussianDiffusionSampler, GaussianDiffusionTrainer,
                       beta_schedule, discretized_gaussian_log_likelihood, normal_kl)
from model import UNet

GRID = -1.0 + 2.0 * np.arange(256) / 255.0  # the 8-bit levels on [-1, 1]


def test_normal_kl_matches_numerical_integration():
    for mean1, var1, mean2, var2 in [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0),
                                     (1.0, 1e-2, 0.9, 3e-2), (-2.0, 4.0, 1.0, 0.5)]:
        p, q = norm(mean1, math.sqrt(var1)), norm(mean2, math.sqrt(var2))
        reference, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)),
                                      mean1 - 30 * math.sqrt(var1), mean1 + 30 * math.sqrt(var1),
                                      epsabs=1e-13, epsrel=1e-11, limit=200)
        ours = normal_kl(*(torch.tensor(v, dtype=torch.float64)
                           for v in (mean1, math.log(var1), mean2, math.log(var2))))
        assert ours.item() == pytest.approx(reference, rel=1e-9, abs=1e-12)


def scipy_bin_probability(x, mean, std):
    """P(bin of x) under N(mean, std^2): [x - 1/255, x + 1/255], the end bins open."""
    upper = np.where(x > 0.999, 1.0, norm.cdf(x + 1 / 255, mean, std))
    lower_tail = np.where(x < -0.999, 0.0, norm.cdf(x - 1 / 255, mean, std))
    middle = upper - lower_tail
    return np.where(x > 0.999, norm.sf(x - 1 / 255, mean, std), middle)


def test_discretized_gaussian_log_likelihood_matches_scipy():
    rng = np.random.default_rng(0)
    x = GRID[rng.integers(0, 256, 4000)]
    x[:50], x[50:100] = -1.0, 1.0                       # the open end bins
    log_scale = rng.uniform(np.log(1e-3), np.log(0.5), x.shape)
    # within a few standard deviations of x, and (the last 1000) anywhere
    mean = x + np.exp(log_scale) * rng.normal(0.0, 3.0, x.shape)
    mean[-1000:] = rng.uniform(-1.2, 1.2, 1000)
    ours = discretized_gaussian_log_likelihood(
        *(torch.from_numpy(v) for v in (x, mean, log_scale))).numpy()
    probability = scipy_bin_probability(x, mean, np.exp(log_scale))
    accurate = probability > 1e-6  # where scipy's cdf differences are themselves accurate
    assert accurate.sum() > 2000 and accurate[:100].sum() > 50
    np.testing.assert_allclose(ours[accurate], np.log(probability[accurate]), rtol=0, atol=1e-9)
    # the official floor: probabilities below 1e-12 count as 1e-12
    tiny = probability < 1e-13
    assert tiny.sum() > 100
    np.testing.assert_allclose(ours[tiny], np.log(1e-12), rtol=1e-12)


def test_discretized_gaussian_bins_sum_to_one():
    for mean, std in [(0.0, 0.01), (0.97, 0.05), (-1.1, 0.3), (0.5, 3.0)]:
        log_p = discretized_gaussian_log_likelihood(
            torch.from_numpy(GRID), torch.full((256,), mean, dtype=torch.float64),
            torch.full((256,), math.log(std), dtype=torch.float64))
        # each bin floored at 1e-12 adds up to 1e-12
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=256e-12)


M, S = 0.1, 0.2          # 8-bit quantized N(M, S^2) data; +-1 is 4.5 S away
T, BETA_1, BETA_T = 1000, 1e-4, 0.02
BETAS = beta_schedule("linear", BETA_1, BETA_T, T)


def schedule():
    betas = np.linspace(BETA_1, BETA_T, T)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    betatilde = betas * (1.0 - abar_prev) / (1.0 - abar)
    return betas, abar, c1, betatilde


def oracle_log_variance(var_type):
    """log sigma_t^2 per t: the fixed choices, or for "learned" the exact reverse variance of
    Gaussian data, Var(x_{t-1} | x_t) = betatilde_t + c1_t^2 Var(x_0 | x_t) (t = 0: Var(x_0 | x_1)),
    Var(x_0 | x_t) = S^2 (1 - abar_t) / (abar_t S^2 + 1 - abar_t)."""
    betas, abar, c1, betatilde = schedule()
    if var_type == "fixedlarge":
        return np.log(np.append(betatilde[1], betas[1:]))
    if var_type == "fixedsmall":
        return np.log(np.append(betatilde[1], betatilde[1:]))
    x0_var = S ** 2 * (1 - abar) / (abar * S ** 2 + 1 - abar)
    return np.log(np.append(x0_var[0], betatilde[1:] + c1[1:] ** 2 * x0_var[1:]))


class GaussianOracle(torch.nn.Module):
    """E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) M) / (a S^2 + 1 - a) for N(M, S^2) data, with the
    log-variance appended as a second half of channels for var_type "learned"."""

    def __init__(self, var_type):
        super().__init__()
        self.learned = var_type == "learned"
        self.register_buffer("alphas_bar", torch.from_numpy(schedule()[1]))
        self.register_buffer("log_var", torch.from_numpy(oracle_log_variance(var_type)))

    def forward(self, x, t):
        a = self.alphas_bar[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S ** 2 + 1 - a)
        if not self.learned:
            return eps
        return torch.cat([eps, self.log_var[t].view(-1, 1, 1, 1).expand_as(x)], dim=1)


def quantized_gaussian():
    """Probabilities of the 256 levels for N(M, S^2) data, end bins open."""
    edges = np.concatenate([[-np.inf], GRID[:-1] + 1 / 255, [np.inf]])
    return np.diff(norm.cdf(edges, M, S))


def expected_bound_bits(var_type):
    """E[sum_t L_t + L_T] / ln 2 for the oracle on the quantized data, computed exactly.

    x0_hat = M + k (x_t - sqrt(a) M), k = sqrt(a) S^2 / (a S^2 + 1 - a), so for t > 0
    E (x_0 - x0_hat)^2 = (1 - k sqrt(a))^2 E (x_0 - M)^2 + k^2 (1 - a) and the KL of two
    Gaussians follows in closed form; L_0 is integrated over x_1's noise by Gauss-Hermite
    quadrature and summed over the 256 levels; L_T in closed form. Clipping x0_hat is ignored
    (x0_hat leaves [-1, 1] with probability ~1e-5).
    """
    betas, abar, c1, betatilde = schedule()
    p = quantized_gaussian()
    log_var = oracle_log_variance(var_type)
    a = abar[1:]
    k = np.sqrt(a) * S ** 2 / (a * S ** 2 + 1 - a)
    error = (1 - k * np.sqrt(a)) ** 2 * (p * (GRID - M) ** 2).sum() + k ** 2 * (1 - a)
    true_log_var = np.log(betatilde[1:])
    kl = 0.5 * (log_var[1:] - true_log_var + np.exp(true_log_var - log_var[1:]) - 1
                + c1[1:] ** 2 * error / np.exp(log_var[1:]))

    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    a0 = abar[0]
    x_1 = np.sqrt(a0) * GRID[:, None] + np.sqrt(1 - a0) * nodes[None, :]
    decoder_mean = M + np.sqrt(a0) * S ** 2 / (a0 * S ** 2 + 1 - a0) * (x_1 - np.sqrt(a0) * M)
    bin_probability = scipy_bin_probability(GRID[:, None], decoder_mean, np.exp(0.5 * log_var[0]))
    decoder_nll = -(p[:, None] * weights * np.log(np.maximum(bin_probability, 1e-12))).sum()

    aT = abar[-1]
    prior = 0.5 * (-np.log(1 - aT) + (1 - aT) + aT * (p * GRID ** 2).sum() - 1)
    return (kl.sum() + decoder_nll + prior) / math.log(2)


@pytest.mark.slow  # a few seconds on 2 cores
@pytest.mark.parametrize("var_type,slack", [("learned", 0.001), ("fixedlarge", 0.13),
                                            ("fixedsmall", 0.74)])
def test_bits_per_dim_of_the_gaussian_oracle(var_type, slack):
    """The bound of the Bayes-optimal denoiser on 8-bit quantized Gaussian data, against the
    data's discrete entropy H = 6.7196 bits.

    The bound is at least H; it exceeds H by the bound's slack, which `expected_bound_bits`
    computes exactly: 0.0009 bits with the exact reverse variances ("learned"), 0.126 bits
    with sigma_t^2 = beta_t and 0.738 bits with betatilde_t, the price of a fixed variance
    (slack is those rounded up). The Monte Carlo estimate of calc_bpd_loop must match the
    exact value to within 4 standard errors (about 0.06 bits; the noise is mostly L_0's)."""
    p = quantized_gaussian()
    entropy = -(p * np.log2(np.maximum(p, 1e-300))).sum()
    exact = expected_bound_bits(var_type)
    assert entropy <= exact <= entropy + slack

    # a stratified sample of the levels, so that its empirical distribution is p
    n = 64 * 256
    levels = np.searchsorted(np.cumsum(p), (np.arange(n) + 0.5) / n)
    rng = np.random.default_rng(0)
    x_0 = torch.from_numpy(GRID[rng.permutation(levels)].reshape(64, 1, 16, 16))
    result = calc_bpd_loop(GaussianOracle(var_type), GaussianDiffusion(BETAS), x_0, "epsilon", var_type,
                           clip_denoised=True, generator=torch.Generator().manual_seed(0))

    assert result["terms_bpd"].shape == result["mse"].shape == (64, T)
    torch.testing.assert_close(result["total_bpd"],
                               result["terms_bpd"].sum(1) + result["prior_bpd"])
    total = result["total_bpd"]
    standard_error = total.std().item() / math.sqrt(len(total))
    assert abs(total.mean().item() - exact) < 4 * standard_error
    assert result["prior_bpd"].max().item() < 1e-5  # abar_T ~ 4e-5


def toy_model(x, t):
    return 3.0 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1)


def test_kl_loss_is_the_bound_term_in_bits_per_dim_without_clipping():
    """Trainer loss_type "kl" with fixedsmall: for t > 0 the KL of equal variances,
    c1^2 (x_0 - x0_hat)^2 / (2 betatilde_t), and at t = 0 the decoder NLL; x0_hat unclipped."""
    betas, abar, c1, betatilde = schedule()
    trainer = GaussianDiffusionTrainer(toy_model, BETAS, loss_type="kl", var_type="fixedsmall")
    rng = np.random.default_rng(0)
    x_0 = GRID[rng.integers(0, 256, (4, 1, 4, 4))]
    noise = rng.standard_normal(x_0.shape)
    t = np.array([0, 1, 500, 999])
    loss = trainer(torch.from_numpy(x_0), torch.from_numpy(t), torch.from_numpy(noise))
    assert loss.shape == (4,)

    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(a) * x_0 + np.sqrt(1 - a) * noise
    eps = 3.0 * np.tanh(x_t) + 0.01 * t.reshape(-1, 1, 1, 1)
    x0_hat = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    assert np.abs(x0_hat).max() > 1.5  # clipping would change the loss
    kl = (c1[t].reshape(-1, 1, 1, 1) ** 2 * (x_0 - x0_hat) ** 2
          / (2 * betatilde[np.maximum(t, 1)].reshape(-1, 1, 1, 1)))
    expected = kl.reshape(4, -1).mean(1) / math.log(2)
    decoder = scipy_bin_probability(x_0[0], x0_hat[0], math.sqrt(betatilde[1]))
    expected[0] = -np.log(np.maximum(decoder, 1e-12)).mean() / math.log(2)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


@pytest.mark.slow  # a few seconds on 2 cores
def test_learned_variance_trains_with_the_kl_loss_and_samples():
    torch.manual_seed(0)
    steps = 100
    net = UNet(steps, ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1, dropout=0.0,
               in_ch=1, out_ch=2)
    betas = beta_schedule("linear", 1e-3, 0.2, steps)
    trainer = GaussianDiffusionTrainer(net, betas, loss_type="kl", var_type="learned")
    images = torch.from_numpy(digits_array(train=True)[0]) * 2 - 1
    generator = torch.Generator().manual_seed(1)
    x_eval, t_eval = images[:64], torch.arange(64) * steps // 64
    noise_eval = torch.randn(x_eval.shape, generator=generator)

    def eval_loss():
        with torch.no_grad():
            return trainer(x_eval, t_eval, noise_eval).mean().item()

    before = eval_loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(30):
        batch = images[torch.randint(len(images), (64,), generator=generator)]
        loss = trainer(batch)
        assert loss.shape == (64,)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    assert eval_loss() < 0.5 * before  # measured: 1.32 -> 0.41 bits/dim

    net.eval()
    for kwargs in ({}, {"sampler": "ddim", "sample_steps": 10}):
        sampler = GaussianDiffusionSampler(betas, var_type="learned", **kwargs)
        samples = sampler(net, torch.randn((4, 1, 8, 8), generator=generator), generator=generator)
        assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="out_ch = 2 \\* in_ch"):
        GaussianDiffusionSampler(betas, var_type="learned")(toy_model, torch.zeros(1, 1, 8, 8))


def test_bad_loss_arguments_raise():
    with pytest.raises(ValueError, match="use loss_type 'kl'"):
        GaussianDiffusionTrainer(toy_model, BETAS, loss_type="mse", var_type="learned")
    with pytest.raises(ValueError, match="mse, kl"):
        GaussianDiffusionTrainer(toy_model, BETAS, loss_type="vb")
    with pytest.raises(ValueError, match="fixedlarge, fixedsmall, learned"):
        GaussianDiffusionTrainer(toy_model, BETAS, loss_type="kl", var_type="large")
    # the bound checks its parameterisation as the sampler does
    x_0 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown mean_type 'eps'"):
        calc_bpd_loop(toy_model, GaussianDiffusion(BETAS), x_0, "eps", "fixedlarge", True)
    with pytest.raises(ValueError, match="unknown var_type 'large'"):
        calc_bpd_loop(toy_model, GaussianDiffusion(BETAS), x_0, "epsilon", "large", True)


def test_bpd_over_a_loader_is_saved_as_json_and_plot(tmp_path):
    steps = 50
    diffusion = GaussianDiffusion(beta_schedule("linear", 1e-3, 0.3, steps))
    parameterisation = ("epsilon", "fixedlarge", True)
    images = torch.from_numpy(GRID[np.random.default_rng(0).integers(0, 256, (6, 1, 4, 4))])
    loader = [(images[:4], None), (images[4:], None)]
    sums = bpd_sums(toy_model, diffusion, loader, *parameterisation, generator=torch.Generator().manual_seed(0))
    summary = save_bpd(sums, tmp_path)

    whole = calc_bpd_loop(toy_model, diffusion, images, *parameterisation,
                          generator=torch.Generator().manual_seed(0))
    assert summary["num_images"] == 6
    assert len(summary["terms_bpd"]) == len(summary["mse"]) == steps
    # batches of 4 and 2 draw other noise than one batch of 6: only the prior is noise-free
    assert summary["prior_bpd"] == pytest.approx(whole["prior_bpd"].mean().item(), rel=1e-12)
    assert summary["total_bpd"] == pytest.approx(sum(summary["terms_bpd"]) + summary["prior_bpd"],
                                                 rel=1e-12)
    with open(tmp_path / "bpd.json") as f:
        assert json.load(f) == summary
    with Image.open(tmp_path / "bpd.png") as plot:
        assert plot.size == (960, 320)

    # a generator per batch number n: the sums are those of each batch's own bound
    per_batch = bpd_sums(toy_model, diffusion, loader, *parameterisation,
                         generator=lambda n: torch.Generator().manual_seed(10 + n))
    parts = [calc_bpd_loop(toy_model, diffusion, x_0, *parameterisation,
                           generator=torch.Generator().manual_seed(10 + n))
             for n, (x_0, _) in enumerate(loader)]
    assert per_batch["count"].item() == 6
    for name in ("total_bpd", "prior_bpd", "terms_bpd", "mse"):
        torch.testing.assert_close(per_batch[name], sum(part[name].sum(0) for part in parts),
                                   rtol=1e-12, atol=0)
    torch.testing.assert_close(per_batch["total_bpd_sq"],
                               sum((part["total_bpd"] ** 2).sum() for part in parts), rtol=1e-12, atol=0)
