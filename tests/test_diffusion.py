"""The noise schedules and the Gaussian diffusion against independent float64
recomputations, closed forms and a second library (diffusers)."""
import math

import numpy as np
import pytest
import torch

from diffusion import (BETA_SCHEDULES, GaussianDiffusion, GaussianDiffusionSampler,
                       GaussianDiffusionTrainer, beta_schedule)

BETA_1, BETA_T, T = 1e-4, 0.02, 1000
BETAS = beta_schedule("linear", BETA_1, BETA_T, T)


def reference_schedule(beta_1=BETA_1, beta_T=BETA_T, steps=T, betas=None):
    """Ho et al. 2020 eqs. 4, 6, 7, written out in numpy float64, one step at a time, for the
    linear schedule or the betas given."""
    betas = np.linspace(beta_1, beta_T, steps) if betas is None else betas
    steps = len(betas)
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
    return GaussianDiffusion(BETAS)


def official_schedule(name, beta_1, beta_T, steps):
    """get_beta_schedule of the official diffusion_utils_2.py, and the cosine schedule of
    Nichol & Dhariwal eq. 17 one step at a time, in numpy / Python float64."""
    if name == "linear":
        return np.linspace(beta_1, beta_T, steps, dtype=np.float64)
    if name == "quad":
        return np.linspace(beta_1 ** 0.5, beta_T ** 0.5, steps, dtype=np.float64) ** 2
    if name == "const":
        return beta_T * np.ones(steps, dtype=np.float64)
    if name == "jsd":
        return 1.0 / np.linspace(steps, 1, steps, dtype=np.float64)
    if name in ("warmup10", "warmup50"):
        betas = beta_T * np.ones(steps, dtype=np.float64)
        warmup = int(steps * {"warmup10": 0.1, "warmup50": 0.5}[name])
        betas[:warmup] = np.linspace(beta_1, beta_T, warmup, dtype=np.float64)
        return betas

    def alpha_bar(t):
        return math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar(t + 1) / alpha_bar(t), 0.999) for t in range(steps)])


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("beta_1,beta_T,steps", [(1e-4, 0.02, 1000), (1e-3, 0.3, 37), (0.05, 0.05, 5), (0.01, 0.2, 1)])
def test_every_schedule_is_the_official_one(name, beta_1, beta_T, steps):
    ours = beta_schedule(name, beta_1, beta_T, steps)
    assert ours.dtype == torch.float64 and ours.shape == (steps,)
    reference = official_schedule(name, beta_1, beta_T, steps)
    # linspace in torch and numpy round differently by an ulp; the cosine's 1 - ratio loses
    # a few digits at small beta (beta_0 ~ 4e-5 at T = 1000)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-10 if name == "cosine" else 1e-14, atol=0)
    assert ((ours > 0) & (ours <= 1)).all()


def test_the_linear_default_is_bit_for_bit_the_former_schedule():
    """The schedule every trained checkpoint has: torch.linspace in float64, unchanged."""
    former = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.equal(beta_schedule("linear", 1e-4, 0.02, 1000), former)
    assert torch.equal(GaussianDiffusion(BETAS).betas, former)
    assert torch.equal(GaussianDiffusionSampler(BETAS).betas, former)


@pytest.mark.parametrize("steps", [1000, 4000, 50])
def test_cosine_schedule_equals_diffusers_squaredcos_cap_v2(steps):
    """diffusers builds the same betas in Python floats and stores them in float32: ours,
    float64, must round to theirs (within one float32 ulp)."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=steps).betas
    assert theirs.dtype == torch.float32
    ours = beta_schedule("cosine", BETA_1, BETA_T, steps)
    torch.testing.assert_close(ours, theirs.double(), rtol=2.0 ** -23, atol=0)
    assert ours[-1] == 0.999 and ours[:-1].max() < 0.999  # the cap binds at the last step alone
    # abar(T - 1) of the paper, kept by the cumulative product, is f(T - 1) / f(0)
    alphas_bar = torch.cumprod(1.0 - ours, 0)
    f = torch.cos((torch.tensor([0.0, (steps - 1) / steps], dtype=torch.float64) + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(alphas_bar[-2], f[1] / f[0], rtol=1e-10, atol=0)


def test_bad_schedule_arguments_raise_one_line_in_flag_terms():
    cases = [(("sigmoid", BETA_1, BETA_T, T), "unknown --beta_schedule 'sigmoid': expected one of "
                                             "linear, quad, const, jsd, warmup10, warmup50, cosine"),
             (("linear", 0.02, 1e-4, T), "need 0 < --beta_1 <= --beta_T < 1, got 0.02 and 0.0001"),
             (("quad", 0.0, BETA_T, T), "need 0 < --beta_1 <= --beta_T < 1"),
             (("warmup10", BETA_1, 1.0, T), "need 0 < --beta_1 <= --beta_T < 1"),
             (("const", BETA_1, 1.5, T), "need 0 < --beta_T < 1, got 1.5"),
             (("cosine", BETA_1, BETA_T, 0), "--T must be at least 1 diffusion step, got 0")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            beta_schedule(*args)
        assert "\n" not in str(error.value)
    # the schedules that take no beta_1 or beta_T ignore them; const ignores beta_1
    assert torch.equal(beta_schedule("cosine", 0.5, 0.1, 10), beta_schedule("cosine", BETA_1, BETA_T, 10))
    assert torch.equal(beta_schedule("jsd", 2.0, -1.0, 10), beta_schedule("jsd", BETA_1, BETA_T, 10))
    assert torch.equal(beta_schedule("const", 0.5, 0.1, 10), torch.full((10,), 0.1, dtype=torch.float64))
    for betas in (torch.tensor([0.1, 1.5]), torch.tensor([0.0, 0.1]), torch.zeros(0), torch.full((2, 2), 0.1)):
        with pytest.raises(ValueError, match="0 < beta_t <= 1"):
            GaussianDiffusion(betas)


@pytest.mark.parametrize("name", ["cosine", "quad", "warmup50"])
def test_any_schedule_gives_the_same_posterior_formulas(name):
    """The coefficients follow the schedule given, not the linear one: eqs. 4-7 again."""
    betas = beta_schedule(name, 1e-3, 0.05, 200)
    ref = reference_schedule(betas=betas.numpy())
    ours = GaussianDiffusion(betas)
    np.testing.assert_allclose(ours.alphas_bar.numpy(), ref["abar"], rtol=1e-12)
    np.testing.assert_allclose(ours.posterior_mean_coef1.numpy(), ref["c1"], rtol=1e-12)
    np.testing.assert_allclose(ours.posterior_mean_coef2.numpy(), ref["c2"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(ours.posterior_var.numpy(), ref["post_var"], rtol=1e-12, atol=1e-300)


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

    trainer = GaussianDiffusionTrainer(Recorder(true_target), BETAS, mean_type)
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


@pytest.mark.slow  # a few seconds each on 2 cores
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
def test_sampler_is_exact_for_gaussian_data(mean_type, var_type):
    # m, s keep x_0 and the oracle's x0_hat inside [-1, 1] (4.5 sigma), so clipping is inert.
    m, s, n = 0.1, 0.2, 60_000
    exact_mean, exact_std = exact_sampler_output(m, s, var_type)
    # A correct sampler's output differs from the data by the fixed-variance approximation
    # alone: the recursion puts it within 2.5% of s (fixedsmall 0.1963, fixedlarge 0.2009).
    assert abs(exact_mean - m) < 1e-5 and abs(exact_std - s) < 0.025 * s

    sampler = GaussianDiffusionSampler(BETAS, mean_type=mean_type, var_type=var_type)
    generator = torch.Generator().manual_seed(3)
    x_T = torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    x_0 = sampler(gaussian_oracle(m, s, mean_type), x_T, generator=generator)
    # five standard errors: s / sqrt(n) for the mean, s / sqrt(2n) for the std
    assert abs(x_0.mean().item() - exact_mean) < 5 * s / np.sqrt(n)
    assert abs(x_0.std().item() - exact_std) < 5 * s / np.sqrt(2 * n)


def test_sampling_is_reproducible_with_a_generator():
    model = Recorder(lambda x_t, t: 0.1 * x_t)
    sampler = GaussianDiffusionSampler(beta_schedule("linear", BETA_1, BETA_T, 50))
    x_T = torch.randn(2, 3, 4, 4)
    first = sampler(model, x_T, generator=torch.Generator().manual_seed(7))
    again = sampler(model, x_T, generator=torch.Generator().manual_seed(7))
    other = sampler(model, x_T, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= -1 and first.max() <= 1


def test_unknown_types_are_refused():
    model = Recorder(lambda x_t, t: x_t)
    with pytest.raises(ValueError, match="unknown mean_type 'eps': expected one of xprev, xstart, epsilon"):
        GaussianDiffusionTrainer(model, BETAS, mean_type="eps")
    with pytest.raises(ValueError, match="unknown mean_type"):
        GaussianDiffusionSampler(BETAS, mean_type="x0")
    with pytest.raises(ValueError, match="unknown var_type 'large': expected one of fixedlarge, fixedsmall"):
        GaussianDiffusionSampler(BETAS, var_type="large")
