"""Process groups for DistributedDataParallel: started here by torch.multiprocessing
(--nprocs) or from outside by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
import datetime
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(minutes=30)  # long enough for rank 0 to draw a sample grid


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank():
    return int(os.environ.get("RANK", 0))


def env_world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_initialized() else 0


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def is_main():
    return rank() == 0


def local_device(device):
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup(rank, world_size, device):
    if device == "cuda":
        torch.cuda.set_device(local_device(device))
    if world_size > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank,
                                world_size=world_size, timeout=TIMEOUT,
                                device_id=local_device(device) if device == "cuda" else None)


def cleanup():
    if is_initialized():
        dist.destroy_process_group()


def barrier():
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor):
    if is_initialized():
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_sum(tensor):
    if is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag, device):
    """True on every rank when `flag` is true on any rank (a stop request, say)."""
    if not is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj):
    """A list with every rank's obj, on every rank."""
    if not is_initialized():
        return [obj]
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _child(rank, fn, world_size, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    fn(rank, world_size, *args)


def spawn(fn, nprocs, *args):
    """Run fn(rank, nprocs, *args) in nprocs processes; the first failure ends them all."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # Ctrl-C reaches every process of the terminal: the workers checkpoint and stop, and
    # the parent waits for them instead of dying first. SIGTERM sent to the parent alone
    # (a scheduler's preemption) is passed on to the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = mp.start_processes(_child, args=(fn, nprocs, args), nprocs=nprocs, join=False,
                                 start_method="spawn")

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as error:
        sys.exit(f"error: worker process {error.error_index} exited with code {error.exit_code}; "
                 "the other workers were stopped")
