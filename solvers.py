"""The fast ODE/SDE solvers of the reverse process, each a `steps.SamplerStep`: multistep
DPM-Solver++ and its SDE form, singlestep DPM-Solver and UniPC (Lu et al. 2022a, 2022b; Zhao
et al. 2023), all built on the data prediction x0_hat and exact against diffusers' schedulers
(tests/test_solvers.py).
"""
import math

import numpy as np

from diffusion import LEARNED_VARIANCES, split_learned_variance
from steps import SamplerStep

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
    DEFAULT_ORDER = 2

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, order):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised)
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

    def record(self):
        return {"solver_order": self.highest_order}

    @classmethod
    def describe(cls, record):
        return f" of order {record['solver_order']}" if "solver_order" in record else ""

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
    """dpm_solver++: DPM-Solver++ multistep (Lu et al. 2022b, Algorithm 2; order 3 as in their code), data
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

    NAME = "dpm_solver++"
    HELP = "DPM-Solver++ (multistep)"

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

    NAME = "sde_dpm_solver++"
    HELP = "its SDE form, stochastic"
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

    NAME = "dpm_solver"
    HELP = "singlestep DPM-Solver"
    DEFAULT_ORDER = 3

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, order):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised, order)
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

    NAME = "unipc"
    HELP = "UniPC"

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, order):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised, order)
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
