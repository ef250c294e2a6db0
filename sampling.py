"""Sampling: which timesteps a sampler visits (`sample_timesteps`), the --sampler names
(`SAMPLERS`, each a `steps.SamplerStep` class that declares its options), the one loop that
walks the reverse chain calling the network (`GaussianDiffusionSampler.chain`), and what a
class-conditional model is asked there: the classes drawn (`draw_labels`) and classifier-free
guidance (`GaussianDiffusionSampler.network_output`).
"""
from typing import NamedTuple

import numpy as np
import torch

from diffusion import (LEARNED_VARIANCES, MEAN_TYPES, VAR_TYPES, GaussianDiffusion, check_choice, nearest_in_log,
                       noise_levels, usable_steps)
from edm import EulerAncestralStep, HeunStep
from solvers import DPMSolverPPStep, DPMSolverSinglestepStep, SDEDPMSolverPPStep, UniPCStep
from steps import AncestralStep, DDIMStep

SKIP_TYPES = ("uniform", "quadratic", "logsnr", "karras")
# the spacing a sampler gets when none is asked for (skip_type None): quadratic, the best or
# within 1 FID of the best for every sampler here at 10 and 20 evaluations on the digits
# demo's model (BENCHMARKS.md, 2026-11-30), where uniform spacing's last step, from t = T/N
# to 0, is too long for every sampler but DDIM
DEFAULT_SKIP_TYPE = "quadratic"

# --sampler name -> its SamplerStep class
SAMPLERS = {}
# the sampling flags a sampler may take as its options, with their defaults (config.py's). A
# sampler that does not take one ignores it, but for eta and churn: noise that would not be
# added is refused rather than ignored.
OPTION_DEFAULTS = {"eta": 0.0, "solver_order": 0, "ddim_eps": "network", "churn": 0.0, "churn_tmin": 0.0,
                   "churn_tmax": 0.0, "churn_noise": 1.0}
REFUSED_UNLESS_TAKEN = ("eta", "churn")


def register(step_class):
    """Makes a SamplerStep class the --sampler choice step_class.NAME: the flags' help, their
    checks, the builder and the protocol record read its declarations from here on."""
    SAMPLERS[step_class.NAME] = step_class
    return step_class


for _builtin in (AncestralStep, DDIMStep, DPMSolverPPStep, SDEDPMSolverPPStep, DPMSolverSinglestepStep,
                 UniPCStep, HeunStep, EulerAncestralStep):
    register(_builtin)


def sampler_class(name):
    check_choice("sampler", name, tuple(SAMPLERS))
    return SAMPLERS[name]


def takers(flag):
    """The samplers that declare `flag` among their OPTIONS."""
    return [name for name, step in SAMPLERS.items() if flag in [option.name for option in step.OPTIONS]]


def sampler_options(name, values):
    """What SAMPLERS[name].make takes of the sampling flags' values ({flag: value}): each of
    its OPTIONS checked against what it accepts, and `order` (solver_order, 0: its default)
    when it has ORDERS. Raises ValueError, naming the flag, for a value it cannot take."""
    step_class, options = sampler_class(name), {}
    for option in step_class.OPTIONS:
        problem = option.problem(values[option.name], name)
        if problem:
            raise ValueError(problem)
        options[option.name] = values[option.name]
    taken = [option.name for option in step_class.OPTIONS]
    for flag in REFUSED_UNLESS_TAKEN:
        if flag not in taken and values[flag] != OPTION_DEFAULTS[flag]:
            raise ValueError(f"--{flag} is an option of sampler(s) {', '.join(takers(flag))}; "
                             f"sampler '{name}' takes none, got {values[flag]!r}")
    if step_class.ORDERS:
        order = values["solver_order"] or step_class.DEFAULT_ORDER
        if order not in step_class.ORDERS:
            raise ValueError(f"--solver_order must be one of {', '.join(map(str, step_class.ORDERS))} "
                             f"for sampler '{name}' (0: its own, {step_class.DEFAULT_ORDER}), got {order}")
        options["order"] = order
    return options


def option_help(flag):
    """What the help of a sampling flag says of the samplers that take it, from their declarations."""
    if flag == "sampler":
        return "; ".join(f"{name}: {step.HELP}" for name, step in SAMPLERS.items())
    if flag == "solver_order":
        orders = ", ".join(f"{name} {min(step.ORDERS)}-{max(step.ORDERS)} ({step.DEFAULT_ORDER})"
                           for name, step in SAMPLERS.items() if step.ORDERS)
        return f"0: the sampler's own, in brackets: {orders}; the others ignore it"
    found = [(name, option) for name, step in SAMPLERS.items() for option in step.OPTIONS if option.name == flag]
    return "; ".join(f"{name}: {option.accepts()}" for name, option in found)


def sample_timesteps(alphas_bar, steps, skip_type, karras=(7.0, 0.0, 0.0)):
    """The timesteps a fast sampler visits, one network evaluation each, ascending.

    uniform:   floor(k T / steps) for k = 0..steps-1, which is the official DDIM code's
               range(0, T, T // steps) when steps divides T (10, 20, 50, 100 of T = 1000), and
               still `steps` timesteps when it does not.
    quadratic: int(s^2) for s in linspace(0, sqrt(0.8 T), steps) (the DDIM code's "quad"): dense
               near t = 0, ending at 0.8 T; x_T ~ N(0, I) stands in for x at that step. Where
               int() repeats a timestep (from about 45 steps at T = 1000) the repeat is
               dropped: the official code spends an evaluation on it for an update from t to t
               that leaves x as it is, so fewer than `steps` evaluations remain here, with the
               same samples.
    logsnr:    uniform in the log-SNR lambda_t = log(sqrt(abar_t / (1 - abar_t))) from
               lambda_{T-1} to lambda_0 (DPM-Solver's "logSNR" spacing; diffusers'
               use_lu_lambdas), each point taken to a training step by interpolating t
               linearly in lambda and rounding. Rounding can repeat a timestep near t = 0,
               where lambda moves fastest; a repeat moves up to the next free timestep, so
               there are always `steps` of them.
    karras:    Karras et al.'s spacing (`karras_sigmas`) of the noise level sigma_t =
               sqrt((1 - abar_t) / abar_t) from sigma_max down to sigma_min (karras: (rho,
               sigma_min, sigma_max), a 0 for the chain's own end: sigma_{T'-1}, sigma_0), each
               taken to the training step nearest in log sigma, repeats moved up as logsnr's.
    steps = T is the full chain whatever the skip type.

    No sampler can start where abar_t = 0 (the jsd schedule's t = T-1): x_t holds nothing of
    x_0 there, an epsilon model's x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) is
    0/0, and lambda_t = -inf. So the timesteps lie in 0..T'-1, T' the number of leading
    timesteps with abar_t > 0 (T' = T - 1 for jsd, T for every other schedule): the full chain
    is 0..T'-1; uniform and quadratic keep their spacing in T, which for steps < T stays below
    T - 1 (quadratic's reaches it at T <= 5: a timestep past T'-1 moves down to it, a repeat
    is dropped); logsnr spans lambda_{T'-1}..lambda_0. x_T ~ N(0, I) stands in for x_{T'-1}, whose
    q(x_{T'-1} | x_0) = N(sqrt(abar) x_0, (1 - abar) I) has abar = 1/T for jsd.
    steps = 1 is the one step from noise at t = T'-1, whatever the skip type: spaced from
    t = 0 it would take x_T for nearly clean data. Raises ValueError when T' = 0.
    """
    T = len(alphas_bar)
    abar = np.asarray(alphas_bar, dtype=np.float64)
    usable = usable_steps(abar)
    if usable == 0:
        raise ValueError("abar_t = 0 at every timestep (jsd with T = 1): x_t keeps nothing of x_0 "
                         "at any t, so there is no timestep to sample from; use T >= 2")
    if steps >= T:
        return list(range(usable))
    if steps == 1:
        return [usable - 1]
    if skip_type == "karras":
        rho, sigma_min, sigma_max = karras
        sigma = noise_levels(abar)  # increasing in t
        targets = karras_sigmas(min(steps, usable), sigma_min or sigma[0], sigma_max or sigma[-1], rho)
        return distinct_ascending(nearest_in_log(sigma, targets), usable)
    if skip_type != "logsnr":
        return sorted({min(t, usable - 1) for t in spaced_in_time(T, steps, skip_type)})
    lam = 0.5 * (np.log(abar[:usable]) - np.log1p(-abar[:usable]))  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], min(steps, usable))
    kept = np.rint(np.interp(targets, lam[::-1], np.arange(usable)[::-1])).astype(int)
    return distinct_ascending(kept, usable)


def karras_sigmas(count, sigma_min, sigma_max, rho=7.0):
    """Karras et al. (2022) eq. 5: sigma_i = (sigma_max^(1/rho) + i / (count - 1) (sigma_min^(1/rho)
    - sigma_max^(1/rho)))^rho for i = 0..count-1, from sigma_max down to sigma_min, in float64
    (k-diffusion's get_sigmas_karras without the 0 it appends)."""
    ramp = np.linspace(0.0, 1.0, count)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def spaced_in_time(T, steps, skip_type):
    """`sample_timesteps`' uniform or quadratic timesteps of a T-step chain, 1 < steps < T."""
    if skip_type == "uniform":
        return [k * T // steps for k in range(steps)]
    return np.unique((np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(int)).tolist()


def distinct_ascending(kept, T):
    """kept (ascending integers in 0..T-1) made strictly ascending by moving each repeat up
    to the next free timestep, then any that overran T-1 back down (len(kept) <= T)."""
    kept = sorted(int(t) for t in kept)
    for k in range(1, len(kept)):
        kept[k] = max(kept[k], kept[k - 1] + 1)
    for k in range(len(kept)):
        kept[k] = min(kept[k], T - len(kept) + k)
    return kept


def draw_labels(first, count, num_classes, chosen=()):
    """The classes of samples first..first + count - 1 of a class-conditional draw, LongTensor:
    sample j asks for chosen[j % len(chosen)] (--class_labels), or by default class
    j % num_classes, so that N samples hold N // num_classes of each class, the remainder one
    more of the first classes, and any run of num_classes consecutive samples holds them all.
    A sample's class depends on its index only, as its noise does (not on processes or batches)."""
    j = torch.arange(first, first + count)
    if chosen:
        return torch.tensor(chosen, dtype=torch.long)[j % len(chosen)]
    return j % num_classes


class StepRecord(NamedTuple):
    """One step of the reverse chain: the i-th kept timestep t, the step's input x_t, the x0_hat
    it predicted, and its output x_prev, x at the previous kept timestep (after the last step
    x_0, not yet clamped)."""
    i: int
    t: int
    x_t: torch.Tensor
    x0_hat: torch.Tensor
    x_prev: torch.Tensor


class GaussianDiffusionSampler(GaussianDiffusion):
    """p_theta: the reverse chain x_T -> x_0 of a network passed in at each call.

    sampler "ddpm" with sample_steps = T (the default) is Algorithm 2. With fewer steps it is
    ancestral sampling on the chain respaced to the kept timesteps (`sample_timesteps` with
    skip_type), the model still called with the original timestep. sampler "ddim" is the DDIM
    update on the kept timesteps with noise scale eta in [0, 1] (0: deterministic). A "learned"
    variance is the variance of one original step, so it cannot serve a strided ancestral
    chain; a "learned_range" one is a fraction between beta and betatilde, which the respaced
    chain takes of its own steps. The solvers (solvers.py) solve the diffusion ODE (SDE) from
    the data prediction x0_hat, one network evaluation per kept timestep, of order
    solver_order (0: the sampler's DEFAULT_ORDER; ddpm and ddim ignore it). "heun" and
    "euler_ancestral" are Karras et al.'s samplers (edm.py); heun spends two evaluations per
    kept timestep but the last. Every sampler is a `SAMPLERS` class; eta, solver_order,
    ddim_eps and the other OPTION_DEFAULTS (the churn options, as keywords) go to those
    that take them (`sampler_options`), and
    sample_steps counts network evaluations, which the sampler turns into kept timesteps
    (`SamplerStep.steps_for`). karras_rho, sigma_min and sigma_max shape the karras spacing.
    sample_steps=None means T. Constructing one validates a sampling configuration without a
    network.

    No sampler visits a timestep whose abar_t is 0 (jsd's t = T-1, where x0_hat of an epsilon
    model is 0/0 and the solvers' lambda is -inf): x_T ~ N(0, I) enters at the last t with
    abar_t > 0, as it enters a strided chain at its last kept step (`sample_timesteps`). So
    a jsd chain has at most T - 1 steps, and `len(timesteps)` is what ran, whatever
    sample_steps (1..T) asked for; sample_steps = 1 is the one step from that t.

    A class-conditional network of num_classes classes is asked for the `labels` given with
    each call, with classifier-free guidance of scale guidance_scale (`network_output`); every
    sampler takes the guided output as it takes a network's.

    timesteps: the kept timesteps, ascending; T: the length of the full chain; step: the
    sampler's `SamplerStep`. The network is called as net(x_t, t), or net(x_t, t, y) for a
    conditional one, t a LongTensor of original timesteps, and its output cast to x_t's dtype.
    """

    def __init__(self, betas, mean_type="epsilon", var_type="fixedlarge", clip_denoised=True,
                 sampler="ddpm", sample_steps=None, eta=0.0, skip_type=None, solver_order=0,
                 ddim_eps="network", num_classes=0, guidance_scale=1.0, karras_rho=7.0, sigma_min=0.0, sigma_max=0.0,
                 **other_options):
        super().__init__(betas)
        self.num_classes, self.guidance_scale = num_classes, guidance_scale
        check_choice("mean_type", mean_type, MEAN_TYPES)
        check_choice("var_type", var_type, VAR_TYPES)
        step_class = sampler_class(sampler)
        self.skip_type = skip_type or DEFAULT_SKIP_TYPE
        check_choice("skip_type", self.skip_type, SKIP_TYPES)
        sample_steps = self.T if sample_steps is None else sample_steps
        if not 1 <= sample_steps <= self.T:
            raise ValueError(f"sample_steps must be in 1..T = 1..{self.T}, got {sample_steps}")
        unknown = set(other_options) - set(OPTION_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampler option(s) {', '.join(sorted(unknown))}")
        values = {**OPTION_DEFAULTS, "eta": eta, "solver_order": solver_order, "ddim_eps": ddim_eps, **other_options}
        options = sampler_options(sampler, values)
        self.timesteps = sample_timesteps(self.alphas_bar, step_class.steps_for(sample_steps), self.skip_type,
                                          (karras_rho, sigma_min, sigma_max))
        self.step = step_class.make(self.betas, self.timesteps, mean_type, var_type, clip_denoised, **options)

    def network_output(self, net, x_t, t, labels=None):
        """What the sampler's step takes at (x_t, t): the network's output, in x_t's dtype.

        labels (a conditional network's classes, or (B, num_classes + 1) weights of them): with
        classifier-free guidance of scale w (Ho & Salimans 2022, in diffusers' convention)
            out = out_u + w (out_c - out_u),
        out_c the output for the labels and out_u for "no label" (class num_classes), both
        from one network call on the doubled batch; w = 1 is the conditional model alone (one
        call), w = 0 the unconditional one. The combination is of the network's output, the
        mean type's own quantity: eps, x0 and the posterior mean are each an affine function of
        another at a given (x_t, t) (eq. 4 and 7), and weights 1 - w and w that sum to one
        commute with affine maps, so combining x0_hat or the mean is combining eps. The
        sampler clips x0_hat after the combination. A learned variance (the output's second
        half) is the conditional branch's, as GLIDE does: guidance moves the mean only.
        """
        if labels is None:
            return net(x_t, t).to(x_t.dtype)
        if not self.num_classes:
            raise ValueError("labels were given to a sampler of an unconditional model (num_classes 0)")
        w, learned = self.guidance_scale, self.step.var_type in LEARNED_VARIANCES
        if labels.is_floating_point():
            null = torch.nn.functional.one_hot(torch.tensor(self.num_classes), self.num_classes + 1)
            null = null.to(labels).expand_as(labels)
        else:
            null = torch.full_like(labels, self.num_classes)
        if w == 1.0 or (w == 0.0 and not learned):  # one branch alone
            return net(x_t, t, labels if w else null).to(x_t.dtype)
        both = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).to(x_t.dtype)
        conditional, unconditional = both.chunk(2)
        channels = x_t.shape[1]
        mean_c, mean_u = conditional[:, :channels], unconditional[:, :channels]
        return torch.cat([mean_u + w * (mean_c - mean_u), conditional[:, channels:]], dim=1)

    @torch.no_grad()
    def chain(self, net, x_t, t=None, generator=None, labels=None):
        """The reverse chain from x_t at kept timestep t (default: the last) down to x_0, one
        `StepRecord` per kept timestep, t descending; the step object is reset first; labels:
        those of a conditional network (`network_output`).

        The only loop that walks the timesteps calling the network: sampling, denoising,
        progressive sampling and interpolation all consume it. A Python generator: it runs as
        far as it is read, one chain at a time (a new chain resets the step's state). Raises
        ValueError, naming the nearest kept timestep, when first read if t is not kept.
        """
        t = self.timesteps[-1] if t is None else t
        if t not in self.timesteps:
            nearest = min(self.timesteps, key=lambda kept: abs(kept - t))
            raise ValueError(f"t={t} is not one of this sampler's timesteps (nearest: {nearest})")
        def network(x, t):
            return self.network_output(net, x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device),
                                       labels)
        self.step.reset()
        for i in reversed(range(self.timesteps.index(t) + 1)):
            x_prev, x0_hat = self.step.advance(network, x_t, i, generator)
            yield StepRecord(i, self.timesteps[i], x_t, x0_hat, x_prev)
            x_t = x_prev

    @torch.no_grad()
    def denoise(self, net, x_t, t, generator=None, labels=None):
        """x_0 in [-1, 1]: the reverse chain from x_t at kept timestep t."""
        for record in self.chain(net, x_t, t, generator, labels):
            x_t = record.x_prev
        return x_t.clamp(-1.0, 1.0)

    @torch.no_grad()
    def forward(self, net, x_T, generator=None, labels=None):
        """x_0 in [-1, 1] from x_T ~ N(0, I), which enters at the last kept timestep."""
        return self.denoise(net, x_T, self.timesteps[-1], generator, labels)