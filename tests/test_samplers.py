"""Fast samplers (DDIM, strided ancestral), the one sampling loop, progressive sampling and
interpolation.

The references below are written from the formulas of Ho et al. 2020 (eqs. 6-7, Algorithm 2)
and Song et al. 2021 (DDIM, eq. 12) in numpy float64,
independently of the sampling code; the sampler runs the same deterministic toy model in float64
and draws its noise from a generator that the reference replays in the same order.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import sampling
from diffusion import GaussianDiffusionSampler, beta_schedule
from sampling import sample_timesteps
from steps import AncestralStep, DDIMStep, StridedAncestralStep
from reports import interpolate, progressive_samples, save_interpolation, save_progressive

T, BETA_1, BETA_T = 40, 1e-3, 0.3
BETAS = beta_schedule("linear", BETA_1, BETA_T, T)
SHAPE = (3, 1, 4, 4)


def schedule(beta_1=BETA_1, beta_T=BETA_T, steps=T):
    betas = np.linspace(beta_1, beta_T, steps)
    return betas, np.cumprod(1.0 - betas)


def toy_output(x, t):
    """A fixed nonlinear function of (x, t), large enough that x0_hat is often clipped."""
    return np.tanh(1.3 * x) * np.cos(0.05 * t) + 0.4 * np.sin(2.0 * x + 0.1 * t)


class ToyModel(torch.nn.Module):
    def forward(self, x, t):
        return torch.from_numpy(toy_output(x.numpy(), t.numpy().reshape(-1, 1, 1, 1)))


def x0_from_output(output, x, t, mean_type, abar, c1, c2):
    if mean_type == "epsilon":
        return (x - np.sqrt(1.0 - abar[t]) * output) / np.sqrt(abar[t])
    if mean_type == "xprev":
        return (output - c2[t] * x) / c1[t]
    return output


def posterior_coefficients(betas):
    """abar, c1, c2 and betatilde of eq. 6-7 for a chain with these betas."""
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    return abar, c1, c2, betas * (1.0 - abar_prev) / (1.0 - abar)


def reference_ancestral(x, noise, kept, mean_type, var_type):
    """Ancestral sampling on the chain through the kept timesteps (all of them: Algorithm 2):
    beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}, the model called at t_i, x0_hat clipped."""
    abar_full, c1_full, c2_full, _ = posterior_coefficients(schedule()[0])
    abar = abar_full[kept]
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    _, c1, c2, betatilde = posterior_coefficients(betas)
    for i in reversed(range(len(kept))):
        output = toy_output(x, kept[i])
        x0 = x0_from_output(output, x, kept[i], mean_type, abar_full, c1_full, c2_full)
        x0 = np.clip(x0, -1, 1)
        mean = output if mean_type == "xprev" and len(kept) == T else c1[i] * x0 + c2[i] * x
        if i > 0:
            var = betas[i] if var_type == "fixedlarge" else betatilde[i]
            x = mean + np.sqrt(var) * noise.pop(0)
        else:
            x = mean
    return np.clip(x, -1, 1)


def reference_ddim(x, noise, kept, eta, clip, ddim_eps="network"):
    """Song et al. eq. 12 on the kept timesteps; with clip, x0_hat is clipped and eps_hat is
    the model output ("network") or re-derived from the clipped x0_hat ("from_x0"); without
    it eps_hat is the model output (the official DDIM code)."""
    _, abar_full = schedule()
    for i in reversed(range(len(kept))):
        a_t = abar_full[kept[i]]
        a_s = abar_full[kept[i - 1]] if i > 0 else 1.0
        eps = toy_output(x, kept[i])
        x0 = (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
        if clip:
            x0 = np.clip(x0, -1, 1)
            if ddim_eps == "from_x0":
                eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)
        sigma = eta * np.sqrt((1.0 - a_s) / (1.0 - a_t)) * np.sqrt(1.0 - a_t / a_s)
        x = np.sqrt(a_s) * x0 + np.sqrt(1.0 - a_s - sigma ** 2) * eps
        if i > 0 and eta > 0:
            x = x + sigma * noise.pop(0)
    return np.clip(x, -1, 1)


def run_both(sampler, reference, draws):
    """The sampler's output and the reference's on the same x_T and the same noise draws."""
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    state = generator.get_state()
    noise = [torch.randn(SHAPE, generator=generator, dtype=torch.float64).numpy()
             for _ in range(draws)]
    generator.set_state(state)
    return sampler(ToyModel(), x_T, generator=generator).numpy(), reference(x_T.numpy(), noise)


def paper_alphas_bar():
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def test_timesteps_follow_the_official_ddim_definitions():
    abar = paper_alphas_bar()
    assert sample_timesteps(abar, 50, "uniform") == list(range(0, 1000, 20))
    assert sample_timesteps(abar, 1000, "uniform") == list(range(1000))
    # steps that do not divide T: still one evaluation per step (range(0, 1000, 3) would be 334)
    assert sample_timesteps(abar, 300, "uniform") == [k * 1000 // 300 for k in range(300)]
    quadratic = sample_timesteps(abar, 50, "quadratic")
    official = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), 50) ** 2]
    assert quadratic == sorted(set(official)) and quadratic[-1] == 800
    assert len(quadratic) == 49  # 0 appears twice in the official list
    # sample_steps 0 means T: the full chain, whatever the skip type (not 688 steps to t = 800)
    assert sample_timesteps(abar, 1000, "quadratic") == list(range(1000))
    assert sample_timesteps(abar, 1000, "logsnr") == list(range(1000))
    sampler = GaussianDiffusionSampler(BETAS, skip_type="quadratic")
    assert sampler.timesteps == list(range(T)) and type(sampler.step) is AncestralStep


@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50, 100, 300, 999])
def test_logsnr_timesteps_are_uniform_in_log_snr_and_one_per_evaluation(steps):
    """Every timestep is distinct and in 0..T-1, the ends are 0 and T-1, and each is the
    training step nearest to its point uniform in lambda, except a repeat, which sits just
    above the step before it (or, with nearly T steps, just below the end's share)."""
    abar = paper_alphas_bar()
    kept = sample_timesteps(abar, steps, "logsnr")
    assert len(set(kept)) == steps and kept == sorted(kept) and kept[0] == 0 and kept[-1] == 999
    lam = 0.5 * np.log(abar / (1.0 - abar))
    targets = np.linspace(lam[-1], lam[0], steps)[::-1]  # ascending t
    nearest = np.rint(np.interp(targets, lam[::-1], np.arange(1000)[::-1])).astype(int)
    for k in range(steps):
        if kept[k] != nearest[k]:
            assert (nearest[k] < kept[k] == kept[k - 1] + 1) or kept[k] == 1000 - steps + k, k
    assert (np.asarray(kept) == nearest).mean() > (0.5 if steps <= 100 else 0.0)


def test_logsnr_timesteps_equal_diffusers_lu_lambdas():
    """diffusers' use_lu_lambdas (uniform in log sigma = -lambda, mapped to t by
    interpolation and rounding) gives the same timesteps where it has no repeats."""
    diffusers = pytest.importorskip("diffusers")
    for steps in (5, 10, 20):
        scheduler = diffusers.DPMSolverMultistepScheduler(use_lu_lambdas=True)
        scheduler.set_timesteps(steps)
        assert sample_timesteps(paper_alphas_bar(), steps, "logsnr") == sorted(scheduler.timesteps.tolist())


@pytest.mark.parametrize("mean_type", ["epsilon", "xstart", "xprev"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_default_sampler_is_algorithm_2(mean_type, var_type):
    sampler = GaussianDiffusionSampler(BETAS, mean_type=mean_type, var_type=var_type)
    assert type(sampler.step) is AncestralStep
    ours, ref = run_both(sampler, lambda x, z: reference_ancestral(
        x, z, list(range(T)), mean_type, var_type), T - 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("skip_type,kept", [
    ("uniform", [k * T // 7 for k in range(7)]),
    ("quadratic", sorted({int(s) for s in np.linspace(0, math.sqrt(0.8 * T), 7) ** 2}))])
@pytest.mark.parametrize("mean_type", ["epsilon", "xprev"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_strided_ancestral_sampling_runs_the_respaced_chain(skip_type, kept, mean_type, var_type):
    sampler = GaussianDiffusionSampler(BETAS, mean_type=mean_type, var_type=var_type, sample_steps=7,
                                       skip_type=skip_type)
    assert sampler.timesteps == kept and type(sampler.step) is StridedAncestralStep
    ours, ref = run_both(sampler, lambda x, z: reference_ancestral(
        x, z, kept, mean_type, var_type), len(kept) - 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("skip_type,steps", [("uniform", 8), ("quadratic", 10), ("uniform", T)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip,ddim_eps", [(True, "network"), (True, "from_x0"), (False, "network")])
def test_ddim_matches_the_update_of_song_et_al(skip_type, steps, eta, clip, ddim_eps):
    sampler = GaussianDiffusionSampler(BETAS, sampler="ddim", sample_steps=steps, eta=eta,
                                       skip_type=skip_type, clip_denoised=clip, ddim_eps=ddim_eps)
    kept = sampler.timesteps
    assert type(sampler.step) is DDIMStep
    draws = len(kept) - 1 if eta > 0 else 0
    ours, ref = run_both(sampler, lambda x, z: reference_ddim(x, z, kept, eta, clip, ddim_eps), draws)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-11)


def test_ddim_with_eta_1_on_every_step_is_ancestral_sampling_with_fixedsmall():
    """sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t = betatilde_t, and the DDIM mean
    sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat is then
    c1 x0_hat + c2 x_t, when eps_hat is the one x0_hat implies (ddim_eps from_x0: the clipped
    x0_hat and the network's eps are not one point of the posterior)."""
    outputs = []
    for kwargs in ({"sampler": "ddim", "eta": 1.0, "ddim_eps": "from_x0"}, {"var_type": "fixedsmall"}):
        sampler = GaussianDiffusionSampler(BETAS, **kwargs)
        generator = torch.Generator().manual_seed(3)
        outputs.append(sampler(ToyModel(), torch.randn(SHAPE, generator=generator, dtype=torch.float64),
                               generator=generator))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)


M, S = 0.1, 0.2  # the oracle's data distribution N(M, S^2): clipping at +-1 is 4.5 S away


class GaussianOracle(torch.nn.Module):
    """E[eps | x_t] for x_0 ~ N(M, S^2) per pixel:
    sqrt(1 - a) (x_t - sqrt(a) M) / (a S^2 + 1 - a), a = abar_t."""

    def __init__(self, alphas_bar):
        super().__init__()
        self.register_buffer("alphas_bar", torch.from_numpy(alphas_bar))

    def forward(self, x, t):
        a = self.alphas_bar[t].view(-1, *[1] * (x.dim() - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S ** 2 + 1 - a)


def ddim_oracle_output(kept, alphas_bar):
    """Mean and std of DDIM's (eta = 0) output with the oracle, x_T ~ N(0, 1), in float64.

    With the oracle every step is affine, x_s = A x_t + B: mean <- A mean + B, std <- |A| std.
    """
    mean, std = 0.0, 1.0
    for i in reversed(range(len(kept))):
        a = alphas_bar[kept[i]]
        a_s = alphas_bar[kept[i - 1]] if i > 0 else 1.0
        k = math.sqrt(1 - a) / (a * S ** 2 + 1 - a)       # eps_hat = k (x_t - sqrt(a) M)
        # x_s = sqrt(a_s) (x_t - sqrt(1 - a) eps_hat) / sqrt(a) + sqrt(1 - a_s) eps_hat
        slope = math.sqrt(a_s / a) * (1 - math.sqrt(1 - a) * k) + math.sqrt(1 - a_s) * k
        intercept = ((math.sqrt(a_s / a) * math.sqrt(1 - a) - math.sqrt(1 - a_s))
                     * k * math.sqrt(a) * M)
        mean, std = slope * mean + intercept, abs(slope) * std
    return mean, std


@pytest.mark.parametrize("skip_type,steps,tolerance", [
    ("uniform", 50, 0.15), ("uniform", 100, 0.08),
    ("quadratic", 50, 0.05), ("quadratic", 100, 0.025)])
def test_ddim_with_the_gaussian_oracle_recovers_the_data_distribution(skip_type, steps, tolerance):
    """DDIM with eta = 0 integrates the probability-flow ODE with first-order (Euler) steps, so
    even with the exact eps its output std misses S by about C / steps. The recursion above
    gives that output exactly: std / S - 1 = -0.119 and -0.062 (uniform, 50 and 100 steps),
    -0.039 and -0.020 (quadratic), halving with twice the steps as a first-order method's
    error does; `tolerance` is that error rounded up. The mean is M to within 1e-3 (x_T enters
    at the last kept step with mean 0, not sqrt(abar) M). The samples must match the exact
    output to within their own sampling error, and so (M, S) to within the tolerance."""
    _, alphas_bar = schedule(1e-4, 0.02, 1000)
    sampler = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, 1000), sampler="ddim",
                                       sample_steps=steps, skip_type=skip_type)
    exact_mean, exact_std = ddim_oracle_output(sampler.timesteps, alphas_bar)
    assert abs(exact_mean - M) < 1e-3 and abs(exact_std / S - 1) < tolerance

    n = 2 ** 16
    x_T = torch.randn((n // 16, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    samples = sampler(GaussianOracle(alphas_bar), x_T)
    mean, std = samples.mean().item(), samples.std().item()
    # the output is affine in x_T, so its error is that of x_T's empirical mean and std
    assert abs(mean - exact_mean) < 5 * exact_std / math.sqrt(n)
    assert abs(std - exact_std) < 5 * exact_std / math.sqrt(2 * n)
    assert abs(mean - M) < 2e-3 and abs(std / S - 1) < tolerance


def test_bad_sampler_arguments_raise():
    def make(**kwargs):
        return GaussianDiffusionSampler(BETAS, **kwargs)

    with pytest.raises(ValueError, match="ddpm, ddim"):
        make(sampler="ddpm2")
    with pytest.raises(ValueError, match="uniform, quadratic, logsnr"):
        make(sampler="ddim", skip_type="quad")
    with pytest.raises(ValueError, match="network, from_x0"):
        make(sampler="ddim", ddim_eps="clipped")
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match="sample_steps"):
            make(sampler="ddim", sample_steps=steps)
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        make(sample_steps=1)
    assert make(sampler="ddim", sample_steps=1).timesteps == [T - 1]  # the one step starts from noise
    with pytest.raises(ValueError, match="eta"):
        make(sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="eta"):
        make(eta=0.5)
    with pytest.raises(ValueError, match="learned"):
        make(var_type="learned", sample_steps=10)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        make(sampler="ddim", sample_steps=10).denoise(ToyModel(), torch.zeros(SHAPE, dtype=torch.float64), 5)


def test_progressive_sampling_records_every_kth_step_and_saves(tmp_path):
    sampler = GaussianDiffusionSampler(BETAS, var_type="fixedsmall")
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    progressive = progressive_samples(sampler, ToyModel(), x_T, every=10, generator=generator)
    assert progressive["timesteps"].tolist() == [30, 20, 10, 0]
    assert progressive["x_t"].shape == progressive["pred_xstart"].shape == (3, 4, 1, 4, 4)
    generator.manual_seed(0)
    x_T = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    samples = sampler(ToyModel(), x_T, generator=generator)
    torch.testing.assert_close(progressive["samples"], samples, rtol=0, atol=0)
    # at t = 0 the mean is c1 x0_hat + c2 x_t with c1 = 1, c2 = 0 up to rounding
    torch.testing.assert_close(progressive["pred_xstart"][:, -1], samples, rtol=1e-12, atol=1e-12)

    paths = save_progressive(progressive, tmp_path)
    assert len(paths) == 4
    with Image.open(paths[0]) as strip:
        # 4 columns, 2 rows of 4 px images shown at 32 px, 2 px of padding
        assert strip.size == (4 * 34 + 2, 2 * 34 + 2)
    with Image.open(paths[-1]) as gif:
        assert gif.n_frames == 4


def test_interpolation_diffuses_each_endpoint_with_its_own_noise(tmp_path):
    """The official interpolate: x_t^a and x_t^b from independent noise, one reverse-process
    noise for every lambda."""
    sampler = GaussianDiffusionSampler(BETAS, sampler="ddim", sample_steps=10, eta=1.0, skip_type="uniform")
    x0_a = torch.full(SHAPE, -0.5, dtype=torch.float64)
    x0_b = torch.full(SHAPE, 0.5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    mixed = interpolate(sampler, ToyModel(), x0_a, x0_b, 20, [0.0, 0.5, 1.0], generator)
    assert mixed.shape == (3, 3, 1, 4, 4)

    generator.manual_seed(0)
    noise_a = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    noise_b = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    assert not torch.allclose(noise_a, noise_b)
    t = torch.full((3,), 20)
    x_t_a, x_t_b = sampler.q_sample(x0_a, t, noise_a), sampler.q_sample(x0_b, t, noise_b)
    state = generator.get_state()
    for column, x_t in ((0, x_t_a), (1, (x_t_a + x_t_b) / 2), (2, x_t_b)):
        generator.set_state(state)
        expected = sampler.denoise(ToyModel(), x_t, 20, generator)
        torch.testing.assert_close(mixed[:, column], expected, rtol=1e-12, atol=1e-12)

    save_interpolation(tmp_path / "interp_t20.png", x0_a, x0_b, mixed)
    with Image.open(tmp_path / "interp_t20.png") as grid:
        assert grid.size == (5 * 34 + 2, 3 * 34 + 2)


# ---------------------------------------------------------------- the one loop

def seeded(seed=5):
    return torch.Generator().manual_seed(seed)


class RecordingNet(torch.nn.Module):
    """ToyModel that notes the timesteps and the input of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append((t.clone(), x.clone()))
        return ToyModel()(x, t)


LOOP_CONFIGS = [{}, {"sample_steps": 7, "skip_type": "quadratic"},
                {"sampler": "ddim", "sample_steps": 8, "eta": 0.5}]


@pytest.mark.parametrize("kwargs", LOOP_CONFIGS)
def test_the_loop_visits_each_kept_timestep_once_in_descending_order(kwargs):
    sampler = GaussianDiffusionSampler(BETAS, **kwargs)
    kept = sampler.timesteps
    net = RecordingNet()
    x_T = torch.randn(SHAPE, generator=seeded(0), dtype=torch.float64)
    records = list(sampler.chain(net, x_T, generator=seeded()))
    assert [t.tolist() for t, _ in net.calls] == [[s] * SHAPE[0] for s in reversed(kept)]
    assert all(t.dtype == torch.long for t, _ in net.calls)
    assert [r.t for r in records] == kept[::-1]
    assert [r.i for r in records] == list(reversed(range(len(kept))))
    # each record's input is what the network saw: x_T, then the previous record's output
    for (_, seen), record in zip(net.calls, records):
        assert torch.equal(seen, record.x_t)
    assert torch.equal(records[0].x_t, x_T)
    for before, after in zip(records, records[1:]):
        assert torch.equal(after.x_t, before.x_prev)
    # from a kept timestep in the middle: the kept timesteps from there down, once each
    net.calls.clear()
    middle = kept[len(kept) // 2]
    sampler.denoise(net, x_T, middle, seeded())
    assert [t[0].item() for t, _ in net.calls] == [s for s in reversed(kept) if s <= middle]


@pytest.mark.parametrize("kwargs", LOOP_CONFIGS)
def test_sampling_denoising_and_progressive_sampling_are_the_same_chain(kwargs):
    sampler = GaussianDiffusionSampler(BETAS, **kwargs)
    x_T = torch.randn(SHAPE, generator=seeded(0), dtype=torch.float64)
    sample = sampler(ToyModel(), x_T, generator=seeded())
    records = list(sampler.chain(ToyModel(), x_T, generator=seeded()))
    assert torch.equal(records[-1].x_prev.clamp(-1.0, 1.0), sample)
    assert torch.equal(sampler.denoise(ToyModel(), x_T, sampler.timesteps[-1], seeded()), sample)
    progressive = progressive_samples(sampler, ToyModel(), x_T, every=3, generator=seeded())
    assert torch.equal(progressive["samples"], sample)
    recorded = [r for r in records if r.i % 3 == 0]
    assert progressive["timesteps"].tolist() == [r.t for r in recorded]
    assert torch.equal(progressive["x_t"], torch.stack([r.x_t for r in recorded], 1))
    assert torch.equal(progressive["pred_xstart"], torch.stack([r.x0_hat for r in recorded], 1))

    # denoising from a kept timestep in the middle, with the generator where the chain had it
    # there, is the rest of the chain
    generator = seeded()
    chain = sampler.chain(ToyModel(), x_T, generator=generator)
    middle = len(sampler.timesteps) // 2
    for record in chain:
        if record.i == middle + 1:
            break
    state, x_middle = generator.get_state(), record.x_prev
    rest = list(chain)
    assert rest[0].t == sampler.timesteps[middle]
    torch.testing.assert_close(rest[-1].x_prev.clamp(-1.0, 1.0), sample, rtol=0, atol=0)
    generator.set_state(state)
    denoised = sampler.denoise(ToyModel(), x_middle, sampler.timesteps[middle], generator)
    torch.testing.assert_close(denoised, sample, rtol=0, atol=0)


class HistoryStep(DDIMStep):
    """A stand-in for a multistep solver: keeps its chain's x0_hat, as DPM-Solver++ keeps its
    earlier predictions, and notes (chain number, i) at every step."""

    NAME = "history"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chains, self.seen, self.history = 0, [], []

    def reset(self):
        self.chains += 1
        self.history = []

    def forward(self, output, x_t, i, generator=None):
        x_prev, x0_hat = super().forward(output, x_t, i, generator)
        self.history.append(x0_hat)
        self.seen.append((self.chains, i, len(self.history)))
        return x_prev, x0_hat


def test_a_registered_stateful_step_is_reset_once_per_chain(monkeypatch):
    """A new sampler is a step class and a registry line: every walk resets it once, at the
    start, and then gives it the chain's steps in order."""
    monkeypatch.setitem(sampling.SAMPLERS, "history", HistoryStep)
    sampler = GaussianDiffusionSampler(BETAS, sampler="history", sample_steps=10, eta=1.0, skip_type="uniform")
    step, kept = sampler.step, sampler.timesteps
    assert isinstance(step, HistoryStep) and len(kept) == 10
    x_T = torch.randn(SHAPE, generator=seeded(0), dtype=torch.float64)
    sample = sampler(ToyModel(), x_T, generator=seeded())
    # the history changes nothing: the samples are DDIM's
    ddim = GaussianDiffusionSampler(BETAS, sampler="ddim", sample_steps=10, eta=1.0, skip_type="uniform")
    assert torch.equal(sample, ddim(ToyModel(), x_T, generator=seeded()))
    next(sampler.chain(ToyModel(), x_T, generator=seeded()))      # a chain left after one step
    sampler.denoise(ToyModel(), x_T, kept[4], seeded())
    progressive_samples(sampler, ToyModel(), x_T, every=3, generator=seeded())
    interpolate(sampler, ToyModel(), x_T, -x_T, kept[6], [0.0, 0.5, 1.0], seeded())
    starts = [9, 9, 4, 9, 6, 6, 6]  # the kept index each chain starts from
    assert step.chains == len(starts)
    expected = [(chain, i, start - i + 1) for chain, start in enumerate(starts, 1)
                for i in (range(start, -1, -1) if chain != 2 else [start])]
    assert step.seen == expected


def test_the_sampler_holds_no_network_and_moves_every_buffer():
    for kwargs in LOOP_CONFIGS:
        sampler = GaussianDiffusionSampler(BETAS, **kwargs)
        assert list(sampler.parameters()) == []
        buffers = dict(sampler.named_buffers())
        assert "step.diffusion.alphas_bar" in buffers
        assert all(value.dtype == torch.float64 for value in buffers.values())
        sampler.to("meta")
        assert all(value.device.type == "meta" for value in sampler.buffers())
    assert {"step.sigma", "step.eps_coef"} <= set(buffers)  # the last, DDIM's
    with pytest.raises(ValueError, match="not one of this sampler's timesteps \\(nearest: 5\\)"):
        GaussianDiffusionSampler(BETAS, sample_steps=8).denoise(ToyModel(), torch.zeros(SHAPE), 6)


# ---------------------------------------------------------------- a second library: diffusers

PAPER_T, PAPER_BETA_1, PAPER_BETA_T = 1000, 1e-4, 0.02
PAPER_BETAS = beta_schedule("linear", PAPER_BETA_1, PAPER_BETA_T, PAPER_T)


def float64_schedule(scheduler):
    """diffusers keeps its schedule in float32; give it the paper's in float64, as ours is."""
    betas = torch.linspace(PAPER_BETA_1, PAPER_BETA_T, PAPER_T, dtype=torch.float64)
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if scheduler.config.set_alpha_to_one
                                         else scheduler.alphas_cumprod[0])
    return scheduler


def noisy_input(seed=0):
    """x_t large enough that x0_hat leaves [-1, 1] at many pixels, so clipping matters."""
    return 2.0 * torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def model_output(x_t, t):
    return ToyModel()(x_t, torch.full((SHAPE[0],), t))


@pytest.mark.parametrize("var_type, variance_type", [("fixedlarge", "fixed_large"), ("fixedsmall", "fixed_small")])
def test_one_ancestral_step_equals_diffusers_ddpm_scheduler(var_type, variance_type):
    diffusers = pytest.importorskip("diffusers")
    ours = GaussianDiffusionSampler(PAPER_BETAS, var_type=var_type, clip_denoised=True)
    theirs = float64_schedule(diffusers.DDPMScheduler(
        num_train_timesteps=PAPER_T, beta_start=PAPER_BETA_1, beta_end=PAPER_BETA_T,
        variance_type=variance_type, clip_sample=True))
    x_t = noisy_input()
    clipped_somewhere = False
    for t in (0, 1, 2, 100, 500, 998, 999):
        expected = theirs.step(model_output(x_t, t), t, x_t, generator=torch.Generator().manual_seed(t))
        # on the full chain the i-th kept step is t
        x_prev, x0_hat = ours.step(model_output(x_t, t), x_t, t, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(x0_hat, expected.pred_original_sample, rtol=0, atol=1e-10)
        torch.testing.assert_close(x_prev, expected.prev_sample, rtol=0, atol=1e-10)
        clipped_somewhere |= bool((x0_hat.abs() == 1.0).any())
    assert clipped_somewhere
    # Where the definitions differ: the variance at t = 0. Ours is the official clipped one
    # (the posterior variance of t = 1); diffusers' is the true posterior variance there, 0,
    # clamped to 1e-20. Neither adds noise at t = 0, so no sample differs.
    if var_type == "fixedsmall":
        assert math.isclose(float(theirs._get_variance(0)), 1e-20)
        assert ours.posterior_var[0] == 0 and ours.posterior_log_var_clipped[0] == ours.posterior_log_var_clipped[1]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip,ddim_eps", [(True, "network"), (True, "from_x0"), (False, "network"),
                                           (False, "from_x0")])
def test_one_ddim_step_equals_diffusers_ddim_scheduler(eta, clip, ddim_eps):
    """ddim_eps "network" is diffusers' default; "from_x0" its use_clipped_model_output=True."""
    diffusers = pytest.importorskip("diffusers")
    steps = 50
    ours = GaussianDiffusionSampler(PAPER_BETAS, clip_denoised=clip, sampler="ddim", sample_steps=steps, skip_type="uniform", eta=eta,
                                    ddim_eps=ddim_eps)
    theirs = float64_schedule(diffusers.DDIMScheduler(
        num_train_timesteps=PAPER_T, beta_start=PAPER_BETA_1, beta_end=PAPER_BETA_T, clip_sample=clip,
        set_alpha_to_one=True))
    theirs.set_timesteps(steps)
    assert sorted(theirs.timesteps.tolist()) == ours.timesteps  # "leading" spacing = our uniform
    x_t = noisy_input(1)
    for i in (0, 1, 25, steps - 1):
        t = ours.timesteps[i]
        noise = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        expected = theirs.step(model_output(x_t, t), t, x_t, eta=eta,
                               use_clipped_model_output=ddim_eps == "from_x0",
                               variance_noise=noise if eta > 0 else None)
        x_prev, x0_hat = ours.step(model_output(x_t, t), x_t, i, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(x0_hat, expected.pred_original_sample, rtol=0, atol=1e-10)
        torch.testing.assert_close(x_prev, expected.prev_sample, rtol=0, atol=1e-10)


def test_where_ddim_definitions_differ_from_diffusers_defaults():
    """Pinned with their formulas: (1) with clipping, the network's eps_hat beside the clipped
    x0_hat (the default, diffusers' too) and eps_hat re-derived from it (from_x0) are different
    updates; (2) with set_alpha_to_one=False diffusers' step to x_0 goes to abar_0 instead of 1."""
    diffusers = pytest.importorskip("diffusers")
    ours = GaussianDiffusionSampler(PAPER_BETAS, clip_denoised=True, sampler="ddim", sample_steps=50, skip_type="uniform")
    rederiving = GaussianDiffusionSampler(PAPER_BETAS, clip_denoised=True, sampler="ddim", sample_steps=50, skip_type="uniform",
                                          ddim_eps="from_x0")
    abar = torch.cumprod(1.0 - torch.linspace(PAPER_BETA_1, PAPER_BETA_T, PAPER_T, dtype=torch.float64), 0)
    x_t = noisy_input(2)
    i, t = 30, ours.timesteps[30]
    s = ours.timesteps[29]
    default = float64_schedule(diffusers.DDIMScheduler(num_train_timesteps=PAPER_T, beta_start=PAPER_BETA_1,
                                                       beta_end=PAPER_BETA_T, clip_sample=True))
    default.set_timesteps(50)
    eps = model_output(x_t, t)
    theirs = default.step(eps, t, x_t, eta=0.0).prev_sample
    mine, x0_hat = ours.step(eps, x_t, i)
    assert (x0_hat.abs() == 1.0).any()
    torch.testing.assert_close(mine, abar[s].sqrt() * x0_hat + (1 - abar[s]).sqrt() * eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-10)
    consistent, _ = rederiving.step(eps, x_t, i)
    eps_from_x0 = (x_t - abar[t].sqrt() * x0_hat) / (1 - abar[t]).sqrt()
    torch.testing.assert_close(consistent, abar[s].sqrt() * x0_hat + (1 - abar[s]).sqrt() * eps_from_x0,
                               rtol=0, atol=1e-10)
    assert (mine - consistent).abs().max() > 1e-3

    final = float64_schedule(diffusers.DDIMScheduler(num_train_timesteps=PAPER_T, beta_start=PAPER_BETA_1,
                                                     beta_end=PAPER_BETA_T, clip_sample=True,
                                                     set_alpha_to_one=False))
    final.set_timesteps(50)
    eps = model_output(x_t, 0)
    last = final.step(eps, 0, x_t, eta=0.0, use_clipped_model_output=True)
    mine, x0_hat = rederiving.step(eps, x_t, 0)
    torch.testing.assert_close(mine, x0_hat, rtol=0, atol=1e-12)  # ours ends at abar = 1: x_0 = x0_hat
    eps_from_x0 = (x_t - abar[0].sqrt() * x0_hat) / (1 - abar[0]).sqrt()
    torch.testing.assert_close(last.prev_sample, abar[0].sqrt() * x0_hat + (1 - abar[0]).sqrt() * eps_from_x0,
                               rtol=0, atol=1e-10)
