"""The ends of the schedule, and what may leave the program as a result.

Where abar_t = 0 (the jsd schedule's last step) x_t holds nothing of x_0: an epsilon model's
x0_hat is 0/0 there and the solvers' log-SNR is -inf, so no sampler may visit it and no bound
may need it. One step means one step from noise. T = 1 has no betatilde_1 for the bound's
clipped variances. Samples that are not finite are never written, never scored. A solver's
record says the highest order a step of its chain used.

The references are closed forms written here in numpy float64 (the schedules' abar, x0_hat
of the one step), independently of the sampling code.
"""
import os
import types

import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import reports
import train
from builders import build_model, build_sampler, build_trainer
from config import Config, ConfigError
from conftest import SOLVERS
from diffusion import beta_schedule
from sampling import SAMPLERS, SKIP_TYPES, GaussianDiffusionSampler, sample_timesteps
from solvers import singlestep_orders
from steps import AncestralStep
from reports import NonFiniteSamples

T = 20
SHAPE = (2, 1, 2, 2)


def alphas_bar(name, steps):
    """abar_t of the named schedule, float64: jsd's beta_t = 1 / (T - t), the paper's linear."""
    betas = 1.0 / np.linspace(steps, 1, steps) if name == "jsd" else np.linspace(1e-4, 0.02, steps)
    return np.cumprod(1.0 - betas)


def eps_like(x, t):
    """A deterministic stand-in network: any function of (x, t) will do."""
    return 0.5 * np.tanh(x) + 0.01 * t


class Recording(torch.nn.Module):
    """eps_like as a network, remembering the timesteps it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls += sorted(set(t.tolist()))
        return torch.from_numpy(eps_like(x.numpy(), t.numpy().reshape(-1, 1, 1, 1)))


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def one_line(error):
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- abar_t = 0 is never visited


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("skip_type", SKIP_TYPES)
@pytest.mark.parametrize("steps", [None, 5])
def test_no_sampler_calls_the_network_where_abar_is_zero_and_every_sample_is_finite(sampler, skip_type, steps):
    abar = alphas_bar("jsd", T)
    assert abar[-1] == 0 and (abar[:-1] > 0).all()
    chain = GaussianDiffusionSampler(beta_schedule("jsd", 0, 0, T), sampler=sampler, sample_steps=steps,
                                     skip_type=skip_type)
    net = Recording()
    samples = chain(net, x_T(), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(samples).all()
    calls = sorted(chain.timesteps, reverse=True)
    if sampler == "heun":  # two evaluations per step but the last, the second at the next kept t
        calls = [t for t in calls for _ in range(1 if t == calls[0] else 2)]
    assert net.calls == calls and all(abar[t] > 0 for t in net.calls)
    full = steps is None and sampler != "heun"  # heun's T evaluations are T // 2 steps
    if full or skip_type in ("logsnr", "karras"):  # these span the chain: they start at T' - 1 = T - 2
        assert net.calls[0] == T - 2
    if full:  # the full chain, every t with abar_t > 0, is Algorithm 2's
        assert chain.timesteps == list(range(T - 1))
        assert sampler != "ddpm" or type(chain.step) is AncestralStep


def test_jsd_keeps_the_strided_timesteps_that_never_reached_its_last_step():
    """Old flagfiles sample as before: uniform and quadratic spacing stay the official
    formulas in T, which for steps < T stop short of t = T - 1."""
    abar = torch.from_numpy(alphas_bar("jsd", 1000))
    for steps in (2, 10, 50, 999):
        assert sample_timesteps(abar, steps, "uniform") == [k * 1000 // steps for k in range(steps)]
        official = {int(s) for s in np.linspace(0, np.sqrt(0.8 * 1000), steps) ** 2}
        assert sample_timesteps(abar, steps, "quadratic") == sorted(official)
    # at T <= 5 quadratic's 0.8 T is T - 1: moved down to T - 2, a repeat dropped
    assert sample_timesteps(torch.from_numpy(alphas_bar("jsd", 5)), 3, "quadratic") == [0, 1, 3]
    kept = sample_timesteps(abar, 10, "logsnr")
    assert len(kept) == 10 and kept[0] == 0 and kept[-1] == 998


# ---------------------------------------------------------------- one step is one step from noise


@pytest.mark.parametrize("schedule, steps", [("linear", T), ("jsd", T), ("linear", 1)])
@pytest.mark.parametrize("skip_type", SKIP_TYPES)
@pytest.mark.parametrize("sampler", [name for name in SAMPLERS if name != "ddpm"])
def test_one_step_starts_at_the_last_t_with_abar_above_zero_and_gives_its_x0_hat(schedule, steps, skip_type,
                                                                               sampler):
    """T' = T, T - 1 for jsd: the one step is x0_hat(x_T, T' - 1), whatever the sampler, since
    each one's last step ends at abar = 1 (sigma = 0). With T = 1 it is the whole chain."""
    abar = alphas_bar(schedule, steps)
    last = int((abar > 0).sum()) - 1
    chain = GaussianDiffusionSampler(beta_schedule(schedule, 1e-4, 0.02, steps), sampler=sampler, sample_steps=1,
                                     skip_type=skip_type, clip_denoised=False)
    assert chain.timesteps == [last]
    net, noise = Recording(), x_T()
    samples = chain.denoise(net, noise, last)
    assert net.calls == [last]
    x = noise.numpy()
    x0_hat = (x - np.sqrt(1.0 - abar[last]) * eps_like(x, last)) / np.sqrt(abar[last])
    np.testing.assert_allclose(samples.numpy(), np.clip(x0_hat, -1, 1), rtol=1e-10, atol=1e-12)


def test_ddpm_with_fewer_than_two_timesteps_is_one_line():
    for values in (dict(sample_steps=1), dict(T=1), dict(beta_schedule="jsd", T=2)):
        with pytest.raises(ConfigError) as error:
            Config.make(**{"T": T, **values})
        assert "sampler 'ddpm' needs at least 2 timesteps, got 1" in one_line(error)


# ---------------------------------------------------------------- the bound: refused where undefined


@pytest.mark.parametrize("values, words", [
    (dict(beta_schedule="jsd", loss_type="kl"), "loss_type 'kl' is undefined for mean_type 'epsilon'"),
    (dict(beta_schedule="jsd", loss_type="hybrid", var_type="learned_range"),
     "loss_type 'hybrid' is undefined for mean_type 'epsilon'"),
    (dict(beta_schedule="jsd", bpd=True), "--bpd is undefined for mean_type 'epsilon'"),
    (dict(beta_schedule="jsd", T=1, sampler="ddim"), "abar_t = 0 at every timestep"),
    (dict(T=1, sampler="ddim", loss_type="kl"), "loss_type 'kl' needs T >= 2"),
    (dict(T=1, sampler="ddim", loss_type="kl", var_type="learned"), "loss_type 'kl' needs T >= 2"),
    (dict(T=1, sampler="ddim", loss_type="hybrid", var_type="learned_range"), "loss_type 'hybrid' needs T >= 2"),
    (dict(T=1, sampler="ddim", bpd=True), "--bpd needs T >= 2"),
])
def test_a_bound_or_chain_with_an_undefined_term_is_refused_in_one_line(values, words):
    with pytest.raises(ConfigError) as error:
        Config.make(**{"T": T, **values})
    assert words in one_line(error)


def test_what_is_defined_at_the_ends_stays_allowed_and_finite():
    """At abar_t = 0: x_t is the noise, so eps's mse target is exact; an xstart or xprev
    model gives the posterior mean directly (c2_t = 0), so its bound is finite. T = 1 samples
    with ddim and the solvers (their one step needs no betatilde)."""
    net = lambda x, t: 0.3 * x + 0.1  # noqa: E731
    x_0 = torch.linspace(-1, 1, 8, dtype=torch.float64).view(2, 1, 2, 2)
    noise, last = x_T(3), torch.full((2,), T - 1)
    config = Config.make(T=T, beta_schedule="jsd")
    loss = build_trainer(net, config.diffusion)(x_0, last, noise)
    np.testing.assert_allclose(loss.numpy(), ((0.3 * noise + 0.1 - noise) ** 2).numpy(), rtol=1e-6)
    for mean_type in ("xstart", "xprev"):
        config = Config.make(T=T, beta_schedule="jsd", mean_type=mean_type, loss_type="kl", bpd=True)
        assert torch.isfinite(build_trainer(net, config.diffusion)(x_0, last, noise)).all()
    for sampler in list(SAMPLERS)[1:]:
        config = Config.make(T=1, sampler=sampler)
        assert torch.isfinite(build_sampler(config.sampling, config.diffusion)(Recording(), x_T())).all()


# ---------------------------------------------------------------- never written, never scored


class NaNNetwork(torch.nn.Module):
    def forward(self, x, t):
        return torch.full_like(x, float("nan"))


def nan_checkpoint(logdir, config):
    """<logdir>/ckpt.pt whose EMA weights are all NaN, for the configuration's network."""
    net = build_model(config.model, config.diffusion)
    os.makedirs(logdir)
    checkpoint.save(os.path.join(logdir, "ckpt.pt"), {
        "ema_model": {name: torch.full_like(tensor, float("nan")) for name, tensor in net.state_dict().items()},
        "layout": "official", "step": 1})


def tiny_eval(logdir, save_samples):
    return Config.make(dataset="digits", img_size=8, img_channels=1, ch=32, ch_mult=[1], attn=[],
                       num_res_blocks=1, T=4, sampler="ddim", logdir=logdir, eval=True, score=False,
                       save_samples=save_samples, num_images=4, eval_batch_size=2)


@pytest.mark.parametrize("target", ["pngs", "samples.npz"])
def test_nan_weights_with_noscore_save_samples_are_refused_and_nothing_is_written(tmp_path, target):
    logdir, out = str(tmp_path / "run"), str(tmp_path / target)
    config = tiny_eval(logdir, out)
    nan_checkpoint(logdir, config)
    with pytest.raises(NonFiniteSamples) as error:
        evaluate.evaluate(config, "cpu")
    assert "sample batch 0: 2 of 2 samples contain NaN or inf values, so nothing was scored" in one_line(error)
    assert not os.path.exists(out) and not os.path.exists(os.path.join(logdir, "samples_ema.png"))
    written = [name for _, _, names in os.walk(logdir) for name in names]
    assert not [name for name in written if name.startswith("batch_") or name.endswith((".png", ".npz"))]


def test_nan_samples_make_no_grid_strip_or_interpolation(tmp_path):
    chain = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, T), sampler="ddim", sample_steps=4)
    with pytest.raises(NonFiniteSamples) as error:
        reports.progressive_samples(chain, NaNNetwork(), x_T(), every=1)
    assert "progressive sampling: 2 of 2 samples contain NaN" in one_line(error)
    with pytest.raises(NonFiniteSamples) as error:
        reports.interpolate(chain, NaNNetwork(), x_T(1), x_T(2), chain.timesteps[-1], [0.0, 1.0])
    assert f"the interpolation at t = {chain.timesteps[-1]}" in one_line(error)
    logs = types.SimpleNamespace(logdir=str(tmp_path), writer=None)
    images = x_T()
    images[1, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteSamples) as error:
        train.Logs.sample_grid(logs, images, None, 7)
    assert "the sample grid of step 7: 1 of 2 samples contain NaN or inf values" in one_line(error)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the record says what ran


def orders_that_ran(chain, monkeypatch):
    """The order of each step of one chain from x_T, seen where the step forms its update:
    the x0_hat the multistep formulas take, the singlestep order list, UniPC's predictor."""
    import solvers
    used, name = [], type(chain.step).__name__
    differences, coefficients = solvers.multistep_differences, solvers.unipc_coefficients

    def counted_differences(history, lam, h):
        used.append(len(history))
        return differences(history, lam, h)

    def counted_coefficients(rks, hh, order, corrector):
        if not corrector:
            used.append(order)
        return coefficients(rks, hh, order, corrector)

    monkeypatch.setattr(solvers, "multistep_differences", counted_differences)
    monkeypatch.setattr(solvers, "unipc_coefficients", counted_coefficients)
    chain(Recording(), x_T(), generator=torch.Generator().manual_seed(0))
    if name == "DPMSolverSinglestepStep":  # diffusers' order list (tests/test_solvers.py)
        used = singlestep_orders(len(chain.timesteps), chain.step.order)
    assert len(used) == len(chain.timesteps)
    return used


@pytest.mark.parametrize("sampler", list(SOLVERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_the_record_names_the_highest_order_any_step_used(sampler, steps, monkeypatch):
    evaluator = types.SimpleNamespace(feature="digits", weights_sha256="a" * 12, statistics_sha256=None,
                                      record=lambda count: {"metrics": ["fid", "is"]})
    order = 2 if sampler == "sde_dpm_solver++" else 3
    config = Config.make(T=T, sampler=sampler, solver_order=order, sample_steps=steps, skip_type="uniform")
    chain = build_sampler(config.sampling, config.diffusion)
    record = evaluate.protocol_record(config, chain, evaluator, 100, 7, "c" * 12, 0.0)
    ran = max(orders_that_ran(chain, monkeypatch))
    assert record["solver_order"] == ran and f"{sampler} sampler of order {ran}," in evaluate.describe(record)
    if sampler == "dpm_solver":  # the case: order 3 asked, 2 steps run first-order only
        assert ran == {1: 1, 2: 1, 3: 2, 10: 3}[steps]
