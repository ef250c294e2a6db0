"""The fast path computes the same numbers as the fp32 eager reference path."""

import pytest
import torch

import speed
from config import FastPathConfig
from diffusion import GaussianDiffusionSampler, GaussianDiffusionTrainer, beta_schedule
from model import UNet

ALL_OFF = dict(precision=None, compile=None, cuda_graphs=None, channels_last=None,
               fused_adam=None, data_on_device=None)


def settings(device_type="cpu", world_size=1, **chosen):
    return speed.resolve(FastPathConfig(**{**ALL_OFF, **chosen}), device_type, world_size)


def tiny_unet(seed=0):
    """A small UNet whose zero-initialised layers are moved off zero, so every layer matters."""
    torch.manual_seed(seed)
    net = UNet(T=1000, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0)
    for layer in net.zero_initialised_layers():
        torch.nn.init.normal_(layer.weight, std=0.05)
    return net


def loss_and_grads(net, fast):
    trainer = GaussianDiffusionTrainer(speed.wrap(net, fast), beta_schedule("linear", 1e-4, 0.02, 1000))
    generator = torch.Generator().manual_seed(1)
    x_0 = torch.rand(8, 3, 8, 8, generator=generator) * 2 - 1
    t = torch.randint(1000, (8,), generator=generator)
    noise = torch.randn(8, 3, 8, 8, generator=generator)
    net.zero_grad()
    loss = trainer(x_0, t, noise).mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def test_auto_settings_are_fast_on_cuda_and_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(speed, "cuda_capability", lambda: (9, 0))  # an H100 or H200
    cpu, cuda = settings("cpu"), settings("cuda")
    assert cpu.precision == "fp32" and cuda.precision == "bf16"
    assert not any(vars(cpu)[k] for k in ("compile", "cuda_graphs", "channels_last", "fused_adam"))
    assert all(vars(cuda)[k] for k in ("compile", "cuda_graphs", "channels_last", "fused_adam"))
    assert not settings("cuda", world_size=2).cuda_graphs  # DDP's hooks would break the graph
    chosen = settings("cuda", precision="fp32", compile=False)
    assert chosen.precision == "fp32" and not chosen.compile and not chosen.cuda_graphs and chosen.channels_last


@pytest.mark.parametrize("capability, chosen", [((7, 0), "fp16"), ((7, 5), "fp16"), ((6, 1), "fp16"),
                                                ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_the_precision_left_unset_is_the_devices(monkeypatch, capability, chosen):
    """V100 7.0, T4 and 2080 Ti 7.5, P100-class 6.x: fp16; A100 8.0, RTX 30xx 8.6, H100 9.0:
    bf16. A flag wins over the device, and a resumed run's precision over the device too."""
    monkeypatch.setattr(speed, "cuda_capability", lambda: capability)
    assert settings("cuda").precision == chosen
    assert settings("cuda", precision="fp32").precision == "fp32"
    resumed = speed.resolve(FastPathConfig(**ALL_OFF), "cuda", precision="fp32")
    assert resumed.precision == "fp32"
    assert speed.resolve(FastPathConfig(**{**ALL_OFF, "precision": "bf16"}), "cuda", precision="fp16").precision == "bf16"
    assert settings("cpu").precision == "fp32"
    words = speed.choice_words(settings("cuda"), None, "cuda")
    assert words.startswith(f"precision: {chosen} (compute capability {capability[0]}.{capability[1]}")


def test_bf16_channels_last_train_step_matches_fp32():
    reference_loss, reference_grads = loss_and_grads(tiny_unet(), settings())
    fast_net = speed.to_layout(tiny_unet(), settings(precision="bf16", channels_last=True))
    fast_loss, fast_grads = loss_and_grads(fast_net, settings(precision="bf16", channels_last=True))
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%) per operation. Measured: the
    # loss moves by 0.06%, the gradients by 2.1% relative (cosine 0.99979); a bug that feeds
    # each image another image's timestep moves the loss by only 0.16% but the gradients by
    # 88% (cosine 0.61): the gradient checks are the sharp ones.
    assert abs(fast_loss - reference_loss) < 0.003 * reference_loss
    assert relative_error(fast_grads, reference_grads) < 0.05
    assert torch.nn.functional.cosine_similarity(fast_grads, reference_grads, dim=0) > 0.998


@pytest.mark.slow  # a few seconds on 2 cores
def test_compiled_train_step_matches_eager(monkeypatch):
    # Inductor's C++ code generation takes minutes on 2 CPU cores, so here the graph capture
    # (Dynamo + AOT autograd) is tested with the aot_eager backend; the GPU tests and bench.py
    # run the real compiler.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: real_compile(net, backend="aot_eager"))
    torch._dynamo.reset()
    reference_loss, reference_grads = loss_and_grads(tiny_unet(), settings())
    compiled_loss, compiled_grads = loss_and_grads(tiny_unet(), settings(compile=True))
    assert compiled_loss == pytest.approx(reference_loss, rel=1e-6)
    assert relative_error(compiled_grads, reference_grads) < 1e-5


@pytest.mark.slow  # a few seconds on 2 cores
@torch.no_grad()
def test_bf16_sampler_matches_fp32_given_the_same_noise():
    net = tiny_unet().eval()
    x_T = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    images = {}
    for name, fast in [("fp32", settings()), ("bf16", settings(precision="bf16", channels_last=True))]:
        sampler = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, 1000), sample_steps=100)
        images[name] = sampler(speed.wrap(speed.to_layout(net, fast), fast), x_T,
                               generator=torch.Generator().manual_seed(3))
    difference = (images["bf16"] - images["fp32"]).abs()
    # The 100-step chain feeds bf16 rounding of each eps_hat (~0.4% relative) back into x_t;
    # measured mean 0.0024, max 0.032 on [-1, 1] images. Noise not drawn from the generator
    # (other noise than the fp32 run's): mean 0.83, max 2.0.
    assert difference.mean() < 0.005
    assert difference.max() < 0.065


def test_fp16_train_step_matches_fp32():
    """fp16 keeps 11 significant bits (rounding 2^-11 = 0.05%), three more than bf16. Measured:
    the loss moves by 0.002% and the gradients by 0.28% relative (bf16: 0.08% and 2.2%)."""
    reference_loss, reference_grads = loss_and_grads(tiny_unet(), settings())
    fp16_loss, fp16_grads = loss_and_grads(tiny_unet(), settings(precision="fp16"))
    assert abs(fp16_loss - reference_loss) < 3e-4 * reference_loss
    assert relative_error(fp16_grads, reference_grads) < 0.01
    assert torch.nn.functional.cosine_similarity(fp16_grads, reference_grads, dim=0) > 0.9999


@pytest.mark.slow  # a few seconds on 2 cores
@torch.no_grad()
def test_fp16_sampler_matches_fp32_and_returns_float32():
    net = tiny_unet().eval()
    x_T = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    images = {}
    for name in ("fp32", "fp16"):
        fast = settings(precision=name)
        sampler = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, 1000), sample_steps=100)
        images[name] = sampler(speed.wrap(net, fast), x_T, generator=torch.Generator().manual_seed(3))
    difference = (images["fp16"] - images["fp32"]).abs()
    # measured mean 0.0003, max 0.004 on [-1, 1] images (bf16: 0.0024 and 0.032)
    assert images["fp16"].dtype == torch.float32
    assert difference.mean() < 0.001 and difference.max() < 0.01
