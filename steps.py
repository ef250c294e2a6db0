"""The reverse process one update at a time: what a sampler is (`SamplerStep`), ancestral
sampling (ddpm) and DDIM. The fast solvers are in solvers.py, the spacing of the timesteps and
the one loop that calls the network in sampling.py.

A sampler is one class. It declares, beside its update, everything the rest of the program
knows of it: its --sampler name and help, the orders --solver_order may ask of it, its own
flags with the values they accept (`Option`), and what it adds to the protocol record of a
score. The flags' help, their validation, the builder and the record all read these
declarations; `sampling.register` makes a new class a --sampler choice.
"""
from typing import NamedTuple, Optional

import torch
from torch import nn

from diffusion import (LEARNED_VARIANCES, GaussianDiffusion, check_choice, extract, split_learned_variance,
                       usable_steps)

# DDIM's eps beside a clipped x0_hat: the network's own, or re-derived from the clipped x0_hat
DDIM_EPS = ("network", "from_x0")


class Option(NamedTuple):
    """A flag of the sampling configuration that a sampler takes (passed to its `make` by
    name), and the values it accepts there: the closed range [low, high], or `choices`."""
    name: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[tuple] = None

    def accepts(self):
        """The accepted values, as a flag's help and error lines say them."""
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        return f"in [{self.low:g}, {self.high:g}]"

    def problem(self, value, sampler):
        """Why value cannot be this option of sampler, or None (NaN is in no range)."""
        ok = value in self.choices if self.choices is not None else self.low <= value <= self.high
        return None if ok else f"--{self.name} of sampler '{sampler}' must be {self.accepts()}, got {value!r}"


class SamplerStep(nn.Module):
    """One update of a sampler: from the i-th kept timestep t_i to the one before it (to x_0
    at i = 0), given the network's output at (x_t, t_i).

    `forward(output, x_t, i, generator)` returns (x at the previous kept timestep, x0_hat); the
    sampling loop calls it through `advance` for i descending and calls `reset` at the start
    of every chain, so a step may keep state between the steps of one chain (a multistep solver's earlier
    x0_hat). Noise is drawn from `generator`, in the working dtype of x_t.

    What a subclass declares (the defaults: a first-order sampler with no options):
        NAME           its --sampler value
        HELP           its words in --sampler's help
        ORDERS         the orders --solver_order may ask for, DEFAULT_ORDER what 0 gives;
                       () for a sampler of one order, which ignores --solver_order
        OPTIONS        its own flags (`Option`), given to `make` by name
        record()       what the protocol record of a score adds for it, and `describe` its
                       words after "<NAME> sampler" in the record's line
    """

    NAME = None
    HELP = ""
    ORDERS = ()
    DEFAULT_ORDER = None
    OPTIONS = ()

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised):
        super().__init__()
        self.diffusion = GaussianDiffusion(betas)
        self.timesteps = timesteps
        self.mean_type = mean_type
        self.var_type = var_type
        self.clip_denoised = clip_denoised

    @classmethod
    def make(cls, betas, timesteps, mean_type, var_type, clip_denoised, **options):
        """The step for these kept timesteps; options: its OPTIONS by name, and `order` when it
        has ORDERS. Raises ValueError for a combination it cannot sample."""
        return cls(betas, timesteps, mean_type, var_type, clip_denoised, **options)

    def record(self):
        """{field: value} the protocol record of a score adds for this sampler."""
        return {}

    @classmethod
    def describe(cls, record):
        """Its words after "<NAME> sampler" in the line of a protocol record."""
        return ""

    @classmethod
    def steps_for(cls, evaluations):
        """How many kept timesteps --sample_steps' evaluations of the network make: one each."""
        return evaluations

    def evaluations(self):
        """How many network evaluations one chain of these kept timesteps makes: one each."""
        return len(self.timesteps)

    def advance(self, network, x_t, i, generator=None):
        """(x at the previous kept timestep, x0_hat): the step from kept timestep i, asking
        network(x, t) (t a training timestep) what it needs. Here: once at (x_t, t_i), then
        `forward`; a step that evaluates elsewhere or more than once overrides this."""
        return self(network(x_t, self.timesteps[i]), x_t, i, generator)

    def reset(self):
        """The start of a new chain: forget what earlier steps left. These steps keep nothing."""

    def original_t(self, i, x_t):
        """t_i for every example of x_t: the timestep the network was called with."""
        return torch.full((x_t.shape[0],), self.timesteps[i], dtype=torch.long, device=x_t.device)

    def add_noise(self, mean, std, i, generator):
        """mean + std z, z ~ N(0, I); the last step (i = 0) and std None (deterministic) add none."""
        if i == 0 or std is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise


class AncestralStep(SamplerStep):
    """x_{t-1} ~ p_theta(x_{t-1} | x_t) on the full chain (Ho et al. Algorithm 2, i = t);
    `make` gives the respaced chain's step when fewer timesteps are kept."""

    NAME = "ddpm"
    HELP = "ancestral (strided when --sample_steps < T)"

    @classmethod
    def make(cls, betas, timesteps, mean_type, var_type, clip_denoised):
        """Algorithm 2 when the kept timesteps are the whole chain (every t with abar_t > 0,
        `sampling.sample_timesteps`), the respaced chain otherwise."""
        usable = usable_steps(torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0))
        strided = timesteps != list(range(usable))
        if strided and var_type == "learned":
            raise ValueError("var_type 'learned' is the variance of one original step: sample it with "
                             "sample_steps = T or sampler 'ddim' ('learned_range' samples a strided chain)")
        if len(timesteps) < 2:
            # its variances at the last step clip betatilde_0 = 0 to betatilde_1 of a second step
            raise ValueError(f"sampler 'ddpm' needs at least 2 timesteps, got {len(timesteps)}: use "
                             "sample_steps >= 2 and T >= 2 (T >= 3 for jsd, whose last t has abar_t = 0), "
                             "or sampler 'ddim'")
        step = StridedAncestralStep if strided else AncestralStep
        return step(betas, timesteps, mean_type, var_type, clip_denoised)

    def forward(self, output, x_t, i, generator=None):
        mean, log_var, x_0 = self.diffusion.p_mean_variance(
            output, x_t, self.original_t(i, x_t), self.mean_type, self.var_type, self.clip_denoised)
        return self.add_noise(mean, torch.exp(0.5 * log_var), i, generator), x_0


class StridedAncestralStep(AncestralStep):
    """Ancestral sampling on the chain respaced to the kept timesteps (Nichol & Dhariwal 2021,
    sec. 4): x0_hat from the network's output at the original step t_i, then the posterior
    q(x_{t_{i-1}} | x_t, x0_hat) and the variance of the respaced step i: the fixed one, or
    learned_range's interpolation between the respaced step's beta and betatilde."""

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised):
        SamplerStep.__init__(self, betas, timesteps, mean_type, var_type, clip_denoised)
        self.respaced = GaussianDiffusion(betas, timesteps)

    def forward(self, output, x_t, i, generator=None):
        t = self.original_t(i, x_t)
        if self.var_type == "learned_range":
            output, var_output = split_learned_variance(output, x_t)
        x_0 = self.diffusion.predict_xstart(output, x_t, t, self.mean_type, self.clip_denoised)
        respaced_output = torch.cat([x_0, var_output], dim=1) if self.var_type == "learned_range" else x_0
        mean, log_var, _ = self.respaced.p_mean_variance(
            respaced_output, x_t, torch.full_like(t, i), "xstart", self.var_type, clip_denoised=False)
        return self.add_noise(mean, torch.exp(0.5 * log_var), i, generator), x_0


class DDIMStep(SamplerStep):
    """The DDIM update (Song et al. 2021, eq. 12) from t = t_i to s = t_{i-1} (abar_s = 1 after
    the last step), with noise scale eta in [0, 1] (0: deterministic):
        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_i^2) eps_hat + sigma_i z,
        sigma_i = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
    Unclipped, eps_hat is the network's eps and this is the official update (the official DDIM
    code never clips). With clip_denoised, x0_hat is clipped and ddim_eps says which eps_hat
    goes beside it: "network", the network's own (diffusers' DDIMScheduler by default), or
    "from_x0", re-derived from the clipped x0_hat so that the pair is consistent (GLIDE's
    choice; diffusers' use_clipped_model_output=True). Only the mean half of a
    learned-variance model's output is used (either kind).
    """

    NAME = "ddim"
    HELP = "DDIM, deterministic at --eta 0"
    OPTIONS = (Option("eta", low=0.0, high=1.0), Option("ddim_eps", choices=DDIM_EPS))

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, eta=0.0, ddim_eps="network"):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised)
        check_choice("ddim_eps", ddim_eps, DDIM_EPS)
        self.eta = eta
        self.ddim_eps = ddim_eps
        alphas_bar = self.diffusion.alphas_bar[timesteps]
        alphas_bar_prev = torch.cat([alphas_bar.new_ones(1), alphas_bar[:-1]])
        sigma = self.eta * torch.sqrt(
            (1.0 - alphas_bar_prev) / (1.0 - alphas_bar) * (1.0 - alphas_bar / alphas_bar_prev))
        buffers = {
            "sigma": sigma,
            "sqrt_alphas_bar_prev": alphas_bar_prev.sqrt(),
            "eps_coef": torch.sqrt(1.0 - alphas_bar_prev - sigma ** 2),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def forward(self, output, x_t, i, generator=None):
        t = self.original_t(i, x_t)
        if self.var_type in LEARNED_VARIANCES:
            output, _ = split_learned_variance(output, x_t)
        raw = self.diffusion.predict_xstart(output, x_t, t, self.mean_type, clip_denoised=False)
        x_0 = raw.clamp(-1.0, 1.0) if self.clip_denoised else raw
        if self.ddim_eps == "from_x0":
            eps = self.diffusion.predict_eps_from_xstart(x_t, t, x_0)
        elif self.mean_type == "epsilon":
            eps = output
        else:  # the eps that the network's own, unclipped x0_hat implies
            eps = self.diffusion.predict_eps_from_xstart(x_t, t, raw)
        index = torch.full_like(t, i)
        mean = (extract(self.sqrt_alphas_bar_prev, index, x_t) * x_0
                + extract(self.eps_coef, index, x_t) * eps)
        std = extract(self.sigma, index, x_t) if self.eta > 0 else None
        return self.add_noise(mean, std, i, generator), x_0

    def record(self):
        return {"ddim_eps": self.ddim_eps} if self.clip_denoised else {}

    @classmethod
    def describe(cls, record):
        return f" ({record['ddim_eps']} eps beside the clipped x0)" if "ddim_eps" in record else ""
