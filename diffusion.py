"""Gaussian diffusion of Ho et al. 2020 ("DDPM"), following the official diffusion_utils_2.py.

Notation (t is 0-based, t = 0..T-1):
    beta_t                      the noise schedule (`beta_schedule`)
    alpha_t = 1 - beta_t,       abar_t = prod_{s<=t} alpha_s,      abar_{-1} = 1
    q(x_t | x_0)       = N(sqrt(abar_t) x_0, (1 - abar_t) I)                         (eq. 4)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, betatilde_t I)                    (eq. 6, 7)
        c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)
        c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
        betatilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  L_0 = -log p(x_0 | x_1)     (eq. 5)

Every coefficient is computed once, in float64, by `GaussianDiffusion`; per-step values are
cast to the working dtype only where they are applied (`extract`). The variational-bound
terms are evaluated in float64 throughout.

Sampling is one loop, `GaussianDiffusionSampler.chain`, which calls the network it is given
and hands each output to a step object (`SamplerStep`) that makes x at the previous kept
timestep; `STEPS` maps the --sampler names to what builds those objects. The fast solvers
(DPM-Solver++, its SDE variant, singlestep DPM-Solver, UniPC) are such steps too, on the
continuous-time view of the chain that `SolverStep` defines.
"""
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN_TYPES = ("xprev", "xstart", "epsilon")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
# the variances the network outputs (2C channels: the mean output, then the variance's)
LEARNED_VARIANCES = ("learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
SKIP_TYPES = ("uniform", "quadratic", "logsnr")
# DDIM's eps beside a clipped x0_hat: the network's own, or re-derived from the clipped x0_hat
DDIM_EPS = ("network", "from_x0")
BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")
WARMUP_FRACTIONS = {"warmup10": 0.1, "warmup50": 0.5}
# s of Nichol & Dhariwal eq. 17: sqrt(beta_0) just under the pixel bin 1/127.5, so the first
# steps add noise enough for eps to be predicted (sec. 3.2)
COSINE_OFFSET = 0.008


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(choices)}")


def cosine_betas(T):
    """The cosine schedule (Nichol & Dhariwal 2021, eq. 17), float64, shape (T,):
        abar(t) = f(t) / f(0),  f(t) = cos(((t / T + s) / (1 + s)) pi / 2)^2,
        beta_t = min(1 - abar(t + 1) / abar(t), 0.999),  t = 0..T-1,
    the paper's 1-based step t + 1 being this file's t. abar(T) is ~0: uncapped, the last beta
    would be 1 and abar_{T-1} = 0, a singularity of 1 / sqrt(abar) (sec. 3.2).
    """
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + COSINE_OFFSET)
                  / (1.0 + COSINE_OFFSET) * (math.pi / 2)) ** 2
    alphas_bar = f / f[0]
    return (1.0 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)


def beta_schedule(name, beta_1, beta_T, T):
    """beta_t for t = 0..T-1, float64, shape (T,), by the names of the official get_beta_schedule.

    linear:              linspace(beta_1, beta_T, T) (Ho et al.)
    quad:                linspace(sqrt(beta_1), sqrt(beta_T), T)^2
    const:               beta_T at every step
    jsd:                 1 / linspace(T, 1, T) = 1/T, 1/(T-1), ..., 1: the last step keeps no
                         x_0 (abar_{T-1} = 0, where an epsilon model's x0_hat is undefined)
    warmup10, warmup50:  beta_T, but for the first int(0.1 T) (int(0.5 T)) steps, which rise
                         as linspace(beta_1, beta_T) over those steps
    cosine:              `cosine_betas`
    jsd and cosine take no beta_1, beta_T. Bad arguments raise a one-line ValueError in the
    command line's terms.
    """
    check_choice("--beta_schedule", name, BETA_SCHEDULES)
    if T < 1:
        raise ValueError(f"--T must be at least 1 diffusion step, got {T}")
    if name == "cosine":
        return cosine_betas(T)
    if name == "jsd":
        return 1.0 / torch.linspace(T, 1, T, dtype=torch.float64)
    if name == "const":
        if not 0 < beta_T < 1:
            raise ValueError(f"need 0 < --beta_T < 1, got {beta_T}")
        return torch.full((T,), beta_T, dtype=torch.float64)
    if not 0 < beta_1 <= beta_T < 1:
        raise ValueError(f"need 0 < --beta_1 <= --beta_T < 1, got {beta_1} and {beta_T}")
    if name == "linear":
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    if name == "quad":
        return torch.linspace(beta_1 ** 0.5, beta_T ** 0.5, T, dtype=torch.float64) ** 2
    betas = torch.full((T,), beta_T, dtype=torch.float64)
    warmup = int(T * WARMUP_FRACTIONS[name])
    betas[:warmup] = torch.linspace(beta_1, beta_T, warmup, dtype=torch.float64)
    return betas


def extract(coef, t, x):
    """coef[t] for a batch of timesteps t, cast to x's dtype and shaped to broadcast over x."""
    return coef.gather(0, t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def mean_flat(x):
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats:
    1/2 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1).
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) under N(means, exp(log_scales)^2) integrated over x's 8-bit bin, elementwise.

    x lies on the 256-level grid of [-1, 1]; its bin is [x - 1/255, x + 1/255], the outermost
    bins extended to -inf (x = -1) and +inf (x = 1) (Ho et al. eq. 13). The normal CDF is exact
    (torch.special.ndtr, in float64) where the official code uses a tanh approximation; the upper
    tail is Phi(-a) rather than 1 - Phi(a), and probabilities are floored at 1e-12 as official.
    """
    x, means, log_scales = x.double(), means.double(), log_scales.double()
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    cdf_upper = torch.special.ndtr(upper)
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_sf_lower = torch.log(torch.special.ndtr(-lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def split_learned_variance(model_output, x_t):
    """A learned-variance model emits 2C channels: the mean output, then the variance output
    (the log-variance for 'learned', v in [-1, 1] for 'learned_range')."""
    if model_output.shape[1] != 2 * x_t.shape[1]:
        raise ValueError(
            f"a learned variance needs a model with out_ch = 2 * in_ch = {2 * x_t.shape[1]} "
            f"channels, got {model_output.shape[1]}")
    return model_output.chunk(2, dim=1)


def usable_steps(alphas_bar):
    """T': how many leading timesteps have abar_t > 0 (abar is non-increasing), the only ones
    a sampler may visit: T for every schedule but jsd, whose last abar is 0."""
    return int((torch.as_tensor(alphas_bar) > 0).sum())


def sample_timesteps(alphas_bar, steps, skip_type):
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
    if skip_type != "logsnr":
        return sorted({min(t, usable - 1) for t in spaced_in_time(T, steps, skip_type)})
    lam = 0.5 * (np.log(abar[:usable]) - np.log1p(-abar[:usable]))  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], min(steps, usable))
    kept = np.rint(np.interp(targets, lam[::-1], np.arange(usable)[::-1])).astype(int)
    return distinct_ascending(kept, usable)


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


class GaussianDiffusion(nn.Module):
    """The noise schedule and every derived coefficient, as float64 buffers.

    betas: beta_t for t = 0..T-1 (`beta_schedule`), taken in float64. With `timesteps`
    (ascending t_0 < ... < t_{S-1}) the chain is respaced to those steps of that schedule
    (Nichol & Dhariwal 2021, sec. 4): abar_{t_i} is kept and
    beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}, abar_{t_{-1}} = 1; its steps are indexed by i.
    """

    def __init__(self, betas, timesteps=None):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        # the official assertion: every step adds noise, none more than all of it
        if betas.dim() != 1 or len(betas) == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D schedule with 0 < beta_t <= 1")
        if timesteps is not None:
            kept = torch.cumprod(1.0 - betas, dim=0)[timesteps]
            betas = 1.0 - kept / torch.cat([kept.new_ones(1), kept[:-1]])
        self.T = len(betas)
        alphas = 1.0 - betas
        alphas_bar = torch.cumprod(alphas, dim=0)
        alphas_bar_prev = torch.cat([alphas_bar.new_ones(1), alphas_bar[:-1]])
        posterior_var = betas * (1.0 - alphas_bar_prev) / (1.0 - alphas_bar)

        buffers = {
            "betas": betas,
            "alphas_bar": alphas_bar,
            "alphas_bar_prev": alphas_bar_prev,
            # q(x_t | x_0)
            "sqrt_alphas_bar": alphas_bar.sqrt(),
            "sqrt_one_minus_alphas_bar": (1.0 - alphas_bar).sqrt(),
            # x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
            "sqrt_recip_alphas_bar": (1.0 / alphas_bar).sqrt(),
            "sqrt_recipm1_alphas_bar": (1.0 / alphas_bar - 1.0).sqrt(),
            # q(x_{t-1} | x_t, x_0)
            "posterior_mean_coef1": betas * alphas_bar_prev.sqrt() / (1.0 - alphas_bar),
            "posterior_mean_coef2": (1.0 - alphas_bar_prev) * alphas.sqrt() / (1.0 - alphas_bar),
            "posterior_var": posterior_var,
            # betatilde_0 = 0: its log is "clipped" to that of betatilde_1
            "posterior_log_var_clipped": torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])),
            # the upper end of the learned_range interpolation
            "log_betas": torch.log(betas),
            # The "fixedlarge" choice sigma_t^2 = beta_t, with t = 0 set to betatilde_1 as the
            # official code does (a better decoder variance, Ho et al. sec. 3.2).
            "fixedlarge_log_var": torch.log(torch.cat([posterior_var[1:2], betas[1:]])),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def q_sample(self, x_0, t, noise):
        """x_t ~ q(x_t | x_0), given the noise (eq. 4)."""
        return (extract(self.sqrt_alphas_bar, t, x_0) * x_0
                + extract(self.sqrt_one_minus_alphas_bar, t, x_0) * noise)

    def q_posterior_mean(self, x_0, x_t, t):
        """Mean of q(x_{t-1} | x_t, x_0) (eq. 7)."""
        return (extract(self.posterior_mean_coef1, t, x_t) * x_0
                + extract(self.posterior_mean_coef2, t, x_t) * x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (extract(self.sqrt_recip_alphas_bar, t, x_t) * x_t
                - extract(self.sqrt_recipm1_alphas_bar, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, x_0):
        """Invert eq. 4: eps = (sqrt(1/abar) x_t - x_0) / sqrt(1/abar - 1)."""
        return ((extract(self.sqrt_recip_alphas_bar, t, x_t) * x_t - x_0)
                / extract(self.sqrt_recipm1_alphas_bar, t, x_t))

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        """Invert the posterior mean: x_0 = (mu - c2 x_t) / c1."""
        return ((xprev - extract(self.posterior_mean_coef2, t, x_t) * x_t)
                / extract(self.posterior_mean_coef1, t, x_t))

    def predict_xstart(self, model_output, x_t, t, mean_type, clip_denoised):
        """x0_hat from the mean part of the model output, clipped to [-1, 1] if clip_denoised."""
        if mean_type == "epsilon":
            x_0 = self.predict_xstart_from_eps(x_t, t, model_output)
        elif mean_type == "xprev":
            x_0 = self.predict_xstart_from_xprev(x_t, t, model_output)
        else:
            x_0 = model_output
        return x_0.clamp(-1.0, 1.0) if clip_denoised else x_0

    def p_mean_variance(self, model_output, x_t, t, mean_type, var_type, clip_denoised):
        """Mean, log-variance and x0_hat of p_theta(x_{t-1} | x_t).

        For the epsilon and xstart parameterisations x0_hat is clipped to [-1, 1] before it
        forms the posterior mean, as the official p_mean_variance does; an xprev model
        predicts the mean directly, so only the x0_hat it implies is clipped.
        """
        if var_type in LEARNED_VARIANCES:
            model_output, var_output = split_learned_variance(model_output, x_t)
            log_var = var_output if var_type == "learned" else self.learned_range_log_var(var_output, t)
        elif var_type == "fixedlarge":
            log_var = extract(self.fixedlarge_log_var, t, x_t)
        else:
            log_var = extract(self.posterior_log_var_clipped, t, x_t)
        x_0 = self.predict_xstart(model_output, x_t, t, mean_type, clip_denoised)
        mean = model_output if mean_type == "xprev" else self.q_posterior_mean(x_0, x_t, t)
        return mean, log_var, x_0

    def learned_range_log_var(self, v, t):
        """Nichol & Dhariwal 2021 eq. 15: log Sigma = frac log beta_t + (1 - frac) log betatilde_t,
        frac = (v + 1) / 2, v in [-1, 1] the network's variance output; log betatilde_t is the
        clipped one (betatilde_0 = 0 replaced by betatilde_1, improved-diffusion's clipping).
        On a respaced chain these are the respaced steps' beta and betatilde."""
        frac = (v + 1.0) / 2.0
        return (frac * extract(self.log_betas, t, v)
                + (1.0 - frac) * extract(self.posterior_log_var_clipped, t, v))

    def vb_terms_bpd(self, model_output, x_0, x_t, t, mean_type, var_type, clip_denoised):
        """The bound's term for each example's t, in bits/dim, float64, and x0_hat:
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder
        negative log-likelihood L_0 = -log p(x_0 | x_1) at t = 0 (x_1 is x_t at code index 0).
        """
        model_output, x_0, x_t = model_output.double(), x_0.double(), x_t.double()
        true_mean = self.q_posterior_mean(x_0, x_t, t)
        true_log_var = extract(self.posterior_log_var_clipped, t, x_t)
        mean, log_var, pred_x_0 = self.p_mean_variance(
            model_output, x_t, t, mean_type, var_type, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl), pred_x_0

    def prior_bpd(self, x_0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example, float64."""
        x_0 = x_0.double()
        mean = self.sqrt_alphas_bar[-1] * x_0
        log_var = torch.log1p(-self.alphas_bar[-1]).expand_as(x_0)
        kl = normal_kl(mean, log_var, torch.zeros_like(x_0), torch.zeros_like(x_0))
        return mean_flat(kl) / math.log(2.0)

    def check_bound(self, mean_type, what, alternative=""):
        """Raise a one-line ValueError naming `what` (a loss type, --bpd; `alternative` ends its
        advice) where a term of the variational bound has no value on this chain. L_0's
        variance, and every clipped one, is betatilde_1 in place of betatilde_0 = 0, so T >= 2.
        Where abar_t = 0 (jsd's t = T-1) an epsilon model's x0_hat = (x_t - eps_hat) / 0 is
        undefined, and with it the mean of p(x_{t-1} | x_t); an xstart or xprev model gives
        that mean directly (c2_t = 0 there: the posterior does not depend on x_t), so its
        bound is finite."""
        if self.T < 2:
            raise ValueError(f"{what} needs T >= 2: the bound's variance at t = 0 is betatilde_1 "
                             f"in place of betatilde_0 = 0, and T = {self.T} has no t = 1")
        if mean_type == "epsilon" and self.alphas_bar[-1] == 0:
            raise ValueError(f"{what} is undefined for mean_type 'epsilon' on a schedule that ends at "
                             f"abar_t = 0 (jsd): x0_hat = (x_t - eps_hat) / sqrt(abar_t) has no value at "
                             f"t = {self.T - 1}; use mean_type 'xstart' or 'xprev'{alternative}")


class GaussianDiffusionTrainer(GaussianDiffusion):
    """The training loss of one random timestep per example.

    loss_type "mse" (Algorithm 1): the per-element squared error (B, C, H, W) of the model
    toward its mean type's target. loss_type "kl": the bound's term L_{t-1} (L_0 at t = 0) in
    bits/dim per example (B,), with x0_hat unclipped as in the official training_losses; it
    also trains a learned variance. loss_type "hybrid" (Nichol & Dhariwal 2021 eq. 16), per
    example (B,): L_simple + lambda L_vlb, L_simple the mse's per-example mean and L_vlb =
    sum_t L_t estimated from the example's t as T L_t (bits/dim), with the mean output
    detached in L_vlb (improved-diffusion's frozen_out): the mean learns from L_simple only,
    the variance from L_vlb only. Either way `.mean()` is the batch loss: for "mse" the mean
    over elements equals the mean of the per-example means.

    snr_gamma G > 0 (Min-SNR-gamma, Hang et al. 2023) weights the squared error of each
    example (the mse loss, hybrid's L_simple) so that every mean type trains the same
    objective, min(SNR_t, G) |x0_hat - x_0|^2 with SNR_t = abar_t / (1 - abar_t)
    (`min_snr_weights`). 0: off.

    The bound's losses (kl, hybrid) need every term defined (`check_bound`): T >= 2, and no
    epsilon model on a schedule that reaches abar_t = 0. The mse loss is defined everywhere:
    its eps target is the noise itself, also where x_t is nothing else.
    """

    def __init__(self, model, betas, mean_type="epsilon", loss_type="mse", var_type="fixedlarge",
                 hybrid_lambda=1e-3, snr_gamma=0.0):
        super().__init__(betas)
        check_choice("mean_type", mean_type, MEAN_TYPES)
        check_choice("loss_type", loss_type, LOSS_TYPES)
        check_choice("var_type", var_type, VAR_TYPES)
        learned = var_type in LEARNED_VARIANCES
        if loss_type == "mse" and learned:
            raise ValueError(f"loss_type 'mse' gives a learned variance no training signal: "
                             f"use loss_type 'kl' or 'hybrid' with var_type '{var_type}'")
        if loss_type == "hybrid" and not learned:
            raise ValueError("loss_type 'hybrid' trains the variance by its bound term: use var_type "
                             "'learned' or 'learned_range'")
        if not 0.0 <= hybrid_lambda < math.inf:
            raise ValueError(f"--hybrid_lambda must be a finite number >= 0, got {hybrid_lambda}")
        if not snr_gamma >= 0.0:  # NaN fails too
            raise ValueError(f"--snr_gamma must be >= 0 (0: off), got {snr_gamma}")
        if snr_gamma > 0.0 and loss_type == "kl":
            raise ValueError("--snr_gamma weights the squared error (loss_type 'mse', and hybrid's "
                             "L_simple); loss_type 'kl' is the bound itself, which it does not weight")
        if loss_type != "mse":
            self.check_bound(mean_type, f"loss_type {loss_type!r}",
                             ", or loss_type 'mse' with a fixed var_type")
        self.model = model
        self.mean_type = mean_type
        self.loss_type = loss_type
        self.var_type = var_type
        self.hybrid_lambda = hybrid_lambda
        self.snr_gamma = snr_gamma
        if snr_gamma > 0.0:
            self.register_buffer("snr_weights", self.min_snr_weights(snr_gamma), persistent=False)

    def min_snr_weights(self, gamma):
        """The Min-SNR-gamma weight of each t's squared error, float64, for this mean type.

        With SNR_t = abar_t / (1 - abar_t) the errors of the three targets are one error scaled
        per t: eps_hat - eps = -sqrt(SNR_t) (x0_hat - x_0) (eq. 4), and an xprev model's mean
        mu_hat - mu = c1_t (x0_hat - x_0) (eq. 7, the x0_hat its output implies). So
        min(SNR_t, G) |x0_hat - x_0|^2 is
            epsilon:  min(SNR_t, G) / SNR_t   |eps_hat - eps|^2
            xstart:   min(SNR_t, G)           |x0_hat - x_0|^2
            xprev:    min(SNR_t, G) / c1_t^2  |mu_hat - mu|^2,
        and with G = inf every one is the unweighted epsilon loss. The epsilon weight is
        min(1, G / SNR_t), which is 1 where SNR_t = 0 (abar_t = 0, the jsd schedule's end).
        """
        snr = self.alphas_bar / (1.0 - self.alphas_bar)
        if self.mean_type == "epsilon":
            return (gamma / snr).clamp(max=1.0)
        if self.mean_type == "xstart":
            return snr.clamp(max=gamma)
        return snr.clamp(max=gamma) / self.posterior_mean_coef1 ** 2

    def forward(self, x_0, t=None, noise=None):
        if t is None:
            t = torch.randint(self.T, size=(x_0.shape[0],), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        return self.loss_terms(x_0, t, noise)[0]

    def per_example_losses(self, x_0, t, noise):
        """(each example's loss (B,), the loss the importance sampler's history records (B,):
        the loss itself for mse and kl, the bound term L_t for hybrid)."""
        loss, recorded = self.loss_terms(x_0, t, noise)
        if loss.dim() > 1:  # mse: the per-element error
            loss = recorded = mean_flat(loss)
        return loss, recorded

    def loss_terms(self, x_0, t, noise):
        """(the loss as `forward` returns it, the per-example loss to record: see above; None
        for mse, whose per-example mean per_example_losses takes)."""
        x_t = self.q_sample(x_0, t, noise)
        output = self.model(x_t, t).float()
        if self.loss_type == "kl":
            loss, _ = self.vb_terms_bpd(output, x_0, x_t, t, self.mean_type, self.var_type,
                                        clip_denoised=False)
            return loss.float(), loss.float()
        mean_output = output
        if self.loss_type == "hybrid":
            mean_output, var_output = split_learned_variance(output, x_t)
        if self.mean_type == "epsilon":
            target = noise
        elif self.mean_type == "xstart":
            target = x_0
        else:
            target = self.q_posterior_mean(x_0, x_t, t)
        mse = F.mse_loss(mean_output, target, reduction="none")
        if self.snr_gamma > 0.0:
            mse = mse * extract(self.snr_weights, t, mse)
        if self.loss_type == "mse":
            return mse, None  # per_example_losses takes its mean where it is needed
        # the bound term sees the mean as a constant: only the variance output learns from it
        frozen = torch.cat([mean_output.detach(), var_output], dim=1)
        vb, _ = self.vb_terms_bpd(frozen, x_0, x_t, t, self.mean_type, self.var_type, clip_denoised=False)
        vb = vb.float()
        return mean_flat(mse) + self.hybrid_lambda * self.T * vb, vb


class ImportanceSampler:
    """Importance-sampled training timesteps (Nichol & Dhariwal 2021 sec. 3.3, eq. 18;
    improved-diffusion's LossSecondMomentResampler).

    p_t is proportional to sqrt(E[L_t^2]) over the last HISTORY losses recorded at t, mixed
    with the uniform distribution, (1 - u) p_t + u / T with u = UNIFORM_WEIGHT; until every t
    has HISTORY losses it is uniform. Each example's loss is weighted by 1 / (T p_t), which
    keeps the batch loss an unbiased estimate of the uniform average over t:
    sum_t p_t L_t / (T p_t) = (1/T) sum_t L_t.

    The history is kept on the host in float64 and updated in the order the losses are given
    (the global batch's order, so that it is the same on every process); `state_dict` is what
    a checkpoint keeps.
    """

    HISTORY = 10
    UNIFORM_WEIGHT = 1e-3

    def __init__(self, T):
        self.T = T
        self.history = np.zeros((T, self.HISTORY), dtype=np.float64)
        self.count = np.zeros(T, dtype=np.int64)

    def probabilities(self):
        """p_t for t = 0..T-1, float64 (T,)."""
        if (self.count < self.HISTORY).any():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = np.sqrt((self.history ** 2).mean(axis=1))
        p = (1.0 - self.UNIFORM_WEIGHT) * p / p.sum() + self.UNIFORM_WEIGHT / self.T
        return torch.from_numpy(p)

    def weights(self, t, probabilities):
        """1 / (T p_t) for a batch of timesteps t, float64."""
        return 1.0 / (self.T * probabilities.to(t.device)[t])

    def update(self, t, losses):
        """Record each example's loss at its t, in order; a full history drops its oldest."""
        for step, loss in zip(t.tolist(), losses.tolist()):
            if self.count[step] == self.HISTORY:
                self.history[step, :-1] = self.history[step, 1:]
                self.history[step, -1] = loss
            else:
                self.history[step, self.count[step]] = loss
                self.count[step] += 1

    def state_dict(self):
        return {"history": torch.from_numpy(self.history.copy()), "count": torch.from_numpy(self.count.copy())}

    def load_state_dict(self, state):
        history, count = np.asarray(state["history"], dtype=np.float64), np.asarray(state["count"], dtype=np.int64)
        if history.shape != self.history.shape or count.shape != self.count.shape:
            raise ValueError(f"a timestep history of shape {tuple(history.shape)} does not fit T = {self.T}")
        self.history, self.count = history, count


class SamplerStep(nn.Module):
    """One update of a sampler: from the i-th kept timestep t_i to the one before it (to x_0
    at i = 0), given the network's output at (x_t, t_i).

    `forward(output, x_t, i, generator)` returns (x at the previous kept timestep, x0_hat); the
    sampling loop calls it for i descending and calls `reset` at the start of every chain, so
    a step may keep state between the steps of one chain (a multistep solver's earlier
    x0_hat). Noise is drawn from `generator`, in the working dtype of x_t.
    """

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised):
        super().__init__()
        self.diffusion = GaussianDiffusion(betas)
        self.timesteps = timesteps
        self.mean_type = mean_type
        self.var_type = var_type
        self.clip_denoised = clip_denoised

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
    """x_{t-1} ~ p_theta(x_{t-1} | x_t) on the full chain (Ho et al. Algorithm 2, i = t)."""

    def forward(self, output, x_t, i, generator=None):
        mean, log_var, x_0 = self.diffusion.p_mean_variance(
            output, x_t, self.original_t(i, x_t), self.mean_type, self.var_type, self.clip_denoised)
        return self.add_noise(mean, torch.exp(0.5 * log_var), i, generator), x_0


class StridedAncestralStep(SamplerStep):
    """Ancestral sampling on the chain respaced to the kept timesteps (Nichol & Dhariwal 2021,
    sec. 4): x0_hat from the network's output at the original step t_i, then the posterior
    q(x_{t_{i-1}} | x_t, x0_hat) and the variance of the respaced step i: the fixed one, or
    learned_range's interpolation between the respaced step's beta and betatilde."""

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised)
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

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, eta, ddim_eps="network"):
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


def ddpm_step(betas, timesteps, mean_type, var_type, clip_denoised, eta):
    """Ancestral sampling: Algorithm 2 when the kept timesteps are the whole chain (every t
    with abar_t > 0, `sample_timesteps`), the respaced chain otherwise."""
    if eta != 0.0:
        raise ValueError("eta is the noise scale of sampler 'ddim'; sampler 'ddpm' takes none")
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


# ---------------------------------------------------------------- fast ODE/SDE solvers
#
# The continuous-time view the solvers need, chosen once for all of them: diffusers'
# convention (the exactness tests compare with its schedulers). A kept timestep t_i of the
# training grid is the point (alpha, sigma) = (sqrt(abar_{t_i}), sqrt(1 - abar_{t_i})), with
# log-SNR lambda = log(alpha / sigma); the chain ends at (alpha, sigma) = (1, 0), lambda = +inf,
# the data itself, as DDIM's last step here ends at abar = 1. No interpolation of abar between
# grid points is needed: the solvers only ever visit the kept timesteps.


class SolverStep(SamplerStep):
    """What the DPM-Solver family and UniPC share: the points they visit and the data
    prediction x0_hat they are built on.

    Point j = i + 1 is the i-th kept timestep and point 0 the end (alpha, sigma) = (1, 0);
    step i goes from point i + 1 to point i, one network evaluation per kept timestep, so the
    evaluations are the kept timesteps of `sample_timesteps` (sample_steps of them when it
    divides T, as 10, 20, 50 and 100 divide T = 1000). x0_hat is
    `GaussianDiffusion.predict_xstart` of the output's mean half, so every mean type (epsilon,
    xstart, xprev) and a learned-variance model of either kind (whose variance half is ignored) can be
    solved, and --clip_denoised clips x0_hat to [-1, 1] (diffusers' `thresholding` with
    `sample_max_value=1`: its dynamic threshold s is clamped to [1, 1]). The coefficients are
    Python floats (float64) applied to x in its working dtype.
    """

    ORDERS = (1, 2, 3)

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, eta, order):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised)
        if eta != 0.0:
            raise ValueError("eta is the noise scale of sampler 'ddim'; the solvers take none")
        if order not in self.ORDERS:
            raise ValueError(f"solver_order must be one of {', '.join(map(str, self.ORDERS))} "
                             f"for this sampler, got {order}")
        self.order = order
        abar = [float(a) for a in self.diffusion.alphas_bar[timesteps]]
        self.alpha = [1.0] + [math.sqrt(a) for a in abar]
        self.sigma = [0.0] + [math.sqrt(1.0 - a) for a in abar]
        self.lam = [math.inf] + [0.5 * (math.log(a) - math.log(1.0 - a)) for a in abar]
        self.history = []

    def reset(self):
        """A new chain: forget the earlier x0_hat (and their points)."""
        self.history = []

    def data_prediction(self, output, x_t, i):
        """x0_hat from the network's output at the i-th kept timestep, clipped if asked."""
        if self.var_type in LEARNED_VARIANCES:
            output, _ = split_learned_variance(output, x_t)
        return self.diffusion.predict_xstart(output, x_t, self.original_t(i, x_t), self.mean_type,
                                             self.clip_denoised)

    def remember(self, x0_hat, point, keep):
        """Append (x0_hat, its point), keeping the last `keep`; the newest is history[-1]."""
        self.history = (self.history + [(x0_hat, point)])[-keep:]

    def step_order(self, i, seen):
        """The order of step i once `seen` x0_hat of this chain are known (its own included):
        each solver's rule, the one its `forward` applies."""
        raise NotImplementedError

    @property
    def highest_order(self):
        """The highest order any step of a chain through all the kept timesteps uses, for the
        record of what ran: `order` is only what was asked for, and a short chain may never
        reach it (its step i has seen len(timesteps) - i x0_hat)."""
        steps = len(self.timesteps)
        return max(self.step_order(i, steps - i) for i in range(steps))


def multistep_differences(history, lam, h):
    """D0 and the scaled differences of DPM-Solver++'s multistep updates (Lu et al. 2022b,
    Algorithm 2 and its third-order extension), from the newest x0_hat m0 (at s0) back:
    r_k = (lambda_{s_{k-1}} - lambda_{s_k}) / h, D1 = (m0 - m1) / r0 and, for order 3,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)."""
    (m0, s0), order = history[-1], len(history)
    if order == 1:
        return m0, None, None
    m1, s1 = history[-2]
    r0 = (lam[s0] - lam[s1]) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        return m0, d1_0, None
    m2, s2 = history[-3]
    r1 = (lam[s1] - lam[s2]) / h
    d1_1 = (m1 - m2) / r1
    return m0, d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


class DPMSolverPPStep(SolverStep):
    """DPM-Solver++ multistep (Lu et al. 2022b, Algorithm 2; order 3 as in their code), data
    prediction, on the exact solution of the probability-flow ODE in lambda (their eq. 9):
    with h = lambda_t - lambda_s, phi = e^{-h} - 1 and the differences of
    `multistep_differences`,
        order 1:  x_t = sigma_t / sigma_s x_s - alpha_t phi D0                    (= DDIM)
        order 2:  ... - 0.5 alpha_t phi D1                                        (midpoint)
        order 3:  ... - alpha_t phi D0 + alpha_t (phi / h + 1) D1
                      - alpha_t ((phi + h) / h^2 - 0.5) D2.
    The order is at most the x0_hat seen so far in this chain (warm-up), 1 at the last step
    (it ends at sigma = 0, where h is infinite) and at most 2 at the one before when the
    chain has fewer than 15 kept timesteps: diffusers' `lower_order_final`.
    """

    def step_order(self, i, seen):
        order = min(self.order, seen)
        if i == 0:
            return 1
        return min(order, 2) if i == 1 and len(self.timesteps) < 15 else order

    def forward(self, output, x_t, i, generator=None):
        x0_hat = self.data_prediction(output, x_t, i)
        self.remember(x0_hat, i + 1, self.order)
        order, s, t = self.step_order(i, len(self.history)), i + 1, i
        h = self.lam[t] - self.lam[s]
        d0, d1, d2 = multistep_differences(self.history[len(self.history) - order:], self.lam, h)
        return self.update(x_t, s, t, h, (d0, d1, d2), i, generator), x0_hat

    def update(self, x_s, s, t, h, differences, i, generator):
        d0, d1, d2 = differences
        alpha_t, phi = self.alpha[t], math.expm1(-h)
        x = self.sigma[t] / self.sigma[s] * x_s - alpha_t * phi * d0
        if d2 is not None:
            return x + alpha_t * (phi / h + 1.0) * d1 - alpha_t * ((phi + h) / h ** 2 - 0.5) * d2
        return x if d1 is None else x - 0.5 * alpha_t * phi * d1


class SDEDPMSolverPPStep(DPMSolverPPStep):
    """SDE-DPM-Solver++ (Lu et al. 2022b, sec. 5's SDE solver; diffusers' sde-dpmsolver++):
    the exact solution of the reverse SDE's linear part in lambda, orders 1-2, with the same
    differences, order rules and h as `DPMSolverPPStep`:
        x_t = sigma_t / sigma_s e^{-h} x_s + alpha_t (1 - e^{-2h}) (D0 + 0.5 D1)
              + sigma_t sqrt(1 - e^{-2h}) z,
    z drawn from the loop's generator (none at the last step, where sigma_t = 0), so a chain
    is the same on 1 or N processes and after a resumed --eval. Order 1 is DDPM-like
    ancestral sampling (DDIM with eta = 1 in these coordinates).
    """

    ORDERS = (1, 2)

    def update(self, x_s, s, t, h, differences, i, generator):
        d0, d1, _ = differences
        decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}, 1 at the last step
        data = d0 if d1 is None else d0 + 0.5 * d1
        mean = self.sigma[t] / self.sigma[s] * math.exp(-h) * x_s + self.alpha[t] * decay * data
        return self.add_noise(mean, self.sigma[t] * math.sqrt(decay), i, generator)


def singlestep_orders(steps, order):
    """The order of each of `steps` evaluations of singlestep DPM-Solver, first step first:
    groups of `order` evaluations (orders 1, 2, .., order within a group), a short group of
    the remainder at the end ([1, 2] for 2 left over by order 3, [1] for 1), and order 1 at the
    very last step, which ends at sigma = 0 (diffusers' `get_order_list` with
    `lower_order_final`). So 10 evaluations at order 3 are [1, 2, 3] * 3 + [1] and 20 are
    [1, 2, 3] * 6 + [1, 1]; when `order` divides `steps` the last group is [1, 2, .., order - 1]
    followed by [1]."""
    groups, left = divmod(steps, order)
    if left == 0:
        orders = list(range(1, order + 1)) * (groups - 1) + list(range(1, order)) + [1]
    else:
        orders = list(range(1, order + 1)) * groups + list(range(1, left + 1))
    orders[-1] = 1
    return orders


class DPMSolverSinglestepStep(SolverStep):
    """Singlestep DPM-Solver (Lu et al. 2022a, DPM-Solver-2 and -3 with their midpoint
    choices) in the data-prediction form (Lu et al. 2022b's singlestep DPM-Solver++), which
    can end at sigma = 0 as the noise-prediction form cannot.

    The kept timesteps are cut into groups (`singlestep_orders`); a group of order k starts at
    the point g of its first evaluation and its k-th evaluation's step jumps from x_g to the
    point after the group's last, using every x0_hat of the group (m at g, then the later
    ones); the earlier steps of the group make the intermediate points' x (lower orders from
    x_g). With h = lambda_t - lambda_g, phi = e^{-h} - 1, r_k = (lambda_{s_k} - lambda_g) / h:
        order 1:  x_t = sigma_t / sigma_g x_g - alpha_t phi m_g
        order 2:  ... - 0.5 alpha_t phi (m_{s0} - m_g) / r0                  (DPM-Solver-2)
        order 3:  ... + alpha_t (phi / h + 1) (m_{s0} - m_g) / r0          (DPM-Solver-3),
    s0 the group's newest point. A chain that starts mid-group lowers the order to the x0_hat
    it has.
    """

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, eta, order):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised, eta, order)
        self.orders = singlestep_orders(len(timesteps), order)
        self.start = None

    def reset(self):
        super().reset()
        self.start = None

    def step_order(self, i, seen):
        return min(self.orders[len(self.timesteps) - 1 - i], seen)

    def forward(self, output, x_t, i, generator=None):
        x0_hat = self.data_prediction(output, x_t, i)
        self.remember(x0_hat, i + 1, self.order)
        order = self.step_order(i, len(self.history))
        if order == 1:
            self.start = x_t
        (m_g, g), (m0, s0), t = self.history[-order], self.history[-1], i
        h = self.lam[t] - self.lam[g]
        alpha_t, phi = self.alpha[t], math.expm1(-h)
        x = self.sigma[t] / self.sigma[g] * self.start - alpha_t * phi * m_g
        if order == 2:
            x = x - 0.5 * alpha_t * phi * (m0 - m_g) / ((self.lam[s0] - self.lam[g]) / h)
        elif order == 3:
            x = x + alpha_t * (phi / h + 1.0) * (m0 - m_g) / ((self.lam[s0] - self.lam[g]) / h)
        return x, x0_hat


def unipc_coefficients(rks, hh, order, corrector):
    """UniPC's weights (Zhao et al. 2023, Algorithm 2 with B(h) = e^h - 1, "bh2"), in float64.

    hh = -h (data prediction). b_n = hh phi_{n+1}(hh) n! / B(hh), with phi_1(x) = (e^x - 1) / x
    and phi_{n+1}(x) = (phi_n(x) - 1/n!) / x; the weights a solve sum_k a_k r_k^{n-1} = b_n,
    n = 1.. (the order conditions, their eq. 8). The predictor (UniP) of order p uses the
    p - 1 earlier points (its order 2 takes a_1 = 1/2, the paper's choice for B(h) = e^h - 1);
    the corrector (UniC) of order p adds the new point, r = 1 (its order 1 takes 1/2).
    """
    b_h = math.expm1(hh)
    b, phi, factorial = [], math.expm1(hh) / hh - 1.0, 1.0
    for n in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= n + 1
        phi = phi / hh - 1.0 / factorial
    size = order if corrector else order - 1
    if size == 0:
        return []
    if size == 1 and (corrector or order == 2):
        return [0.5]
    r = np.array(list(rks[:order - 1]) + [1.0])[:size]
    matrix = np.stack([r ** (n - 1) for n in range(1, size + 1)])
    return np.linalg.solve(matrix, np.array(b[:size])).tolist()


class UniPCStep(SolverStep):
    """UniPC multistep (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2"), data prediction: the
    predictor UniP-p from s0 to t and, once the network has been called at t, the corrector
    UniC-p, which replaces x_t by
        x_t^c = sigma_t / sigma_s0 x_s0 - alpha_t B(-h) m0
                - alpha_t B(-h) (sum_k a_k (m_k - m0) / r_k + a_p (m_t - m0)),
    r_k = (lambda_{s_k} - lambda_s0) / h over the p - 1 earlier points (`unipc_coefficients`);
    UniP is the same without the m_t term (its own a_k). The network's x0_hat m_t is kept as
    it was (evaluated before the correction), and no correction follows the last step. The
    order p is at most the x0_hat seen so far in this chain and the steps left (i + 1):
    diffusers' `lower_order_final`.
    """

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, eta, order):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised, eta, order)
        self.last = None

    def reset(self):
        """A new chain: no earlier x0_hat, and nothing to correct."""
        super().reset()
        self.last = None

    def step_order(self, i, seen):
        """The predictor's order; the corrector that follows it has the same."""
        return min(self.order, i + 1, seen)

    def forward(self, output, x_t, i, generator=None):
        x0_hat = self.data_prediction(output, x_t, i)
        if self.last is not None:
            x_s, order = self.last
            x_t = self.update(self.history[-order:], x_s, i + 1, x0_hat)
        self.remember(x0_hat, i + 1, self.order)
        order = self.step_order(i, len(self.history))
        self.last = (x_t, order)
        return self.update(self.history[-order:], x_t, i), x0_hat

    def update(self, history, x_s, t, m_t=None):
        """UniP from the newest point of `history` to point t, or UniC with m_t (x0_hat at t)."""
        (m0, s0), older = history[-1], history[-2::-1]
        h = self.lam[t] - self.lam[s0]
        rks = [(self.lam[s] - self.lam[s0]) / h for _, s in older]
        weights = unipc_coefficients(rks, -h, len(history), corrector=m_t is not None)
        terms = [(m - m0) / r for (m, _), r in zip(older, rks)]
        terms += [] if m_t is None else [m_t - m0]
        b_h = math.expm1(-h)
        x = self.sigma[t] / self.sigma[s0] * x_s - self.alpha[t] * b_h * m0
        for weight, term in zip(weights, terms):
            x = x - self.alpha[t] * b_h * weight * term
        return x


# --sampler name -> f(betas, timesteps, mean_type, var_type, clip_denoised, eta): a SamplerStep,
# raising ValueError for options that sampler cannot take
STEPS = {
    "ddpm": ddpm_step,
    "ddim": DDIMStep,
    "dpm_solver++": DPMSolverPPStep,
    "sde_dpm_solver++": SDEDPMSolverPPStep,
    "dpm_solver": DPMSolverSinglestepStep,
    "unipc": UniPCStep,
}
SAMPLERS = tuple(STEPS)
# the solvers: their factories also take order=, given solver_order or else this default
SOLVER_DEFAULT_ORDERS = {"dpm_solver++": 2, "sde_dpm_solver++": 2, "dpm_solver": 3, "unipc": 2}
# the spacing a sampler gets when none is asked for (skip_type None): quadratic, the best or
# within 1 FID of the best for every sampler here at 10 and 20 evaluations on the digits
# demo's model (BENCHMARKS.md, 2026-11-30), where uniform spacing's last step, from t = T/N
# to 0, is too long for every sampler but DDIM
DEFAULT_SKIP_TYPE = "quadratic"


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
    chain takes of its own steps. "dpm_solver++", "sde_dpm_solver++", "dpm_solver" (singlestep) and "unipc" solve the
    diffusion ODE (SDE) from the data prediction x0_hat (`SolverStep`), one network evaluation
    per kept timestep, of order solver_order (0: the sampler's default,
    `SOLVER_DEFAULT_ORDERS`; ddpm and ddim ignore it). sample_steps=None means T.
    Constructing one validates a sampling configuration without a network.

    No sampler visits a timestep whose abar_t is 0 (jsd's t = T-1, where x0_hat of an epsilon
    model is 0/0 and the solvers' lambda is -inf): x_T ~ N(0, I) enters at the last t with
    abar_t > 0, as it enters a strided chain at its last kept step (`sample_timesteps`). So
    a jsd chain has at most T - 1 steps, and `len(timesteps)` is what ran, whatever
    sample_steps (1..T) asked for; sample_steps = 1 is the one step from that t.

    timesteps: the kept timesteps, ascending; T: the length of the full chain; step: the
    sampler's `SamplerStep`. The network is called as net(x_t, t), t a LongTensor of original
    timesteps, and its output cast to x_t's dtype.
    """

    def __init__(self, betas, mean_type="epsilon", var_type="fixedlarge", clip_denoised=True,
                 sampler="ddpm", sample_steps=None, eta=0.0, skip_type=None, solver_order=0,
                 ddim_eps="network"):
        super().__init__(betas)
        check_choice("mean_type", mean_type, MEAN_TYPES)
        check_choice("var_type", var_type, VAR_TYPES)
        check_choice("sampler", sampler, tuple(STEPS))
        self.skip_type = skip_type or DEFAULT_SKIP_TYPE
        check_choice("skip_type", self.skip_type, SKIP_TYPES)
        sample_steps = self.T if sample_steps is None else sample_steps
        if not 1 <= sample_steps <= self.T:
            raise ValueError(f"sample_steps must be in 1..T = 1..{self.T}, got {sample_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.timesteps = sample_timesteps(self.alphas_bar, sample_steps, self.skip_type)
        # ddpm and ddim are first-order by definition and take no order (any given is unused)
        options = {"ddim_eps": ddim_eps} if sampler == "ddim" else {}
        if sampler in SOLVER_DEFAULT_ORDERS:
            options["order"] = solver_order or SOLVER_DEFAULT_ORDERS[sampler]
        self.step = STEPS[sampler](self.betas, self.timesteps, mean_type=mean_type, var_type=var_type,
                                   clip_denoised=clip_denoised, eta=eta, **options)

    @torch.no_grad()
    def chain(self, net, x_t, t=None, generator=None):
        """The reverse chain from x_t at kept timestep t (default: the last) down to x_0, one
        `StepRecord` per kept timestep, t descending; the step object is reset first.

        The only loop that walks the timesteps calling the network: sampling, denoising,
        progressive sampling and interpolation all consume it. A Python generator: it runs as
        far as it is read, one chain at a time (a new chain resets the step's state). Raises
        ValueError, naming the nearest kept timestep, when first read if t is not kept.
        """
        t = self.timesteps[-1] if t is None else t
        if t not in self.timesteps:
            nearest = min(self.timesteps, key=lambda kept: abs(kept - t))
            raise ValueError(f"t={t} is not one of this sampler's timesteps (nearest: {nearest})")
        self.step.reset()
        for i in reversed(range(self.timesteps.index(t) + 1)):
            batch_t = torch.full((x_t.shape[0],), self.timesteps[i], dtype=torch.long,
                                 device=x_t.device)
            x_prev, x0_hat = self.step(net(x_t, batch_t).to(x_t.dtype), x_t, i, generator)
            yield StepRecord(i, self.timesteps[i], x_t, x0_hat, x_prev)
            x_t = x_prev

    @torch.no_grad()
    def denoise(self, net, x_t, t, generator=None):
        """x_0 in [-1, 1]: the reverse chain from x_t at kept timestep t."""
        for record in self.chain(net, x_t, t, generator):
            x_t = record.x_prev
        return x_t.clamp(-1.0, 1.0)

    @torch.no_grad()
    def forward(self, net, x_T, generator=None):
        """x_0 in [-1, 1] from x_T ~ N(0, I), which enters at the last kept timestep."""
        return self.denoise(net, x_T, self.timesteps[-1], generator)
