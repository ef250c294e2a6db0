"""The fast GPU path: bf16 autocast, channels_last, torch.compile (with CUDA graphs),
fused Adam and the dataset held on the GPU. Each is a flag; left unset, a flag is on for
CUDA and off for the CPU, where fp32 eager is the reference path."""
import types

import torch
from torch import nn


def settings(flags, device_type, world_size=1):
    """The speed flags with 'auto' (None) resolved for this device."""
    cuda = device_type == "cuda"

    def pick(value):
        return cuda if value is None else value

    compile_ = pick(flags.compile)
    return types.SimpleNamespace(
        bf16=(flags.precision or ("bf16" if cuda else "fp32")) == "bf16",
        channels_last=pick(flags.channels_last),
        compile=compile_,
        # CUDA graphs replay the whole step without Python; DDP's gradient hooks would
        # break the graph, so they are for one process.
        cuda_graphs=compile_ and cuda and world_size == 1 and pick(flags.cuda_graphs),
        fused_adam=cuda and pick(flags.fused_adam),
        data_on_device=pick(flags.data_on_device),
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

    def forward(self, x, t):
        if self.cuda_graphs:
            # Each call is a new replay: the previous call's output has been consumed
            # (loss, backward or sampler update) before the next call.
            torch.compiler.cudagraph_mark_step_begin()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x, t)
        return out.float().contiguous()


def to_layout(net, speed):
    """Weights in the layout the fast path wants; call before wrapping in DDP or copying."""
    return net.to(memory_format=torch.channels_last) if speed.channels_last else net


def fast(net, speed):
    """net (a UNet, or its DDP wrapper) compiled and run under autocast."""
    if speed.compile:
        mode = "reduce-overhead" if speed.cuda_graphs else "default"
        net = torch.compile(net, mode=mode, dynamic=False)
    return FastModel(net, speed.bf16, speed.channels_last, speed.cuda_graphs)


def adam(params, lr, speed):
    return torch.optim.Adam(params, lr=lr, fused=True) if speed.fused_adam else torch.optim.Adam(params, lr=lr)
