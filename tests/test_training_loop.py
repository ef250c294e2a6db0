"""The training loop's pieces against references computed here: the EMA against its closed
form, gradient clipping against the clipped norm, the warmup schedule against the official
formula lr * min(step / warmup, 1), fused Adam against plain Adam, and batches held on the
device against the data loader's."""
import types

import pytest
import torch

import batches
import datasets
import speed
import train

GRAD_CLIP, EMA_DECAY = 1.0, 0.9


def small_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def weights(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def set_gradients(net, step):
    """Reproducible gradients for step `step`, whatever the weights are."""
    generator = torch.Generator().manual_seed(100 + step)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_ema_after_k_updates_is_its_closed_form(fused):
    """ema_k = d^k ema_0 + sum_j (1 - d) d^(k - j) w_j over the weights w_j after update j
    (official: ExponentialMovingAverage applied after each optimizer step). Catches the decay
    and its complement swapped, the EMA updated before the optimizer step (it would average
    w_{j-1}), and the fused path's device-side weighting."""
    net, ema = small_net(), small_net(seed=1).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_lr(0))
    decay, k = EMA_DECAY, 6
    expected = decay ** k * weights(ema)
    for j in range(1, k + 1):
        set_gradients(net, j)
        train.apply_gradients(net, ema, optimizer, scheduler, GRAD_CLIP, EMA_DECAY)
        expected += (1 - decay) * decay ** (k - j) * weights(net)
    torch.testing.assert_close(weights(ema), expected, rtol=0, atol=1e-6)
    assert (weights(ema) - weights(net)).abs().max() > 1e-2  # it is an average, not a copy


@pytest.mark.parametrize("scale,grad_clip", [(10.0, 0.5), (0.01, 0.5)], ids=["clipped", "unclipped"])
def test_the_step_uses_the_gradient_clipped_to_grad_clip(scale, grad_clip):
    """With SGD at lr 1 the update is minus the gradient the optimizer saw: the gradient scaled
    to norm grad_clip when its global norm exceeds grad_clip, else unchanged (official:
    tf.clip_by_global_norm). Catches a fixed threshold, a per-tensor norm, clipping after the
    step, or no clipping."""
    net, ema = small_net(), small_net().requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_lr(0))
    set_gradients(net, 0)
    gradient = torch.cat([p.grad.flatten() for p in net.parameters()]) * scale
    for p in net.parameters():
        p.grad *= scale
    before = weights(net)
    train.apply_gradients(net, ema, optimizer, scheduler, grad_clip, EMA_DECAY)
    update = before - weights(net)
    expected = gradient * min(1.0, grad_clip / gradient.norm().item())
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-7)


def test_warmup_learning_rate_at_chosen_steps():
    """The learning rate of optimizer step s (0-based, as the official global_step) is
    lr * min(s / warmup, 1): 0 at the first step, lr from step `warmup` on. SGD at this rate
    moves a weight by exactly lr_s * gradient, so the rate applied is checked, not only the
    one reported. Catches an off-by-one, a missing scheduler step, or a warmup that never ends."""
    lr, warmup = 0.1, 8
    net, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_lr(warmup))
    applied = []
    for _ in range(12):
        before = net.weight.item()
        net.weight.grad = torch.ones_like(net.weight)
        train.apply_gradients(net, ema, optimizer, scheduler, 10.0, EMA_DECAY)
        applied.append(before - net.weight.item())
    for step in (0, 1, 4, 7, 8, 11):
        assert applied[step] == pytest.approx(lr * min(step / warmup, 1.0), abs=1e-7), step
    assert train.warmup_lr(0)(0) == 1.0  # --warmup 0: the full rate at once


def test_fused_adam_matches_plain_adam():
    """speed.adam with fused_adam (CUDA's default; torch runs the fused kernel on the CPU too)
    takes the same steps as plain Adam through apply_gradients, whose fused branch passes the
    non-finite flag as found_inf. Catches a fused branch that skips or double-applies steps,
    or weights the EMA differently."""
    nets = {name: small_net() for name in ("plain", "fused")}
    emas = {name: small_net().requires_grad_(False) for name in nets}
    optimizers = {name: speed.adam(nets[name].parameters(), 0.01, types.SimpleNamespace(fused_adam=name == "fused"))
                  for name in nets}
    assert optimizers["fused"].param_groups[0]["fused"] and not optimizers["plain"].param_groups[0]["fused"]
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(optimizers[name], train.warmup_lr(2)) for name in nets}
    for step in range(5):
        for name in nets:
            set_gradients(nets[name], step)
            assert not train.apply_gradients(nets[name], emas[name], optimizers[name], schedulers[name], GRAD_CLIP, EMA_DECAY)
    assert (weights(nets["plain"]) - weights(small_net())).abs().min() > 1e-3  # every weight moved
    torch.testing.assert_close(weights(nets["fused"]), weights(nets["plain"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(weights(emas["fused"]), weights(emas["plain"]), rtol=0, atol=1e-6)


def test_batches_on_the_device_are_the_loaders_batches():
    """--data_on_device cuts each micro-batch from the stored dataset by the same seeded
    permutation the loader follows: the same images in the same order, over an epoch boundary,
    for every rank and micro-batch. Catches a device path that reshuffles, takes another slice
    or scales pixels differently."""
    dataset = datasets.build_dataset("digits", None, 8, train=True, flip=False)
    stored = datasets.as_tensor(dataset)
    assert stored is not None
    per_epoch = len(dataset) // 96
    for rank in (0, 1):
        sampler = batches.GlobalBatchSampler(len(dataset), 96, 2, rank, 3, seed=5, start=per_epoch - 1)
        loader = batches.loader_batches(dataset, sampler, 0, 5, torch.device("cpu"))
        device = batches.device_batches(stored, sampler)
        for _ in range(2 * 3):  # the epoch's last global batch and the next epoch's first
            (ours, _), (theirs, _) = next(device), next(loader)
            assert ours.shape == (16, 1, 8, 8)
            assert torch.equal(ours, theirs)


def test_ranks_and_micro_batches_partition_the_global_batch():
    """Process r's micro-batch m of step g is part r * accum + m of the global batch g that a
    single process takes whole: together they are that batch, in order, each index once.
    Catches a rank offset or micro-batch cut that overlaps or skips images (2 processes would
    then train on other data than 1)."""
    whole = iter(batches.GlobalBatchSampler(100, 24, 1, 0, 1, seed=3, start=2))
    parts = [iter(batches.GlobalBatchSampler(100, 24, 2, rank, 3, seed=3, start=2)) for rank in (0, 1)]
    for _ in range(6):  # over the epoch boundary (4 batches of 24 per epoch of 100)
        expected = next(whole)
        got = torch.cat([next(parts[rank]) for rank in (0, 1) for _ in range(3)])
        assert torch.equal(got, expected)
        assert len(set(expected.tolist())) == 24


def test_resuming_mid_warmup_continues_the_schedule():
    """restore_schedule after 3 of 8 warmup steps: the next step runs at lr * 3/8, as an
    uninterrupted run would, and a new --lr takes over the base rate. Catches a resume that
    restarts the warmup, skips it (lr at once), or keeps the checkpoint's base rate."""
    def run(steps, optimizer, scheduler):
        for _ in range(steps):
            optimizer.step()
            scheduler.step()

    def fresh(lr):
        optimizer = torch.optim.Adam(small_net().parameters(), lr=lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_lr(8))
    optimizer, scheduler = fresh(0.1)
    run(3, optimizer, scheduler)
    for lr in (0.1, 0.05):
        resumed, resumed_scheduler = fresh(lr)
        train.restore_schedule(resumed, resumed_scheduler, optimizer.state_dict(), scheduler.state_dict(),
                               lr, 8, "ckpt.pt")
        assert resumed.param_groups[0]["lr"] == pytest.approx(lr * 3 / 8, rel=1e-12)
        run(6, resumed, resumed_scheduler)
        assert resumed.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)  # warmup over at step 8
    run(1, optimizer, scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 4 / 8, rel=1e-12)
