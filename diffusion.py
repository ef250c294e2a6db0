"""Gaussian diffusion of Ho et al. 2020 ("DDPM"), following the official diffusion_utils_2.py.

Notation (t is 0-based, t = 0..T-1):
    beta_t                      linear schedule from beta_1 to beta_T
    alpha_t = 1 - beta_t,       abar_t = prod_{s<=t} alpha_s,      abar_{-1} = 1
    q(x_t | x_0)       = N(sqrt(abar_t) x_0, (1 - abar_t) I)                         (eq. 4)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, betatilde_t I)                    (eq. 6, 7)
        c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)
        c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
        betatilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)

Every coefficient is computed once, in float64, by `GaussianDiffusion`; per-step values are
cast to the working dtype only where they are applied (`extract`).
"""
import torch
import torch.nn.functional as F
from torch import nn

MEAN_TYPES = ("xprev", "xstart", "epsilon")
VAR_TYPES = ("fixedlarge", "fixedsmall")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(choices)}")


def extract(coef, t, x):
    """coef[t] for a batch of timesteps t, cast to x's dtype and shaped to broadcast over x."""
    return coef.gather(0, t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class GaussianDiffusion(nn.Module):
    """The noise schedule and every derived coefficient, as float64 buffers."""

    def __init__(self, beta_1, beta_T, T):
        super().__init__()
        if not 0 < beta_1 <= beta_T < 1:
            raise ValueError(f"need 0 < beta_1 <= beta_T < 1, got beta_1={beta_1}, beta_T={beta_T}")
        self.T = T
        betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
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

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        """Invert the posterior mean: x_0 = (mu - c2 x_t) / c1."""
        return ((xprev - extract(self.posterior_mean_coef2, t, x_t) * x_t)
                / extract(self.posterior_mean_coef1, t, x_t))

    def p_mean_variance(self, model_output, x_t, t, mean_type, var_type, clip_denoised):
        """Mean, log-variance and x0_hat of p_theta(x_{t-1} | x_t).

        For the epsilon and xstart parameterisations x0_hat is clipped to [-1, 1] before it
        forms the posterior mean, as the official p_mean_variance does; an xprev model
        predicts the mean directly, so nothing is clipped.
        """
        if var_type == "fixedlarge":
            log_var = extract(self.fixedlarge_log_var, t, x_t)
        else:
            log_var = extract(self.posterior_log_var_clipped, t, x_t)

        if mean_type == "xprev":
            mean = model_output
            x_0 = self.predict_xstart_from_xprev(x_t, t, model_output)
            return mean, log_var, x_0
        if mean_type == "xstart":
            x_0 = model_output
        else:
            x_0 = self.predict_xstart_from_eps(x_t, t, model_output)
        if clip_denoised:
            x_0 = x_0.clamp(-1.0, 1.0)
        return self.q_posterior_mean(x_0, x_t, t), log_var, x_0


class GaussianDiffusionTrainer(GaussianDiffusion):
    """Algorithm 1: the per-element regression loss of the model toward its mean type's target."""

    def __init__(self, model, beta_1, beta_T, T, mean_type="epsilon"):
        super().__init__(beta_1, beta_T, T)
        check_choice("mean_type", mean_type, MEAN_TYPES)
        self.model = model
        self.mean_type = mean_type

    def forward(self, x_0, t=None, noise=None):
        if t is None:
            t = torch.randint(self.T, size=(x_0.shape[0],), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        if self.mean_type == "epsilon":
            target = noise
        elif self.mean_type == "xstart":
            target = x_0
        else:
            target = self.q_posterior_mean(x_0, x_t, t)
        output = self.model(x_t, t)
        return F.mse_loss(output.float(), target, reduction="none")


class GaussianDiffusionSampler(GaussianDiffusion):
    """Algorithm 2: ancestral sampling x_T -> x_0 with a fixed variance."""

    def __init__(self, model, beta_1, beta_T, T, img_size=32, mean_type="epsilon",
                 var_type="fixedlarge", clip_denoised=True):
        super().__init__(beta_1, beta_T, T)
        check_choice("mean_type", mean_type, MEAN_TYPES)
        check_choice("var_type", var_type, VAR_TYPES)
        self.model = model
        self.img_size = img_size
        self.mean_type = mean_type
        self.var_type = var_type
        self.clip_denoised = clip_denoised

    def p_sample(self, x_t, time_step, generator=None):
        """One step x_t -> x_{t-1}; no noise is added at t = 0."""
        t = torch.full((x_t.shape[0],), time_step, dtype=torch.long, device=x_t.device)
        output = self.model(x_t, t).to(x_t.dtype)
        mean, log_var, _ = self.p_mean_variance(
            output, x_t, t, self.mean_type, self.var_type, self.clip_denoised)
        if time_step == 0:
            return mean
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + torch.exp(0.5 * log_var) * noise

    @torch.no_grad()
    def forward(self, x_T, generator=None):
        x_t = x_T
        for time_step in reversed(range(self.T)):
            x_t = self.p_sample(x_t, time_step, generator)
        return x_t.clamp(-1.0, 1.0)
