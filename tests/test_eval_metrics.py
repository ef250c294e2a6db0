"""--metrics: precision/recall, density/coverage, KID and sFID in the streamed --eval, against the
same metrics computed all at once from the saved samples (prdc for the nearest-neighbour
ones); the batch-by-batch statistics of the spatial features against float64 statistics of
all of them; an older statistics file, non-finite reference features and unknown names."""
import glob
import json
import os
import struct

import numpy as np
import pytest
import torch
from prdc import compute_prdc

from config import Config, ConfigError
from score import Evaluator, ScoreError, frechet_distance, load_images, statistics
from score.distribution import kernel_inception_distance
from score.metrics import Moments, save_statistics
from score.scorer import METRICS
from conftest import run_main

NUM_IMAGES, BATCH = 48, 8
EVAL = ["--notrain", "--eval", "--num_images", str(NUM_IMAGES), "--eval_batch_size", str(BATCH)]


def test_moments_of_batches_equal_the_statistics_of_all_features():
    """Sums about a shift, batch by batch, against float64 statistics of everything at once; a
    shift far from the mean (features around 1,000, shift 0) costs precision but stays exact
    to 1e-9 of the covariance."""
    generator = torch.Generator().manual_seed(0)
    features = 1000 + torch.randn(301, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 6, generator=generator, dtype=torch.float64)
    mu, sigma = statistics(features)
    for shift in (mu + 0.3, torch.zeros(6, dtype=torch.float64)):
        moments = Moments(shift)
        for batch in features.split(64):  # 4 of 64 and one of 45
            moments.add(batch)
        got_mu, got_sigma = moments.statistics()
        torch.testing.assert_close(got_mu, mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_sigma, sigma, rtol=1e-9, atol=1e-9 * float(sigma.abs().max()))
    with pytest.raises(ScoreError, match="at least 2 images"):
        Moments(mu).statistics()


def tfevents_scalars(logdir):
    """{tag: [(step, value)]} of every TensorBoard event file in logdir, read as TFRecords."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        with open(path, "rb") as file:
            while header := file.read(12):
                length = struct.unpack("<Q", header[:8])[0]
                event = event_pb2.Event.FromString(file.read(length))
                file.read(4)
                for value in event.summary.value:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow
def test_every_metric_of_the_streamed_eval_equals_the_metrics_of_its_saved_samples(trained_copy):
    samples = os.path.join(trained_copy, "samples.npz")
    result = run_main("--logdir", trained_copy, *EVAL, "--metrics", ",".join(METRICS), "--save_samples", samples)
    with open(os.path.join(trained_copy, "eval.txt")) as file:
        record = json.loads(file.read().splitlines()[-1])

    evaluator = Evaluator("digits", metrics=METRICS)  # the training digits, all 1,500
    features, logits, spatial = evaluator.features(load_images(samples))
    real = evaluator.reference_features
    theirs = compute_prdc(real.numpy(), features.numpy(), nearest_k=5)  # density and coverage: k = 5
    for name in ("density", "coverage"):
        assert record[name] == pytest.approx(theirs[name], abs=1e-12), name
    theirs = compute_prdc(real.numpy(), features.numpy(), nearest_k=3)  # precision and recall: k = 3
    for name in ("precision", "recall"):
        assert record[name] == pytest.approx(theirs[name], abs=1e-12), name
    # 48 samples: KID's subsets shrink to 48 of each set
    expected = kernel_inception_distance(real, features, 100, NUM_IMAGES)
    expected["sFID"] = frechet_distance(*statistics(spatial), *evaluator.reference_spatial)
    expected["FID"] = frechet_distance(*statistics(features), *evaluator.reference)
    for name, value in expected.items():  # features of batches of 8 against one pass: float32 rounding
        assert record[name] == pytest.approx(value, rel=1e-5), name
    assert 0 < record["sFID"] and record["KID"] != 0
    assert record["metrics"] == list(METRICS) and record["kid_subsets"] == [100, NUM_IMAGES]
    assert record["pr_k"] == [3, 5] and record["reference_features"] == 1500
    assert "sFID" in result.stdout and "KID over 100 subsets of 48" in result.stdout
    scalars = tfevents_scalars(trained_copy)
    for name in ("eval/FID", "eval/precision", "eval/KID", "eval/sFID"):
        assert scalars[name] == [(2, pytest.approx(record[name[5:]], rel=1e-6))], name


def test_an_older_statistics_file_scores_fid_and_is_and_says_what_it_cannot_in_one_line(tmp_path, capsys):
    reference = Evaluator("digits")
    old = str(tmp_path / "old.npz")
    save_statistics(old, *reference.reference)  # mu and sigma only, as files were written before
    capsys.readouterr()
    evaluator = Evaluator("digits", old, metrics=METRICS, dataset="digits")
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: {old}: no reference features for pr, kid, sfid")
    assert "python -m score.fid_cache --dataset digits" in notes[0]
    assert evaluator.metrics == ("fid", "is")
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    scores = evaluator.score(*evaluator.features(images))
    assert set(scores) == {"FID", "IS", "IS_std"}
    assert scores == reference.score(*reference.features(images))


def test_reference_features_that_do_not_fit_or_are_not_finite_are_refused(tmp_path):
    mu, sigma = Evaluator("digits").reference
    cases = {"nan": dict(features=np.full((20, 64), np.nan, dtype=np.float32)),
             "narrow": dict(features=np.zeros((20, 63), dtype=np.float32)),
             "half": dict(mu_s=np.zeros(448))}
    expected = {"nan": "features hold NaN, inf or no numbers", "narrow": "features (20, 63) are not (N, 64)",
                "half": "mu_s and sigma_s (the spatial statistics) do not match"}
    for case, extras in cases.items():
        path = str(tmp_path / f"{case}.npz")
        save_statistics(path, mu, sigma, **extras)
        with pytest.raises(ScoreError, match="recreate them with") as error:
            Evaluator("digits", path, metrics=METRICS)
        assert expected[case] in str(error.value) and "\n" not in str(error.value)


def test_metric_names_are_checked_before_anything_runs():
    for metrics, words in ((("fid", "bogus"), "(bogus unknown)"), ((), "(empty)"), (("fid", "fid"), "each once")):
        with pytest.raises(ConfigError, match="expected some of fid,is,pr,kid,sfid") as error:
            Config.make(metrics=metrics)
        assert words in str(error.value)
    assert Config.make().eval.metrics == ("fid", "is")  # today's score, and its cost


def test_a_process_without_batches_brings_empty_features():
    """More processes than batches (--nprocs 2, 500 samples in batches of 500): the idle rank's
    share is empty, not an error (it was: torch.cat of nothing)."""
    import evaluate
    evaluator = Evaluator("digits")
    features, logits, spatial = evaluate.stored_features(None, range(0), evaluator, (64, 10), "cpu")
    assert features.shape == (0, 64) and logits.shape == (0, 10) and features.dtype == torch.float64
    assert spatial is None
