"""--eval at scale: streamed through the feature network batch by batch, resumable after a
kill -9, sampling without scoring, and the protocol recorded with every score.

The reference is the all-at-once path, written here: every batch drawn with its own seed,
all images concatenated, one pass of the feature network, one score."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import streams
from diffusion import GaussianDiffusionSampler, beta_schedule
from score import Evaluator
from score.metrics import to_uint8
from test_main import ROOT, TINY, run_main

NUM_IMAGES, BATCH = 48, 4
EVAL = ["--notrain", "--eval", "--num_images", str(NUM_IMAGES), "--eval_batch_size", str(BATCH)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("eval") / "run")
    run_main("--train", "--logdir", logdir, "--total_steps", "3", "--sample_step", "0")
    return logdir


def all_at_once(logdir, num_images=NUM_IMAGES, batch=BATCH, seed=0):
    """Scores and samples of the EMA model as the pre-streaming --eval computed them."""
    net = checkpoint.load_model(logdir)
    sampler = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, 20))  # TINY's T and the full chain
    images = []
    with torch.no_grad():
        for i in range(math.ceil(num_images / batch)):
            generator = torch.Generator().manual_seed(streams.stream_seed(seed, streams.EVAL_NOISE, i))
            x_T = torch.randn((min(batch, num_images - i * batch), 1, 8, 8), generator=generator)
            images.append((sampler(net, x_T, generator=generator) + 1) / 2)
    images = torch.cat(images)
    evaluator = Evaluator("digits")
    return evaluator.score(*evaluator.features(images)), images


def last_record(logdir):
    with open(os.path.join(logdir, "eval.txt")) as file:
        return json.loads(file.read().splitlines()[-1])


@pytest.mark.slow
def test_streamed_scores_equal_the_all_at_once_path_and_record_their_protocol(trained):
    result = run_main("--logdir", trained, *EVAL)
    record = last_record(trained)
    expected, _ = all_at_once(trained)
    # the feature network sees batches of 4 instead of all 48: float32 rounding only (measured
    # 1.8e-8 relative with batches of 1); a wrong seed or a lost batch moves the FID by > 1%
    for name in ("FID", "IS", "IS_std"):
        assert record[name] == pytest.approx(expected[name], rel=1e-6), name
    with open(os.path.join(trained, "ckpt.pt"), "rb") as file:
        ckpt_sha = hashlib.sha256(file.read()).hexdigest()[:12]
    protocol = {"num_samples": NUM_IMAGES, "sampler": "ddpm", "steps": 20, "eta": 0.0,
                "skip_type": "uniform", "clip_denoised": True, "beta_schedule": "linear", "ema": True,
                "checkpoint_step": 3,
                "checkpoint_sha256": ckpt_sha, "feature_network": "digits", "quantize": True,
                "seed": 0, "processes": 1, "torch": torch.__version__}
    for name, value in protocol.items():
        assert record[name] == value, name
    assert record["wall_time_s"] > 0 and len(record["feature_weights_sha256"]) == 12
    assert f"{NUM_IMAGES} samples of the EMA model at step 3" in result.stdout
    assert not os.path.exists(os.path.join(trained, "eval_state"))  # removed once scored


def copy_run(trained, logdir):
    os.makedirs(logdir)
    for name in ("ckpt.pt", "flagfile.txt"):
        with open(os.path.join(trained, name), "rb") as src, open(os.path.join(logdir, name), "wb") as dst:
            dst.write(src.read())
    return logdir


@pytest.mark.slow
def test_an_eval_killed_mid_way_resumes_to_identical_scores(trained, tmp_path):
    uninterrupted = copy_run(trained, str(tmp_path / "uninterrupted"))
    run_main("--logdir", uninterrupted, "--notrain", "--eval", "--num_images", str(NUM_IMAGES),
             "--eval_batch_size", "1")
    logdir = copy_run(trained, str(tmp_path / "killed"))
    args = [sys.executable, os.path.join(ROOT, "main.py"), *TINY, "--logdir", logdir,
            "--notrain", "--eval", "--num_images", str(NUM_IMAGES), "--eval_batch_size", "1"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(logdir, "eval_state")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        finished = [name for _, _, names in os.walk(state) for name in names if name.startswith("batch_")]
        if len(finished) >= 5:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait(60) == -signal.SIGKILL, "the evaluation ended before it could be killed"
    assert not os.path.exists(os.path.join(logdir, "eval.txt"))
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "were finished by an earlier run" in resumed.stderr
    expected, record = last_record(uninterrupted), last_record(logdir)
    for name in ("FID", "IS", "IS_std"):
        assert record[name] == expected[name], name  # bit for bit


@pytest.mark.slow
def test_sampling_only_needs_no_inception_weights_and_draws_the_scored_samples(trained, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty_torch_home"))  # no weights anywhere
    out = str(tmp_path / "samples.npz")
    result = subprocess.run([sys.executable, "main.py", *TINY, "--logdir", trained, *EVAL,
                             "--fid_feature", "inception", "--noscore", "--save_samples", out],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out) as stored:
        array = stored["arr_0"]
    _, images = all_at_once(trained)
    assert array.dtype == np.uint8 and array.shape == (NUM_IMAGES, 8, 8, 1)
    np.testing.assert_array_equal(array, to_uint8(images).permute(0, 2, 3, 1).numpy())
    refused = run_main("--logdir", trained, *EVAL, "--noscore", expect_ok=False)
    assert refused.returncode != 0 and "--noscore only draws samples" in refused.stderr


@pytest.mark.slow
def test_the_saved_flagfile_holds_the_configuration_not_the_actions(trained):
    with open(os.path.join(trained, "flagfile.txt")) as file:
        lines = file.read().splitlines()
    names = {line[2:].split("=")[0] for line in lines}
    assert "--ch=32" in lines and "--T=20" in lines
    for action in ("train", "notrain", "eval", "noeval", "resume", "noresume", "verbosity", "helpshort"):
        assert action not in names, action
    before = open(os.path.join(trained, "eval.txt")).read() if os.path.exists(os.path.join(trained, "eval.txt")) else ""
    result = subprocess.run([sys.executable, "main.py", "--flagfile", os.path.join(trained, "flagfile.txt"),
                             "--progressive_every", "10", "--sample_size", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    after = open(os.path.join(trained, "eval.txt")).read() if os.path.exists(os.path.join(trained, "eval.txt")) else ""
    assert after == before  # only the progressive run: no evaluation, no training


def test_an_inception_fid_below_50000_samples_is_recorded_as_not_comparable():
    import types
    import evaluate
    from config import Config
    flags = Config.make(sampler="ddim", eta=0.0, skip_type="quadratic", clip_denoised=True,
                        fid_cache="stats.npz", fid_quantize=True, seed=3)
    sampler = types.SimpleNamespace(timesteps=list(range(0, 1000, 20)))
    evaluator = types.SimpleNamespace(feature="inception", weights_sha256="a" * 12, statistics_sha256="b" * 12)
    record = evaluate.protocol_record(flags, sampler, evaluator, 10_000, 7, "c" * 12, time.time())
    assert record["steps"] == 50 and record["statistics_sha256"] == "b" * 12
    assert "not comparable with published FIDs" in record["comparable"]
    assert "not comparable" in evaluate.describe(record)
    assert "comparable" not in evaluate.protocol_record(flags, sampler, evaluator, 50_000, 7, "c" * 12, time.time())
    evaluator.feature = "digits"
    assert "comparable" not in evaluate.protocol_record(flags, sampler, evaluator, 100, 7, "c" * 12, time.time())
