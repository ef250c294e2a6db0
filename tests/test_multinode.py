"""torchrun across two nodes, for real: two torchrun agents on this machine, each a node of one
process, meet at a c10d rendezvous on 127.0.0.1 and train the tiny digits model over Gloo. And
the start-up of such a job: a node that fails ends the other, a process that waits for a peer
ends at once on a stop signal or at its deadline."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import distributed
from conftest import ROOT, TINY_ARGS, assert_same_updates, weights

pytestmark = pytest.mark.slow


def start_nodes(*args, node_args=((), ())):
    """The README's multi-node command, one node per agent: [agent process] * 2; node_args: each
    node's own extra arguments."""
    endpoint = f"127.0.0.1:{distributed.free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
               os.path.join(ROOT, "main.py"), *TINY_ARGS, "--device", "cpu", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen(command + list(own), cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for own in node_args]


def finish(nodes, timeout=600):
    """Both agents' (exit status, stderr), after each has ended."""
    results = [node.communicate(timeout=timeout) for node in nodes]
    return [(node.returncode, stderr) for node, (_, stderr) in zip(nodes, results)]


def start_one_process(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *TINY_ARGS, "--device", "cpu", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_scores(logdir):
    return json.loads(open(os.path.join(logdir, "eval.txt")).read().splitlines()[-1])


def test_two_nodes_train_and_evaluate_as_one_process(tmp_path):
    common = ["--train", "--total_steps", "3", "--dropout", "0", "--save_step", "100", "--sample_step", "0"]
    evaluation = ["--eval", "--num_images", "20", "--eval_batch_size", "8"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    nodes = start_nodes(*common, *evaluation, "--logdir", two)
    single = start_one_process(*common, "--logdir", one)
    for status, stderr in finish(nodes) + finish([single]):
        assert status == 0, stderr[-3000:]
    assert len(weights(two)["rng"]) == 2  # two processes trained it
    assert_same_updates(weights(one), weights(two))
    # the two nodes' checkpoint evaluated by one process: the same samples, the same scores
    copy = str(tmp_path / "copy")
    shutil.copytree(two, copy)
    os.remove(os.path.join(copy, "eval.txt"))
    single = start_one_process("--flagfile", os.path.join(copy, "flagfile.txt"), "--notrain", *evaluation,
                               "--logdir", copy)
    status, stderr = finish([single])[0]
    assert status == 0, stderr[-3000:]
    assert last_scores(two)["FID"] == pytest.approx(last_scores(copy)["FID"], rel=1e-6)
    assert last_scores(two)["IS"] == pytest.approx(last_scores(copy)["IS"], rel=1e-6)


def processes_with(marker):
    """Ids of the processes whose command line contains marker."""
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as file:
                if marker.encode() in file.read():
                    found.append(int(path.split("/")[2]))
        except OSError:  # ended meanwhile
            pass
    return found


def test_a_dead_node_ends_the_other_at_once(tmp_path):
    logdir = str(tmp_path / "run")
    nodes = start_nodes("--train", "--logdir", logdir, "--total_steps", "100000", "--save_step", "100000",
                        "--sample_step", "0")
    try:
        deadline = time.time() + 120
        while not glob.glob(os.path.join(logdir, "events.out.tfevents.*")) and time.time() < deadline:
            time.sleep(0.2)  # the TensorBoard file appears with the first step
        time.sleep(2)
        assert all(node.poll() is None for node in nodes), "training ended before the kill"
        nodes[0].send_signal(signal.SIGKILL)  # the node that hosts the rendezvous, if either
        killed_at = time.time()
        # no hang until the 30-minute collective timeout: the other node ends within seconds
        status, stderr = finish(nodes[1:], timeout=60)[0]
        assert time.time() - killed_at < 30
        assert status != 0
        assert "error: rank 0 of 2 lost contact" in stderr or "error: rank 1 of 2 lost contact" in stderr, \
            stderr[-3000:]
    finally:
        for pid in processes_with(logdir):  # only what this test started: its logdir is unique
            os.kill(pid, signal.SIGKILL)
        for node in nodes:
            node.wait(timeout=60)


# ---------------------------------------------------------------- start-up


def kill_what_was_started(marker, processes):
    for pid in processes_with(marker):  # only what the test started: its logdir is unique
        os.kill(pid, signal.SIGKILL)
    for process in processes:
        process.wait(timeout=60)


def end_times(nodes, started, limit_s=120):
    """{node's index: when its agent ended}, for those that ended within limit_s of started."""
    ended = {}
    while len(ended) < len(nodes) and time.time() - started < limit_s:
        for i, node in enumerate(nodes):
            if i not in ended and node.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.1)
    return ended


def test_a_node_that_fails_at_start_up_ends_the_other(tmp_path):
    """Without the start-up exchange the healthy node would wait in init_process_group for the
    other until the 30-minute timeout. Each node names its own --data_root, which may differ."""
    logdir, missing, images = str(tmp_path / "run"), str(tmp_path / "no_such_folder"), tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "0.png")
    nodes = start_nodes("--train", "--logdir", logdir, "--total_steps", "2", "--sample_step", "0",
                        "--dataset", "folder",
                        node_args=(("--data_root", str(images)), ("--data_root", missing)))
    started = time.time()
    try:
        ended = end_times(nodes, started)
        healthy, failing = finish(nodes, timeout=1)
    finally:
        kill_what_was_started(logdir, nodes)
    print(f"agents ended {ended[1] - started:.1f} s (failing), {ended[0] - started:.1f} s (healthy) after start")
    assert abs(ended[0] - ended[1]) < 60
    cause = f"folder: data_root {missing} is not a folder of images"
    assert failing[0] != 0 and f"error: {cause}" in failing[1], failing[1][-3000:]
    assert healthy[0] != 0
    errors = [line for line in healthy[1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(rf"error: rank [01] failed at start-up: {re.escape(cause)}",
                                             errors[0]), healthy[1][-3000:]
    assert not os.path.exists(logdir)  # rank 0 took back what its start-up made, on either node


def test_nodes_started_with_different_flags_end_before_anything_is_written(tmp_path):
    """Without the comparison another --seed trains apart under rank 0's flagfile.txt, and
    another --T ends in a Gloo collective mismatch. The logdir is there already, so that a
    rank 0 that wrote before every rank agreed would leave its lock file (take_back removes
    the logdir only where it made it)."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    nodes = start_nodes("--train", "--logdir", str(logdir), "--total_steps", "2", "--sample_step", "0",
                        node_args=((), ("--noscore", "--T", "30", "--seed", "1")))
    started = time.time()
    try:
        ended = end_times(nodes, started)
        results = finish(nodes, timeout=1)
    finally:
        kill_what_was_started(str(logdir), nodes)
    print(f"agents ended {ended[0] - started:.1f} s and {ended[1] - started:.1f} s after start")
    assert abs(ended[0] - ended[1]) < 30
    # the rendezvous decides which node is rank 0; rank 1 compares, in --help order
    plain, other = ("true", "20", "0"), ("false", "30", "1")

    def cause(first, second):
        return ("the processes of this job were started with different flags: "
                + "; ".join(f"--{name} {a} on rank 0, {b} on rank 1"
                            for name, a, b in zip(("score", "T", "seed"), first, second))
                + ": start every node with the same command")

    lines = []
    for status, stderr in results:
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert status != 0 and len(errors) == 1, stderr[-3000:]
        # torchrun's agent reports its worker's exit with a traceback of its own, in torch
        assert f'File "{ROOT}' not in stderr and "Fatal Python error" not in stderr, stderr[-3000:]
        lines += errors
    assert sorted(lines) in (sorted([f"error: {cause(first, second)}",
                                     f"error: rank 1 failed at start-up: {cause(first, second)}"])
                             for first, second in ((plain, other), (other, plain))), lines
    assert os.listdir(logdir) == []


def start_alone(rank, logdir, timeout_s=None):
    """main.py as rank `rank` of a job of 2 whose other process never comes; it announces its
    wait at once; timeout_s: its start-up deadline (distributed.START_TIMEOUT), patched in."""
    patch = "import datetime, distributed; distributed.NOTE_AFTER_S = 0" + (
        f"; distributed.START_TIMEOUT = datetime.timedelta(seconds={timeout_s})" if timeout_s else "")
    launch = f"import runpy, sys\n{patch}\nsys.argv = sys.argv[1:]\nrunpy.run_path('main.py', run_name='__main__')"
    environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(distributed.free_port()), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", launch, "main.py", *TINY_ARGS, "--device", "cpu", "--train",
                             "--logdir", logdir], cwd=ROOT, env=environment, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("rank,signum", [(0, signal.SIGINT), (1, signal.SIGTERM)],
                         ids=["rank0_SIGINT_waiting_for_rank1", "rank1_SIGTERM_waiting_for_the_store"])
def test_a_stop_signal_ends_a_process_that_waits_for_a_peer(tmp_path, rank, signum):
    """Rank 0 waits for rank 1's start-up checks, rank 1 for rank 0's store: both in Python, so
    the signal is answered at once, and rank 0 takes back the logdir its start-up made."""
    logdir = str(tmp_path / "run")
    process = start_alone(rank, logdir)
    try:
        line = process.stderr.readline()
        while line and "note: rank" not in line:
            line = process.stderr.readline()
        assert f"note: rank {rank} of 2 waits for " in line
        process.send_signal(signum)
        sent = time.time()
        stderr = process.communicate(timeout=30)[1]
        took = time.time() - sent
    finally:
        kill_what_was_started(logdir, [process])
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert took < 10, took  # the line comes at once; the rest is the interpreter ending (1-5 s here)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: stopped by {signal.Signals(signum).name} before the command finished"], stderr
    assert "Traceback" not in stderr and not os.path.exists(logdir)


@pytest.mark.parametrize("rank,message", [
    (0, "error: rank 1 never reached the job's store at start-up (2 s without a sign of life)"),
    (1, "error: rank 1 of 2 could not reach the job's store at 127.0.0.1:"),
], ids=["rank0_waiting_for_rank1", "rank1_waiting_for_the_store"])
def test_start_up_gives_up_on_a_peer_that_never_comes(tmp_path, rank, message):
    """Rank 0 gives up on a rank whose heartbeat never starts, rank 1 on a store that never
    opens: each after its deadline (2 s here), with one line, and rank 0 takes back its logdir."""
    logdir = str(tmp_path / "run")
    process = start_alone(rank, logdir, timeout_s=2)
    try:
        stderr = process.communicate(timeout=40)[1]
    finally:
        kill_what_was_started(logdir, [process])
    assert process.returncode == 1 and message in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and not os.path.exists(logdir)
