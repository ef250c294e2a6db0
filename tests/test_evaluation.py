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
import evaluate
import streams
from store import BatchStore, StoreError
from builders import build_sampler
from config import Config
from diffusion import GaussianDiffusionSampler, beta_schedule
from score import Evaluator
from score.metrics import to_uint8
from conftest import ROOT, TINY_ARGS, run_main, run_main_process
from test_untrusted_files import outcome_within

NUM_IMAGES, BATCH = 48, 4
EVAL = ["--notrain", "--eval", "--num_images", str(NUM_IMAGES), "--eval_batch_size", str(BATCH)]


# `trained` (conftest): a logdir of TINY_ARGS after 2 training steps; tests that write into a
# logdir take a copy (`trained_copy`, or copy_run below)


def all_at_once(logdir, num_images=NUM_IMAGES, batch=BATCH, seed=0):
    """Scores and samples of the EMA model as the pre-streaming --eval computed them."""
    net = checkpoint.load_model(logdir)
    sampler = GaussianDiffusionSampler(beta_schedule("linear", 1e-4, 0.02, 20))  # TINY_ARGS's T and the full chain
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
def test_streamed_scores_equal_the_all_at_once_path_and_record_their_protocol(trained_copy):
    trained = trained_copy
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
                "skip_type": "quadratic", "clip_denoised": True, "beta_schedule": "linear", "ema": True,
                "checkpoint_step": 2,
                "checkpoint_sha256": ckpt_sha, "feature_network": "digits", "quantize": True,
                "seed": 0, "processes": 1, "torch": torch.__version__, "network_precision": "fp32"}
    for name, value in protocol.items():
        assert record[name] == value, name
    assert record["wall_time_s"] > 0 and len(record["feature_weights_sha256"]) == 12
    assert f"{NUM_IMAGES} samples of the EMA model at step 2" in result.stdout
    assert not os.path.exists(os.path.join(trained, "eval_state"))  # removed once scored


def copy_run(trained, logdir):
    os.makedirs(logdir)
    for name in ("ckpt.pt", "flagfile.txt"):
        with open(os.path.join(trained, name), "rb") as src, open(os.path.join(logdir, name), "wb") as dst:
            dst.write(src.read())
    return logdir


# the stochastic solver: its noise, too, must come from each batch's own generator
SDE_SOLVER = ["--sampler", "sde_dpm_solver++", "--sample_steps", "10"]


@pytest.mark.slow
def test_an_eval_killed_mid_way_resumes_to_identical_scores(trained, tmp_path):
    uninterrupted = copy_run(trained, str(tmp_path / "uninterrupted"))
    run_main("--logdir", uninterrupted, "--notrain", "--eval", "--num_images", str(NUM_IMAGES),
             "--eval_batch_size", "1", *SDE_SOLVER)
    logdir = copy_run(trained, str(tmp_path / "killed"))
    command = ["--logdir", logdir, "--notrain", "--eval", "--num_images", str(NUM_IMAGES), "--eval_batch_size", "1",
               *SDE_SOLVER]
    args = [sys.executable, os.path.join(ROOT, "main.py"), *TINY_ARGS, *command]
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
    resumed = run_main(*command)  # the same command, to its end: in this process
    assert "were finished by an earlier run" in resumed.stderr
    expected, record = last_record(uninterrupted), last_record(logdir)
    assert record["sampler"] == "sde_dpm_solver++" and record["solver_order"] == 2
    for name in ("FID", "IS", "IS_std"):
        assert record[name] == expected[name], name  # bit for bit


@pytest.mark.parametrize("sampler", ["sde_dpm_solver++", "ddpm"])
def test_each_process_draws_the_batches_one_process_would(sampler, monkeypatch):
    """sample_batches on 2 processes (rank and world size stood in for) gives, batch for
    batch, what one process gives: x_T and every noise draw of the chain come from the batch's
    own generator. Catches a noise source shared across batches or seeded by the rank."""
    config = Config.make(T=20, img_size=8, img_channels=1, sampler=sampler, sample_steps=5, num_images=10,
                         eval_batch_size=3, seed=5)
    sampler = build_sampler(config.sampling, config.diffusion)
    net = ToyNet()
    shares = {}
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        monkeypatch.setattr(evaluate.distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(evaluate.distributed, "world_size", lambda size=world_size: size)
        shares[rank, world_size] = dict(evaluate.sample_batches(config, sampler, net, 10, torch.device("cpu")))
    one = shares[0, 1]
    two = {**shares[0, 2], **shares[1, 2]}
    assert sorted(one) == sorted(two) == [0, 1, 2, 3] and set(shares[0, 2]).isdisjoint(shares[1, 2])
    for i in one:
        assert torch.equal(one[i], two[i]), i
    assert not torch.equal(one[0][:1], one[1][:1])


class ToyNet(torch.nn.Module):
    """A fixed eps_theta(x_t, t) = 0.3 x_t + 0.01 t: deterministic, and nonlinear in nothing."""

    def forward(self, x, t):
        return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.slow
def test_sampling_only_needs_no_inception_weights_and_draws_the_scored_samples(trained_copy, tmp_path):
    trained = trained_copy
    # a process of its own, that surely loaded no Inception network before
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty_torch_home"))  # no weights anywhere
    out = str(tmp_path / "samples.npz")
    run_main_process("--logdir", trained, *EVAL, "--fid_feature", "inception", "--noscore", "--save_samples", out,
                     env=env)
    with np.load(out) as stored:
        array = stored["arr_0"]
    _, images = all_at_once(trained)
    assert array.dtype == np.uint8 and array.shape == (NUM_IMAGES, 8, 8, 1)
    np.testing.assert_array_equal(array, to_uint8(images).permute(0, 2, 3, 1).numpy())
    refused = run_main("--logdir", trained, *EVAL, "--noscore", expect_ok=False)
    assert refused.returncode != 0 and "--noscore only draws samples" in refused.stderr


@pytest.mark.slow
def test_the_saved_flagfile_holds_the_configuration_not_the_actions(trained_copy):
    trained = trained_copy
    with open(os.path.join(trained, "flagfile.txt")) as file:
        lines = file.read().splitlines()
    names = {line[2:].split("=")[0] for line in lines}
    assert "--ch=32" in lines and "--T=20" in lines
    for action in ("train", "notrain", "eval", "noeval", "resume", "noresume", "verbosity", "helpshort"):
        assert action not in names, action
    before = open(os.path.join(trained, "eval.txt")).read() if os.path.exists(os.path.join(trained, "eval.txt")) else ""
    run_main("--flagfile", os.path.join(trained, "flagfile.txt"), "--progressive_every", "10", "--sample_size", "2",
             tiny=False)
    after = open(os.path.join(trained, "eval.txt")).read() if os.path.exists(os.path.join(trained, "eval.txt")) else ""
    assert after == before  # only the progressive run: no evaluation, no training


def test_an_inception_fid_below_50000_samples_is_recorded_as_not_comparable():
    import types
    import evaluate
    from config import Config
    flags = Config.make(sampler="ddim", sample_steps=50, eta=0.0, skip_type="quadratic", clip_denoised=True,
                        fid_cache="stats.npz", fid_quantize=True, seed=3)
    sampler = build_sampler(flags.sampling, flags.diffusion)
    evaluator = types.SimpleNamespace(feature="inception", weights_sha256="a" * 12, statistics_sha256="b" * 12,
                                      record=lambda count: {"metrics": ["fid", "is"]})
    record = evaluate.protocol_record(flags, sampler, evaluator, 10_000, 7, "c" * 12, time.time())
    assert record["steps"] == 49 and record["statistics_sha256"] == "b" * 12  # quadratic repeats t = 0
    assert "not comparable with published FIDs" in record["comparable"]
    assert "not comparable" in evaluate.describe(record)
    assert "comparable" not in evaluate.protocol_record(flags, sampler, evaluator, 50_000, 7, "c" * 12, time.time())
    evaluator.feature = "digits"
    assert "comparable" not in evaluate.protocol_record(flags, sampler, evaluator, 100, 7, "c" * 12, time.time())


def test_the_protocol_record_names_the_spacing_used_the_solver_order_and_ddims_eps():
    """"auto" is recorded as the spacing it resolved to, a solver's order as the one it ran
    (0 asks for the default), and DDIM's eps convention where it matters (clipped x0)."""
    import types
    import evaluate
    from config import Config
    from sampling import DEFAULT_SKIP_TYPE, SAMPLERS
    evaluator = types.SimpleNamespace(feature="digits", weights_sha256="a" * 12, statistics_sha256=None,
                                      record=lambda count: {"metrics": ["fid", "is"]})

    def record_of(**values):
        flags = Config.make(sample_steps=10, **values)
        record = evaluate.protocol_record(flags, build_sampler(flags.sampling, flags.diffusion), evaluator,
                                          100, 7, "c" * 12, time.time())
        return record, evaluate.describe(record)

    record, line = record_of(sampler="dpm_solver")
    assert record["solver_order"] == SAMPLERS["dpm_solver"].DEFAULT_ORDER == 3 and "dpm_solver sampler of order 3" in line
    assert record["skip_type"] == DEFAULT_SKIP_TYPE == "quadratic" and f"{record['skip_type']} skips" in line
    record, line = record_of(sampler="unipc", solver_order=1, skip_type="logsnr")
    assert record["solver_order"] == 1 and record["skip_type"] == "logsnr" and "logsnr skips" in line
    record, line = record_of(sampler="ddim", ddim_eps="from_x0")
    assert record["ddim_eps"] == "from_x0" and "ddim sampler (from_x0 eps beside the clipped x0)," in line and "order" not in line
    record, _ = record_of(sampler="ddim", clip_denoised=False)
    assert "ddim_eps" not in record  # unclipped, both conventions are one update


# ---------------------------------------------------------------- the store keeps what is not its own


def evaluate_here(logdir, num_images, **values):
    """--eval of logdir's checkpoint with batches of BATCH, in this process (evaluate.evaluate,
    as main.py calls it, without the seconds of starting main.py)."""
    with open(os.path.join(logdir, "flagfile.txt")) as file:
        text = file.read()
    evaluate.evaluate(Config.from_flagfile_text(text, logdir=logdir, eval=True, num_images=num_images,
                                                eval_batch_size=BATCH, **values), "cpu")


class Killed(Exception):
    """Stands for a kill -9 right after a batch was saved."""


def killed_after(monkeypatch, count, logdir, num_images, **values):
    """evaluate_here, stopped once `count` batches are finished; the store's folder."""
    save, saved = BatchStore.save, []

    def save_then_die(store, i, tensors):
        save(store, i, tensors)
        saved.append(store.folder)
        if len(saved) == count:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(BatchStore, "save", save_then_die)
        with pytest.raises(Killed):
            evaluate_here(logdir, num_images, **values)
    return saved[0]


def tree(folder):
    """{path relative to folder: file content} of every file under folder."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def notes(capsys, text):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:") and text in line]


@pytest.mark.slow
def test_a_quick_eval_keeps_other_stores_and_foreign_files_in_a_symlinked_eval_state(
        trained, tmp_path, monkeypatch, capsys):
    """eval_state a symlink to scratch storage that holds other things: an interrupted 16-image
    evaluation, then a quick 12-image one, then the first again. The quick one lists the first's
    store in one line and deletes nothing but its own; the first resumes from its 2 batches to
    the all-at-once scores. Catches the store deleting what is not its own (through the link)."""
    logdir = copy_run(trained, str(tmp_path / "run"))
    scratch = tmp_path / "scratch"
    (scratch / "keep").mkdir(parents=True)
    (scratch / "keep" / "results.txt").write_text("someone else's")
    os.symlink(scratch, os.path.join(logdir, "eval_state"))
    foreign = tree(scratch)
    first = killed_after(monkeypatch, 2, logdir, 16)
    assert os.path.dirname(first) == os.path.join(logdir, "eval_state")
    kept = tree(first)
    assert sorted(kept) == ["batch_000000.pt", "batch_000001.pt", "identity.json"]
    capsys.readouterr()
    evaluate_here(logdir, 12)
    (note,) = notes(capsys, "other unfinished evaluation")
    assert note.startswith(f"note: 1 other unfinished evaluation(s) kept in {logdir}/eval_state (")
    assert f"{os.path.basename(first)}: 2 batches, " in note and note.endswith(f"rm -r {first}")
    assert tree(first) == kept and sorted(os.listdir(scratch)) == sorted(["keep", os.path.basename(first)])
    evaluate_here(logdir, 16)
    assert notes(capsys, "other unfinished") == []
    expected, _ = all_at_once(trained, num_images=16)
    for name in ("FID", "IS", "IS_std"):
        assert last_record(logdir)[name] == pytest.approx(expected[name], rel=1e-6), name
    assert os.readlink(os.path.join(logdir, "eval_state")) == str(scratch) and tree(scratch) == foreign


def test_a_symlinked_eval_state_and_the_folder_it_points_to_outlive_the_store(tmp_path):
    """The finished store removes its own folder only: an empty scratch folder behind the
    eval_state link stays for the next evaluation. Catches removing eval_state through the link."""
    scratch, logdir = tmp_path / "scratch", tmp_path / "run"
    scratch.mkdir()
    logdir.mkdir()
    os.symlink(scratch, logdir / "eval_state")
    layout = {"grid": (torch.uint8, (1, 1, 2, 2))}
    store = BatchStore(str(logdir), {"any": "identity"}, lambda i: layout)
    store.save(0, {"grid": torch.zeros((1, 1, 2, 2), dtype=torch.uint8)})
    assert store.finished(range(2)) == {0}
    store.remove()
    assert os.readlink(logdir / "eval_state") == str(scratch) and os.listdir(scratch) == []


def test_a_folder_at_the_stores_key_is_used_only_with_the_stores_identity(tmp_path):
    """The store's own folder is found by its key; it is taken up only if its identity.json is
    the store's (or, as written before stores were marked, the identity itself), so a folder
    of other files there is refused, untouched, rather than filled and deleted at the end."""
    layout = {"grid": (torch.uint8, (1, 1, 2, 2))}
    store = BatchStore(str(tmp_path), {"any": ["identity"]}, lambda i: layout)
    store.save(0, {"grid": torch.zeros((1, 1, 2, 2), dtype=torch.uint8)})
    identity = os.path.join(store.folder, "identity.json")
    with open(identity, "w") as file:
        json.dump({"any": ["identity"]}, file)  # an unmarked store of this identity
    again = BatchStore(str(tmp_path), {"any": ["identity"]}, lambda i: layout)
    assert again.finished(range(1)) == {0} and json.load(open(identity))["store"] == "ddpm-eval"
    os.remove(identity)
    before = tree(store.folder)
    with pytest.raises(StoreError, match="is not this evaluation's store"):
        BatchStore(str(tmp_path), {"any": ["identity"]}, lambda i: layout)
    assert tree(store.folder) == before


@pytest.mark.slow
def test_malformed_finished_batches_are_drawn_again_to_the_uninterrupted_results(
        trained, tmp_path, monkeypatch, capsys):
    """An evaluation killed after 5 of its 6 batches, then: batch 0 truncated, batch 1 with a
    renamed key, batch 2 missing a sample, batch 3 with NaN logits. Run again, each is named
    in one note and drawn again, and the scores and the .npz are those of the all-at-once path.
    Catches finished batches used unchecked (a traceback, a short .npz or a NaN score), and
    a folder in eval_state that is not a store deleted."""
    logdir = copy_run(trained, str(tmp_path / "run"))
    os.makedirs(os.path.join(logdir, "eval_state", "mine"))
    with open(os.path.join(logdir, "eval_state", "mine", "notes.txt"), "w") as file:
        file.write("not the store's")
    npz = str(tmp_path / "samples.npz")
    folder = killed_after(monkeypatch, 5, logdir, 24, save_samples=npz)
    path = [os.path.join(folder, f"batch_{i:06d}.pt") for i in range(5)]
    with open(path[0], "r+b") as file:
        file.truncate(os.path.getsize(path[0]) // 2)
    batches = {i: torch.load(path[i], weights_only=True) for i in (1, 2, 3)}
    batches[1]["feature"] = batches[1].pop("features")
    batches[2]["samples"] = batches[2]["samples"][1:]
    batches[3]["logits"][0, 0] = float("nan")
    for i, batch in batches.items():
        torch.save(batch, path[i])
    capsys.readouterr()
    evaluate_here(logdir, 24, save_samples=npz)
    redrawn = notes(capsys, "is unreadable or malformed")
    assert len(redrawn) == 4
    for i, why in enumerate(["RuntimeError", "keys ['feature', 'grid', 'logits', 'samples']",
                             "samples is uint8 (3, 1, 8, 8), expected uint8 (4, 1, 8, 8)", "logits holds NaN"]):
        assert redrawn[i].startswith(f"note: {path[i]} is unreadable or malformed (") and why in redrawn[i]
        assert redrawn[i].endswith(f"drawing batch {i} again")
    expected, images = all_at_once(trained, num_images=24)
    for name in ("FID", "IS", "IS_std"):
        assert last_record(logdir)[name] == pytest.approx(expected[name], rel=1e-6), name
    with np.load(npz) as stored:
        np.testing.assert_array_equal(stored["arr_0"], to_uint8(images).permute(0, 2, 3, 1).numpy())
    assert os.listdir(os.path.join(logdir, "eval_state")) == ["mine"]


@pytest.mark.slow
def test_entries_the_store_did_not_write_are_never_read_as_batches(trained, tmp_path, monkeypatch, capsys):
    """An evaluation killed after 4 of its 6 batches, then: batch 0 a symlink to a copy of batch
    1 kept outside the store (used as batch 0 until now: FID 696.47 against 688.37, recorded as
    a normal run), batch 1 a FIFO (a read blocked for ever), batch 2 an empty folder (a
    traceback). Each is one note and drawn again; the scores are the all-at-once path's, and
    the file the link pointed to is untouched. Catches a store that follows links or opens
    what is not a regular file."""
    logdir = copy_run(trained, str(tmp_path / "run"))
    folder = killed_after(monkeypatch, 4, logdir, 24)
    path = [os.path.join(folder, f"batch_{i:06d}.pt") for i in range(4)]
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(open(path[1], "rb").read())
    copied = outside.read_bytes()
    for i in range(3):
        os.remove(path[i])
    os.symlink(outside, path[0])
    os.mkfifo(path[1])
    os.mkdir(path[2])
    capsys.readouterr()
    evaluate_here(logdir, 24)
    redrawn = notes(capsys, "is unreadable or malformed")
    for i, why in enumerate(["is a symbolic link", "is a FIFO (named pipe)", "is a folder"]):
        assert redrawn[i].startswith(f"note: {path[i]} is unreadable or malformed (") and why in redrawn[i]
    assert len(redrawn) == 3
    expected, _ = all_at_once(trained, num_images=24)
    for name in ("FID", "IS", "IS_std"):
        assert last_record(logdir)[name] == pytest.approx(expected[name], rel=1e-6), name
    assert outside.read_bytes() == copied  # the link was removed, never what it points to


def test_finished_batches_are_found_in_one_listing_of_the_store(tmp_path):
    """--num_images 10^12 sat minutes checking 4 billion batch names one by one: the store lists
    its folder once, so that its finished batches of a huge range are found at once."""
    layout = {"grid": (torch.uint8, (1, 1, 2, 2))}
    store = BatchStore(str(tmp_path), {"huge": True}, lambda i: layout)
    for i in (0, 7):
        store.save(i, {"grid": torch.zeros((1, 1, 2, 2), dtype=torch.uint8)})
    found = {}
    assert outcome_within(lambda: found.update(all=store.finished(range(10 ** 12)),
                                               later=store.finished(range(1, 10 ** 12))), seconds=10) is None
    assert found == {"all": {0, 7}, "later": {7}}


@pytest.mark.slow
def test_a_new_checkpoint_between_an_interrupted_and_a_resumed_eval_draws_every_batch_again(
        trained, tmp_path, monkeypatch, capsys):
    """The README's promise: training went on (or --resume wrote a new ckpt.pt) between an
    interrupted --eval and its rerun, so the rerun's samples come from the new weights only.
    Its scores equal a fresh evaluation of the new checkpoint in another logdir, and the old
    store is kept and listed, not taken up. Catches a store key that ignores the checkpoint."""
    logdir = copy_run(trained, str(tmp_path / "run"))
    old_store = killed_after(monkeypatch, 3, logdir, 24)
    state = torch.load(os.path.join(logdir, "ckpt.pt"), weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["ema_model"] = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
                          if tensor.is_floating_point() else tensor for name, tensor in state["ema_model"].items()}
    state["step"] += 1
    fresh = copy_run(trained, str(tmp_path / "fresh"))
    for folder in (logdir, fresh):
        torch.save(state, os.path.join(folder, "ckpt.pt"))
    capsys.readouterr()
    evaluate_here(logdir, 24)
    stderr = capsys.readouterr().err
    assert "finished by an earlier run" not in stderr
    assert f"1 other unfinished evaluation(s) kept in {logdir}/eval_state ({os.path.basename(old_store)}: 3 batches" \
        in stderr
    evaluate_here(fresh, 24)
    resumed, expected = last_record(logdir), last_record(fresh)
    assert resumed["checkpoint_sha256"] == expected["checkpoint_sha256"] and resumed["checkpoint_step"] == 3
    for name in ("FID", "IS", "IS_std"):
        assert resumed[name] == expected[name], name
    old, _ = all_at_once(trained, num_images=24)
    assert abs(old["FID"] - expected["FID"]) > 1e-3  # the new weights do sample differently


@pytest.mark.parametrize("when", ["before", "after"])
def test_the_recorded_hash_is_that_of_the_checkpoint_loaded_while_a_run_saves_another(
        trained, tmp_path, monkeypatch, when):
    """A training run renames a new ckpt.pt over the old one just before or just after the
    evaluation unpickles it: the weights and the hash must come from the same bytes, those
    read first. Catches hashing the path again after loading, or loading it again after
    hashing."""
    logdir = copy_run(trained, str(tmp_path / "run"))
    path = os.path.join(logdir, "ckpt.pt")
    with open(path, "rb") as file:
        read = hashlib.sha256(file.read()).hexdigest()[:12]
    saved = torch.load(path, weights_only=True)
    newer = {**saved, "step": saved["step"] + 1,
             "ema_model": {name: tensor + 1 for name, tensor in saved["ema_model"].items()}}
    load, replaced = torch.load, []

    def load_while_saving(*args, **kwargs):
        if when == "before" and not replaced:
            replaced.append(checkpoint.save(path, newer))
        state = load(*args, **kwargs)
        if when == "after" and not replaced:
            replaced.append(checkpoint.save(path, newer))
        return state

    monkeypatch.setattr(torch, "load", load_while_saving)
    ema, step, sha256 = checkpoint.load_ema(Config.from_flagfile_text(
        open(os.path.join(logdir, "flagfile.txt")).read(), logdir=logdir), "cpu")
    monkeypatch.undo()
    assert replaced and checkpoint.load(path)["step"] == saved["step"] + 1  # the race happened
    assert step == saved["step"] and sha256 == read
    for name, tensor in ema.state_dict().items():
        assert torch.equal(tensor, saved["ema_model"][name]), name
