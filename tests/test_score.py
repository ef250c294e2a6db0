"""score/: the Frechet distance and Inception Score against independent computations, the
feature pipeline end to end (FID Inception with random weights: the real ones cannot be
downloaded here), statistics files, two Gloo ranks, the offline digits score, and each error."""
import os
import shlex

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_gan_metrics.core import calculate_frechet_distance, calculate_inception_score

import datasets
from score import (Evaluator, ScoreError, frechet_distance, gather, inception_score, load_images,
                   load_statistics, quantize, save_images, statistics)
from score import digits, fid_cache, inception
from score.metrics import Moments, load_reference
from score.scorer import METRICS


def random_spd(dim, generator):
    a = torch.randn(dim, 2 * dim, generator=generator, dtype=torch.float64)
    return a @ a.T / (2 * dim) + 0.1 * torch.eye(dim, dtype=torch.float64)


def relative(a, b):
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- Frechet distance


def test_frechet_distance_matches_scipy_sqrtm_formula():
    generator = torch.Generator().manual_seed(0)
    for dim in (2, 16, 64):
        mu1, mu2 = torch.randn(2, dim, generator=generator, dtype=torch.float64)
        sigma1, sigma2 = random_spd(dim, generator), random_spd(dim, generator)
        covmean = scipy.linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real
        expected = float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace()
                         - 2 * np.trace(covmean))
        assert relative(frechet_distance(mu1, sigma1, mu2, sigma2), expected) < 1e-6


def test_frechet_distance_of_identical_statistics_is_zero():
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(256, generator=generator, dtype=torch.float64)
    sigma = random_spd(256, generator)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside their sqrtm call
def test_frechet_distance_matches_pytorch_gan_metrics():
    rng = np.random.default_rng(2)
    acts1 = rng.normal(size=(400, 24))
    acts2 = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 0.3
    theirs = calculate_frechet_distance(acts1.mean(0), np.cov(acts1, rowvar=False),
                                        acts2.mean(0), np.cov(acts2, rowvar=False))
    ours = frechet_distance(*statistics(torch.from_numpy(acts1)),
                            *statistics(torch.from_numpy(acts2)))
    assert relative(ours, theirs) < 1e-6


def test_frechet_distance_with_fewer_samples_than_dimensions():
    """Rank-deficient covariances, as with a few samples of 2048-d features.

    With S_i = X_i^T X_i / (n_i - 1) for centred X_i, the nonzero eigenvalues of S1 S2 are the
    squared singular values of X2 X1^T / sqrt((n1 - 1)(n2 - 1)), so tr (S1 S2)^1/2 is the sum
    of those singular values: a small, well-conditioned SVD as an independent reference.
    """
    generator = torch.Generator().manual_seed(3)
    x1 = torch.randn(20, 64, generator=generator, dtype=torch.float64)
    x2 = 2 * torch.randn(15, 64, generator=generator, dtype=torch.float64) + 0.5
    (mu1, sigma1), (mu2, sigma2) = statistics(x1), statistics(x2)
    assert torch.linalg.matrix_rank(sigma1) == 19 and torch.linalg.matrix_rank(sigma2) == 14
    cross = (x2 - mu2) @ (x1 - mu1).T / np.sqrt(19 * 14)
    expected = float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace()
                     - 2 * torch.linalg.svdvals(cross).sum())
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(ours) and relative(ours, expected) < 1e-9


# ---------------------------------------------------------------- Inception Score


def numpy_inception_score(probs, splits=10):
    scores = []
    for i in range(splits):
        part = probs[i * len(probs) // splits:(i + 1) * len(probs) // splits]
        marginal = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(marginal)), 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_numpy_and_pytorch_gan_metrics():
    generator = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(1003, 1008, generator=generator, dtype=torch.float64)
    probs = torch.softmax(logits, 1).numpy()
    ours = inception_score(logits)
    np.testing.assert_allclose(ours, numpy_inception_score(probs), rtol=1e-10)
    np.testing.assert_allclose(ours, calculate_inception_score(probs, 10), rtol=1e-10)


def test_inception_score_limits():
    assert inception_score(torch.zeros(100, 10)) == pytest.approx((1.0, 0.0))
    confident = 50 * torch.eye(10).repeat(10, 1)  # every split: each class once, certain
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)


# ---------------------------------------------------------------- images, 8 bits, statistics


def test_saved_images_read_back_as_their_quantization(tmp_path):
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(quantize(quantize(images)), quantize(images))
    assert not torch.equal(quantize(images), images)
    save_images(images, str(tmp_path / "png"))
    assert sorted(os.listdir(tmp_path / "png"))[0] == "000000.png"
    assert torch.equal(load_images(str(tmp_path / "png")), quantize(images))
    save_images(images[:, :1], str(tmp_path / "npz" / "samples.npz"))
    with np.load(tmp_path / "npz" / "samples.npz") as stored:
        assert stored["arr_0"].dtype == np.uint8 and stored["arr_0"].shape == (5, 8, 8, 1)
    assert torch.equal(load_images(str(tmp_path / "npz" / "samples.npz")), quantize(images[:, :1]))
    save_images(images[:, :1], str(tmp_path / "gray"))  # grayscale PNGs come back as RGB
    gray = quantize(images[:, :1]).expand(-1, 3, -1, -1)
    assert torch.equal(load_images(str(tmp_path / "gray")), gray)


def test_8_bit_rounding_is_that_of_torchvision_save_image(tmp_path):
    """to_uint8 (and so quantize and save_images) rounds as torchvision's save_image writes a
    PNG, to the nearest level, so the FID of rounded samples is the FID of saved PNGs. Catches
    truncation, which darkens every image by half a level on average."""
    from PIL import Image
    from torchvision.utils import save_image

    from score.metrics import to_uint8
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    images[0, 0, 0, :3] = torch.tensor([0.4 / 255, 0.6 / 255, 254.6 / 255])  # either side of a level
    for i, image in enumerate(images):
        save_image(image, tmp_path / f"{i}.png")
        saved = np.asarray(Image.open(tmp_path / f"{i}.png"))
        assert np.array_equal(to_uint8(image).permute(1, 2, 0).numpy(), saved)
    assert to_uint8(images[0, 0, 0, :3]).tolist() == [0, 1, 255]


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """A cached digits classifier of this RECIPE in a file of its own: a copy of the default
    cache, which load_classifier trains first where it is absent or stale (retraining gives
    the same weights: test_digits_classifier_is_cached_deterministic_and_leaves_the_rng_alone)."""
    import shutil
    path = str(tmp_path_factory.mktemp("digits") / "digits_classifier.pt")
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), digits.CLASSIFIER)
    digits.load_classifier(default)
    shutil.copyfile(default, path)
    assert torch.load(path, weights_only=True)["recipe"] == digits.RECIPE
    return path


def test_quantize_switch(classifier):
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    on = Evaluator("digits", digits_classifier=classifier)
    off = Evaluator("digits", digits_classifier=classifier, quantize=False)
    assert torch.equal(on.features(images)[0], off.features(quantize(images))[0])
    assert not torch.equal(on.features(images)[0], off.features(images)[0])
    assert on.features(images)[0].dtype == torch.float64


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A weights file in the real file's format, with random weights scaled (He init) so that
    the features do not vanish through the 90-odd layers."""
    path = str(tmp_path_factory.mktemp("hub") / inception.WEIGHTS_FILE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = inception.fid_inception_v3()
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_pipeline_end_to_end(random_weights, tmp_path):
    """PNG folder -> fid_cache CLI -> .npz; the same folder -> Evaluator -> statistics, IS, FID."""
    folder, stats = str(tmp_path / "images"), str(tmp_path / "cache" / "stats.npz")
    save_images(torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(7)), folder)
    fid_cache.main(["--dataset", "folder", "--data_root", folder, "--img_size", "16",
                    "--inception_weights", random_weights, "--output", stats,
                    "--batch_size", "4", "--num_workers", "0", "--device", "cpu"])
    with np.load(stats) as stored:  # the layout pytorch_gan_metrics reads
        assert stored["mu"].shape == (2048,) and stored["sigma"].shape == (2048, 2048)
        assert stored["mu"].dtype == stored["sigma"].dtype == np.float64

    evaluator = Evaluator("inception", stats, "cpu", inception_weights=random_weights, batch_size=4)
    features, logits = evaluator.features(load_images(folder))
    assert features.shape == (10, 2048) and logits.shape == (10, 1008)
    assert features.dtype == logits.dtype == torch.float64
    mu, sigma = load_statistics(stats, "unused")
    torch.testing.assert_close(statistics(features), (mu, sigma), rtol=1e-12, atol=1e-15)

    scores = evaluator.score(features, logits)
    assert 1 <= scores["IS"] <= 1008 and np.isfinite(scores["IS_std"])
    # the same 10 images as the reference, so rank-9 covariances in 2048 dimensions: zero up to
    # rounding (measured 1.7e-6 tr(sigma) when zero eigenvalues were only clamped at 0)
    assert abs(scores["FID"]) < 1e-10 * float(sigma.trace())

    gray = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(evaluator.features(gray),
                               evaluator.features(gray.expand(-1, 3, -1, -1)))


@pytest.mark.slow  # the Inception network, a few seconds on 2 cores
def test_inception_matches_pytorch_gan_metrics_network(random_weights, monkeypatch):
    """Same weights file, same images: pytorch_gan_metrics' InceptionV3 (its download replaced
    by the file) gives the same pool3 features and, from the logits, the same probabilities."""
    import pytorch_gan_metrics.inception as theirs
    monkeypatch.setattr(theirs, "load_state_dict_from_url",
                        lambda *args, **kwargs: torch.load(random_weights, weights_only=True))
    reference = theirs.InceptionV3([3, 4]).eval()
    evaluator = Evaluator("inception", inception_weights=random_weights, quantize=False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        pool, probs = reference(images)
    features, logits = evaluator.features(images)
    torch.testing.assert_close(features, pool.flatten(1).double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.softmax(logits, 1), probs.double(), rtol=1e-5, atol=1e-9)


@pytest.mark.slow  # the Inception network, a few seconds on 2 cores
def test_sfid_features_are_the_tf_graphs_mixed_6_conv_found_by_running_the_network(random_weights):
    """guided-diffusion's sFID takes the first 7 channels of the TF graph's tensor mixed_6/conv.
    That graph names its mixed blocks mixed, mixed_1, ..., mixed_10 in the order they run, and
    inside a block names the branch without a tower `conv`: the 1x1 convolution, the first one
    a block runs. So the tensor is found here by running the network and counting, not by a
    module name: the first convolution (after its ReLU) of the seventh mixed block to run."""
    evaluator = Evaluator("inception", inception_weights=random_weights, quantize=False)
    from torchvision.models.inception import BasicConv2d
    blocks, convolutions, hooks = [], [], []
    for name, block in evaluator.net.net.named_children():
        if name.startswith("Mixed_"):
            hooks.append(block.register_forward_pre_hook(lambda module, inputs, name=name: blocks.append(name)))
            for conv in block.modules():
                if isinstance(conv, BasicConv2d):
                    hooks.append(conv.register_forward_hook(
                        lambda module, inputs, output: convolutions.append((blocks[-1], output))))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    features, logits, spatial = evaluator.run(images, spatial=True)  # no reference needed
    for hook in hooks:
        hook.remove()
    assert len(blocks) == 11  # mixed .. mixed_10
    mixed_6_conv = next(output for block, output in convolutions if block == blocks[6])
    assert mixed_6_conv.shape[1:] == (192, 17, 17)
    expected = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's (H, W, C) order
    assert spatial.shape == (2, 2023) == (2, inception.SPATIAL_DIM)
    assert torch.equal(spatial, expected.double())
    assert (spatial >= 0).all() and (spatial > 0).any()  # after the ReLU, and not all zero


def test_the_digits_spatial_stand_in_is_the_last_convolution_before_pooling(classifier):
    """The digits' sFID features: the first 7 channels after the last ReLU before the pooling."""
    evaluator = Evaluator("digits", digits_classifier=classifier, quantize=False, metrics=("sfid",))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    body = list(evaluator.net.body)
    before_pool = next(i for i, layer in enumerate(body) if isinstance(layer, torch.nn.MaxPool2d))
    grid = torch.nn.Sequential(*body[:before_pool])(images)
    assert isinstance(body[before_pool - 1], torch.nn.ReLU) and isinstance(body[before_pool - 2], torch.nn.Conv2d)
    spatial = evaluator.features(images)[2]
    assert spatial.shape == (3, digits.SPATIAL_DIM) == (3, 8 * 8 * 7)
    assert torch.equal(spatial, grid[:, :7].permute(0, 2, 3, 1).reshape(3, -1).double())


@pytest.mark.slow  # the digits classifier on 1,500 images, twice
def test_fid_cache_keeps_a_seeded_subset_of_features_and_the_spatial_statistics(classifier, tmp_path):
    stats = str(tmp_path / "digits.npz")
    fid_cache.main(["--dataset", "digits", "--digits_classifier", classifier, "--output", stats,
                    "--num_workers", "0", "--device", "cpu", "--reference_features", "100", "--seed", "3",
                    "--batch_size", "128"])
    on_the_fly = Evaluator("digits", digits_classifier=classifier, metrics=METRICS)  # the whole train split
    stored = load_reference(stats, "unused")
    chosen = torch.randperm(1500, generator=torch.Generator().manual_seed(3))[:100]
    assert torch.equal(stored["features"], on_the_fly.reference_features[chosen].float().double())
    assert int(stored["features_seed"]) == 3 and int(stored["features_of"]) == 1500
    torch.testing.assert_close((stored["mu_s"], stored["sigma_s"]), on_the_fly.reference_spatial,
                               rtol=1e-10, atol=1e-12)  # summed in batches of 128 against all at once
    from_file = Evaluator("digits", stats, digits_classifier=classifier, metrics=METRICS)
    assert len(from_file.reference_features) == 100 and from_file.reference_seed == 3


def test_digits_statistics_file_round_trips(classifier, tmp_path):
    """With no --feature, the digits get the digits classifier, as main.py scores them."""
    stats = str(tmp_path / "digits.train.npz")
    fid_cache.main(["--dataset", "digits", "--digits_classifier", classifier,
                    "--output", stats, "--num_workers", "0", "--device", "cpu"])
    on_the_fly = Evaluator("digits", digits_classifier=classifier).reference
    torch.testing.assert_close(load_statistics(stats, "unused"), on_the_fly, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the offline digits score


@pytest.mark.slow  # trains the digits classifier
def test_digits_classifier_is_cached_deterministic_and_leaves_the_rng_alone(classifier, tmp_path):
    stale = str(tmp_path / "stale.pt")
    torch.save({"recipe": {"epochs": -1}, "state_dict": {}}, stale)
    rng_state = torch.get_rng_state()
    retrained = digits.load_classifier(stale)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.load(stale, weights_only=True)["recipe"] == digits.RECIPE
    cached = digits.load_classifier(classifier)
    for a, b in zip(retrained.state_dict().values(), cached.state_dict().values()):
        assert torch.equal(a, b)
    images, labels = datasets.digits_array(train=False)
    accuracy = (cached(torch.from_numpy(images))[1].argmax(1).numpy() == labels).mean()
    assert accuracy > 0.97  # measured 0.993


def test_digits_score_separates_real_digits_from_noise(classifier):
    evaluator = Evaluator("digits", digits_classifier=classifier)
    held_out = torch.from_numpy(datasets.digits_array(train=False)[0])
    noise = torch.rand(len(held_out), 1, 8, 8, generator=torch.Generator().manual_seed(9))
    real = evaluator.score(*evaluator.features(held_out))
    fake = evaluator.score(*evaluator.features(noise))
    # Measured (297 images vs the 1500 training digits): held-out FID 22.4, IS 8.3 of 10;
    # uniform noise FID 662, IS 3.1; 297 of the training digits themselves FID 9.1, IS 8.3.
    assert real["FID"] < 40 and real["IS"] > 7
    assert fake["FID"] > 300 and fake["IS"] < 5


# ---------------------------------------------------------------- two Gloo ranks


def rank_worker(rank, world_size, rendezvous, classifier, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size)
    try:
        images = torch.from_numpy(datasets.digits_array(train=False)[0])
        share = images.tensor_split(world_size)[rank]  # 149 and 148 images: unequal on purpose
        evaluator = Evaluator("digits", digits_classifier=classifier, metrics=METRICS)
        features, logits, spatial = evaluator.features(share)
        features, logits = gather(features), gather(logits)
        moments = Moments(evaluator.reference_spatial[0])  # each rank its share, added up
        moments.add(spatial)
        spatial = moments.all_reduce().statistics()
        torch.save({"statistics": statistics(features), "score": evaluator.score(features, logits, spatial),
                    "rows": len(features), "spatial": spatial}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(classifier, tmp_path):
    mp.spawn(rank_worker, args=(2, str(tmp_path / "rendezvous"), classifier, str(tmp_path)),
             nprocs=2)
    evaluator = Evaluator("digits", digits_classifier=classifier, metrics=METRICS)
    assert gather(torch.ones(3)).shape == (3,)  # no process group: identity
    features, logits, spatial = evaluator.features(torch.from_numpy(datasets.digits_array(train=False)[0]))
    expected = evaluator.score(features, logits, spatial)
    assert {"FID", "IS", "precision", "coverage", "KID", "sFID"} <= set(expected)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["rows"] == 297
        torch.testing.assert_close(result["statistics"], statistics(features), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(result["spatial"], statistics(spatial), rtol=1e-9, atol=1e-9)
        for name, value in expected.items():
            assert result["score"][name] == pytest.approx(value, rel=1e-9)  # 1 vs 2 threads


# ---------------------------------------------------------------- errors


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ScoreError) as hub:
        Evaluator("inception", None)
    message = str(hub.value)
    assert inception.WEIGHTS_FILE in message and "--inception_weights" in message
    assert os.path.join(str(tmp_path / "torch"), "hub", "checkpoints") in message
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(ScoreError, match="nowhere.pth: no such file") as explicit:
        Evaluator("inception", None, inception_weights=missing)
    assert inception.WEIGHTS_FILE in str(explicit.value)
    with pytest.raises(SystemExit, match=inception.WEIGHTS_FILE):  # the CLI: one line, exit 1
        fid_cache.main(["--dataset", "cifar10", "--output", str(tmp_path / "x.npz")])


def test_missing_fid_cache_names_the_command_that_creates_it(classifier, random_weights, tmp_path):
    stats = str(tmp_path / "inception.npz")
    with pytest.raises(ScoreError) as error:
        Evaluator("inception", stats, inception_weights=random_weights, dataset="cifar10",
                  data_root="./data", img_size=32)
    assert (f"python -m score.fid_cache --dataset cifar10 --data_root ./data --img_size 32 "
            f"--inception_weights {random_weights} --output {stats}") in str(error.value)

    stats = str(tmp_path / "digits.train.npz")
    with pytest.raises(ScoreError) as error:
        Evaluator("digits", stats, digits_classifier=classifier, dataset="digits")
    command = str(error.value).split("create them with: ")[1]
    assert command == (f"python -m score.fid_cache --dataset digits --feature digits "
                       f"--output {stats}")
    # running the command it names (with this test's classifier cache) makes the error go away
    fid_cache.main(shlex.split(command)[3:] + ["--digits_classifier", classifier,
                                               "--num_workers", "0", "--device", "cpu"])
    assert Evaluator("digits", stats, digits_classifier=classifier).reference is not None


def test_unreadable_or_empty_image_folder(tmp_path):
    with pytest.raises(ScoreError, match="no image files"):
        load_images(str(tmp_path))
    with pytest.raises(ScoreError, match="not a folder"):
        load_images(str(tmp_path / "missing"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ScoreError, match="cannot read image .*broken.png"):
        load_images(str(tmp_path))


@pytest.mark.slow  # the Inception network, a few seconds on 2 cores
def test_weights_download_keeps_only_a_file_that_loads(tmp_path, monkeypatch):
    """score.download: a wrong download is refused and leaves nothing where runs look; the
    right one (here: the architecture's own state dict) lands and its sha256 is reported."""
    from score import download, inception

    def fake_download(payload):
        def download_url_to_file(url, destination, progress=True):
            assert url == inception.FID_WEIGHTS_URL
            torch.save(payload, destination)
        return download_url_to_file

    target = tmp_path / "hub" / inception.WEIGHTS_FILE
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download({"not": torch.zeros(1)}))
    with pytest.raises(download.ScoreError):
        download.download(str(target))
    assert not target.exists() and not os.listdir(target.parent)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download(inception.fid_inception_v3().state_dict()))
    digest = download.download(str(target))
    assert target.exists() and len(digest) == 64
    assert inception.find_weights(str(target)) == str(target)
