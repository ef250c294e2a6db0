"""Reliability and security (issue 10): an untrusted checkpoint runs no code, a bad value never
trains silently, NaN never becomes a score, a full disk or a killed parent loses nothing, a
stop signal stops the whole command. Tiny digits runs on the CPU, as in test_main.py."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import builders
import checkpoint
import evaluate
import files
import main
import memory
import speed
import streams
import train
import cli
from score import Evaluator, ScoreError, load_images
from score.scorer import small_sample_warning
from conftest import ROOT, TINY_ARGS, assert_one_line_error, run_main, run_main_process


@pytest.fixture
def run(trained_copy):
    """A copy of conftest's `trained` (a logdir after 2 training steps) without its eval.txt:
    a run that scored nothing yet."""
    os.remove(os.path.join(trained_copy, "eval.txt"))
    return trained_copy


def load(logdir):
    return torch.load(os.path.join(logdir, "ckpt.pt"), weights_only=True)


# ---------------------------------------------------------------- untrusted checkpoints


class Payload:
    """Unpickling it would create a folder: the code a malicious checkpoint runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_with_a_pickle_payload_runs_no_code(run, tmp_path):
    marker = str(tmp_path / "payload_ran")
    torch.save({**load(run), "extra": Payload(marker)}, os.path.join(run, "ckpt.pt"))
    for args in (["--notrain", "--eval", "--num_images", "10"],
                 ["--train", "--resume", "--total_steps", "3"]):
        result = run_main("--logdir", run, *args, expect_ok=False)
        assert_one_line_error(result, "was not loaded", "posix.mkdir", "may be unsafe")
        assert not os.path.exists(marker), args


def test_rng_states_survive_weights_only_loading(tmp_path):
    def draws():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, {"rng": [streams.rng_state()]})
    torch.load(path, weights_only=True)  # plain tensors and values: no allowlisted numpy types
    expected = draws()
    streams.set_rng_state(checkpoint.load(path)["rng"][0])
    assert draws() == expected
    # this project's checkpoints before the change stored numpy's state as an ndarray
    legacy = {**streams.rng_state(), "numpy": np.random.get_state()}
    torch.save({"rng": [legacy]}, path)
    expected = draws()
    streams.set_rng_state(checkpoint.load(path)["rng"][0])
    assert draws() == expected


def test_a_checkpoint_of_the_earlier_port_resumes(run):
    state = load(run)
    # the earlier port's keys only (no RNG states, no world size): sched a LambdaLR state_dict
    torch.save({key: state[key] for key in checkpoint.TRAINING_KEYS}, os.path.join(run, "ckpt.pt"))
    run_main("--train", "--resume", "--logdir", run, "--total_steps", "3", "--sample_step", "0")
    assert load(run)["step"] == 3


@pytest.mark.parametrize("content,required,message", [
    ([1, 2], ("ema_model",), "holds a list, not a dict"),
    ({"net_model": {}, "step": 1}, ("ema_model",), "has no ema_model"),  # for --eval
    ({"ema_model": {}}, checkpoint.TRAINING_KEYS, "has no net_model, optim, sched, step, x_T"),  # --resume
])
def test_a_checkpoint_that_is_not_a_training_dict_is_one_line(tmp_path, content, required, message):
    path = str(tmp_path / "ckpt.pt")
    torch.save(content, path)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(path, required)
    with pytest.raises(checkpoint.CheckpointError, match="not a dict of tensors"):
        checkpoint.load_weights(torch.nn.Linear(1, 1), {"weight": "x", "bias": 1}, path)


# ---------------------------------------------------------------- flags


@pytest.fixture
def parse(tmp_path):
    """Parse TINY_ARGS plus args into main's flags (in this process), reset afterwards."""
    def parse(*args):
        main.FLAGS.unparse_flags()
        cli.parse_flags(["main.py", *TINY_ARGS, *args])
    yield parse
    main.FLAGS.unparse_flags()


@pytest.mark.parametrize("args,message", [
    (["--T", "-5"], "--T must be at least 1"),
    (["--T", "0"], "--T must be at least 1"),
    (["--ch", "0"], "--ch must be a positive multiple of 32"),
    (["--ch_mult", "0"], "--ch_mult must be >= 1 at every level, got [1, 2, 0]"),  # TINY_ARGS: 1, 2
    (["--img_size", "0"], "--img_size must be at least 1"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--ema_decay", "1.5"], "--ema_decay must be in [0, 1]"),
    (["--grad_clip", "-1"], "--grad_clip must be > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--warmup", "-1"], "--warmup must be a number of steps >= 0"),
    (["--sample_size", "0", "--sample_step", "0"], "--sample_size must be at least 1"),
    (["--sampler", "ddim", "--eta", "-0.5"], "--eta of sampler 'ddim' must be in [0, 1], got -0.5"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta of sampler 'ddim' must be in [0, 1], got nan"),
    (["--eta", "0.5"], "--eta is an option of sampler(s) ddim; sampler 'ddpm' takes none, got 0.5"),
    (["--sampler", "unipc", "--solver_order", "4"], "--solver_order must be one of 1, 2, 3 for sampler 'unipc'"),
    (["--sampler", "ddpm_solver"], "--sampler must be one of ddpm, ddim, dpm_solver++"),
    (["--max_bad_steps", "-1"], "--max_bad_steps must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--eval", "--num_images", "0"], "--num_images must be positive"),
    (["--notrain", "--bpd", "--bpd_num_images", "-1"], "--bpd_num_images must be >= 0"),
])
def test_out_of_range_flags_are_refused_before_any_work(parse, tmp_path, args, message):
    logdir = str(tmp_path / "run")
    parse("--train", "--logdir", logdir, *args)
    with pytest.raises(main.ConfigError) as error:
        main.validate(main.configuration_from_flags(), 1, "cpu")
    assert message in str(error.value) and "sample_steps" not in str(error.value)
    assert not os.path.exists(logdir)  # nothing written: not even the folder


def test_a_refused_flag_writes_no_flagfile(parse, tmp_path):
    logdir = str(tmp_path / "run")
    parse("--train", "--logdir", logdir, "--lr", "nan")
    with pytest.raises(SystemExit, match="error: --lr must be a finite number"):
        main.main([])
    assert not os.path.exists(logdir)


def test_resume_refuses_a_new_network_and_lists_other_changes(parse, run, capsys):
    parse("--train", "--resume", "--logdir", run, "--ch", "64", "--T", "30", "--total_steps", "9")
    with pytest.raises(main.ConfigError) as error:
        main.validate(main.configuration_from_flags(), 1, "cpu")
    assert "--ch 32 -> 64; --T 20 -> 30" in str(error.value) and "total_steps" not in str(error.value)
    parse("--train", "--resume", "--logdir", run, "--total_steps", "9", "--lr", "0.0005")
    main.validate(main.configuration_from_flags(), 1, "cpu")
    notice = capsys.readouterr().err.strip()
    assert "--lr 0.001 -> 0.0005" in notice and "--total_steps 2 -> 9" in notice
    assert len(notice.splitlines()) == 1


def snapshot(folder):
    """{path: (size, modification time)} of every file under folder."""
    return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_size,
                                       os.stat(os.path.join(root, name)).st_mtime_ns)
            for root, _, names in os.walk(folder) for name in names}


@pytest.mark.slow  # processes of their own
def test_a_second_command_in_a_busy_logdir_is_one_line_and_changes_nothing(run):
    """Two commands in one logdir would share ckpt.pt.tmp, the evaluation store and eval.txt.
    While one holds the logdir, --eval, --train --resume and a fresh --train stop at once,
    naming the holder; the lock ends with its holder, even one killed with SIGKILL."""
    hold = ("import sys, time; sys.path.insert(0, '.'); import lock; "
            "lock.hold(sys.argv[1], 'python main.py --train (the first)'); print('held', flush=True); "
            "time.sleep(120)")
    fresh = os.path.join(os.path.dirname(run), "fresh")
    os.makedirs(fresh)
    holders = [subprocess.Popen([sys.executable, "-c", hold, folder], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True) for folder in (run, fresh)]
    try:
        assert [holder.stdout.readline().strip() for holder in holders] == ["held", "held"]
        before = snapshot(os.path.dirname(run))
        for folder, args in ((run, ["--notrain", "--eval", "--num_images", "12"]),
                             (run, ["--train", "--resume", "--total_steps", "3"]), (fresh, ["--train"])):
            holder = holders[folder == fresh]
            result = run_main("--logdir", folder, *args, expect_ok=False)
            assert_one_line_error(result, f"{folder} is in use by pid {holder.pid} on ",
                                  "(python main.py --train (the first))")
        assert snapshot(os.path.dirname(run)) == before
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    run_main("--logdir", run, "--train", "--resume", "--total_steps", "3", "--sample_step", "0")
    assert load(run)["step"] == 3


def test_resume_applies_a_new_lr_and_removes_a_stale_temporary(run):
    with open(os.path.join(run, "ckpt.pt.tmp"), "wb") as stale:  # a save killed midway
        stale.write(b"\0" * 1000)
    result = run_main("--train", "--resume", "--logdir", run, "--total_steps", "3", "--lr", "0.0005",
                      "--sample_step", "0")
    assert "removed ckpt.pt.tmp" in result.stderr and "--lr 0.001 -> 0.0005" in result.stderr
    assert not os.path.exists(os.path.join(run, "ckpt.pt.tmp"))
    state = load(run)
    assert state["step"] == 3 and state["sched"]["base_lrs"] == [0.0005]
    assert state["optim"]["param_groups"][0]["lr"] == 0.0005  # --warmup 0: the full rate


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_a_non_finite_step_changes_nothing(fused):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ema = torch.nn.Linear(4, 3).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_lr(0))
    net(torch.randn(2, 4)).sum().backward()
    assert not train.apply_gradients(net, ema, optimizer, scheduler, 1.0, 0.9)
    before = [tensor.clone() for tensor in (*net.parameters(), *ema.parameters(),
                                            *optimizer.state[net.weight].values())]
    (net(torch.randn(2, 4)).sum() * float("nan")).backward()
    assert train.apply_gradients(net, ema, optimizer, scheduler, 1.0, 0.9)
    after = (*net.parameters(), *ema.parameters(), *optimizer.state[net.weight].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # weights, EMA, Adam moments, step
    net(torch.randn(2, 4)).sum().backward()
    assert not train.apply_gradients(net, ema, optimizer, scheduler, 1.0, 0.9)
    assert not torch.equal(before[0], net.weight) and not torch.equal(before[2], ema.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_skipping_a_non_finite_step_needs_no_host_sync_with_fused_adam():
    net = torch.nn.Linear(4, 3).cuda()
    ema = torch.nn.Linear(4, 3).cuda().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_lr(0))
    (net(torch.randn(2, 4, device="cuda")).sum() * float("nan")).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host read of a device value raises
    try:
        bad = train.apply_gradients(net, ema, optimizer, scheduler, 1.0, 0.9)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bad.item() and torch.isfinite(net.weight).all()


def nan_loss_at(*steps):
    """A prelude for run_main_process: the training loss is NaN at these steps (accum_steps 1)."""
    return (f"import diffusion\nforward, calls = diffusion.GaussianDiffusionTrainer.forward, [0]\n"
            f"def poisoned(self, *args, **kwargs):\n    calls[0] += 1\n"
            f"    loss = forward(self, *args, **kwargs)\n"
            f"    return loss * float('nan') if calls[0] in {steps} else loss\n"
            f"diffusion.GaussianDiffusionTrainer.forward = poisoned")


@pytest.mark.slow  # processes of their own
def test_a_non_finite_loss_is_skipped_then_stops_training(tmp_path):
    logdir = str(tmp_path / "run")
    result = run_main_process("--train", "--logdir", logdir, "--total_steps", "6", "--save_step", "1",
                              "--sample_step", "0", "--max_bad_steps", "1", prelude=nan_loss_at(3, 5),
                              expect_ok=False)
    assert_one_line_error(result, "the loss is not finite at step 5", "(step 4) is left as it was")
    assert "skipped 1 step(s)" in result.stdout + result.stderr
    state = load(logdir)
    assert state["step"] == 4  # step 3 was skipped, step 4 trained and saved, step 5 stopped it
    assert all(torch.isfinite(tensor).all() for key in ("net_model", "ema_model")
               for tensor in state[key].values())


def test_nan_samples_are_never_scored(run):
    state = load(run)
    state["ema_model"] = {name: torch.full_like(tensor, float("nan"))
                          for name, tensor in state["ema_model"].items()}
    torch.save(state, os.path.join(run, "ckpt.pt"))
    result = run_main("--notrain", "--eval", "--logdir", run, "--num_images", "20", "--eval_batch_size", "10",
                      expect_ok=False)
    # streamed: the first batch of 10 stops the evaluation
    assert_one_line_error(result, "10 of 10 samples contain NaN or inf", "nothing was scored")
    assert not os.path.exists(os.path.join(run, "eval.txt"))


def test_small_sample_inception_fid_is_flagged_and_recorded(tmp_path, capsys):
    evaluator = Evaluator.__new__(Evaluator)  # the scoring half only: no Inception weights here
    evaluator.feature, evaluator.metrics = "inception", ("fid", "is")
    generator = torch.Generator().manual_seed(0)
    evaluator.reference = (torch.zeros(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64))
    scores = evaluator.score(torch.randn(100, 8, generator=generator, dtype=torch.float64),
                             torch.randn(100, 10, generator=generator, dtype=torch.float64))
    assert "fewer than the 2048 Inception features" in scores["warning"]
    assert "not comparable with published FIDs" in small_sample_warning("inception", 2048)
    assert small_sample_warning("inception", 50000) is None
    assert small_sample_warning("digits", 100) is None
    evaluate.report(str(tmp_path), scores, step=7)
    assert capsys.readouterr().err.startswith("warning: FID of 100 samples")
    line = json.loads(open(tmp_path / "eval.txt").read())
    assert line["warning"] == scores["warning"] and line["FID"] == scores["FID"]


# ---------------------------------------------------------------- unreadable inputs


def test_a_corrupt_image_in_a_folder_dataset_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(15):
        Image.fromarray(np.full((8, 8), 16 * i, np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "zzz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    # a loader worker reads it: its error arrives wrapped in the worker's traceback
    result = run_main("--train", "--logdir", str(tmp_path / "run"), "--dataset", "folder", "--data_root",
                      str(folder), "--total_steps", "1", "--sample_step", "0", "--num_workers", "1",
                      expect_ok=False)
    assert_one_line_error(result, "cannot read image", "zzz_broken.png")


@pytest.mark.parametrize("shape,hint", [((4, 3, 8, 8), "(channels first?)"), ((4, 8, 8, 2), "C 1 or 3")])
def test_an_npz_of_the_wrong_layout_is_one_line(tmp_path, shape, hint):
    path = str(tmp_path / "samples.npz")
    np.savez(path, arr_0=np.zeros(shape, np.uint8))
    with pytest.raises(ScoreError) as error:
        load_images(path)
    assert f"got uint8 {shape}" in str(error.value) and hint in str(error.value)


@pytest.mark.slow  # trains the digits classifier
def test_a_corrupt_digits_classifier_cache_is_retrained(tmp_path, capsys):
    from score import digits
    path = str(tmp_path / "digits_classifier.pt")
    with open(path, "wb") as file:
        file.write(b"not a checkpoint")
    net = digits.load_classifier(path)
    assert "unreadable" in capsys.readouterr().err
    assert net(torch.zeros(1, 1, 8, 8))[1].shape == (1, 10)
    assert torch.load(path, weights_only=True)["recipe"] == digits.RECIPE  # replaced by a good one


# ---------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only: skipped where mount is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield str(mount)
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_keeps_the_previous_files(small_disk):
    path = os.path.join(small_disk, "ckpt.pt")
    checkpoint.save(path, {"step": 1, "w": torch.ones(10)})
    with pytest.raises(files.WriteError, match=r"disk is full: it needs about 4\.\d MB"):
        checkpoint.save(path, {"step": 2, "w": torch.ones(2 ** 20)})
    assert checkpoint.load(path)["step"] == 1
    eval_txt = os.path.join(small_disk, "eval.txt")
    files.append_line(eval_txt, '{"FID": 1}')
    with open(os.path.join(small_disk, "filler"), "wb", buffering=0) as filler:  # the rest of the disk
        with pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 4096)
    with pytest.raises(files.WriteError, match="eval.txt: the disk is full"):
        files.append_line(eval_txt, '{"FID": 2}' + " " * 10000)
    with pytest.raises(files.WriteError, match="grid.png"):
        files.save_png(torch.rand(3, 64, 64), os.path.join(small_disk, "grid.png"))
    assert open(eval_txt).read() == '{"FID": 1}\n'
    assert sorted(os.listdir(small_disk)) == ["ckpt.pt", "eval.txt", "filler"]  # no .tmp left


def test_training_onto_a_full_disk_is_one_line(small_disk):
    result = run_main("--train", "--logdir", small_disk, "--total_steps", "1", "--sample_step", "0",
                      expect_ok=False)
    assert_one_line_error(result, f"cannot write {small_disk}/ckpt.pt", "disk is full")
    assert not os.path.exists(os.path.join(small_disk, "ckpt.pt.tmp"))


# ---------------------------------------------------------------- signals and processes


@pytest.mark.slow  # processes of their own
def test_a_stop_signal_during_eval_stops_it(run, tmp_path):
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "main.py", *TINY_ARGS, "--notrain", "--eval", "--logdir", run,
                                    "--num_images", "100000", "--eval_batch_size", "10"],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 120
        while "generating" not in log.read_text() and time.time() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 128 + signal.SIGINT
    assert "error: stopped by SIGINT" in log.read_text() and "Traceback" not in log.read_text()
    assert not os.path.exists(os.path.join(run, "eval.txt"))


@pytest.mark.parametrize("unreadable", [False, True], ids=["empty_folder", "unreadable_image"])
def test_a_data_error_at_start_leaves_no_logdir(tmp_path, unreadable):
    """An empty folder fails the start-up checks, before anything is written. An unreadable
    image is found only by the first step, after rank 0 made the logdir and wrote flagfile.txt:
    those are taken back, and TensorBoard's file and sample/ do not exist before that step."""
    images = tmp_path / "images"
    images.mkdir()
    if unreadable:  # 16 images, one batch: the first step reads the last one, the sample grid does not
        for i in range(16):
            Image.fromarray(np.full((8, 8, 3), 15 * i, np.uint8)).save(images / f"{i:02d}.png")
        (images / "15.png").write_bytes(b"not a png")
    logdir = tmp_path / "runs" / "new"  # its parent is made too, and taken back
    result = run_main("--train", "--dataset", "folder", "--data_root", str(images), "--logdir", str(logdir),
                      "--total_steps", "1", "--sample_step", "0", expect_ok=False)
    assert_one_line_error(result, "cannot read image" if unreadable else "no image files")
    assert not os.path.exists(tmp_path / "runs")


def catches(pid, signum):
    """Whether the process has a handler for signum (/proc's SigCgt mask)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) >> (signum - 1) & 1)


LOADING_COMMANDS = {  # how each command is run, its logdir (where it has one) as {logdir}
    "main.py": "runpy.run_path('main.py', run_name='__main__')",
    "convert.py": "runpy.run_path('convert.py', run_name='__main__')",
    "score.fid_cache": "runpy.run_module('score.fid_cache', run_name='__main__', alter_sys=True)",
}
LOADING_ARGS = {
    "main.py": [*TINY_ARGS, "--train", "--logdir", "{logdir}"],
    "convert.py": ["google/ddpm-cifar10-32", "--logdir", "{logdir}"],
    "score.fid_cache": ["--dataset", "digits", "--output", "{logdir}/stats.npz"],
}
# torch's import held up (a marker file says when), so that the signal surely comes while it loads
STALLED_TORCH = """
import importlib.abc, pathlib, runpy, sys, time
MARKER = pathlib.Path(sys.argv[1])
class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            MARKER.touch()
            time.sleep(60)
sys.meta_path.insert(0, Stall())
sys.argv = sys.argv[2:]
"""


@pytest.mark.parametrize("command", list(LOADING_COMMANDS))
def test_ctrl_c_while_a_command_loads_is_one_line(tmp_path, command):
    """SIGINT while torch loads: one line and exit 130, from main.py, convert.py and python -m
    score.fid_cache alike (a KeyboardInterrupt traceback in the last two until now)."""
    logdir, marker = tmp_path / "run", tmp_path / "loading"
    args = [arg.format(logdir=logdir) for arg in LOADING_ARGS[command]]
    process = subprocess.Popen([sys.executable, "-c", STALLED_TORCH + LOADING_COMMANDS[command], str(marker),
                                command, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while process.poll() is None and not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert stderr.splitlines() == ["error: stopped by SIGINT before the command finished"], stderr[-3000:]
    assert not os.path.exists(logdir)


def process_table():
    """{pid: (parent pid, state)} from /proc."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid):
    table, found = process_table(), []
    parents = [pid]
    while parents:
        children = [child for child, (parent, _) in table.items() if parent in parents]
        found += children
        parents = children
    return found


def alive(pids):
    table = process_table()
    return [pid for pid in pids if pid in table and table[pid][1] != "Z"]


@pytest.mark.slow  # processes of their own
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    logdir = tmp_path / "run"
    # --log_step 100000: torch's spawn asks the kernel for a SIGINT when the parent dies, which
    # the workers answer only at the next log step (they stop together there); so only
    # die_with_parent's SIGKILL can end them within seconds
    parent = subprocess.Popen([sys.executable, "main.py", *TINY_ARGS, "--train", "--logdir", str(logdir),
                               "--nprocs", "2", "--device", "cpu", "--total_steps", "100000",
                               "--save_step", "0", "--sample_step", "0", "--log_step", "100000"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(logdir.glob("events.out.tfevents.*")) and time.time() < deadline:
            time.sleep(0.2)  # rank 0 is about to train
        workers = descendants(parent.pid)
        assert len(workers) >= 2, workers
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 10
    while alive(workers) and time.time() < deadline:
        time.sleep(0.2)
    left = alive(workers)
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived their parent"


# ---------------------------------------------------------------- sizes, steps, signals (issue 24)


def in_process_config(tmp_path, **values):
    """TINY_ARGS's configuration, made in this process (cli.configuration), with values on top."""
    args = [f"--{name}={value}" if not isinstance(value, bool) else f"--{'' if value else 'no'}{name}"
            for name, value in values.items()]
    return cli.configuration(["main.py", *TINY_ARGS, "--logdir", str(tmp_path / "run"), *args])


GB = 2 ** 30


@pytest.mark.parametrize("values,needs,machine", [
    (dict(T=10 ** 8, train=True), "--T 100,000,000 needs at least 38.0 GB for the schedule alone", 16 * GB),
    # a schedule small enough to build here, were it not measured first
    (dict(T=10 ** 6, train=True), "--T 1,000,000 needs at least 389.1 MB for the schedule alone", GB // 16),
    (dict(ch=3_200_000, train=True), "training a UNet of --ch 3200000", 16 * GB),
    (dict(ch_mult=10_000, attn=0, train=True), "--ch_mult 1,2,10000", 16 * GB),  # added to TINY_ARGS's levels
    (dict(img_size=2 ** 20, train=True), "--img_size 1048576", 16 * GB),
    (dict(num_images=10 ** 12, eval=True), "scoring --num_images 1,000,000,000,000 needs at least 538.4 TB",
     16 * GB),
])
def test_sizes_that_cannot_fit_are_one_line_with_the_bytes_before_anything_is_built(
        tmp_path, monkeypatch, values, needs, machine):
    """--T 10^8, --ch 3.2M, --ch_mult 10000, --img_size 2^20 ended in allocator tracebacks
    (the configuration built a 10^8-step schedule several times); --num_images 10^12 sat for
    minutes. On a machine of 16 GB (1 GB / 16 for a schedule this test can afford to build)
    each is one line with the bytes needed, within seconds, and no logdir is made."""
    monkeypatch.setattr(memory, "host_memory", lambda: machine)
    started = time.monotonic()
    with pytest.raises(memory.OutOfMemory) as refused:
        run_config = in_process_config(tmp_path, **values)
        if run_config.actions.eval:  # a checkpoint to evaluate
            open(os.path.join(tmp_path, "ckpt.pt"), "w").close()
        main.validate(run_config.replace(logdir=str(tmp_path)), 1, "cpu")
    assert needs in str(refused.value) and files.readable(machine) in str(refused.value)
    assert time.monotonic() - started < 30 and not os.path.exists(tmp_path / "run")
    assert sorted(os.listdir(tmp_path)) == (["ckpt.pt"] if values.get("eval") else [])


@pytest.mark.slow  # builds the paper's CIFAR10 UNet
def test_the_memory_estimate_is_a_lower_bound_of_the_network_built(tmp_path):
    """The meta-device count is the built network's bytes exactly, and the estimate of a run
    (weights, Adam, EMA, one feature map) lies below what training the paper's CIFAR10
    network holds, and lets it through: refusing it would be a false alarm."""
    cifar = cli.configuration(["main.py", "--flagfile", os.path.join(ROOT, "config", "cifar10_unet_example.cfg"),
                                "--train", "--logdir", str(tmp_path / "run")])
    for run_config in (in_process_config(tmp_path), cifar):
        built = builders.build_model(run_config.model, run_config.diffusion)
        exact = sum(tensor.numel() * tensor.element_size() for tensor in built.state_dict().values())
        assert memory.network_bytes(run_config.model, run_config.diffusion) == exact
    ((needed, what),) = memory.needed(cifar.replace(sample_step=0, eval_step=0), world_size=1)
    parameters = sum(p.numel() for p in builders.build_model(cifar.model, cifar.diffusion).parameters())
    assert what.startswith("training") and 5 * 4 * parameters < needed < 2 ** 30  # 35.7M parameters


def fresh_checkpoint(run_config, path, step):
    """The checkpoint a run at `step` would save: a fresh TrainState with that step."""
    fast = speed.resolve(run_config.fast, "cpu", 1)
    state = train.initial_state(run_config.replace(resume=False), fast, torch.device("cpu"), path, 0, 1)
    state.step = step
    checkpoint.save(path, state.to_checkpoint([streams.rng_state()], 1))


@pytest.mark.parametrize("step", [-3, 2.5, True, torch.tensor(-1), "7"])
def test_a_checkpoint_whose_step_is_no_count_of_steps_is_one_line(tmp_path, step):
    """A negative step was a numpy traceback on --resume; any step but an int >= 0 (a Python
    int or an integer tensor of one element) is one line naming it."""
    run_config = in_process_config(tmp_path, train=True)
    path = str(tmp_path / "ckpt.pt")
    fresh_checkpoint(run_config, path, 0)
    state = checkpoint.load(path)
    state["step"] = step
    torch.save(state, path)
    resume = run_config.replace(resume=True)
    fast = speed.resolve(resume.fast, "cpu", 1)
    with pytest.raises(checkpoint.CheckpointError, match="its step .* is not a number of optimizer steps >= 0"):
        train.initial_state(resume, fast, torch.device("cpu"), path, 0, 1)
    state["step"] = torch.tensor(4)
    torch.save(state, path)
    assert train.initial_state(resume, fast, torch.device("cpu"), path, 0, 1).step == 4


def test_a_resume_already_past_total_steps_trains_and_writes_nothing(tmp_path, capsys):
    """It said "wrote ckpt.pt (step N)" of a checkpoint it did not write: now it says there is
    nothing to train, and the logdir is as it was (no checkpoint rewritten, no TensorBoard file)."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    run_config = in_process_config(tmp_path, train=True, resume=True, total_steps=3, sample_step=0)
    fresh_checkpoint(run_config, str(logdir / "ckpt.pt"), 5)
    before = {name: (logdir / name).read_bytes() for name in os.listdir(logdir)}
    assert train.train(run_config, "cpu") == 0
    out = capsys.readouterr().out
    assert f"nothing to train: {logdir}/ckpt.pt is at step 5, and --total_steps is 3; nothing was written" in out
    assert "wrote" not in out
    assert {name: (logdir / name).read_bytes() for name in os.listdir(logdir)} == before


@pytest.mark.parametrize("target,message", [
    ("samples", "exists and is not a folder"), ("samples.npz", "is a folder")])
def test_save_samples_onto_what_cannot_hold_them_is_one_line_before_sampling(tmp_path, target, message):
    """--save_samples onto an existing file that is not an .npz was a FileExistsError traceback
    after all the sampling: checked first."""
    path = tmp_path / target
    (path.mkdir if target.endswith(".npz") else path.write_text)(*(() if target.endswith(".npz") else ("x",)))
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "ckpt.pt").write_bytes(b"")
    run_config = in_process_config(tmp_path, eval=True, save_samples=str(path), noscore=True)
    with pytest.raises(main.ConfigError, match=f"--save_samples {path} {message}"):
        main.validate(run_config, 1, "cpu")

