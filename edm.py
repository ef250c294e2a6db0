"""Karras et al. (2022)'s samplers (EDM) as sampler steps: Heun's second-order method on the
probability-flow ODE, with optional churn (their Algorithm 2; Algorithm 1 without it), and the
Euler-ancestral sampler.

They work in EDM's coordinates: a kept timestep t is the noise level sigma_t = sqrt((1 -
abar_t) / abar_t), and x_t of the chain is x = x_t / sqrt(abar_t) = sqrt(1 + sigma_t^2) x_t
there (x_t = x_0 + sigma_t eps, eq. 4 rescaled). The chain ends at sigma = 0, the data. The
denoiser D(x; sigma) is the x0_hat of the network's output, so every mean type and a learned
variance (its mean half) can be sampled, and --clip_denoised clips it.

Both visit only kept timesteps of the training grid, where the network was trained, except
Heun's churn: it raises sigma_i by the factor 1 + gamma_i to a level sigma_hat between
training steps. The network is then asked at the training timestep nearest sigma_hat in
log sigma (k-diffusion's `DiscreteEpsDDPMDenoiser` with quantize=True), because the time
embedding has only ever seen integer timesteps, and log sigma because sigma spans five orders
of magnitude over the chain. The input keeps sigma_hat's own scaling, x / sqrt(1 + sigma_hat^2),
and D = x - sigma_hat eps_hat, eps_hat the noise that output implies: the exact denoiser of an
epsilon model at sigma_hat had it been trained there, a fraction of a step off otherwise.
"""
import math

import torch

from diffusion import LEARNED_VARIANCES, nearest_in_log, noise_levels, split_learned_variance
from steps import Option, SamplerStep


class KarrasStep(SamplerStep):
    """What the EDM samplers share: sigma at each kept timestep and beyond the last (0), and the
    denoiser D(x; sigma) of a network output."""

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised)
        # every training timestep that can be asked (abar_t > 0), for the churned sigma_hat
        self.grid_sigmas = noise_levels(self.diffusion.alphas_bar.numpy())
        # sigmas[i]: kept timestep i, sigmas_next[i]: where step i goes (kept i - 1, or 0)
        self.sigmas = [float(self.grid_sigmas[t]) for t in timesteps]
        self.sigmas_next = [0.0] + self.sigmas[:-1]

    def nearest_timestep(self, sigma):
        """The training timestep whose sigma is nearest sigma in log sigma."""
        return int(nearest_in_log(self.grid_sigmas, sigma)[0])

    def denoised(self, output, x, sigma, t):
        """D(x; sigma) of the network's output at timestep t for the input x / sqrt(1 + sigma^2):
        x - sigma eps_hat, eps_hat the noise the output implies at t (the output itself for an
        epsilon model); at sigma = sigma_t this is GaussianDiffusion.predict_xstart's x0_hat."""
        if self.var_type in LEARNED_VARIANCES:
            output, _ = split_learned_variance(output, x)
        if self.mean_type == "epsilon":
            eps = output
        else:
            x_in = x / math.sqrt(1.0 + sigma ** 2)
            batch_t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x_0 = self.diffusion.predict_xstart(output, x_in, batch_t, self.mean_type, clip_denoised=False)
            eps = self.diffusion.predict_eps_from_xstart(x_in, batch_t, x_0)
        x_0 = x - sigma * eps
        return x_0.clamp(-1.0, 1.0) if self.clip_denoised else x_0

    def to_chain(self, x, i):
        """x at sigmas_next[i] in EDM's coordinates, as x_t of the chain at kept timestep i - 1
        (the data itself after the last step)."""
        return x / math.sqrt(1.0 + self.sigmas_next[i] ** 2)


class HeunStep(KarrasStep):
    """Karras et al. Algorithm 2, from sigma_i = sigmas[i] to sigma_next = sigmas_next[i]:
        gamma_i = min(churn / N, sqrt(2) - 1) if churn_tmin <= sigma_i <= churn_tmax, else 0
        sigma_hat = sigma_i (1 + gamma_i),  x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) churn_noise z
        d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat,  x_next = x_hat + (sigma_next - sigma_hat) d
    and, unless sigma_next = 0, Heun's correction with d' = (x_next - D(x_next; sigma_next)) / sigma_next:
        x_next = x_hat + (sigma_next - sigma_hat) (d + d') / 2.
    N is the number of steps (kept timesteps); churn 0 is Algorithm 1, deterministic;
    churn_tmax 0 sets no upper bound. Two network evaluations per step but the last, so N
    steps cost 2N - 1: `--sample_steps E` runs (E + 1) // 2 steps, E evaluations when E is odd
    and E - 1 when it is even (an extra evaluation would need a step it could not complete).
    """

    NAME = "heun"
    HELP = "Heun's 2nd-order ODE solver of Karras et al. (Algorithm 2; --churn 0: Algorithm 1)"
    OPTIONS = (Option("churn", low=0.0, high=math.inf), Option("churn_tmin", low=0.0, high=math.inf),
               Option("churn_tmax", low=0.0, high=math.inf), Option("churn_noise", low=0.0, high=math.inf))

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, churn=0.0, churn_tmin=0.0,
                 churn_tmax=0.0, churn_noise=1.0):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised)
        self.churn, self.churn_tmin, self.churn_tmax, self.churn_noise = churn, churn_tmin, churn_tmax, churn_noise

    @classmethod
    def steps_for(cls, evaluations):
        return (evaluations + 1) // 2

    def gamma(self, i):
        sigma = self.sigmas[i]
        inside = self.churn_tmin <= sigma and (self.churn_tmax == 0 or sigma <= self.churn_tmax)
        return min(self.churn / len(self.timesteps), math.sqrt(2.0) - 1.0) if self.churn > 0 and inside else 0.0

    def advance(self, network, x_t, i, generator=None):
        sigma, sigma_next = self.sigmas[i], self.sigmas_next[i]
        x = x_t * math.sqrt(1.0 + sigma ** 2)
        gamma = self.gamma(i)
        sigma_hat, t_hat = sigma * (1.0 + gamma), self.timesteps[i]
        if gamma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * self.churn_noise * noise
            t_hat = self.nearest_timestep(sigma_hat)
        x_0 = self.denoised(network(x / math.sqrt(1.0 + sigma_hat ** 2), t_hat), x, sigma_hat, t_hat)
        d = (x - x_0) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            t_next = self.timesteps[i - 1]
            x_0_next = self.denoised(network(x_next / math.sqrt(1.0 + sigma_next ** 2), t_next), x_next,
                                     sigma_next, t_next)
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + (x_next - x_0_next) / sigma_next)
        return self.to_chain(x_next, i), x_0

    def evaluations(self):
        return 2 * len(self.timesteps) - 1

    def record(self):
        record = {"evaluations": self.evaluations(), "churn": self.churn}
        if self.churn > 0:
            record.update(churn_tmin=self.churn_tmin, churn_tmax=self.churn_tmax, churn_noise=self.churn_noise)
        return record

    @classmethod
    def describe(cls, record):
        churn = (f", churn {record['churn']} in [{record['churn_tmin']}, {record['churn_tmax'] or 'inf'}] "
                 f"noise {record['churn_noise']}" if record.get("churn") else "")
        return f" ({record['evaluations']} evaluations{churn})" if "evaluations" in record else ""


class EulerAncestralStep(KarrasStep):
    """Euler steps on the ODE with the noise of an ancestral step (k-diffusion's
    `sample_euler_ancestral`, eta 1): from sigma_i to sigma_next the step goes down to
        sigma_down = sqrt(sigma_next^2 - sigma_up^2),
        sigma_up = min(sigma_next, sqrt(sigma_next^2 (sigma_i^2 - sigma_next^2) / sigma_i^2)),
    x_down = x_i + (sigma_down - sigma_i) (x_i - D(x_i; sigma_i)) / sigma_i, and adds fresh
    noise sigma_up z (none at the last step, to sigma = 0). sigma_up is the posterior
    q(x_s | x_t, x_0)'s standard deviation in these coordinates, so this is DDIM with eta = 1
    up to the Euler step. One network evaluation per step.
    """

    NAME = "euler_ancestral"
    HELP = "Euler steps with ancestral noise (k-diffusion's euler_ancestral)"

    def forward(self, output, x_t, i, generator=None):
        sigma, sigma_next = self.sigmas[i], self.sigmas_next[i]
        x = x_t * math.sqrt(1.0 + sigma ** 2)
        x_0 = self.denoised(output, x, sigma, self.timesteps[i])
        sigma_up = min(sigma_next, math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x_next = x + (sigma_down - sigma) * (x - x_0) / sigma
        return self.to_chain(self.add_noise(x_next, sigma_up, i, generator), i), x_0
