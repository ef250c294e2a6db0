"""A new sampler is one class and one line: the toy sampler below is defined and registered
here, and main.py's flags, their checks, --eval's resumable store and the protocol record of
its score all take it from its declarations, with no other file naming it.
"""
import json
import math
import os
import shutil

import pytest
import torch

import checkpoint
import files
import sampling
from builders import build_model
from config import Config, ConfigError, flagfile_text
from conftest import run_main
from steps import Option, SamplerStep


class ShrunkDDIMStep(SamplerStep):
    """A toy: deterministic DDIM (eta 0) whose x0_hat is scaled by --eta, which this sampler
    takes in [0, 2] (DDIM itself takes it in [0, 1])."""

    NAME = "shrunk_ddim"
    HELP = "a test's toy: deterministic DDIM with x0_hat scaled by --eta"
    OPTIONS = (Option("eta", low=0.0, high=2.0),)
    fail_at_batch = None  # set by a test: the chain that raises, to stand in for a crash

    def __init__(self, betas, timesteps, mean_type, var_type, clip_denoised, eta):
        super().__init__(betas, timesteps, mean_type, var_type, clip_denoised)
        self.eta, self.chains = eta, 0

    def reset(self):
        self.chains += 1
        if self.chains == ShrunkDDIMStep.fail_at_batch:
            raise RuntimeError("a stand-in for a crash")

    def forward(self, output, x_t, i, generator=None):
        t = self.original_t(i, x_t)
        x0_hat = self.eta * self.diffusion.predict_xstart(output, x_t, t, self.mean_type, self.clip_denoised)
        eps = self.diffusion.predict_eps_from_xstart(x_t, t, x0_hat)
        abar_prev = float(self.diffusion.alphas_bar[self.timesteps[i - 1]]) if i > 0 else 1.0
        return math.sqrt(abar_prev) * x0_hat + math.sqrt(1.0 - abar_prev) * eps, x0_hat

    def record(self):
        return {"x0_scale": self.eta}

    @classmethod
    def describe(cls, record):
        return f" (x0_hat scaled by {record['x0_scale']})"


@pytest.fixture
def registered():
    sampling.register(ShrunkDDIMStep)  # the one line a new sampler needs
    yield
    del sampling.SAMPLERS[ShrunkDDIMStep.NAME]
    ShrunkDDIMStep.fail_at_batch = None


@pytest.fixture
def logdir(tmp_path):
    """A run of the digits demo's network with random weights: --eval needs no training."""
    path = str(tmp_path / "run")
    run = Config.make(dataset="digits", img_size=8, img_channels=1, ch=32, ch_mult=(1, 2), attn=(1,),
                      num_res_blocks=1, T=100, fid_cache="", logdir=path, layout="official")
    torch.manual_seed(0)
    net = build_model(run.model, run.diffusion)
    os.makedirs(path)
    checkpoint.save(os.path.join(path, "ckpt.pt"), {"ema_model": net.state_dict(), "net_model": net.state_dict(),
                                                    "step": 0, "layout": "official"})
    files.write_bytes(os.path.join(path, "flagfile.txt"), flagfile_text(run).encode())
    return path


def evaluation(logdir):
    return ["--flagfile", os.path.join(logdir, "flagfile.txt"), "--logdir", logdir, "--notrain", "--eval",
            "--num_workers", "0", "--sampler", "shrunk_ddim", "--eta", "1.5", "--sample_steps", "5",
            "--num_images", "12", "--eval_batch_size", "3"]


def last_record(logdir):
    with open(os.path.join(logdir, "eval.txt")) as lines:
        return json.loads(lines.read().splitlines()[-1])


def test_the_flags_take_a_registered_sampler_and_its_options_from_its_class(registered):
    assert "shrunk_ddim: a test's toy" in sampling.option_help("sampler")
    eta_help = sampling.option_help("eta")
    assert "shrunk_ddim: in [0, 2]" in eta_help and "ddim: in [0, 1]" in eta_help
    assert Config.make(sampler="shrunk_ddim", eta=1.5).sampler().step.eta == 1.5
    with pytest.raises(ConfigError, match=r"--eta of sampler 'shrunk_ddim' must be in \[0, 2\], got 2.5"):
        Config.make(sampler="shrunk_ddim", eta=2.5)
    with pytest.raises(ConfigError, match=r"--eta of sampler 'ddim' must be in \[0, 1\], got 1.5"):
        Config.make(sampler="ddim", eta=1.5)  # each sampler its own range
    with pytest.raises(ConfigError, match="--eta is an option of sampler\\(s\\) ddim, shrunk_ddim; sampler 'ddpm'"):
        Config.make(sampler="ddpm", eta=1.5)


@pytest.mark.slow
def test_a_registered_sampler_runs_through_a_resumable_eval_with_its_protocol_record(registered, logdir, tmp_path):
    uninterrupted = shutil.copytree(logdir, str(tmp_path / "uninterrupted"))
    run_main(*evaluation(uninterrupted), tiny=False)
    ShrunkDDIMStep.fail_at_batch = 3  # the third batch's chain crashes: two are finished
    crashed = run_main(*evaluation(logdir), tiny=False, expect_ok=False)
    assert crashed.returncode == 1 and "RuntimeError: a stand-in for a crash" in crashed.stderr
    assert not os.path.exists(os.path.join(logdir, "eval.txt"))
    (store,) = os.listdir(os.path.join(logdir, "eval_state"))
    identity = json.load(open(os.path.join(logdir, "eval_state", store, "identity.json")))["identity"]
    assert identity["sampling"]["sampler"] == "shrunk_ddim" and identity["sampling"]["eta"] == 1.5
    ShrunkDDIMStep.fail_at_batch = None
    resumed = run_main(*evaluation(logdir), tiny=False)
    assert "2 of its 4 batches were finished by an earlier run" in resumed.stderr
    record, expected = last_record(logdir), last_record(uninterrupted)
    assert record["sampler"] == "shrunk_ddim" and record["x0_scale"] == 1.5 and record["steps"] == 5
    for name in ("FID", "IS", "IS_std"):
        assert record[name] == expected[name], name  # bit for bit
    from evaluate import describe
    assert "shrunk_ddim sampler (x0_hat scaled by 1.5), 5 steps" in describe(record)
