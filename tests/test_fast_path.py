"""The fast path is really taken: autocast runs the network in bf16, weights and activations
are channels_last, torch.compile is called with the requested mode and its compiled code is
what runs, in one graph that is not recompiled from step to step.

test_speed.py checks that the fast path computes the right numbers; a fast path that is
silently off computes them too, so these tests look inside. Inductor's code generation takes
minutes on 2 CPU cores: here the compiled graph runs on the aot_eager backend (Dynamo and
AOT autograd, the graph capture that Inductor would compile); tests/test_gpu.py runs Inductor.
"""
import os
import types

import pytest
import torch

import speed
import train
import cli
from diffusion import GaussianDiffusionSampler, beta_schedule
from conftest import TINY_ARGS
from test_speed import settings, tiny_unet

CHANNELS_LAST = torch.channels_last


def is_channels_last(tensor):
    """NHWC strides; a tensor of one channel or one pixel is both layouts, else strictly NHWC."""
    both = tensor.shape[1] == 1 or tensor.shape[2] * tensor.shape[3] == 1
    return tensor.is_contiguous(memory_format=CHANNELS_LAST) and (both or not tensor.is_contiguous())


def record_convolutions(net):
    """(input, output) of every Conv2d call of net, appended to the returned list."""
    seen = []
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    return seen


def images_and_timesteps():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 8, 8, generator=generator) * 2 - 1, torch.randint(1000, (8,), generator=generator)


def test_autocast_runs_the_network_in_bf16_and_returns_float32():
    """Catches autocast switched off, the wrong dtype (float16), or a bf16 result leaking out
    of FastModel (the diffusion math must stay float32)."""
    net = tiny_unet()
    seen = record_convolutions(net)
    x, t = images_and_timesteps()
    out = speed.wrap(net, settings(precision="bf16"))(x, t)
    assert out.dtype == torch.float32
    assert seen and all(o.dtype == torch.bfloat16 for _, o in seen)
    seen.clear()
    assert speed.wrap(net, settings(precision="fp32"))(x, t).dtype == torch.float32
    assert all(o.dtype == torch.float32 for _, o in seen)  # the reference path stays fp32
    seen.clear()
    assert speed.wrap(net, settings(precision="fp16"))(x, t).dtype == torch.float32
    assert seen and all(o.dtype == torch.float16 for _, o in seen)


def test_weights_and_activations_are_channels_last():
    """Catches to_layout or FastModel not converting (both still compute the same numbers),
    and a layout leaking out of FastModel."""
    fast = settings(precision="bf16", channels_last=True)
    net = speed.to_layout(tiny_unet(), fast)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(is_channels_last(m.weight) for m in convs)
    seen = record_convolutions(net)
    x, t = images_and_timesteps()
    out = speed.wrap(net, fast)(x, t)
    assert out.is_contiguous()  # NCHW again for the diffusion math
    assert is_channels_last(seen[0][0])  # the head conv's input: the image itself
    assert sum(is_channels_last(o) for _, o in seen) == len(seen)
    plain = tiny_unet()  # the reference path: NCHW
    seen = record_convolutions(plain)
    speed.wrap(plain, settings())(x, t)
    assert not is_channels_last(plain.head.weight) and not is_channels_last(seen[0][1])


class CountingBackend:
    """A torch.compile backend (aot_eager underneath) that counts the graphs it compiles and
    the calls of the compiled code, and records what the compiled code sees."""

    def __init__(self):
        self.compiled, self.calls, self.output_dtypes, self.image_inputs = 0, 0, set(), []

    def __call__(self, graph, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend
        self.compiled += 1
        compiled = lookup_backend("aot_eager")(graph, example_inputs)

        def run(*args):
            self.calls += 1
            self.image_inputs += [a for a in args if torch.is_tensor(a) and a.dim() == 4]
            out = compiled(*args)
            self.output_dtypes |= {o.dtype for o in out if torch.is_tensor(o)}
            return out
        return run


@pytest.fixture
def compile_calls(monkeypatch):
    """Replaces torch.compile: records each call's arguments and compiles on a CountingBackend."""
    real_compile, calls = torch.compile, []

    def recording_compile(model, **kwargs):
        backend = CountingBackend()
        calls.append(types.SimpleNamespace(model=model, kwargs=kwargs, backend=backend))
        return real_compile(model, backend=backend, dynamic=kwargs.get("dynamic"))
    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield calls
    torch._dynamo.reset()


@pytest.mark.parametrize("cuda_graphs,mode", [(False, "default"), (True, "reduce-overhead")])
def test_compile_is_called_with_the_requested_mode(compile_calls, cuda_graphs, mode):
    """Catches a dropped or wrong mode= (CUDA graphs come from mode 'reduce-overhead'), dynamic
    shapes left on, and compile not called at all."""
    fast = speed.FastPath(precision="fp32", channels_last=False, compile=True, cuda_graphs=cuda_graphs, fused_adam=False,
                           data_on_device=False)
    net = tiny_unet()
    speed.wrap(net, fast)
    assert len(compile_calls) == 1 and compile_calls[0].model is net
    assert compile_calls[0].kwargs == {"mode": mode, "dynamic": False}


@pytest.mark.slow  # torch.compile: seconds of graph capture
@torch.no_grad()
def test_compiled_sampler_is_not_recompiled_across_steps(compile_calls):
    """A 10-step strided sampler calls the network with ten different timesteps: still one
    graph (a timestep baked in as a constant would recompile at every step)."""
    fast = settings(compile=True)
    sampler = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, 1000), sample_steps=10)
    sampler(speed.wrap(tiny_unet().eval(), fast), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    (call,) = compile_calls
    assert call.backend.compiled == 1 and call.backend.calls == 10


@pytest.mark.slow  # torch.compile: seconds of graph capture
def test_training_runs_the_compiled_network_in_one_graph_without_recompiles(compile_calls, tmp_path):
    """train.train with --compile --precision bf16 --channels_last on the CPU, four steps, each
    on other images, timesteps and noise: the training network is compiled (mode default,
    static shapes) once, as one graph (no graph break), never recompiled, and every step runs
    the compiled code, in bf16, on channels_last weights. Catches a graph break or a guard that
    fails every step (a Python number taken from a tensor, a shape-dependent branch), a
    FastModel or train.py that calls the uncompiled network, and speed settings that do not
    reach the trainer."""
    train.train(cli.configuration(["main.py", *TINY_ARGS, "--train", "--logdir", str(tmp_path), "--total_steps", "4",
                                    "--sample_step", "0", "--save_step", "0", "--dropout", "0",
                                    "--compile", "--precision", "bf16", "--channels_last"]), "cpu")
    (call,) = [call for call in compile_calls if call.model.training]  # not the EMA sampler's
    assert call.kwargs == {"mode": "default", "dynamic": False}
    assert call.backend.compiled == 1  # one graph: no break, no recompile
    assert call.backend.calls == 4  # the compiled code is what ran, every step
    assert not torch._dynamo.utils.counters["graph_break"]
    assert call.backend.output_dtypes == {torch.bfloat16}  # autocast inside the compiled graph
    weights = [a for a in call.backend.image_inputs if a.shape[-1] == 3]  # 3x3 conv kernels
    assert weights and all(map(is_channels_last, weights))
    assert os.path.exists(tmp_path / "ckpt.pt")
