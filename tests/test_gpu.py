"""The fast path on a GPU: compiled (Inductor, CUDA graphs), bf16, channels_last, fused Adam.

Skipped without CUDA. Run on a GPU machine with `python -m pytest -q -m gpu tests`.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

import speed
from diffusion import GaussianDiffusionSampler, GaussianDiffusionTrainer
from model import UNet

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10 = dict(T=1000, ch=128, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=2, dropout=0.0)


def settings(**chosen):
    flags = dict(precision=None, compile=None, cuda_graphs=None, channels_last=None,
                 fused_adam=None, data_on_device=None)
    return speed.settings(types.SimpleNamespace(**{**flags, **chosen}), "cuda")


def paper_unet():
    torch.manual_seed(0)
    net = UNet(**CIFAR10)
    for layer in net.zero_initialised_layers():  # every layer carries signal
        torch.nn.init.normal_(layer.weight, std=0.02)
    return net.cuda()


def loss_and_grads(fast, steps=3):
    """The last of `steps` identical steps (the first ones compile and capture graphs)."""
    net = speed.to_layout(paper_unet(), fast)
    trainer = GaussianDiffusionTrainer(speed.fast(net, fast), 1e-4, 0.02, 1000).cuda()
    generator = torch.Generator("cuda").manual_seed(1)
    x_0 = torch.rand(128, 3, 32, 32, generator=generator, device="cuda") * 2 - 1
    t = torch.randint(1000, (128,), generator=generator, device="cuda")
    noise = torch.randn(128, 3, 32, 32, generator=generator, device="cuda")
    for _ in range(steps):
        net.zero_grad()
        loss = trainer(x_0, t, noise).mean()
        loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None])


def test_fast_train_step_matches_fp32_eager():
    reference_loss, reference_grads = loss_and_grads(settings(precision="fp32", compile=False,
                                                              channels_last=False), steps=1)
    fast_loss, fast_grads = loss_and_grads(settings())
    assert abs(fast_loss - reference_loss) < 0.01 * reference_loss
    error = ((fast_grads - reference_grads).norm() / reference_grads.norm()).item()
    assert error < 0.05
    assert torch.nn.functional.cosine_similarity(fast_grads, reference_grads, dim=0) > 0.998


@torch.no_grad()
def test_fast_sampler_matches_fp32_given_the_same_noise():
    net = paper_unet().eval()
    x_T = torch.randn(64, 3, 32, 32, generator=torch.Generator("cuda").manual_seed(2), device="cuda")
    images = {}
    for name, fast in [("fp32", settings(precision="fp32", compile=False, channels_last=False)),
                       ("fast", settings())]:
        model = speed.fast(speed.to_layout(net, fast), fast)
        sampler = GaussianDiffusionSampler(model, 1e-4, 0.02, 1000, sample_steps=100).cuda()
        images[name] = sampler(x_T, generator=torch.Generator("cuda").manual_seed(3))
    difference = (images["fast"] - images["fp32"]).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.2


def test_training_on_the_fast_path_end_to_end(tmp_path):
    """The CLI with every speed default on: trains, samples, resumes, evaluates (digits)."""
    args = [sys.executable, "main.py", "--flagfile", "config/digits.cfg", "--logdir", str(tmp_path),
            "--total_steps", "40", "--sample_step", "20", "--save_step", "20", "--T", "100"]
    for extra in (["--train"], ["--train", "--resume", "--total_steps", "60"],
                  ["--notrain", "--eval", "--num_images", "500"]):
        result = subprocess.run(args + extra, capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(tmp_path / "sample" / "40.png")
    assert "FID" in open(tmp_path / "eval.txt").read()
