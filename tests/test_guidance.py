"""Class-conditional models and classifier-free guidance (Ho & Salimans 2022): where the class
embedding enters, the guided output against a float64 recomputation for every mean type and
variance, label dropout's rate and seeding, the classes drawn, and the whole pipeline on a tiny
conditional digits model.
"""
import json
import os

import numpy as np
import pytest
import torch

import cli
import evaluate
import streams
import train
from builders import build_sampler
from config import Config, ConfigError
from diffusion import LEARNED_VARIANCES, MEAN_TYPES, GaussianDiffusion, beta_schedule
from model import UNet
from sampling import SAMPLERS, GaussianDiffusionSampler, draw_labels
from tests.conftest import ROOT, assert_one_line_error, run_main

CLASSES = 10
TINY_UNET = dict(T=20, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0, in_ch=1, img_size=8)
COND_ARGS = ["--num_classes", str(CLASSES), "--sample_size", "10"]


def test_a_zero_class_embedding_is_the_unconditional_network_and_a_label_adds_to_the_time_embedding():
    """Built from one seed, the conditional network's other weights are the unconditional
    one's and its embedding starts at zero: the same outputs for every label. A label's
    embedding e_y is added to the time embedding after its MLP: the unconditional network with
    e_y added to the MLP's last bias computes what the conditional one does for y."""
    torch.manual_seed(0)
    plain = UNet(**TINY_UNET).double()
    torch.manual_seed(0)
    conditional = UNet(**TINY_UNET, num_classes=CLASSES).double()
    x, t = torch.randn(CLASSES + 1, 1, 8, 8, dtype=torch.float64), torch.arange(CLASSES + 1) % 20
    labels = torch.arange(CLASSES + 1)  # the no-label class CLASSES too
    assert torch.equal(conditional(x, t, labels), plain(x, t))
    torch.nn.init.normal_(conditional.class_embedding.weight)
    for y in (0, 7, CLASSES):
        shifted = UNet(**TINY_UNET).double()
        shifted.load_state_dict({name: value for name, value in conditional.state_dict().items()
                                 if name != "class_embedding.weight"})
        with torch.no_grad():
            shifted.time_embedding.timembedding[3].bias += conditional.class_embedding.weight[y]
        torch.testing.assert_close(conditional(x, t, torch.full((len(x),), y)), shifted(x, t), rtol=1e-12, atol=1e-12)
    # class weights (interpolation's mixtures): a one-hot row is its class
    one_hot = torch.nn.functional.one_hot(labels, CLASSES + 1).double()
    torch.testing.assert_close(conditional(x, t, one_hot), conditional(x, t, labels), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="takes labels"):
        conditional(x, t)


class LabelledNet:
    """A deterministic stand-in network of (x, t, y) in float64 whose output depends on the
    class, recording each call's batch."""

    def __init__(self, out_channels=1):
        self.out_channels, self.calls = out_channels, []

    def __call__(self, x, t, y):
        self.calls.append((len(x), y.clone()))
        scale = (y.double() + 1.0)[:, None, None, None] / CLASSES
        base = torch.sin(3.0 * x + t.double()[:, None, None, None] / 7.0) * scale + 0.3 * scale
        return torch.cat([base * (k + 1) for k in range(self.out_channels)], dim=1)


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["fixedlarge", "learned_range"])
def test_the_guided_output_is_the_float64_combination_and_the_step_clips_after_it(mean_type, var_type):
    betas = beta_schedule("linear", 1e-4, 0.02, 20)
    sampler = GaussianDiffusionSampler(betas, mean_type, var_type, True, "ddim", 5, num_classes=CLASSES,
                                       guidance_scale=2.5)
    out_channels = 2 if var_type in LEARNED_VARIANCES else 1
    net = LabelledNet(out_channels)
    x, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([3, 9, 12, 19])
    labels = torch.tensor([0, 3, 9, 3])
    guided = sampler.network_output(net, x, t, labels)
    assert [size for size, _ in net.calls] == [8]  # one call on the doubled batch
    assert torch.equal(net.calls[0][1], torch.cat([labels, torch.full((4,), CLASSES)]))
    conditional, unconditional = net(x, t, labels), net(x, t, torch.full((4,), CLASSES))
    expected = unconditional[:, :1] + 2.5 * (conditional[:, :1] - unconditional[:, :1])
    torch.testing.assert_close(guided[:, :1], expected, rtol=1e-12, atol=1e-12)
    if out_channels == 2:  # the variance is the conditional branch's
        assert torch.equal(guided[:, 1:], conditional[:, 1:])
    # combining the network's outputs is combining the eps (and the x0_hat) they imply
    diffusion = GaussianDiffusion(betas)
    if mean_type != "epsilon":
        eps = [diffusion.predict_eps_from_xstart(x, t, diffusion.predict_xstart(out[:, :1], x, t, mean_type, False))
               for out in (conditional, unconditional, guided)]
        torch.testing.assert_close(eps[2], eps[1] + 2.5 * (eps[0] - eps[1]), rtol=1e-9, atol=1e-9)
    # the step clips the guided x0_hat, not the branches'
    i = sampler.timesteps.index(9)
    batch_t = torch.full((4,), 9)
    _, x0_hat = sampler.step(sampler.network_output(net, x, batch_t, labels), x, i)
    raw = diffusion.predict_xstart(sampler.network_output(net, x, batch_t, labels)[:, :1], x, batch_t,
                                   mean_type, False)
    assert torch.equal(x0_hat, raw.clamp(-1, 1))


def test_scale_one_asks_the_conditional_branch_alone_and_zero_the_unconditional_one():
    betas = beta_schedule("linear", 1e-4, 0.02, 20)
    x, t, labels = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    for scale, asked in ((1.0, labels), (0.0, torch.full((3,), CLASSES))):
        net = LabelledNet()
        sampler = GaussianDiffusionSampler(betas, num_classes=CLASSES, guidance_scale=scale)
        out = sampler.network_output(net, x, t, labels)
        assert len(net.calls) == 1 and net.calls[0][0] == 3 and torch.equal(net.calls[0][1], asked)
        assert torch.equal(out, net(x, t, asked))


@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
def test_every_sampler_samples_a_guided_model(sampler_name):
    """Every registered sampler takes the guided output: a chain from the same noise under
    scale 3 differs from the unguided one and stays finite."""
    betas = beta_schedule("linear", 1e-4, 0.02, 20)
    torch.manual_seed(0)
    net = UNet(**TINY_UNET, num_classes=CLASSES).eval()
    with torch.no_grad():  # a network whose output depends on its input and class, unlike a new one's
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x_T, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    steps = 20 if sampler_name == "ddpm" else 5
    samples = [GaussianDiffusionSampler(betas, sampler=sampler_name, sample_steps=steps, num_classes=CLASSES,
                                        guidance_scale=scale)(net, x_T, torch.Generator().manual_seed(1), labels)
               for scale in (1.0, 3.0)]
    assert all(torch.isfinite(s).all() for s in samples)
    assert (samples[0] - samples[1]).abs().max() > 1e-4


def test_balanced_draws_hold_each_class_equally_whatever_the_batches():
    labels = draw_labels(0, 1003, CLASSES)
    counts = np.bincount(labels.numpy(), minlength=CLASSES)
    assert counts.tolist() == [101, 101, 101] + [100] * 7  # the remainder on the first classes
    # every run of CLASSES consecutive samples holds every class; batches cut the same sequence
    assert all(sorted(labels[j:j + CLASSES].tolist()) == list(range(CLASSES)) for j in range(0, 990, 7))
    assert torch.equal(torch.cat([draw_labels(first, 100, CLASSES) for first in range(0, 1000, 100)]), labels[:1000])
    assert draw_labels(5, 4, CLASSES, (3,)).tolist() == [3, 3, 3, 3]
    assert draw_labels(0, 5, CLASSES, (2, 7)).tolist() == [2, 7, 2, 7, 2]


def test_labels_are_dropped_at_the_asked_rate_from_a_stream_of_the_step():
    drops = streams.label_drops(0, 5, 20000, 0.1, "cpu")
    # binomial: 20000 draws at p = 0.1 have a standard deviation of 0.0021 in the rate
    assert abs(drops.double().mean().item() - 0.1) < 0.01
    assert torch.equal(drops, streams.label_drops(0, 5, 20000, 0.1, "cpu"))  # seeded by (seed, step)
    assert not torch.equal(drops, streams.label_drops(0, 6, 20000, 0.1, "cpu"))
    assert not streams.label_drops(0, 5, 100, 0.0, "cpu").any() and streams.label_drops(0, 5, 100, 1.0, "cpu").all()
    # independent of the step's other draws: the dropped examples are flipped half the time
    flips = streams.step_draws(0, 5, 20000, (1, 8, 8), 20, "cpu")[0]
    assert abs(flips[drops].double().mean().item() - 0.5) < 0.05


class RecordingTrainer:
    """Stands in for the trainer in train_step: records the labels of each micro-batch."""

    def __init__(self, seen):
        self.seen = seen

    def __call__(self, x_0, t, noise, y=None):
        self.seen.append(y.clone())
        return (x_0 * 0.0).sum(dim=(1, 2, 3)) + torch.zeros((), requires_grad=True)


def labels_seen(config, rank, world_size, steps=3):
    """The labels each micro-batch of this process's share of steps 0..steps-1 gives the
    network (train_step with the trainer stood in for), concatenated per step."""
    seen, micro = [], config.training.batch_size // (world_size * config.training.accum_steps)
    net = torch.nn.Linear(1, 1)
    optimizer = torch.optim.Adam(net.parameters())
    state = train.TrainState(net, torch.nn.Linear(1, 1), optimizer,
                             torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), 0,
                             torch.zeros(1, 1, 8, 8))
    part = config.training.batch_size // world_size
    labels = torch.arange(config.training.batch_size) % CLASSES  # each example's own class

    def batches():
        step = 0
        while True:
            for m in range(config.training.accum_steps):
                first = rank * part + m * micro
                yield torch.zeros(micro, 1, 8, 8), labels[first:first + micro]
            step += 1
    source, per_step = batches(), []
    for _ in range(steps):
        before = len(seen)
        train.train_step(state, RecordingTrainer(seen), net, source, config, rank, world_size)
        per_step.append(torch.cat(seen[before:]))
    return per_step


def test_label_dropout_is_the_same_on_any_number_of_processes_and_micro_batches():
    config = Config.make(dataset="digits", img_size=8, img_channels=1, num_classes=CLASSES, batch_size=40,
                         cond_drop_prob=0.3)
    one = labels_seen(config, 0, 1)
    for step, labels in enumerate(one):
        dropped = streams.label_drops(0, step, 40, 0.3, "cpu")
        assert torch.equal(labels, torch.where(dropped, CLASSES, torch.arange(40) % CLASSES))
    accumulated = labels_seen(config.replace(accum_steps=4), 0, 1)
    two = [torch.cat(parts) for parts in zip(labels_seen(config, 0, 2), labels_seen(config, 1, 2))]
    for expected, *others in zip(one, accumulated, two):
        assert all(torch.equal(expected, other) for other in others)


@pytest.mark.slow  # main.py's command eleven times
def test_the_new_refusals_are_one_line_before_anything_runs(tmp_path):
    cases = [
        (["--guidance_scale", "2"], "--guidance_scale 2.0 needs a class-conditional model"),
        (["--class_labels", "3"], "--class_labels needs a class-conditional model"),
        (["--num_classes", "5"], "--num_classes 5 does not fit digits, which has 10 classes"),
        (COND_ARGS + ["--class_labels", "10"], "--class_labels 10 is not a class of 0..9"),
        (COND_ARGS + ["--class_labels", "x"], "--class_labels takes class numbers"),
        (COND_ARGS + ["--guidance_scale", "-1"], "--guidance_scale must be a finite number >= 0"),
        (COND_ARGS + ["--guidance_scale", "nan"], "--guidance_scale must be a finite number >= 0"),
        (COND_ARGS + ["--cond_drop_prob", "1.5"], "--cond_drop_prob must be in [0, 1]"),
        (["--num_classes", "10", "--sample_size", "4"], "--sample_size 4 is fewer than the 10 classes"),
        (["--num_classes", "-1"], "--num_classes must be >= 0"),
    ]
    for args, message in cases:
        logdir = tmp_path / "run"
        assert_one_line_error(run_main("--train", "--logdir", logdir, *args, expect_ok=False), message, last=True)
        assert not logdir.exists()
    with pytest.raises(ConfigError, match="lsun_church has no labels"):
        Config.make(dataset="lsun_church", num_classes=3)


@pytest.mark.slow  # four runs of main.py's command
def test_a_tiny_conditional_run_trains_scores_saves_labels_and_resumes_exactly(tmp_path):
    """2 + 2 steps with a resume end where 4 steps do (the dropped labels included); --eval of a
    guided model draws balanced classes, writes them beside the images, records the guidance,
    and its batches' identity changes with the scale."""
    steps = ["--save_step", "0", "--sample_step", "2", "--eval_batch_size", "10", "--sampler", "ddim",
             "--sample_steps", "4", *COND_ARGS]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    run_main("--train", "--total_steps", "4", "--logdir", whole, *steps)
    run_main("--train", "--total_steps", "2", "--logdir", halves, *steps)
    run_main("--train", "--resume", "--total_steps", "4", "--logdir", halves, *steps)
    first, second = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (whole, halves))
    for name, tensor in first["ema_model"].items():
        assert torch.equal(second["ema_model"][name], tensor), name
    assert (whole / "classes.txt").read_text().split() == [str(k) for k in range(CLASSES)]
    result = run_main("--flagfile", whole / "flagfile.txt", "--notrain", "--eval", "--num_images", "30",
                      "--guidance_scale", "2", "--save_samples", tmp_path / "s.npz", tiny=False)
    assert "label_accuracy" in result.stdout and "10 classes, guidance scale 2.0, classes balanced" in result.stdout
    record = json.loads((whole / "eval.txt").read_text().splitlines()[-1])
    assert record["guidance_scale"] == 2.0 and record["num_classes"] == CLASSES
    assert record["class_labels"] == "balanced" and 0.0 <= record["label_accuracy"] <= 1.0
    with np.load(tmp_path / "s.npz", allow_pickle=False) as saved:
        assert saved["arr_0"].shape == (30, 8, 8, 1)
        assert saved["labels"].tolist() == [j % CLASSES for j in range(30)]


def test_samples_and_their_labels_stay_together_through_the_evaluation(tmp_path):
    """A stand-in network whose x0 prediction is a gray level of its class: every sample of
    --eval's batches must show the level of the class sample_labels gives it."""
    config = Config.make(dataset="digits", img_size=8, img_channels=1, ch_mult=(1, 2), T=20, num_classes=CLASSES,
                         mean_type="xstart", sampler="ddim", sample_steps=4, eval_batch_size=7,
                         class_labels=("1", "8", "3"), logdir=str(tmp_path))

    def net(x, t, y):
        return ((y.float() / CLASSES) * 2 - 1)[:, None, None, None].expand_as(x).clone()
    sampler = build_sampler(config.sampling, config.diffusion, CLASSES)
    for i, images in evaluate.sample_batches(config, sampler, net, 30, torch.device("cpu")):
        labels = evaluate.sample_labels(config, i * 7, len(images))
        torch.testing.assert_close(images, (labels.float() / CLASSES)[:, None, None, None].expand_as(images),
                                   atol=1e-5, rtol=0)
    # the grid of the first samples: a row per class of the cycle, in its order
    first = torch.arange(9.0)[:, None, None, None].expand(9, 1, 2, 2)
    rows, per_row = evaluate.by_class(config, first)
    assert per_row == 3 and rows[:, 0, 0, 0].tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]


def test_the_conditional_demo_is_the_digits_demo_with_labels():
    """config/digits_cond.cfg is config/digits.cfg plus the class flags, its own logdir and a
    grid of a row per digit: the comparison with the unconditional demo in the README holds only
    while the model, recipe, sampler and scoring are the same. Catches a flag changed in one
    demo and not the other."""
    demos = {name: cli.configuration(["main.py", "--flagfile", os.path.join(ROOT, "config", f"{name}.cfg"), "--train",
                                      "--eval"]).values() for name in ("digits", "digits_cond")}
    changed = {name for name, value in demos["digits"].items() if demos["digits_cond"][name] != value}
    assert changed <= {"num_classes", "cond_drop_prob", "guidance_scale", "sample_size", "logdir"}
    cond = demos["digits_cond"]
    assert cond["num_classes"] == CLASSES and 0.1 <= cond["cond_drop_prob"] <= 0.2
    assert cond["guidance_scale"] > 1 and cond["sample_size"] % CLASSES == 0
