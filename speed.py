"""The fast GPU path: bf16 or fp16 autocast, channels_last, torch.compile (with CUDA graphs),
fused Adam and the dataset held on the GPU. Each is a flag; left unset, a flag is on for
CUDA and off for the CPU, where fp32 eager is the reference path. The precision left unset
is the device's: bf16 where the GPU computes it natively (compute capability 8.0 and up:
Ampere, Ada, Hopper), fp16 on older CUDA GPUs (Volta, Turing: their tensor cores run fp16,
and bf16 would be emulated or refused), fp32 on the CPU."""
from dataclasses import dataclass

import torch
from torch import nn


PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16 = (8, 0)  # the first compute capability with bf16 tensor cores (A100)


def cuda_capability():
    """(major, minor) of this process's CUDA device."""
    return torch.cuda.get_device_capability()


def device_precision(device_type):
    """(the precision this device trains and samples in by default, why)."""
    if device_type != "cuda":
        return "fp32", "the CPU's reference arithmetic"
    capability = cuda_capability()
    words = f"compute capability {capability[0]}.{capability[1]}"
    if tuple(capability) >= NATIVE_BF16:
        return "bf16", f"{words}: native bf16"
    return "fp16", f"{words}: no native bf16, so fp16 with loss scaling"


@dataclass(frozen=True)
class FastPath:
    """The fast path's choices, each resolved for one device: the precision one of
    PRECISIONS, the rest on or off."""
    precision: str
    channels_last: bool
    compile: bool
    cuda_graphs: bool
    fused_adam: bool
    data_on_device: bool


def resolve(fast, device_type, world_size=1, precision=None):
    """A FastPathConfig's settings with unset (None) resolved for this device: on for CUDA;
    the precision --precision, else `precision` (a resumed run's), else the device's."""
    cuda = device_type == "cuda"

    def pick(value):
        return cuda if value is None else value

    compile_ = pick(fast.compile)
    return FastPath(
        precision=fast.precision or precision or device_precision(device_type)[0],
        channels_last=pick(fast.channels_last),
        compile=compile_,
        # CUDA graphs replay the whole step without Python; DDP's gradient hooks would
        # break the graph, so they are for one process.
        cuda_graphs=compile_ and cuda and world_size == 1 and pick(fast.cuda_graphs),
        fused_adam=cuda and pick(fast.fused_adam),
        data_on_device=pick(fast.data_on_device),
    )


def choice_words(fast, config_precision, device_type, resumed=None):
    """One line saying which precision runs and why."""
    if config_precision:
        why = "--precision"
    elif resumed:
        why = "the checkpoint's (--precision to change it)"
    else:
        why = device_precision(device_type)[1]
    return f"precision: {fast.precision} ({why})"


class FastModel(nn.Module):
    """Calls net under bf16 or fp16 autocast and in channels_last layout; returns float32, so
    that the loss and every sampler's arithmetic (float64 coefficients) are unaffected.

    Holds `net` as given (a DDP wrapper or a compiled module) so the caller keeps its own
    handle on the weights."""

    def __init__(self, net, precision, channels_last, cuda_graphs=False):
        super().__init__()
        self.net = net
        self.precision = precision
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs

    def forward(self, x, t, y=None):
        if self.cuda_graphs:
            # Each call is a new replay: the previous call's output has been consumed
            # (loss, backward or sampler update) before the next call.
            torch.compiler.cudagraph_mark_step_begin()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=AUTOCAST.get(self.precision, torch.float32),
                            enabled=self.precision in AUTOCAST):
            out = self.net(x, t) if y is None else self.net(x, t, y)
        return out.float().contiguous()


def to_layout(net, path):
    """Weights in the memory layout of a FastPath; call before wrapping in DDP or copying."""
    return net.to(memory_format=torch.channels_last) if path.channels_last else net


def wrap(net, path):
    """net (a UNet, or its DDP wrapper) compiled and run under autocast, as the FastPath says."""
    if path.compile:
        mode = "reduce-overhead" if path.cuda_graphs else "default"
        net = torch.compile(net, mode=mode, dynamic=False)
    return FastModel(net, path.precision, path.channels_last, path.cuda_graphs)


def adam(params, lr, path):
    return torch.optim.Adam(params, lr=lr, fused=True) if path.fused_adam else torch.optim.Adam(params, lr=lr)
