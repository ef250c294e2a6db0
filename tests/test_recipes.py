"""The training recipes of Nichol & Dhariwal 2021 and after, against references written here:
the learned_range variance (their eq. 15) against a float64 recomputation, diffusers'
DDPMScheduler and the fixed variances it interpolates; the hybrid loss (eq. 16) against its
closed form, value and gradients; importance-sampled timesteps (sec. 3.3) against their
formula, unbiasedness, an exact --resume and two processes; Min-SNR-gamma weights (Hang et al.
2023) against float64 recomputations and their defining property; the EMA warm-up against a
hand recursion through the training step."""
import math
import os

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import distributed
import speed
import train
from bpd import calc_bpd_loop
from builders import build_trainer
from config import Config
from diffusion import (MEAN_TYPES, GaussianDiffusion, GaussianDiffusionSampler, GaussianDiffusionTrainer,
                       ImportanceSampler, beta_schedule)
from streams import rng_state, step_draws

T = 10
BETAS = beta_schedule("linear", 1e-3, 0.2, T)
GRID = np.arange(256) / 127.5 - 1.0  # the 8-bit levels of [-1, 1]


def schedule(betas=BETAS):
    """Ho et al. eqs. 4, 6, 7 in numpy float64, one step at a time: beta, abar, c1, c2, betatilde."""
    betas = np.asarray(betas, dtype=np.float64)
    abar, abar_prev, running = np.empty(len(betas)), np.empty(len(betas)), 1.0
    for t, beta in enumerate(betas):
        abar_prev[t] = running
        running *= 1.0 - beta
        abar[t] = running
    c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    betatilde = betas * (1.0 - abar_prev) / (1.0 - abar)
    return dict(betas=betas, abar=abar, c1=c1, c2=c2, betatilde=betatilde)


def clipped_log_betatilde(s):
    """log betatilde_t with betatilde_0 = 0 replaced by betatilde_1 (improved-diffusion's clipping)."""
    return np.log(np.concatenate([s["betatilde"][1:2], s["betatilde"][1:]]))


def column(values, t):
    return values[t].reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------- learned_range (eq. 15)

def test_learned_range_log_variance_is_eq_15():
    s = schedule()
    t = np.arange(T)
    v = np.random.default_rng(0).uniform(-1, 1, (T, 2, 3, 3))
    v[0, 0, 0, 0], v[1, 0, 0, 0] = -1.0, 1.0  # the two ends: betatilde and beta
    eps = np.random.default_rng(1).standard_normal(v.shape)
    x_t = np.random.default_rng(2).standard_normal(v.shape)
    diffusion = GaussianDiffusion(BETAS)
    mean, log_var, _ = diffusion.p_mean_variance(torch.from_numpy(np.concatenate([eps, v], 1)), torch.from_numpy(x_t),
                                                 torch.from_numpy(t), "epsilon", "learned_range", False)
    frac = (v + 1) / 2
    expected = frac * column(np.log(s["betas"]), t) + (1 - frac) * column(clipped_log_betatilde(s), t)
    np.testing.assert_allclose(log_var.numpy(), expected, rtol=1e-13, atol=0)
    assert log_var[0, 0, 0, 0] == pytest.approx(math.log(s["betatilde"][1]), rel=1e-14)
    assert log_var[1, 0, 0, 0] == pytest.approx(math.log(s["betas"][1]), rel=1e-14)
    # the variance output changes the variance only: the mean is the fixed-variance one
    fixed_mean, _, _ = diffusion.p_mean_variance(torch.from_numpy(eps), torch.from_numpy(x_t), torch.from_numpy(t),
                                                 "epsilon", "fixedlarge", False)
    assert torch.equal(mean, fixed_mean)


PAPER_T = 1000
PAPER_BETAS = beta_schedule("linear", 1e-4, 0.02, PAPER_T)


def two_halves(x_t, t):
    """A model output of 2C channels: an epsilon that pushes x0_hat out of [-1, 1] at some pixels,
    and v in (-1, 1)."""
    return torch.cat([0.3 * x_t - 0.9 * torch.sin(x_t + 1e-3 * t), torch.tanh(2 * x_t.flip(-1) - 1e-3 * t)], dim=1)


@pytest.mark.parametrize("steps", [None, 10], ids=["full_chain", "strided_10"])
def test_one_ancestral_step_equals_diffusers_ddpm_scheduler_learned_range(steps):
    """Every step of the full chain and of the 10-step respaced chain (diffusers' leading
    spacing is this project's uniform one), in float64 with the same noise. diffusers takes
    beta and betatilde of the respaced step (1 - abar_t / abar_prev) as ours does."""
    diffusers = pytest.importorskip("diffusers")
    from test_samplers import float64_schedule
    ours = GaussianDiffusionSampler(PAPER_BETAS, var_type="learned_range", sample_steps=steps, skip_type="uniform")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=PAPER_T, beta_start=1e-4, beta_end=0.02,
                                     variance_type="learned_range", clip_sample=True)
    if steps:
        theirs.set_timesteps(steps)
        assert sorted(theirs.timesteps.tolist()) == ours.timesteps
    theirs = float64_schedule(theirs)
    x_t = 2.0 * torch.randn((2, 3, 4, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    indices = range(len(ours.timesteps)) if steps else (0, 1, 2, 500, 998, 999)
    for i in indices:
        t = ours.timesteps[i]
        output = two_halves(x_t, t)
        expected = theirs.step(output, t, x_t, generator=torch.Generator().manual_seed(t))
        x_prev, x0_hat = ours.step(output, x_t, i, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(x0_hat, expected.pred_original_sample, rtol=0, atol=1e-12)
        torch.testing.assert_close(x_prev, expected.prev_sample, rtol=0, atol=1e-12)


def constant_v(value):
    """A learned_range network whose v is `value` everywhere; its mean half is eps_net's."""
    return lambda x, t: torch.cat([eps_net(x, t), torch.full_like(x, value)], dim=1)


def eps_net(x, t):
    return 0.5 * x + 0.02 * t.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("steps", [T, 4], ids=["full_chain", "strided_4"])
def test_learned_range_at_its_ends_samples_as_the_fixed_variances(steps):
    """v = -1 is betatilde (fixedsmall) and v = 1 is beta (fixedlarge) of each step of the chain
    sampled, the respaced one included; they differ only at the last step, which adds no
    noise. So whole chains are bit-for-bit those of the fixed variances."""
    x_T = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    for value, fixed in ((-1.0, "fixedsmall"), (1.0, "fixedlarge")):
        ours = GaussianDiffusionSampler(BETAS, var_type="learned_range", sample_steps=steps)
        reference = GaussianDiffusionSampler(BETAS, var_type=fixed, sample_steps=steps)
        sample = ours(constant_v(value), x_T, generator=torch.Generator().manual_seed(1))
        assert torch.equal(sample, reference(eps_net, x_T, generator=torch.Generator().manual_seed(1)))
    small = GaussianDiffusionSampler(BETAS, var_type="learned_range", sample_steps=steps)
    assert not torch.equal(small(constant_v(0.0), x_T, generator=torch.Generator().manual_seed(1)), sample)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++", "unipc"])
def test_ddim_and_the_solvers_ignore_the_variance_half(sampler):
    x_T = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    ours = GaussianDiffusionSampler(BETAS, var_type="learned_range", sampler=sampler, sample_steps=5)
    fixed = GaussianDiffusionSampler(BETAS, var_type="fixedlarge", sampler=sampler, sample_steps=5)
    assert torch.equal(ours(constant_v(0.3), x_T), fixed(eps_net, x_T))


def test_bits_per_dim_of_learned_range_at_its_ends_are_the_fixed_variances():
    """The bound with v = -1 is fixedsmall's at every t; with v = 1, fixedlarge's at t >= 1
    (at t = 0 fixedlarge takes betatilde_1, learned_range's upper end is beta_0)."""
    x_0 = torch.from_numpy(GRID[np.random.default_rng(0).integers(0, 256, (4, 1, 4, 4))])
    diffusion = GaussianDiffusion(BETAS)

    def terms(net, var_type):
        return calc_bpd_loop(net, diffusion, x_0, "epsilon", var_type, True,
                             generator=torch.Generator().manual_seed(3))["terms_bpd"]

    assert torch.equal(terms(constant_v(-1.0), "learned_range"), terms(eps_net, "fixedsmall"))
    upper, large = terms(constant_v(1.0), "learned_range"), terms(eps_net, "fixedlarge")
    assert torch.equal(upper[:, 1:], large[:, 1:]) and not torch.equal(upper[:, 0], large[:, 0])


# ---------------------------------------------------------------- the hybrid loss (eq. 16)

def fixed_output(values):
    """A "network" that returns the same leaf tensor whatever its input, so that the loss's
    gradient with respect to each half of the output can be read off it."""
    leaf = torch.tensor(values, requires_grad=True)
    return leaf, (lambda x, t: leaf)


def bin_probability(x, mean, std):
    """P(x's 8-bit bin) under N(mean, std^2), the edge bins open (Ho et al. eq. 13)."""
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    return scipy.stats.norm.cdf(upper, mean, std) - scipy.stats.norm.cdf(lower, mean, std)


def hybrid_reference(x_0, noise, t, eps_hat, v, var_type, lam, gamma):
    """(L_simple + lam T L_t per example, d loss.sum() / d eps_hat, d loss.sum() / d v), float64:
    the gradients in closed form for t > 0 (None where some t is 0)."""
    s = schedule()
    a, dims = column(s["abar"], t), np.prod(x_0.shape[1:])
    weight = np.minimum(column(s["abar"] / (1 - s["abar"]), t), gamma) / column(s["abar"] / (1 - s["abar"]), t) \
        if gamma else 1.0
    l_simple = (weight * (eps_hat - noise) ** 2).reshape(len(t), -1).mean(1)
    x_t = np.sqrt(a) * x_0 + np.sqrt(1 - a) * noise
    x0_hat = (x_t - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    mu = column(s["c1"], t) * x_0 + column(s["c2"], t) * x_t
    mu_hat = column(s["c1"], t) * x0_hat + column(s["c2"], t) * x_t
    log_bt = column(clipped_log_betatilde(s), t)
    if var_type == "learned":
        log_var, dlogvar_dv = v, 1.0
    else:
        frac = (v + 1) / 2
        log_var = frac * column(np.log(s["betas"]), t) + (1 - frac) * log_bt
        dlogvar_dv = 0.5 * (column(np.log(s["betas"]), t) - log_bt)
    var = np.exp(log_var)
    kl = 0.5 * (log_var - log_bt + np.exp(log_bt) / var + (mu - mu_hat) ** 2 / var - 1)
    bound = kl.reshape(len(t), -1).mean(1) / math.log(2)
    decoder = -np.log(np.maximum(bin_probability(x_0, mu_hat, np.sqrt(var)), 1e-12)).reshape(len(t), -1).mean(1)
    bound = np.where(t == 0, decoder / math.log(2), bound)
    loss = l_simple + lam * T * bound
    if (t == 0).any():
        return loss, None, None
    grad_eps = 2 * weight * (eps_hat - noise) / dims  # L_simple's only: the mean is detached in L_vlb
    dkl_dlogvar = 0.5 * (1 - np.exp(log_bt) / var - (mu - mu_hat) ** 2 / var)
    grad_v = lam * T * dkl_dlogvar * dlogvar_dv / dims / math.log(2)
    return loss, grad_eps, grad_v


def hybrid_case(t, seed=0):
    rng = np.random.default_rng(seed)
    shape = (len(t), 1, 3, 3)
    x_0 = GRID[rng.integers(0, 256, shape)]
    return x_0, rng.standard_normal(shape), rng.standard_normal(shape), rng.uniform(-0.9, 0.9, shape)


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
@pytest.mark.parametrize("gamma", [0.0, 2.0], ids=["unweighted", "min_snr_2"])
def test_hybrid_loss_is_l_simple_plus_lambda_T_times_the_bound_term(var_type, gamma):
    t = np.array([0, 1, 4, 9, 9])
    x_0, noise, eps_hat, v = hybrid_case(t)
    if var_type == "learned":
        v = v - 5.0  # a log-variance near log beta_t
    lam = 0.1
    _, net = fixed_output(np.concatenate([eps_hat, v], 1))
    trainer = GaussianDiffusionTrainer(net, BETAS, "epsilon", "hybrid", var_type, hybrid_lambda=lam, snr_gamma=gamma)
    loss = trainer(torch.from_numpy(x_0), torch.from_numpy(t), torch.from_numpy(noise))
    expected, _, _ = hybrid_reference(x_0, noise, t, eps_hat, v, var_type, lam, gamma)
    assert loss.shape == (len(t),)
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=2e-5)


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_hybrid_gradients_reach_the_mean_through_l_simple_and_the_variance_through_l_vlb(var_type):
    """d loss / d mean output is L_simple's alone (L_vlb sees the mean as a constant), and
    d loss / d variance output is lambda T dL_t / dv alone (L_simple has no variance)."""
    t = np.array([1, 2, 5, 9])
    x_0, noise, eps_hat, v = hybrid_case(t, seed=1)
    if var_type == "learned":
        v = v - 5.0
    lam = 0.1
    leaf, net = fixed_output(np.concatenate([eps_hat, v], 1))
    trainer = GaussianDiffusionTrainer(net, BETAS, "epsilon", "hybrid", var_type, hybrid_lambda=lam)
    trainer(torch.from_numpy(x_0), torch.from_numpy(t), torch.from_numpy(noise)).sum().backward()
    _, grad_eps, grad_v = hybrid_reference(x_0, noise, t, eps_hat, v, var_type, lam, 0.0)
    np.testing.assert_allclose(leaf.grad[:, :1].numpy(), grad_eps, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(leaf.grad[:, 1:].numpy(), grad_v, rtol=1e-4, atol=1e-9)
    assert np.abs(grad_v).max() > 1e-4  # the variance learns


# ---------------------------------------------------------------- Min-SNR-gamma

def min_snr_case(mean_type, seed=0):
    """(x_0, noise, t, x0_hat, the output of a mean_type network that predicts x0_hat)."""
    s = schedule()
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    x_0, noise = GRID[rng.integers(0, 256, (T, 2, 3, 3))], rng.standard_normal((T, 2, 3, 3))
    x0_hat = x_0 + 0.3 * rng.standard_normal(x_0.shape)
    a = column(s["abar"], t)
    x_t = np.sqrt(a) * x_0 + np.sqrt(1 - a) * noise
    output = {"xstart": x0_hat, "epsilon": (x_t - np.sqrt(a) * x0_hat) / np.sqrt(1 - a),
              "xprev": column(s["c1"], t) * x0_hat + column(s["c2"], t) * x_t}[mean_type]
    return x_0, noise, t, x0_hat, output


def weighted_losses(mean_type, gamma, seed=0):
    x_0, noise, t, _, output = min_snr_case(mean_type, seed)
    trainer = GaussianDiffusionTrainer(lambda x, steps: torch.from_numpy(output), BETAS, mean_type, "mse",
                                       "fixedlarge", snr_gamma=gamma)
    return trainer(torch.from_numpy(x_0), torch.from_numpy(t), torch.from_numpy(noise))


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_are_their_float64_recomputation(mean_type, gamma):
    """epsilon: min(SNR, G) / SNR; xstart: min(SNR, G); xprev: min(SNR, G) / c1^2, the factor
    between an xprev model's squared error and the x0_hat error it implies."""
    s = schedule()
    x_0, noise, t, x0_hat, output = min_snr_case(mean_type)
    snr = s["abar"] / (1 - s["abar"])
    assert snr.min() < gamma < snr.max()  # G binds at some steps and not at others
    a = column(s["abar"], t)
    x_t = np.sqrt(a) * x_0 + np.sqrt(1 - a) * noise
    target = {"epsilon": noise, "xstart": x_0, "xprev": column(s["c1"], t) * x_0 + column(s["c2"], t) * x_t}[mean_type]
    weight = {"epsilon": np.minimum(snr, gamma) / snr, "xstart": np.minimum(snr, gamma),
              "xprev": np.minimum(snr, gamma) / s["c1"] ** 2}[mean_type]
    expected = column(weight, t) * (output - target) ** 2
    # the network's output is float32: its rounding, relative to the largest error
    np.testing.assert_allclose(weighted_losses(mean_type, gamma).numpy(), expected, rtol=1e-5,
                               atol=1e-6 * expected.max())


@pytest.mark.parametrize("gamma", [2.0, math.inf])
def test_min_snr_weights_give_every_mean_type_one_objective_and_none_at_infinite_gamma(gamma):
    """The same x0_hat predicted as epsilon, x_0 or the posterior mean has the same weighted
    loss, min(SNR, G) |x0_hat - x_0|^2 per element; with G = inf it is the unweighted epsilon
    loss of Ho et al. (L_simple)."""
    per_type = {m: weighted_losses(m, gamma).double().flatten(1).mean(1) for m in MEAN_TYPES}
    for mean_type in ("xstart", "xprev"):
        torch.testing.assert_close(per_type[mean_type], per_type["epsilon"], rtol=1e-4, atol=0)
    s = schedule()
    _, _, t, x0_hat, _ = min_snr_case("epsilon")
    x_0 = min_snr_case("epsilon")[0]
    snr = s["abar"] / (1 - s["abar"])
    expected = (column(np.minimum(snr, gamma), t) * (x0_hat - x_0) ** 2).reshape(T, -1).mean(1)
    np.testing.assert_allclose(per_type["epsilon"].numpy(), expected, rtol=1e-4)
    if gamma == math.inf:
        assert torch.equal(weighted_losses("epsilon", gamma), weighted_losses("epsilon", 0.0))


# ---------------------------------------------------------------- importance-sampled timesteps

def fill(sampler, losses):
    """Record losses {t: [l_1, l_2, ...]} one round at a time over t, as batches would."""
    rounds = max(map(len, losses.values()))
    for k in range(rounds):
        steps = [t for t in sorted(losses) if k < len(losses[t])]
        sampler.update(torch.tensor(steps), torch.tensor([losses[t][k] for t in steps], dtype=torch.float64))


def test_importance_probabilities_are_the_second_moment_formula():
    """p_t = (1 - 1e-3) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + 1e-3 / T over the last 10 losses
    at each t; uniform while some t has fewer than 10."""
    steps = 5
    rng = np.random.default_rng(0)
    losses = {t: list(rng.uniform(0.1, 1.0, 12) * (t + 1)) for t in range(steps)}
    losses[3] = losses[3][:9]
    sampler = ImportanceSampler(steps)
    fill(sampler, losses)
    assert torch.equal(sampler.probabilities(), torch.full((steps,), 1 / steps, dtype=torch.float64))
    sampler.update(torch.tensor([3]), torch.tensor([2.5], dtype=torch.float64))
    losses[3].append(2.5)
    second_moment = np.array([np.sqrt(np.mean(np.square(losses[t][-10:]))) for t in range(steps)])
    expected = (1 - 1e-3) * second_moment / second_moment.sum() + 1e-3 / steps
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-14, atol=0)
    # the history a checkpoint keeps brings back the same p
    restored = ImportanceSampler(steps)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.probabilities(), sampler.probabilities())


def test_the_reweighted_loss_is_unbiased():
    """E_{t ~ p}[L_t / (T p_t)] = (1/T) sum_t L_t, the uniform average, summed over t exactly."""
    steps = 7
    rng = np.random.default_rng(1)
    sampler = ImportanceSampler(steps)
    fill(sampler, {t: list(rng.uniform(0.5, 1.0, 10) * 2.0 ** t) for t in range(steps)})
    p = sampler.probabilities()
    assert p.max() / p.min() > 3  # far from uniform
    table = torch.from_numpy(rng.uniform(0.0, 10.0, steps))
    everything = torch.arange(steps)
    expectation = (p * table * sampler.weights(everything, p)).sum()
    assert expectation.item() == pytest.approx(table.mean().item(), rel=1e-14)


def test_timesteps_are_drawn_from_p_the_same_on_every_call():
    p = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    _, t, _ = step_draws(0, 5, 40000, (1, 1, 1), 4, "cpu", p)
    assert torch.equal(t, step_draws(0, 5, 40000, (1, 1, 1), 4, "cpu", p)[1])
    counts = torch.bincount(t, minlength=4).double()
    assert counts[1] == 0
    tolerance = 5 * torch.sqrt(40000 * p * (1 - p))  # five standard deviations
    assert ((counts - 40000 * p).abs() <= tolerance).all(), counts


# ---------------------------------------------------------------- through the training step

def tiny_config(**overrides):
    """Every recipe at once on a tiny network: T = 4 and batches of 16 fill the importance
    sampler's history (10 losses per t) within a few steps."""
    values = dict(dataset="digits", img_size=8, img_channels=1, ch=32, ch_mult=(1,), attn=(0,), num_res_blocks=1,
                  T=4, batch_size=16, var_type="learned_range", loss_type="hybrid", t_sampling="importance",
                  ema_warmup=True, snr_gamma=5.0, dropout=0.1, warmup=0, sample_size=1, num_workers=0,
                  ema_decay=0.9)
    return Config.make(**{**values, **overrides})


def global_batch(step, size):
    return torch.rand((size, 1, 8, 8), generator=torch.Generator().manual_seed(1000 + step)) * 2 - 1


def fresh_state(config):
    torch.manual_seed(0)
    fast = speed.resolve(config.fast, "cpu")
    return train.initial_state(config, fast, torch.device("cpu"), "unused", 0, 1)


def run(config, state, steps, rank=0, world_size=1, net=None):
    """`steps` training steps of this process's share of the global batches; the timesteps
    each step drew, as train_step draws them."""
    net = net or state.net
    trainer = build_trainer(net, config.diffusion, config.training)
    local, drawn = config.training.batch_size // world_size, []
    for _ in range(steps):
        probabilities = state.t_sampler.probabilities() if state.t_sampler else None
        drawn.append(step_draws(config.run.seed, state.step, config.training.batch_size, (1, 8, 8), config.diffusion.T,
                                "cpu", probabilities)[1])
        part = global_batch(state.step, config.training.batch_size)[rank * local:(rank + 1) * local]
        micro_batches = [(chunk, None) for chunk in part.chunk(config.training.accum_steps)]
        train.train_step(state, trainer, net, iter(micro_batches), config, rank, world_size)
    return drawn


@pytest.mark.slow  # over a second on 2 cores
def test_importance_sampling_and_every_recipe_resume_exactly(tmp_path):
    """8 steps straight, or 3, a checkpoint, --resume and 5 more: the same weights, EMA and
    loss history bit for bit. The checkpoint is taken while the history fills (it must keep
    the counts) and the run ends with t drawn from a non-uniform p."""
    config = tiny_config()
    straight = fresh_state(config)
    run(config, straight, 8)
    assert (straight.t_sampler.count == 10).all()
    assert straight.t_sampler.probabilities().max() > 0.3  # not uniform

    first = fresh_state(config)
    run(config, first, 3)
    assert (first.t_sampler.count < 10).any()
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, first.to_checkpoint([rng_state()], 1))
    torch.manual_seed(123)  # the resumed process's own RNG (dropout) must be restored
    resumed = train.initial_state(config.replace(train=True, resume=True), speed.resolve(config.fast, "cpu"),
                                  torch.device("cpu"), path, 0, 1)
    run(config, resumed, 5)
    assert resumed.step == straight.step == 8
    for key in ("net", "ema"):
        for (name, ours), theirs in zip(getattr(resumed, key).state_dict().items(),
                                        getattr(straight, key).state_dict().values()):
            assert torch.equal(ours, theirs), f"{key}.{name}"
    assert np.array_equal(resumed.t_sampler.history, straight.t_sampler.history)
    assert np.array_equal(resumed.t_sampler.count, straight.t_sampler.count)


def two_process_run(rank, port, path):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        config = tiny_config(dropout=0.0)
        state = fresh_state(config)
        drawn = run(config, state, 8, rank, 2, DistributedDataParallel(state.net))
        if rank == 0:
            torch.save({"drawn": drawn, "history": torch.from_numpy(state.t_sampler.history),
                        "net": state.net.state_dict()}, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes start (about 20 s on 2 busy cores)
def test_importance_sampling_on_two_processes_draws_what_one_does(tmp_path):
    """The history is updated with the whole global batch's losses, gathered in its order, so
    both processes of a 2-process run hold one history and draw the t that one process draws;
    the weights are the same up to float rounding (the batch is summed in other orders)."""
    config = tiny_config(dropout=0.0)
    one = fresh_state(config)
    drawn = run(config, one, 8)
    path = str(tmp_path / "rank0.pt")
    mp.spawn(two_process_run, args=(distributed.free_port(), path), nprocs=2)
    two = torch.load(path, weights_only=True)
    assert one.t_sampler.probabilities().max() > 0.3  # the last steps drew from a non-uniform p
    for step, (ours, theirs) in enumerate(zip(two["drawn"], drawn)):
        assert torch.equal(ours, theirs), step
    np.testing.assert_allclose(two["history"].numpy(), one.t_sampler.history, rtol=1e-5)
    for name, tensor in one.net.state_dict().items():
        torch.testing.assert_close(two["net"][name], tensor, rtol=0, atol=2e-4, msg=name)


def test_a_non_finite_step_leaves_the_loss_history_as_it_was():
    """A step whose loss is NaN changes nothing (apply_gradients), the importance sampler's
    history included: one NaN would make every later p_t NaN."""
    config = tiny_config(dropout=0.0)
    state = fresh_state(config)
    run(config, state, 2)
    history, count = state.t_sampler.history.copy(), state.t_sampler.count.copy()
    trainer = build_trainer(state.net, config.diffusion, config.training)
    nan_batch = torch.full((16, 1, 8, 8), float("nan"))
    _, bad = train.train_step(state, trainer, state.net, iter([(nan_batch, None)]), config, 0, 1)
    assert bad
    assert np.array_equal(state.t_sampler.history, history) and np.array_equal(state.t_sampler.count, count)
    assert torch.isfinite(state.t_sampler.probabilities()).all()


@pytest.mark.slow  # over a second on 2 cores
def test_importance_sampling_in_micro_batches_draws_what_one_batch_does():
    """--accum_steps 4: the micro-batches' losses are recorded in the global batch's order."""
    config = tiny_config(dropout=0.0)
    whole, micro = fresh_state(config), fresh_state(config.replace(accum_steps=4))
    drawn = run(config, whole, 7)
    assert whole.t_sampler.probabilities().max() > 0.3
    for step, (ours, theirs) in enumerate(zip(run(config.replace(accum_steps=4), micro, 7), drawn)):
        assert torch.equal(ours, theirs), step
    np.testing.assert_allclose(micro.t_sampler.history, whole.t_sampler.history, rtol=1e-5)


# ---------------------------------------------------------------- the EMA warm-up

def test_ema_warmup_is_tensorflows_num_updates_rule_through_the_training_step():
    """With --ema_warmup the EMA update after optimizer step k (k = 0, 1, ... steps taken
    before it) uses decay min(ema_decay, (1 + k) / (10 + k)): 0.1, 2/11, then --ema_decay 0.25
    at k = 2 (3/12 = 0.25, where the two meet). Recomputed by hand from the weights after each step."""
    config = tiny_config(ema_decay=0.25, lr=0.05, t_sampling="uniform", loss_type="kl", snr_gamma=0.0, dropout=0.0)
    state = fresh_state(config)

    def flat(net):
        return torch.cat([p.detach().flatten().double() for p in net.parameters()])

    expected = flat(state.ema)
    without_warmup = expected.clone()
    for k, decay in enumerate([0.1, 2 / 11, 0.25]):
        run(config, state, 1)
        assert state.step == k + 1
        expected = decay * expected + (1 - decay) * flat(state.net)
        without_warmup = 0.25 * without_warmup + 0.75 * flat(state.net)
    torch.testing.assert_close(flat(state.ema), expected, rtol=0, atol=1e-6)
    assert (flat(state.ema) - without_warmup).abs().max() > 1e-4  # the warm-up changed the average


def test_an_fp16_overflow_leaves_the_loss_history_as_it_was():
    """A step the loss scaler skips (finite loss, gradients that overflow fp16) changes no
    history either: its losses are real, but the step was not taken. Not a bad step."""
    config = tiny_config(dropout=0.0, precision="fp16")
    state = fresh_state(config)
    assert state.scaling.enabled
    run(config, state, 2)
    history, count = state.t_sampler.history.copy(), state.t_sampler.count.copy()
    trainer = build_trainer(state.net, config.diffusion, config.training)
    weight = next(p for p in state.net.parameters() if p.requires_grad)
    hook = weight.register_hook(lambda grad: grad * float("inf"))  # an overflow in the backward pass
    _, bad = train.train_step(state, trainer, state.net, iter([(global_batch(2, 16), None)]), config, 0, 1)
    hook.remove()
    assert not bad and state.scaling.scaler.get_scale() == 32768.0
    assert np.array_equal(state.t_sampler.history, history) and np.array_equal(state.t_sampler.count, count)
