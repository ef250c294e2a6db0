"""Process groups for DistributedDataParallel: started here by torch.multiprocessing
(--nprocs) or from outside by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

The processes of a job meet at its store (a TCPStore at MASTER_ADDR:MASTER_PORT) before they
form the process group. Under torchrun each process runs its own start-up checks (the first:
its configuration is rank 0's, `JobStart.agree`), and they agree through the store (`starting_together`) before any of them waits in a collective: one
that fails or is stopped ends the others within seconds, one that never comes or goes silent
after START_TIMEOUT, each naming it in one line. Every wait of the start-up polls in Python,
so a stop signal is answered at once.
"""
import contextlib
import ctypes
import datetime
import json
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
# start-up only: to reach the job's store, to form the process group, and the longest a process
# may stay silent while the others wait for its checks (a heartbeat says it is alive)
START_TIMEOUT = datetime.timedelta(seconds=60)
POLL_S = 0.2  # between looks at the store while waiting: stop signals are answered in between
BEAT_S = 1.0
NOTE_AFTER_S = 5.0  # a wait longer than this is announced once
_store = None  # the job's store once this process has reached it; the process group forms on it


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
    """This process's device, and the process group on the job's store (reached here unless
    the start-up already did). Forming it may take START_TIMEOUT; collectives get TIMEOUT."""
    if device_type == "cuda":
        torch.cuda.set_device(local_device(device_type))
    if world_size > 1:
        store = _store if _store is not None else connect(*store_address(), rank, world_size)
        try:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=world_size, timeout=START_TIMEOUT,
                                    device_id=local_device(device_type) if device_type == "cuda" else None)
        except RuntimeError as error:  # a process that went away since the start-up checks
            raise StartFailed(f"rank {rank} of {world_size}: the process group did not form "
                              f"({str(error).splitlines()[0]}): another process stopped; its own log "
                              "says why") from None
        dist.set_timeout(TIMEOUT)
        store.set_timeout(TIMEOUT)


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


def all_gather_cat(tensor):
    """Every rank's 1-D tensor (all of one length), concatenated in rank order, on every rank."""
    if not is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


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


class StartFailed(UserError):
    """A process of the job failed at start-up, stopped answering, or could not be reached."""


def store_address():
    """(host, port) of the job's store, from MASTER_ADDR and MASTER_PORT."""
    try:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise StartFailed("RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT (a port number) "
                          "are not: start the processes with torchrun, or with --nprocs") from None


def reachable(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for(ready, note):
    """ready()'s first answer that is not None, asked every POLL_S seconds in Python, so that a
    stop signal is answered in between; the note is printed once if that takes long."""
    since, noted = time.monotonic(), False
    while (answer := ready()) is None:
        if not noted and time.monotonic() - since > NOTE_AFTER_S:
            print(f"note: {note}", file=sys.stderr, flush=True)
            noted = True
        time.sleep(POLL_S)
    return answer


def connect(host, port, rank, world_size):
    """The job's store: rank 0 hosts it, unless torchrun's agent does. The others wait for it
    in Python (a bare TCP probe, then the store's handshake, which would block signals and
    log each failed try) and give up after START_TIMEOUT."""
    seconds = int(START_TIMEOUT.total_seconds())
    try:
        if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return dist.TCPStore(host, port, world_size, is_master=True, timeout=START_TIMEOUT,
                                 wait_for_workers=False, multi_tenant=True)
        deadline = time.monotonic() + seconds

        def ready():
            if reachable(host, port):
                return True
            if time.monotonic() > deadline:
                raise StartFailed(f"rank {rank} of {world_size} could not reach the job's store at {host}:{port} "
                                  f"within {seconds} s: rank 0 (or its torchrun agent) did not start, or "
                                  "stopped; its own log says why")
            return None

        wait_for(ready, f"rank {rank} of {world_size} waits for the job's store at {host}:{port} (rank 0 or "
                        f"its torchrun agent hosts it; gives up after {seconds} s)")
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=START_TIMEOUT)
    except dist.DistError as error:
        raise StartFailed(f"rank {rank} of {world_size}: the job's store at {host}:{port}: "
                          f"{str(error).splitlines()[0]}") from None


class JobStart:
    """This process's part in the start of a torchrun job, through keys of the job's store:
    beat/R (rank R's heartbeat count), flags (rank 0's configuration), agreed (how many others
    found theirs the same), passed (how many passed their checks), failed (the first failure's
    line), seen (how many have read it). Rank 0 watches every heartbeat and posts a silent rank
    as the failure; the others watch rank 0's."""

    def __init__(self, rank, world_size):
        global _store
        self.rank, self.world_size = rank, world_size
        self.host, self.port = store_address()
        _store = connect(self.host, self.port, rank, world_size)
        # torchrun's restarts reuse its agent's store: each attempt keeps to its own keys
        self.prefix = f"ddpm-start-up/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = dist.PrefixStore(self.prefix, _store)
        self.heard, self.given_up = {}, set()  # rank -> (beat count, when it changed); ranks posted silent
        self.has_read = False
        self.done = threading.Event()
        threading.Thread(target=self.beat, name="start-up-heartbeat", daemon=True).start()

    def beat(self):
        """Count up every BEAT_S seconds, on a connection of its own: the main thread may spend
        minutes in its checks (listing a large dataset) without a word to the store."""
        try:
            store = dist.PrefixStore(self.prefix, dist.TCPStore(self.host, self.port, is_master=False,
                                                                timeout=START_TIMEOUT))
            while not self.done.is_set():
                store.add(f"beat/{self.rank}", 1)
                self.done.wait(BEAT_S)
        except dist.DistError:  # the store went away: the main thread finds that out itself
            pass

    def silent(self, ranks):
        """The ranks among these whose heartbeat has not moved for START_TIMEOUT, counted from
        this process's first look: one that never came is as silent as one that died."""
        now, limit = time.monotonic(), START_TIMEOUT.total_seconds()
        for rank in ranks:
            count = self.store.add(f"beat/{rank}", 0)
            if self.heard.get(rank, (None,))[0] != count:
                self.heard[rank] = (count, now)
        return [rank for rank in ranks if now - self.heard[rank][1] > limit]

    def silence(self):
        """The line for a silent rank, or None: rank 0 posts it as the job's failure and counts
        the silent ranks as having read it; the others end when rank 0 itself is silent."""
        lost = [rank for rank in self.silent(range(1, self.world_size) if self.rank == 0 else [0])
                if rank not in self.given_up]
        if not lost:
            return None
        what = "never reached the job's store" if self.heard[lost[0]][0] == 0 else "stopped answering"
        line = (f"rank {lost[0]} {what} at start-up ({int(START_TIMEOUT.total_seconds())} s without a sign "
                "of life): it failed before it could say why, was killed, or its node is down; its own log "
                "says why")
        if self.rank == 0:
            self.given_up.update(lost)
            self.store.add("seen", len(lost))
            self.store.compare_set("failed", "", line)
        return line

    def wait(self, ready, note):
        """wait_for(ready), where a lost store is StartFailed."""
        try:
            return wait_for(ready, f"rank {self.rank} of {self.world_size} {note}")
        except dist.DistError:
            raise StartFailed(f"rank {self.rank} of {self.world_size} lost the job's store at {self.host}:"
                              f"{self.port} at start-up: the process that hosts it (rank 0 or its torchrun "
                              "agent) stopped; its own log says why") from None

    def outcome(self, done):
        """The first failure's line, "" once done(), None while undecided."""
        if self.store.check(["failed"]):
            return self.store.get("failed").decode()
        if done():
            return ""
        return self.silence()

    def until(self, done, note):
        """Wait until done(); StartFailed, once read, for a failure (a silent rank's) first."""
        failure = self.wait(lambda: self.outcome(done), f"{note} (gives up on one silent for "
                                                        f"{int(START_TIMEOUT.total_seconds())} s)")
        if failure:
            self.read(stay=True)
            raise StartFailed(failure)

    def agree(self, values):
        """This process was started with rank 0's configuration, values ({flag name: value},
        JSON-able): rank 0 posts its own and returns once every other rank has found its the
        same, so that nothing is written for a job that will not run; a rank whose values
        differ raises FlagsDiffer, which starting_together posts as its failure."""
        mine = json.loads(json.dumps(values))  # as rank 0's arrive: tuples as lists
        if self.rank == 0:
            self.store.set("flags", json.dumps(mine))
            self.until(lambda: self.store.add("agreed", 0) >= self.world_size - 1,
                       "waits for the other processes of the job to compare their flags with its own")
            return
        self.until(lambda: self.store.check(["flags"]), "waits for rank 0's flags")
        line = differences(json.loads(self.store.get("flags")), mine, self.rank)
        if line:
            raise FlagsDiffer(line)
        self.store.add("agreed", 1)

    def passed(self):
        """This process passed its checks: wait for the others'; StartFailed names the first
        rank that failed."""
        self.store.add("passed", 1)
        self.until(lambda: self.store.add("passed", 0) >= self.world_size,
                   "waits for the other processes of the job to finish their start-up checks")
        self.done.set()

    def failed(self, line, stay):
        """This process failed its start-up: post its line, unless a failure came first; stay:
        until every rank has read it."""
        self.store.compare_set("failed", "", f"rank {self.rank} failed at start-up: {line}")
        self.read(stay)

    def read(self, stay):
        """This process has read the failure; stay: until every rank has, since the store may
        end with this process (rank 0's, or its torchrun agent's, which ends with its workers)."""
        if not self.has_read:
            self.has_read = True
            self.store.add("seen", 1)
        if stay:
            self.wait(self.all_read, "waits until the other processes of the job have read that the "
                                     "start-up failed")

    def all_read(self):
        """True once every rank has read the failure (rank 0 counts silent ones in), or, on
        the other ranks, once rank 0 is silent; else None."""
        if self.store.add("seen", 0) >= self.world_size:
            return True
        return True if self.silence() is not None and self.rank != 0 else None


class FlagsDiffer(UserError):
    """The processes of a job were started with different configurations."""


SHOWN_DIFFERENCES = 5  # flags named in the line; the rest are counted


def shown(value):
    """A configuration value as a flag's value reads."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(empty)"
    return str(value) if value != "" else "(empty)"


def differences(first, mine, rank):
    """The line naming the flags whose values differ between rank 0's and this rank's, in
    rank 0's order, or "". Compared as JSON, so that a NaN equals itself; a flag only one of
    them knows (another version of the program) differs too."""
    missing = "(no such flag)"
    names = list(first) + [name for name in mine if name not in first]
    differ = [f"--{name} {shown(first.get(name, missing))} on rank 0, {shown(mine.get(name, missing))} "
              f"on rank {rank}" for name in names
              if name not in first or name not in mine or json.dumps(first[name]) != json.dumps(mine[name])]
    if not differ:
        return ""
    more = len(differ) - SHOWN_DIFFERENCES
    return (f"the processes of this job were started with different flags: "
            f"{'; '.join(differ[:SHOWN_DIFFERENCES])}{f'; and {more} more' if more > 0 else ''}: "
            "start every node with the same command")


@contextlib.contextmanager
def starting_together(one_line):
    """Around the start-up checks of a process of a torchrun job: it reaches the job's store
    (within START_TIMEOUT), runs its checks, and leaves only once every process has passed
    theirs. Yields the JobStart, whose agree() the checks call first, or None outside such a
    job. A failure here (one_line(error): its line) is posted for the others before it goes
    on; a failure elsewhere is StartFailed here. Outside such a job: the checks alone."""
    if not launched_by_torchrun() or env_world_size() == 1:
        yield None
        return
    job = JobStart(env_rank(), env_world_size())
    try:
        yield job
        job.passed()
    except StartFailed:
        raise
    except BaseException as error:
        # an error stays until the others have read it (the store may end with this process);
        # a stop signal, while checking or waiting, ends this process at once
        with contextlib.suppress(UserError, dist.DistError):  # the error itself is what matters
            job.failed(one_line(error), stay=isinstance(error, Exception))
        raise


def report_start_failure(line):
    """A failure before the start-up checks (the flags) told to the job's other processes,
    as well as can be: no-op outside a torchrun job."""
    if launched_by_torchrun() and env_world_size() > 1:
        with contextlib.suppress(UserError, dist.DistError):
            JobStart(env_rank(), env_world_size()).failed(line, stay=True)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)  # main.py's exit on a stop signal


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
    signal.signal(signal.SIGHUP, forward)  # a closed terminal: the workers checkpoint first, as for SIGTERM
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as error:
        if error.exit_code in STOP_EXIT_CODES:  # stopped by a signal, and rank 0 said so
            sys.exit(error.exit_code)
        sys.exit(f"error: worker process {error.error_index} exited with code {error.exit_code}; "
                 "the other workers were stopped")


def my_block(count):
    """This process's contiguous share [first, last) of count items."""
    return count * rank() // world_size(), count * (rank() + 1) // world_size()
