"""main.py end to end on the digits data with a tiny model: its command run in this process
(conftest.run_main), and in processes of its own where the process is the subject (signals,
exit status, --nprocs, --help)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import distributed
from conftest import (ROOT, TINY_ARGS, assert_same_updates, assert_same_weights, net_differences, run_main,
                      run_main_process, weights)

pytestmark = pytest.mark.slow  # every test runs main.py's command (a few seconds each on 2 cores)


def test_train_then_eval_from_the_saved_flagfile(tmp_path):
    logdir = str(tmp_path / "run")
    os.makedirs(logdir)
    with open(os.path.join(logdir, "flagfile.txt"), "w") as stale:  # a run that died early
        stale.write("--ch_mult=1\n--ch_mult=2\n--ch=999\n")
    run_main("--train", "--logdir", logdir, "--total_steps", "4", "--sample_step", "2",
             "--save_step", "2")
    saved = open(os.path.join(logdir, "flagfile.txt")).read().splitlines()
    assert "--ch=32" in saved and "--ch=999" not in saved
    assert [line for line in saved if line.startswith("--ch_mult")] == ["--ch_mult=1", "--ch_mult=2"]
    for name in ("ckpt.pt", "flagfile.txt", os.path.join("sample", "2.png"), os.path.join("sample", "4.png")):
        assert os.path.exists(os.path.join(logdir, name)), name
    assert glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    state = weights(logdir)
    assert state["step"] == 4 and {"net_model", "ema_model", "optim", "sched", "x_T", "rng"} <= set(state)
    # the saved flagfile alone reproduces the configuration, in one process or two (spawned:
    # those run as their own command)
    scores = []
    for processes, run in (("1", run_main), ("2", run_main_process)):
        run("--flagfile", os.path.join(logdir, "flagfile.txt"), "--notrain", "--eval", "--num_images", "20",
            "--eval_batch_size", "8", "--nprocs", processes, "--device", "cpu", tiny=False)
        scores.append(json.loads(open(os.path.join(logdir, "eval.txt")).read().splitlines()[-1]))
    assert os.path.exists(os.path.join(logdir, "samples_ema.png"))
    # the same samples, sharded and gathered: the same scores (up to float32 feature
    # sums taken over differently split batches)
    assert scores[0]["FID"] == pytest.approx(scores[1]["FID"], rel=1e-6)
    assert scores[0]["IS"] == pytest.approx(scores[1]["IS"], rel=1e-6)


# the CPU's share of the fast path: bf16 autocast and channels_last
FAST = ["--precision", "bf16", "--channels_last"]


@pytest.mark.parametrize("path", [[], FAST], ids=["reference", "fast"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, path):
    # dropout on: the per-process RNG must be restored too
    common = ["--train", "--total_steps", "6", "--dropout", "0.1", "--save_step", "100", "--sample_step", "0",
              *path]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_main(*common, "--logdir", straight)
    run_main(*common, "--logdir", interrupted, "--total_steps", "3")
    run_main(*common, "--logdir", interrupted, "--resume")
    first, second = weights(straight), weights(interrupted)
    assert second["step"] == 6
    assert_same_weights(first, second, atol=1e-6)


def test_gradient_accumulation_is_one_big_batch(tmp_path):
    common = ["--train", "--total_steps", "3", "--dropout", "0", "--save_step", "0", "--sample_step", "0"]
    whole, micro = str(tmp_path / "whole"), str(tmp_path / "micro")
    run_main(*common, "--logdir", whole)
    run_main(*common, "--logdir", micro, "--accum_steps", "4")
    assert_same_updates(weights(whole), weights(micro))


def test_two_processes_equal_one(tmp_path):
    """DistributedDataParallel on 2 processes makes the one-process updates. The model is
    class-conditional with half the labels dropped, so that each process's labels and their
    drops must be its share of the global batch too (the unconditional path runs on two
    processes in test_multinode.py, test_flips.py and test_recipes.py)."""
    common = ["--train", "--total_steps", "3", "--dropout", "0", "--save_step", "100", "--sample_step", "2",
              "--num_classes", "10", "--sample_size", "10", "--cond_drop_prob", "0.5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_main(*common, "--logdir", one)
    run_main_process(*common, "--logdir", two, "--nprocs", "2", "--device", "cpu")
    assert os.path.exists(os.path.join(two, "sample", "2.png"))
    assert_same_updates(weights(one), weights(two))
    assert len(weights(two)["rng"]) == 2


def test_fast_path_splits_the_batch_up_to_bf16_rounding(tmp_path):
    """On the bf16 path, micro-batches and processes change the batch shapes the kernels see,
    and so the bf16 rounding: the runs agree only to that. Measured after 3 steps: 30% (4
    micro-batches) and 53% (2 processes) of the weights differ from the whole-batch run by more
    than 1e-5, the largest by 3e-3; the fp32 run differs from it in 68%, by 3.3e-3 (these
    fractions depend on the CPU's bf16 kernels); a wrong data, noise or timestep slice changes
    99.6%, by up to 0.5. So each split must be closer to the whole bf16 run than the fp32 run
    is (a split that fell back to fp32 is not), and within 6e-3."""
    common = ["--train", "--total_steps", "3", "--dropout", "0", "--save_step", "0", "--sample_step", "0"]
    run_main(*common, *FAST, "--logdir", str(tmp_path / "whole"))
    run_main(*common, "--logdir", str(tmp_path / "fp32"))
    fp32 = (net_differences(weights(tmp_path / "whole"), weights(tmp_path / "fp32")) > 1e-5).float().mean()
    splits = {"micro": ["--accum_steps", "4"], "two": ["--nprocs", "2", "--device", "cpu"]}
    for name, split in splits.items():
        run = run_main_process if "--nprocs" in split else run_main  # processes: a command of their own
        run(*common, *FAST, "--logdir", str(tmp_path / name), *split)
        net = net_differences(weights(tmp_path / "whole"), weights(tmp_path / name))
        assert (net > 1e-5).float().mean() < fp32 - 0.05, name
        assert net.max() < 6e-3, name


@pytest.mark.parametrize("args,message", [
    (["--batch_size", "10", "--accum_steps", "4"], "--batch_size 10 is not divisible by processes x --accum_steps"),
    (["--attn", "3"], "attn level 3 is out of range"),
    (["--img_size", "9"], "img_size 9 is not divisible by 2"),
    (["--img_channels", "3"], "digits images have 1 channel(s): set --img_channels 1, not 3"),
    (["--notrain", "--interp_t", "5", "--sample_steps", "10", "--skip_type", "uniform"],
     "--interp_t 5 is not one of the sampler's 10 timesteps (0, 2, 4, ..., 18)"),
    (["--save_step", "-1"], "--save_step must be a number of steps >= 0 (0: off), got -1"),
    (["--dataset", "mnist"], "flag --dataset=mnist: value should be one of"),
    (["--logdir", "/proc/not_here"], "--logdir /proc/not_here is not writable"),
    (["--flagfile", "/no/such.cfg"], "/no/such.cfg"),
    (["--dataset", "folder", "--data_root", "/no/such/folder"], "data_root /no/such/folder is not a folder"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--nprocs", "999"],
     "no CUDA device is visible" if not torch.cuda.is_available() else "exceeds the"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = run_main("--train", "--logdir", str(tmp_path / "run"), *args, expect_ok=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_existing_checkpoint_needs_resume(tmp_path):
    logdir = str(tmp_path / "run")
    run_main("--train", "--logdir", logdir, "--total_steps", "1", "--sample_step", "0")
    before = os.path.getmtime(os.path.join(logdir, "ckpt.pt"))
    result = run_main("--train", "--logdir", logdir, "--total_steps", "1", expect_ok=False)
    assert result.returncode != 0 and "pass --resume" in result.stderr
    assert os.path.getmtime(os.path.join(logdir, "ckpt.pt")) == before
    mismatched = run_main("--notrain", "--eval", "--logdir", logdir, "--ch", "64", expect_ok=False)
    assert "does not fit the flags" in mismatched.stderr and "Traceback" not in mismatched.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_saves_a_checkpoint_to_resume_from(tmp_path, signum):
    """A scheduler's preemption (SIGTERM) or a closed terminal or ssh session (SIGHUP, which
    ended training without a checkpoint until now), a moment after the first step."""
    logdir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *TINY_ARGS, "--train", "--eval", "--logdir", str(logdir),
         "--total_steps", "100000", "--save_step", "100000", "--sample_step", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(str(logdir / "events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.2)  # the TensorBoard file appears just before the first step
    time.sleep(2)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    # 128 + the signal, as a shell reports a killed process: the command did not finish
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stdout and "Traceback" not in stderr
    assert not os.path.exists(logdir / "samples_ema.png")  # --eval did not start
    state = weights(str(logdir))
    assert 1 <= state["step"] < 100000
    run_main("--train", "--resume", "--logdir", str(logdir), "--total_steps", str(state["step"] + 1),
             "--sample_step", "0")
    assert weights(str(logdir))["step"] == state["step"] + 1


def test_more_processes_than_gpus_is_one_clear_line(tmp_path):
    # a CPU machine that claims two GPUs: the check must stop before anything touches CUDA
    claim = "import torch; torch.cuda.is_available = lambda: True; torch.cuda.device_count = lambda: 2"
    result = run_main_process("--train", "--nprocs", "4", "--logdir", str(tmp_path / "run"), prelude=claim,
                              expect_ok=False)
    assert result.returncode != 0
    assert "--nprocs 4 exceeds the 2 visible GPU(s)" in result.stderr
    assert "Traceback" not in result.stderr


def fail_on_rank_one(rank, world_size, device):
    """Rank 1 stops with an error, as main.spawned does; rank 0 waits in a collective for it."""
    distributed.setup(rank, world_size, device)
    if rank == 1:
        sys.exit("error: rank 1 cannot go on")
    distributed.barrier()


def test_a_failing_rank_ends_the_whole_job():
    # were the failure not passed on, rank 0 would wait in its barrier for the 30-minute timeout
    launch = ("import sys; sys.path[:0] = ['.', 'tests']; import distributed, test_main; "
              "distributed.spawn(test_main.fail_on_rank_one, 2, 'cpu')")
    result = subprocess.run([sys.executable, "-c", launch], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode != 0
    assert "error: rank 1 cannot go on" in result.stderr
    assert "worker process 1 exited with code 1; the other workers were stopped" in result.stderr


def test_help_opens_with_the_common_commands_and_lists_every_flag_once_by_section():
    result = subprocess.run([sys.executable, "main.py", "--helpshort"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("DDPM") and "--flagfile ./config/digits.cfg --train --eval" in result.stdout
    import cli
    own = {flag.name for flag in cli.FLAGS.get_flags_for_module(cli)}
    listed = [line.split(":")[0].strip()[2:] for line in lines if line.startswith("  --")]
    assert sorted(listed) == sorted(own)  # every flag main.py defines (in cli.py), each once
    for title in ("UNet:", "Training:", "Evaluation:", "Data:"):
        assert title in lines
    assert lines.index("UNet:") < lines.index("  --ch: base channel count of the UNet (default: 128)")
