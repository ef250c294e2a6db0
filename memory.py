"""What a run needs in memory, estimated before anything is built, so that a configuration that
cannot fit (a typo in --ch, --T or --img_size) is one line with the bytes it needs instead of
an allocator's traceback minutes later.

Every estimate is a lower bound: what the run surely holds at once (the network's tensors and
its optimizer's, one layer's activations, the schedule, the scores' features), never the
peak. A run refused here cannot run on this machine; a run let through may still need more.
The network is counted on the meta device: shapes only, no memory, however large.
"""
import torch

import builders
import datasets
from errors import UserError
from files import readable
from score.scorer import default_feature

# The schedule's float64 buffers (13 in GaussianDiffusion), the temporaries that make them,
# and a sampler's kept timesteps as a Python list (36 bytes an item): per diffusion step, for
# the sampler and the loss that a configuration builds to check itself, two at a time.
SCHEDULE_BYTES_PER_STEP = 2 * (13 * 8 + 8 * 8 + 36)
# Training keeps, beside the network's weights, the EMA copy, the gradients and Adam's two moments.
TRAINING_COPIES = 5
# Features and logits per image of each feature network (pool3 and the 1,008 logits of the
# FID Inception; the digits classifier's 64 features and 10 classes), held in float64 to score.
SCORED_WIDTHS = {"inception": 2048 + 1008, "digits": 64 + 10}


class OutOfMemory(UserError, MemoryError):
    """A configuration that needs more memory than the device has."""


def host_memory():
    """Bytes of host memory available now."""
    return datasets.free_memory(torch.device("cpu"))


def device_memory(device_type):
    """Bytes the run's device can hold: the host's available memory, or a GPU's total memory
    (read without creating a CUDA context in this process, which only starts the others)."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return host_memory()


def schedule_bytes(T):
    return T * SCHEDULE_BYTES_PER_STEP


def check_schedule(T):
    """Before the configuration builds its schedule (in host memory, float64)."""
    needed, available = schedule_bytes(T), host_memory()
    if needed > available:
        raise OutOfMemory(f"--T {T:,} needs at least {readable(needed)} for the schedule alone, and "
                          f"{readable(available)} of memory are available: the paper's T is 1,000")


def network_bytes(model, diffusion):
    """Bytes of the network's weights and buffers (the timestep table's T rows included),
    counted on the meta device."""
    with torch.device("meta"):
        net = builders.build_model(model, diffusion)
    return sum(tensor.numel() * tensor.element_size() for tensor in net.state_dict().values())


def activation_bytes(model, batch):
    """One feature map of the first level for a batch, float32: what every layer there holds."""
    return batch * model.ch * model.ch_mult[0] * model.img_size ** 2 * 4


def needed(config, world_size):
    """[(bytes, what)] that one process of the run surely holds at once, for training and for
    sampling and scoring (which come one after the other)."""
    actions, training, scoring = config.actions, config.training, config.eval
    try:
        weights = network_bytes(config.model, config.diffusion)
    except (RuntimeError, OverflowError) as error:  # sizes past what a tensor can describe
        raise OutOfMemory(f"the network of --ch {config.model.ch}, --ch_mult "
                          f"{','.join(map(str, config.model.ch_mult))} is too large to build "
                          f"({str(error).splitlines()[0]})") from None
    shape = (f"a UNet of --ch {config.model.ch} --ch_mult {','.join(map(str, config.model.ch_mult))} at "
             f"--img_size {config.model.img_size}, --T {config.diffusion.T:,}")
    parts = []
    if actions.train:
        micro_batch = training.batch_size // (world_size * training.accum_steps)
        parts.append((TRAINING_COPIES * weights + 2 * activation_bytes(config.model, micro_batch),
                      f"training {shape} on micro-batches of {micro_batch:,}"))
    if actions.eval or actions.inspecting or (actions.train and (training.sample_step or scoring.eval_step)):
        # guidance asks the network for both branches of a batch at once
        guided = config.model.num_classes and config.sampling.guidance_scale != 1.0
        sampling = weights + 2 * activation_bytes(config.model, scoring.eval_batch_size * (2 if guided else 1))
        what = f"sampling {shape} in batches of {scoring.eval_batch_size:,}"
        if actions.eval and actions.score and not actions.eval_dir:
            feature = scoring.fid_feature or default_feature(config.data.dataset)
            sampling += scoring.num_images * SCORED_WIDTHS[feature] * 8
            what += f" and scoring --num_images {scoring.num_images:,}"
        parts.append((sampling, what))
    return parts


def check(config, world_size, device_type):
    """One line unless the largest part of the run fits in the device's memory."""
    parts = needed(config, world_size)
    if not parts:
        return
    size, what = max(parts)
    available = device_memory(device_type)
    if size > available:
        raise OutOfMemory(f"{what} needs at least {readable(size)} per process, and this "
                          f"{'GPU' if device_type == 'cuda' else 'machine'} has {readable(available)}; "
                          "nothing was written")
