"""Every evaluation path of main.py run once, end to end, on a tiny digits model: --eval_step,
--save_samples (PNG folder and .npz, one and two processes), --eval_dir, --nofid_quantize,
--bpd (one and two processes), --progressive_every and --interp_t."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_main, run_main_process

pytestmark = pytest.mark.slow  # each test runs main.py's command several times
EVAL = ["--notrain", "--eval", "--num_images", "16", "--eval_batch_size", "4", "--device", "cpu"]
TWO = ["--nprocs", "2"]
BPD = ["--bpd", "--bpd_num_images", "12"]  # 3 batches of 4: 2 on one process, 1 on the other


def scores(logdir):
    """The JSON lines of <logdir>/eval.txt."""
    with open(os.path.join(logdir, "eval.txt")) as file:
        return [json.loads(line) for line in file]


def png_folder(path):
    names = sorted(os.listdir(path))
    return names, np.stack([np.asarray(Image.open(os.path.join(path, name))) for name in names])


def test_eval_step_scores_the_ema_model_during_training(trained):
    """--eval_step 2 in a 2-step run: one evaluation, at step 2. Catches the flag never
    reaching the loop, or an evaluation at the wrong steps."""
    # conftest's `trained`: a logdir after 2 training steps that scored its EMA model at step 2
    (line,) = scores(trained)
    assert line["step"] == 2 and {"FID", "IS", "IS_std"} <= set(line)
    assert 0 < line["FID"] < 1e4 and 1 <= line["IS"] <= 10


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """Logdirs of --eval runs on copies of `trained`, each saving its 16 samples: png1 (one
    process, a PNG folder, also --bpd, --progressive_every 5 and --interp_t 10), png2 (two
    processes, a PNG folder, also --bpd), npz2 (two processes, an .npz) and npz1 (one process,
    an .npz, --nofid_quantize)."""
    runs = {"png1": [*BPD, "--progressive_every", "5", "--interp_t", "10"], "png2": [*BPD, *TWO],
            "npz2": TWO, "npz1": ["--nofid_quantize"]}
    logdirs = {}
    for name, extra in runs.items():
        logdirs[name] = str(tmp_path_factory.mktemp("cli") / name)
        shutil.copytree(trained, logdirs[name])
        target = os.path.join(logdirs[name], "samples" + (".npz" if name.startswith("npz") else ""))
        run = run_main_process if "--nprocs" in extra else run_main  # two processes: their own command
        run(*EVAL, "--logdir", logdirs[name], "--save_samples", target, *extra)
    return logdirs


def test_saved_samples_are_the_same_in_every_format_and_on_two_processes(evaluated):
    """--save_samples as a PNG folder and as an .npz, from one process and from two (each rank
    writes its own PNGs; the .npz is gathered): the same 16 images, in the same order, and the
    same scores; --nofid_quantize scores the unrounded samples: a different FID, but not by
    much (rounding to 8 bits moves a pixel by at most 1/510). Catches shards that overwrite
    each other or are numbered from 0 on every rank, a gather in the wrong order, and
    --nofid_quantize being ignored."""
    names, png1 = png_folder(os.path.join(evaluated["png1"], "samples"))
    assert names == [f"{i:06d}.png" for i in range(16)]
    names2, png2 = png_folder(os.path.join(evaluated["png2"], "samples"))
    # the same samples up to float rounding, which may move a pixel across a rounding boundary
    assert names2 == names and np.abs(png2.astype(int) - png1).max() <= 1
    for name in ("npz1", "npz2"):
        with np.load(os.path.join(evaluated[name], "samples.npz")) as stored:
            assert stored["arr_0"].shape == (16, 8, 8, 1)
            assert np.abs(stored["arr_0"][..., 0].astype(int) - png1).max() <= 1
    fid = {name: scores(logdir)[-1]["FID"] for name, logdir in evaluated.items()}
    assert fid["png2"] == pytest.approx(fid["png1"], rel=1e-6)
    assert fid["npz2"] == pytest.approx(fid["png1"], rel=1e-6)
    assert fid["npz1"] != pytest.approx(fid["png1"], rel=1e-9)  # not rounded to 8 bits
    assert fid["npz1"] == pytest.approx(fid["png1"], rel=0.02)


def test_eval_dir_scores_the_saved_samples_as_eval_did(evaluated, tmp_path):
    """--eval_dir of the PNG folder that --eval saved: the score --eval gave (the same 8-bit
    images). Catches --eval_dir ignored (it would sample afresh) or reading other images."""
    logdir = str(tmp_path / "dir")
    run_main("--notrain", "--eval", "--logdir", logdir, "--eval_dir", os.path.join(evaluated["png1"], "samples"))
    assert not os.path.exists(os.path.join(logdir, "samples_ema.png"))  # nothing sampled
    assert scores(logdir)[-1]["FID"] == pytest.approx(scores(evaluated["png1"])[-1]["FID"], rel=1e-6)


def test_bits_per_dim_on_two_processes_equals_one_and_looking_inside_writes_its_images(evaluated):
    """--bpd over 12 test digits: each process takes whole batches whose noise is seeded by
    the batch's index, so two processes sum to one process's bound. The one-process run also
    wrote --progressive_every 5 strips (4 of the 20 steps: t = 15, 10, 5, 0) and an
    --interp_t 10 grid (the two images and 9 mixtures). Catches per-process noise (the bound
    then moves by its Monte Carlo error), a sum that drops a rank, and either flag ignored."""
    one, two = evaluated["png1"], evaluated["png2"]
    results = [json.load(open(os.path.join(logdir, "bpd.json"))) for logdir in (one, two)]
    assert results[0]["num_images"] == results[1]["num_images"] == 12
    for name in ("total_bpd", "prior_bpd", "total_bpd_stderr"):
        assert results[1][name] == pytest.approx(results[0][name], rel=1e-9), name
    assert results[1]["terms_bpd"] == pytest.approx(results[0]["terms_bpd"], rel=1e-9)
    assert os.path.exists(os.path.join(one, "bpd.png"))

    cell = 32 + 2  # an 8x8 image enlarged 4x, and 2 px between images
    strips = sorted(os.listdir(os.path.join(one, "progressive")))
    assert strips == ["progressive.gif"] + [f"progressive_{b:04d}.png" for b in range(4)]  # --sample_size 4
    assert Image.open(os.path.join(one, "progressive", strips[1])).size == (4 * cell + 2, 2 * cell + 2)
    assert Image.open(os.path.join(one, "interpolation", "t10.png")).size == (11 * cell + 2, cell + 2)
