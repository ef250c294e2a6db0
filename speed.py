"""The fast GPU path: bf16 autocast, channels_last, torch.compile (with CUDA graphs),
fused Adam and the dataset held on the GPU. Each is a flag; left unset, a flag is on for
CUDA and off for the CPU, where fp32 eager is the reference path."""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FastPath:
    """The fast path's choices, each resolved to on or off for one device."""
    bf16: bool
    channels_last: bool
    compile: bool
    cuda_graphs: bool
    fused_adam: bool
    data_on_device: bool


def resolve(fast, device_type, world_size=1):
    """A FastPathConfig's settings with unset (None) resolved for this device: on for CUDA."""
    cuda = device_type == "cuda"

    def pick(value):
        return cuda if value is None else value

    compile_ = pick(fast.compile)
    return FastPath(
        bf16=(fast.precision or ("bf16" if cuda else "fp32")) == "bf16",
        channels_last=pick(fast.channels_last),
        compile=compile_,
        # CUDA graphs replay the whole step without Python; DDP's gradient hooks would
        # break the graph, so they are for one process.
        cuda_graphs=compile_ and cuda and world_size == 1 and pick(fast.cuda_graphs),
        fused_adam=cuda and pick(fast.fused_adam),
        data_on_device=pick(fast.data_on_device),
    )


class FastModel(nn.Module):
    """Calls net under bf16 autocast and in channels_last layout; returns float32.

    Holds `net` as given (a DDP wrapper or a compiled module) so the caller keeps its own
    handle on the weights."""

    def __init__(self, net, bf16, channels_last, cuda_graphs=False):
        super().__init__()
        self.net = net
        self.bf16 = bf16
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs

    def forward(self, x, t, y=None):
        if self.cuda_graphs:
            # Each call is a new replay: the previous call's output has been consumed
            # (loss, backward or sampler update) before the next call.
            torch.compiler.cudagraph_mark_step_begin()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
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
    return FastModel(net, path.bf16, path.channels_last, path.cuda_graphs)


def adam(params, lr, path):
    return torch.optim.Adam(params, lr=lr, fused=True) if path.fused_adam else torch.optim.Adam(params, lr=lr)
