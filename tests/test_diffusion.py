"""The Gaussian diffusion against independent float64 recomputations and closed forms."""
import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, GaussianDiffusionSampler, GaussianDiffusionTrainer

BETA_1, BETA_T, T = 1e-4, 0.02, 1000


def reference_schedule(beta_1=BETA_1, beta_T=BETA_T, steps=T):
    """Ho et al. 2020 eqs. 4, 6, 7, written out in numpy float64, one step at a time."""
    betas = np.linspace(beta_1, beta_T, steps)
    abar, abar_prev = np.empty(steps), np.empty(steps)
    running = 1.0
    for t in range(steps):
        abar_prev[t] = running
        running *= 1.0 - betas[t]
        abar[t] = running
    c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return dict(betas=betas, abar=abar, abar_prev=abar_prev, c1=c1, c2=c2, post_var=post_var)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(BETA_1, BETA_T, T)


def test_schedule_and_posterior_coefficients(diffusion):
    ref = reference_schedule()
    ours = {name: getattr(diffusion, name).numpy() for name in
            ("betas", "alphas_bar", "alphas_bar_prev", "posterior_mean_coef1",
             "posterior_mean_coef2", "posterior_var", "posterior_log_var_clipped",
             "fixedlarge_log_var")}
    assert all(getattr(diffusion, name).dtype == torch.float64 for name in ours)
    np.testing.assert_allclose(ours["betas"], ref["betas"], rtol=1e-15)
    np.testing.assert_allclose(ours["alphas_bar"], ref["abar"], rtol=1e-12)
    np.testing.assert_allclose(ours["alphas_bar_prev"], ref["abar_prev"], rtol=1e-12)
    np.testing.assert_allclose(ours["posterior_mean_coef1"], ref["c1"], rtol=1e-12)
    np.testing.assert_allclose(ours["posterior_mean_coef2"], ref["c2"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(ours["posterior_var"], ref["post_var"], rtol=1e-12, atol=1e-300)
    clipped = np.log(np.r_[ref["post_var"][1], ref["post_var"][1:]])
    np.testing.assert_allclose(ours["posterior_log_var_clipped"], clipped, rtol=1e-12)
    large = np.log(np.r_[ref["post_var"][1], ref["betas"][1:]])
    np.testing.assert_allclose(ours["fixedlarge_log_var"], large, rtol=1e-12)


def test_posterior_is_the_bayes_product_of_gaussians(diffusion):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precisions add, means weight."""
    ref = reference_schedule()
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(1, T, (64,), generator=generator)
    x_0 = torch.randn(64, 3, 4, 4, generator=generator, dtype=torch.float64)
    x_t = torch.randn(64, 3, 4, 4, generator=generator, dtype=torch.float64)
    tt = t.numpy()[:, None, None, None]
    alpha, abar_prev = 1.0 - ref["betas"][tt], ref["abar_prev"][tt]
    precision = alpha / ref["betas"][tt] + 1.0 / (1.0 - abar_prev)
    mean = (np.sqrt(alpha) * x_t.numpy() / ref["betas"][tt]
            + np.sqrt(abar_prev) * x_0.numpy() / (1.0 - abar_prev)) / precision
    np.testing.assert_allclose(diffusion.q_posterior_mean(x_0, x_t, t).numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(diffusion.posterior_var[t].numpy(), 1.0 / precision.ravel(), rtol=1e-9)


def test_xstart_and_xprev_inversions_recover_x0(diffusion):
    generator = torch.Generator().manual_seed(1)
    t = torch.randint(0, T, (32,), generator=generator)
    x_0 = torch.randn(32, 1, 2, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(32, 1, 2, 2, generator=generator, dtype=torch.float64)
    x_t = diffusion.q_sample(x_0, t, noise)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, noise), x_0)
    xprev = diffusion.q_posterior_mean(x_0, x_t, t)
    torch.testing.assert_close(diffusion.predict_xstart_from_xprev(x_t, t, xprev), x_0)


def test_clipping_happens_before_the_posterior_mean(diffusion):
    x_t = torch.full((2, 1, 2, 2), 0.5)
    t = torch.tensor([10, 500])
    out = torch.full_like(x_t, 5.0)  # an x_0 prediction far outside [-1, 1]
    mean, _, x0_hat = diffusion.p_mean_variance(out, x_t, t, "xstart", "fixedlarge", clip_denoised=True)
    assert torch.all(x0_hat == 1.0)
    torch.testing.assert_close(mean, diffusion.q_posterior_mean(torch.ones_like(x_t), x_t, t))
    unclipped, _, _ = diffusion.p_mean_variance(out, x_t, t, "xstart", "fixedlarge", clip_denoised=False)
    torch.testing.assert_close(unclipped, diffusion.q_posterior_mean(out, x_t, t))


class Recorder(torch.nn.Module):
    """A model that returns what the test decides, computed from the arguments it receives."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x_t, t):
        return self.fn(x_t, t)


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_loss_is_zero_for_the_true_target(mean_type):
    ref = reference_schedule()
    generator = torch.Generator().manual_seed(2)
    x_0 = torch.rand(8, 3, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(8, 3, 4, 4, generator=generator)
    t = torch.randint(0, T, (8,), generator=generator)
    tt = t.numpy()[:, None, None, None]
    x0, eps = x_0.double().numpy(), noise.double().numpy()
    x_t = np.sqrt(ref["abar"][tt]) * x0 + np.sqrt(1.0 - ref["abar"][tt]) * eps
    target = {"epsilon": eps, "xstart": x0, "xprev": ref["c1"][tt] * x0 + ref["c2"][tt] * x_t}[mean_type]

    def true_target(x_t_seen, t_seen):
        assert torch.equal(t_seen, t)
        np.testing.assert_allclose(x_t_seen.double().numpy(), x_t, atol=1e-5)
        return torch.from_numpy(target).float()

    trainer = GaussianDiffusionTrainer(Recorder(true_target), BETA_1, BETA_T, T, mean_type)
    loss = trainer(x_0, t=t, noise=noise)
    assert loss.shape == x_0.shape
    assert loss.max() < 1e-12
    # and a wrong target is not zero: the loss measures the distance to this mean type's target
    trainer.model = Recorder(lambda x_t_seen, t_seen: torch.from_numpy(target).float() + 0.1)
    torch.testing.assert_close(trainer(x_0, t=t, noise=noise), torch.full_like(x_0, 0.01))


def gaussian_oracle(m, s, mean_type):
    """The Bayes-optimal predictor for x_0 ~ N(m, s^2) per pixel, from the test's own schedule.

    x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps is jointly Gaussian with x_0 and eps, so
    E[x_0 | x_t] = m + k (x_t - sqrt(abar) m),  k = sqrt(abar) s^2 / (abar s^2 + 1 - abar),
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar).
    """
    ref = reference_schedule()
    abar, c1, c2 = (torch.from_numpy(ref[k]) for k in ("abar", "c1", "c2"))

    def predict(x_t, t):
        a = abar[t].view(-1, 1, 1, 1)
        centred = x_t - a.sqrt() * m
        x0 = m + a.sqrt() * s * s / (a * s * s + 1 - a) * centred
        if mean_type == "xstart":
            return x0
        if mean_type == "epsilon":
            return (1 - a).sqrt() * centred / (a * s * s + 1 - a)
        return c1[t].view(-1, 1, 1, 1) * x0 + c2[t].view(-1, 1, 1, 1) * x_t

    return Recorder(predict)


def exact_sampler_output(m, s, var_type):
    """Mean and std of what ancestral sampling with the oracle returns, by linear recursion.

    Each step is x_{t-1} = A_t x_t + b_t + sigma_t z with A_t = c1 k + c2 and
    b_t = c1 (1 - k sqrt(abar)) m, so mean and variance propagate exactly from x_T ~ N(0, 1).
    The result is not exactly (m, s): the reverse variance is fixed, not the true one.
    """
    ref = reference_schedule()
    k = np.sqrt(ref["abar"]) * s * s / (ref["abar"] * s * s + 1 - ref["abar"])
    A = ref["c1"] * k + ref["c2"]
    b = ref["c1"] * (1 - k * np.sqrt(ref["abar"])) * m
    sigma2 = np.r_[ref["post_var"][1], ref["betas"][1:] if var_type == "fixedlarge" else ref["post_var"][1:]]
    mean, var = 0.0, 1.0
    for t in reversed(range(T)):
        mean = A[t] * mean + b[t]
        var = A[t] ** 2 * var + (sigma2[t] if t > 0 else 0.0)
    return mean, np.sqrt(var)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_sampler_is_exact_for_gaussian_data(mean_type, var_type):
    # m, s keep x_0 and the oracle's x0_hat inside [-1, 1] (4.5 sigma), so clipping is inert.
    m, s, n = 0.1, 0.2, 60_000
    exact_mean, exact_std = exact_sampler_output(m, s, var_type)
    # A correct sampler's output differs from the data by the fixed-variance approximation
    # alone: the recursion puts it within 2.5% of s (fixedsmall 0.1963, fixedlarge 0.2009).
    assert abs(exact_mean - m) < 1e-5 and abs(exact_std - s) < 0.025 * s

    sampler = GaussianDiffusionSampler(gaussian_oracle(m, s, mean_type), BETA_1, BETA_T, T,
                                       img_size=1, mean_type=mean_type, var_type=var_type)
    generator = torch.Generator().manual_seed(3)
    x_T = torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    x_0 = sampler(x_T, generator=generator)
    # five standard errors: s / sqrt(n) for the mean, s / sqrt(2n) for the std
    assert abs(x_0.mean().item() - exact_mean) < 5 * s / np.sqrt(n)
    assert abs(x_0.std().item() - exact_std) < 5 * s / np.sqrt(2 * n)


def test_sampling_is_reproducible_with_a_generator():
    model = Recorder(lambda x_t, t: 0.1 * x_t)
    sampler = GaussianDiffusionSampler(model, BETA_1, BETA_T, 50, img_size=4)
    x_T = torch.randn(2, 3, 4, 4)
    first = sampler(x_T, generator=torch.Generator().manual_seed(7))
    again = sampler(x_T, generator=torch.Generator().manual_seed(7))
    other = sampler(x_T, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= -1 and first.max() <= 1


def test_unknown_types_are_refused():
    model = Recorder(lambda x_t, t: x_t)
    with pytest.raises(ValueError, match="unknown mean_type 'eps': expected one of xprev, xstart, epsilon"):
        GaussianDiffusionTrainer(model, BETA_1, BETA_T, T, mean_type="eps")
    with pytest.raises(ValueError, match="unknown mean_type"):
        GaussianDiffusionSampler(model, BETA_1, BETA_T, T, mean_type="x0")
    with pytest.raises(ValueError, match="unknown var_type 'large': expected one of fixedlarge, fixedsmall"):
        GaussianDiffusionSampler(model, BETA_1, BETA_T, T, var_type="large")
