"""Precision, recall, density, coverage and KID (score/distribution.py) against second
libraries on the same features: prdc 0.2's compute_prdc and torchmetrics 1.9.0's
KernelInceptionDistance (the same subsets: its global generator seeded as ours), and
closed forms: identical sets, far-apart sets, a hand-made MMD.
"""
import numpy as np
import pytest
import torch

from score import distribution
from score.distribution import kernel_inception_distance, precision_recall_density_coverage, unbiased_mmd2


def features(n, d=16, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_density_coverage_equal_prdc(k, capsys):
    """On overlapping but different clouds (fewer real than generated samples), all four
    equal prdc's. Catches the k-NN radius counting the point itself, precision and recall
    swapped, a closed ball instead of an open one, and density not divided by k."""
    prdc = pytest.importorskip("prdc")
    real, fake = features(300, seed=1), 1.2 * features(400, seed=2) + 0.3
    theirs = prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    capsys.readouterr()  # prdc prints the sample counts
    ours = precision_recall_density_coverage(real, fake, k_pr=k, k_dc=k)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-12), name
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1


def test_blocks_change_nothing(monkeypatch):
    """The blocked distances give what one block gives. Catches a block's rows offset."""
    real, fake = features(250, seed=3), features(180, seed=4, shift=0.2)
    whole = precision_recall_density_coverage(real, fake)
    monkeypatch.setattr(distribution, "BLOCK", 37)
    assert precision_recall_density_coverage(real, fake) == whole


def test_identical_sets_and_far_apart_sets_are_the_extremes():
    """A set against itself: precision = recall = coverage = 1 and density exactly 1 (the mean
    count of balls holding a point is the mean count of points in a ball, and an open ball of
    radius r_k holds its centre and k - 1 neighbours: k of them), KID near 0 for two samples
    of one distribution; a set against one moved far away: all four 0 and KID large."""
    x = features(400, seed=5)
    same = precision_recall_density_coverage(x, x)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0, abs=1e-12)
    far = precision_recall_density_coverage(x, x + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    two_samples = kernel_inception_distance(features(600, seed=6), features(600, seed=7), num_subsets=20,
                                            subset_size=300)
    assert abs(two_samples["KID"]) < 3 * two_samples["KID_std"] + 1e-3
    assert kernel_inception_distance(x, x + 3.0, num_subsets=5, subset_size=200)["KID"] > 10


def test_the_unbiased_mmd_of_a_hand_made_case():
    """x = {0, 1}, y = {2, 3} in one dimension: k(a, b) = (a b + 1)^3, so the off-diagonal sums
    are 2 k(0, 1) = 2 and 2 k(2, 3) = 686, the cross sum k(0,2) + k(0,3) + k(1,2) + k(1,3) =
    1 + 1 + 27 + 64 = 93: MMD^2 = (2 + 686) / 2 - 2 * 93 / 4 = 297.5. Catches the diagonal
    kept (the biased estimate) and a kernel without the / D or the + 1."""
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    assert unbiased_mmd2(x, y).item() == pytest.approx(297.5, abs=1e-12)


def test_kid_equals_torchmetrics_on_the_same_subsets():
    """The same 10 subsets of 100 (torchmetrics draws them from the global generator, seeded
    as ours is), mean and population std. Catches a biased MMD, another kernel, the subsets
    drawn in another order and the sample std."""
    torchmetrics_kid = pytest.importorskip("torchmetrics.image.kid")
    real, fake = features(300, d=32, seed=8), 1.1 * features(250, d=32, seed=9) + 0.05
    metric = torchmetrics_kid.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=10, subset_size=100)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(11)
    mean, std = metric.compute()
    ours = kernel_inception_distance(real, fake, num_subsets=10, subset_size=100, seed=11)
    assert ours["KID"] == pytest.approx(mean.item(), rel=1e-10)
    assert ours["KID_std"] == pytest.approx(std.item(), rel=1e-10)


def test_features_that_are_not_finite_or_do_not_fit_are_one_line():
    x = features(50)
    bad = x.clone()
    bad[3, 2] = float("nan")
    for call, words in ((lambda: precision_recall_density_coverage(x, bad), "generated features hold NaN"),
                        (lambda: precision_recall_density_coverage(x, features(50, d=8)), "16 dimensions"),
                        (lambda: kernel_inception_distance(x, x, subset_size=100), "KID subsets of 100"),
                        (lambda: precision_recall_density_coverage(x[:3], x), "k = 3 nearest neighbours")):
        with pytest.raises(ValueError) as refused:
            call()
        assert words in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert np.isfinite(precision_recall_density_coverage(x, x + 0.1)["density"])
