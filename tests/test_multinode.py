"""torchrun across two nodes, for real: two torchrun agents on this machine, each a node of one
process, meet at a c10d rendezvous on 127.0.0.1 and train the tiny digits model over Gloo."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import distributed
from test_main import ROOT, TINY, assert_same_updates, weights

pytestmark = pytest.mark.slow


def start_nodes(*args):
    """The README's multi-node command, one node per agent: [agent process] * 2."""
    endpoint = f"127.0.0.1:{distributed.free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
               os.path.join(ROOT, "main.py"), *TINY, "--device", "cpu", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]


def finish(nodes, timeout=600):
    """Both agents' (exit status, stderr), after each has ended."""
    results = [node.communicate(timeout=timeout) for node in nodes]
    return [(node.returncode, stderr) for node, (_, stderr) in zip(nodes, results)]


def start_one_process(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *TINY, "--device", "cpu", *args],
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
            time.sleep(0.2)  # the TensorBoard file appears just before the first step
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
