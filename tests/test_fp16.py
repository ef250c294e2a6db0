"""fp16 with dynamic loss scaling, on the CPU (CPU autocast runs float16; GradScaler runs on the
CPU): a scaled step is the unscaled step exactly, an overflow is skipped and backs the scale off
without counting as a bad step, the warm-up and the EMA see applied steps only, the scale
resumes exactly, and the fp16 network's numbers stay near fp32's."""
import os

import pytest
import torch

import train
from conftest import TINY_ARGS, run_main
from test_eval_metrics import tfevents_scalars

FP16_TRAIN = [*TINY_ARGS, "--train", "--save_step", "0", "--sample_step", "0", "--precision", "fp16"]


def linear_run(fused, seed=0, warmup=10):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    ema = torch.nn.Linear(4, 3).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_lr(warmup))
    return net, ema, optimizer, scheduler


def snapshot(net, ema, optimizer):
    return [tensor.clone() for tensor in (*net.parameters(), *ema.parameters(),
                                          *optimizer.state[net.weight].values())]


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_a_scaled_step_is_the_unscaled_step_exactly(fused):
    """The scale is a power of two: multiplying the loss by it and dividing the gradients by it
    changes no bit in float32, so a loss-scaled step lands on the unscaled step's weights (a
    missing unscale would clip 65,536 times larger gradients to another step)."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    results = []
    for enabled in (False, True):
        net, ema, optimizer, scheduler = linear_run(fused)
        scaling = train.LossScaling("cpu", enabled)
        for _ in range(3):
            loss = net(x).square().mean()
            scaling.scale(loss).backward()
            assert not train.apply_gradients(net, ema, optimizer, scheduler, 1.0, 0.9, scaling, loss.detach())
        scaling.settle(scheduler)
        results.append((snapshot(net, ema, optimizer), scheduler.last_epoch))
    assert results[0][1] == results[1][1] == 3
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-on-device"])
def test_an_overflow_is_skipped_backs_the_scale_off_and_is_not_a_bad_step(fused):
    net, ema, optimizer, scheduler = linear_run(fused)
    scaling = train.LossScaling("cpu", True)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))

    def step(plant=None, loss_factor=1.0):
        loss = net(x).sum() * loss_factor
        scaling.scale(loss).backward()
        if plant is not None:
            net.weight.grad[0, 0] = plant  # an fp16 overflow somewhere in the backward pass
        return train.apply_gradients(net, ema, optimizer, scheduler, 1.0, 0.9, scaling, loss.detach())

    assert not step()
    scaling.settle(scheduler)
    before, epoch = snapshot(net, ema, optimizer), scheduler.last_epoch
    assert scaling.scaler.get_scale() == 65536.0 and epoch == 1
    assert not step(plant=float("inf"))  # the loss is finite: the scaler's business, not a bad step
    scaling.settle(scheduler)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net, ema, optimizer)))  # weights, EMA, Adam
    assert scaling.scaler.get_scale() == 32768.0  # backed off by half
    assert scheduler.last_epoch == epoch  # the warm-up does not count it
    assert not step()  # applied again, at the lower scale
    scaling.settle(scheduler)
    assert scheduler.last_epoch == epoch + 1 and not torch.equal(before[0], net.weight)
    assert scaling.state_dict()["_growth_tracker"] == 1
    assert step(loss_factor=float("nan"))  # a loss that is not finite is a bad step, as in fp32
    scaling.scaler._scale.fill_(0.5)  # after 17 overflows in a row: fp16 cannot train this
    assert step(plant=float("inf"))


@pytest.mark.slow
def test_fp16_training_resumes_its_loss_scale_exactly(tmp_path):
    """2 + 2 steps equal 4 steps, bit for bit, the loss scale's state included; the weights,
    Adam's state and the EMA are float32; the resumed run keeps fp16 without the flag."""
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    args = [arg for arg in FP16_TRAIN]
    run_main(*args, "--total_steps", "4", "--logdir", whole)
    run_main(*args, "--total_steps", "2", "--logdir", split)
    no_flag = args[:-2]  # without --precision fp16: the checkpoint's is kept
    result = run_main(*no_flag, "--total_steps", "4", "--logdir", split, "--resume")
    assert "precision: fp16 (the checkpoint's" in result.stdout
    a, b = (torch.load(os.path.join(path, "ckpt.pt"), weights_only=True) for path in (whole, split))
    assert a["precision"] == b["precision"] == "fp16"
    assert a["loss_scale"] == b["loss_scale"] and a["loss_scale"]["_growth_tracker"] == 4
    assert a["sched"]["last_epoch"] == b["sched"]["last_epoch"] == 4
    assert [value for _, value in tfevents_scalars(whole)["loss_scale"]] == [65536.0] * 4  # logged each step
    for key in ("net_model", "ema_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
            assert not tensor.is_floating_point() or tensor.dtype == torch.float32
    moments = [value for state in a["optim"]["state"].values() for value in state.values() if torch.is_tensor(value)]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    changed = run_main(*no_flag, "--total_steps", "5", "--logdir", split, "--resume", "--precision", "fp32")
    assert "note: the checkpoint trained in fp16, this run goes on in fp32" in changed.stdout
    assert "loss_scale" not in torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)


def test_a_checkpoint_with_a_malformed_loss_scale_or_precision_is_one_line(tmp_path):
    scaling = train.LossScaling("cpu", True)
    good = scaling.state_dict()
    for bad in ({**good, "scale": float("nan")}, {**good, "scale": -1.0}, {"scale": 1.0}, [1.0]):
        with pytest.raises(train.checkpoint.CheckpointError, match="its loss scale is not a GradScaler state"):
            scaling.load_state_dict(bad, "ckpt.pt")
    with pytest.raises(train.checkpoint.CheckpointError, match="its precision 'fp8' is none of fp32, bf16, fp16"):
        train.saved_precision({"precision": "fp8"}, "ckpt.pt")
    assert train.saved_precision({}, "ckpt.pt") is None  # written before the precision was recorded
