import os
import subprocess

import pytest
import torch

from sampling import SAMPLERS

# the samplers with orders (--solver_order): the solvers
SOLVERS = {name: step for name, step in SAMPLERS.items() if step.ORDERS}

# One thread in the processes the tests start (main.py runs) too, as one_thread below does in
# this one: with two, a 16-sample evaluation took 30 s instead of 1 on two busy cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use small tensors: two OpenMP threads on two (often shared) cores
    spin against each other and run 3-10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- main.py, in this process or another

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# main.py's flags of the tiny digits run the end-to-end tests use (a UNet of 32 channels, T 20)
TINY_ARGS = ["--flagfile", os.path.join(ROOT, "config", "digits.cfg"), "--ch", "32", "--ch_mult", "1",
             "--ch_mult", "2", "--attn", "1", "--num_res_blocks", "1", "--T", "20", "--batch_size", "16",
             "--sample_size", "4", "--warmup", "0", "--log_step", "1", "--num_workers", "0",
             "--sampler", "ddpm", "--sample_steps", "0"]


def in_process(argv, command):
    """command() (a script's main) run in this process as `python argv...` would run it: a
    subprocess.CompletedProcess of its exit status and what it printed. Afterwards the flags
    are unparsed, the logdir locks given up, and the signal handlers, torch's thread count and
    the working directory what they were."""
    import contextlib
    import io
    import signal
    import sys
    import traceback

    import cli
    import lock
    import signals

    handlers = {signum: signal.getsignal(signum) for signum in signals.SIGNALS}
    threads, cwd = torch.get_num_threads(), os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    os.chdir(ROOT)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 gives a subprocess (one_thread may not be set up yet)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                cli.FLAGS.unparse_flags()
                command()
            except SystemExit as exit:  # as the interpreter reports it
                if isinstance(exit.code, int) or exit.code is None:
                    returncode = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
                    returncode = 1
            except Exception:  # a bug: its traceback, as an uncaught exception prints it
                traceback.print_exc()
                returncode = 1
    finally:
        cli.FLAGS.unparse_flags()
        lock.release_all()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)
        os.chdir(cwd)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def run_main(*args, expect_ok=True, tiny=True):
    """main.py's command (TINY_ARGS, unless not tiny, then args) run in this process, as
    `python main.py` would (see in_process). For tests whose subject is not the process
    boundary; signals, exit status of a process, several processes (--nprocs 2), start-up use
    run_main_process. expect_ok: assert it succeeded."""
    import cli
    import main

    argv = ["main.py", *(TINY_ARGS if tiny else []), *map(str, args)]
    result = in_process(argv, lambda: main.main(cli.parse_flags(argv, main.__doc__)))
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_convert(*args):
    """convert.py with args, run in this process (see in_process)."""
    import convert
    argv = ["convert.py", *map(str, args)]
    return in_process(argv, lambda: convert.main(argv[1:]))


def run_main_process(*args, expect_ok=True, tiny=True, prelude="", env=None, timeout=600):
    """main.py (TINY_ARGS, unless not tiny, then args) in a fresh interpreter: for tests of
    the process itself. prelude: Python run before main.py (a patch), env: its environment."""
    import sys
    command = [os.path.join(ROOT, "main.py"), *(TINY_ARGS if tiny else []), *map(str, args)]
    if prelude:
        launch = (f"import runpy, sys\n{prelude}\nsys.argv = sys.argv[1:]\n"
                  "runpy.run_path(sys.argv[0], run_name='__main__')")
        command = ["-c", launch, *command]
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=timeout)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_one_line_error(result, *parts, last=False):
    """A failed command whose one "error:" line holds every part, and no traceback; last: that
    line is also the last stderr printed."""
    assert result.returncode != 0, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(part in errors[0] for part in parts), result.stderr[-3000:]
    if last:
        assert errors[0].startswith("error: "), result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == errors[0].rstrip(), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def weights(logdir):
    # weights_only: a checkpoint holds nothing that loading with it refuses
    return torch.load(os.path.join(logdir, "ckpt.pt"), weights_only=True)


def assert_same_weights(first, second, atol):
    for key in ("net_model", "ema_model"):
        for name, tensor in first[key].items():
            torch.testing.assert_close(second[key][name], tensor, atol=atol, rtol=0, msg=f"{key}.{name}")


def net_differences(first, second):
    """|second - first| over every weight of the trained network, flattened."""
    return torch.cat([(second["net_model"][name] - tensor).abs().flatten()
                      for name, tensor in first["net_model"].items()])


def assert_same_updates(first, second):
    """Equal up to float rounding amplified by Adam.

    The summation order differs between the runs, so gradients differ by rounding. Adam divides
    each gradient by its running RMS (+ eps = 1e-8), which turns rounding in an element whose
    true gradient is ~0 (a bias just before a GroupNorm) into a visible difference. Measured on
    the digits model: 2-8 of its 702k weights differ by more than 1e-5, the largest by 1.5e-5;
    a wrong data, noise or timestep slice changes 99.6% of them, the largest by 0.5. So: at
    most 1 in 10^4 weights beyond 1e-5, and none beyond 2e-4 (a fifth of one step at lr 1e-3).
    """
    net = net_differences(first, second)
    assert (net > 1e-5).float().mean() < 1e-4
    for key in ("net_model", "ema_model"):
        for name, tensor in first[key].items():
            torch.testing.assert_close(second[key][name], tensor, atol=2e-4, rtol=0, msg=f"{key}.{name}")


# the flags of the shared tiny run (`trained`): 2 steps, scored at step 2 (--eval_step)
TRAINED_ARGS = ["--train", "--total_steps", "2", "--save_step", "0", "--sample_step", "0",
                "--eval_step", "2", "--eval_num_images", "16", "--eval_batch_size", "8"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A logdir of TINY_ARGS and TRAINED_ARGS: 2 training steps, its EMA model scored at step 2
    (one line of eval.txt). Trained once per test session, and once per machine under xdist
    (its workers share it through a file lock). Read it, never write it: a test that changes
    a logdir works on a copy (`trained_copy`)."""
    import shutil

    def train(logdir):
        run_main(*TRAINED_ARGS, "--logdir", logdir)

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: the session's own folder
        logdir = str(tmp_path_factory.mktemp("trained") / "run")
        train(logdir)
        return logdir
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, shared by its workers
    logdir = str(shared / "trained" / "run")
    with FileLock(str(shared / "trained.lock")):
        if not os.path.exists(os.path.join(shared, "trained", "done")):
            if os.path.exists(shared / "trained"):
                shutil.rmtree(shared / "trained")  # a worker that failed midway
            os.makedirs(shared / "trained")
            train(logdir)
            open(os.path.join(shared, "trained", "done"), "w").close()
    return logdir


@pytest.fixture
def trained_copy(trained, tmp_path):
    """A copy of `trained` for this test to change; its flagfile.txt names the copy as the
    logdir, so that --flagfile <copy>/flagfile.txt runs there."""
    import shutil
    logdir = str(tmp_path / "run")
    shutil.copytree(trained, logdir)
    flagfile = os.path.join(logdir, "flagfile.txt")
    with open(flagfile) as file:
        lines = file.read().splitlines(keepends=True)
    assert f"--logdir={trained}\n" in lines
    with open(flagfile, "w") as file:
        file.writelines(f"--logdir={logdir}\n" if line == f"--logdir={trained}\n" else line for line in lines)
    return logdir
