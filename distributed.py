"""Process groups for DistributedDataParallel: started here by torch.multiprocessing
(--nprocs) or from outside by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
import ctypes
import datetime
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from errors import UserError

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


def local_device(device_type):
    """This process's torch.device for a device type ("cuda": the GPU of its LOCAL_RANK)."""
    if device_type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup(rank, world_size, device_type):
    if device_type == "cuda":
        torch.cuda.set_device(local_device(device_type))
    if world_size > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, timeout=TIMEOUT,
                                device_id=local_device(device_type) if device_type == "cuda" else None)


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


def max_over_ranks(number, device):
    """The largest of every rank's integer, on every rank (a stop signal's number, say)."""
    if not is_initialized():
        return number
    value = torch.tensor([number], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


class PeerLost(UserError, RuntimeError):
    """A collective failed because another process of the job went away."""


# How Gloo and NCCL report a peer whose connection closed (its process or node died)
PEER_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "remote process exited")


def peer_lost(error):
    """A one-line PeerLost for an error that says another process went away, else None."""
    text = str(error)
    sign = next((sign for sign in PEER_LOST_SIGNS if sign in text), None)
    if not is_initialized() or (sign is None and not isinstance(error, dist.DistNetworkError)):
        return None
    return PeerLost(f"rank {rank()} of {world_size()} lost contact with another process of the job "
                    f"({sign or type(error).__name__}): a process or node stopped, its own log says "
                    "why; continue from the last checkpoint with --resume")


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


PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # main.py's exit on a stop signal


def die_with_parent(parent):
    """End this process when `parent` dies, however it dies (kill -9 included): orphaned
    workers would otherwise hold their GPUs until someone noticed. On Linux the kernel
    sends SIGKILL (prctl PR_SET_PDEATHSIG); everywhere a thread checks every second that
    the parent is still ours, which also covers a parent that died before the prctl call.
    SIGKILL rather than a stop request (torch's spawn asks for SIGINT, replaced here):
    checkpoints are written atomically, so nothing is lost but the steps since the last one,
    and a stop request would wait for the next log step."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl: not Linux
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _child(rank, fn, world_size, args, parent):
    die_with_parent(parent)
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
    context = mp.start_processes(_child, args=(fn, nprocs, args, os.getpid()), nprocs=nprocs,
                                 join=False, start_method="spawn")

    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as error:
        if error.exit_code in STOP_EXIT_CODES:  # stopped by a signal, and rank 0 said so
            sys.exit(error.exit_code)
        sys.exit(f"error: worker process {error.error_index} exited with code {error.exit_code}; "
                 "the other workers were stopped")
