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

The reverse process, p_theta, is in its own modules: the spacing of the timesteps and the
one sampling loop in sampling.py, its updates in steps.py (ancestral, DDIM) and solvers.py.
`GaussianDiffusionSampler` is importable from here too, where the design names it.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN_TYPES = ("xprev", "xstart", "epsilon")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
# the variances the network outputs (2C channels: the mean output, then the variance's)
LEARNED_VARIANCES = ("learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
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


def noise_levels(alphas_bar):
    """sigma_t = sqrt((1 - abar_t) / abar_t) of the timesteps with abar_t > 0, float64 numpy:
    Karras et al.'s noise level, x_t / sqrt(abar_t) = x_0 + sigma_t eps (eq. 4 rescaled)."""
    abar = np.asarray(alphas_bar, dtype=np.float64)[:usable_steps(alphas_bar)]
    return np.sqrt((1.0 - abar) / abar)


def nearest_in_log(levels, targets):
    """For each target sigma, the index of the level nearest it in log sigma (sigma spans
    orders of magnitude over a chain)."""
    return np.abs(np.log(levels)[None, :] - np.log(np.atleast_1d(targets))[:, None]).argmin(axis=1)



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

    def forward(self, x_0, t=None, noise=None, y=None):
        """The loss of x_0 at timesteps t with this noise (drawn when not given); y: the
        classes a class-conditional network is given (its "no label" class where dropped)."""
        if t is None:
            t = torch.randint(self.T, size=(x_0.shape[0],), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        return self.loss_terms(x_0, t, noise, y)[0]

    def per_example_losses(self, x_0, t, noise, y=None):
        """(each example's loss (B,), the loss the importance sampler's history records (B,):
        the loss itself for mse and kl, the bound term L_t for hybrid)."""
        loss, recorded = self.loss_terms(x_0, t, noise, y)
        if loss.dim() > 1:  # mse: the per-element error
            loss = recorded = mean_flat(loss)
        return loss, recorded

    def loss_terms(self, x_0, t, noise, y=None):
        """(the loss as `forward` returns it, the per-example loss to record: see above; None
        for mse, whose per-example mean per_example_losses takes)."""
        x_t = self.q_sample(x_0, t, noise)
        output = (self.model(x_t, t) if y is None else self.model(x_t, t, y)).float()
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


def __getattr__(name):
    """GaussianDiffusionSampler, where the design names it (PEP 562): loaded when first asked
    for, so that importing this module never imports the sampling modules built on it."""
    if name == "GaussianDiffusionSampler":
        from sampling import GaussianDiffusionSampler
        return GaussianDiffusionSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
