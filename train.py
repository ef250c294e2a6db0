"""The training loop: Algorithm 1 with Adam, warmup, clipping and an EMA of the weights.

A TrainState holds what a step changes and a checkpoint keeps; `train_step` is one optimizer
step; `train` sets up, loops, logs, draws sample grids, evaluates and saves. Every random draw
of a step comes from the streams of streams.py and the data order from batches.py, so a run is
the same whatever the number of processes or micro-batches, and a resumed run continues exactly
where the interrupted one stopped.
"""
import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from tensorboardX import SummaryWriter
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint
import datasets
import distributed
import files
import logdir_files
import signals
import speed
from batches import GlobalBatchSampler, device_batches, loader_batches
from builders import build_model, build_sampler, build_trainer
from diffusion import ImportanceSampler
from errors import UserError
from reports import class_rows, grid, require_finite
from streams import (SAMPLE_NOISE, X_T, generator, label_drops, rng_state, set_rng_state, step_draws,
                     stream_seed)


def warmup_lr(warmup):
    return lambda step: min(step, warmup) / warmup if warmup > 0 else 1.0


@torch.no_grad()
def ema_update(ema, net, weight):
    """ema <- ema + weight * (net - ema) over the trainable tensors; weight is 1 - decay.

    A float weight: one fused lerp. A device tensor (0 on a skipped step): the same sum in
    three foreach calls, since lerp would read a tensor weight back to the host.
    """
    pairs = [(e, p) for e, p in zip(ema.parameters(), net.parameters()) if p.requires_grad]
    emas, nets = [e for e, _ in pairs], [p for _, p in pairs]
    if torch.is_tensor(weight):
        steps = torch._foreach_sub(nets, emas)
        torch._foreach_mul_(steps, weight)
        torch._foreach_add_(emas, steps)
    else:
        torch._foreach_lerp_(emas, nets, weight)


def ema_decay_at(training, k):
    """The EMA decay of optimizer step k (0-based: k steps were taken before it, skipped
    non-finite ones included, as the warmup schedule counts them): --ema_decay, or with
    --ema_warmup min(--ema_decay, (1 + k) / (10 + k)), TensorFlow's ExponentialMovingAverage
    with num_updates = k. It depends only on the step count, which a checkpoint keeps."""
    if not training.ema_warmup:
        return training.ema_decay
    return min(training.ema_decay, (1.0 + k) / (10.0 + k))


class LossScaling:
    """fp16's dynamic loss scaling: torch.amp.GradScaler, and the warm-up schedule's view of
    the steps it skips. Disabled (every call a no-op) in fp32 and bf16.

    The loss is multiplied by the scale (65,536 at first) before backward, so that small
    gradients do not underflow fp16, and the gradients divided by it before clipping. A step
    whose gradients overflowed is skipped (apply_gradients) and the scale halved; after 2,000
    applied steps in a row it is doubled. Whether a step was applied is a device flag: the
    warm-up schedule is given it one step late (`settle`, when the next step reads it, by
    which time the device has long computed it), so no step waits on the host, and a skipped
    step does not advance the warm-up. The scale and its growth count are in the checkpoint."""

    def __init__(self, device_type, enabled):
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device_type, enabled=enabled)
        self.unsettled = None  # the last step's "applied" flag, not yet given to the schedule

    def scale(self, loss):
        return self.scaler.scale(loss) if self.enabled else loss

    def settle(self, scheduler):
        """Advance the warm-up schedule for the last step if it was applied."""
        if self.unsettled is not None:
            applied, self.unsettled = bool(self.unsettled), None
            if applied:
                scheduler.step()

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state, path):
        """The scale of a checkpoint; one line if it is no GradScaler state or no positive number."""
        keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
        scale = state.get("scale") if isinstance(state, dict) else None
        if not (isinstance(state, dict) and set(state) == keys and isinstance(scale, float)
                and 0 < scale < float("inf")):
            raise checkpoint.CheckpointError(f"checkpoint {path}: its loss scale is not a GradScaler state "
                                             f"with a positive scale: {state!r:.200}")
        self.scaler.load_state_dict(state)


def apply_gradients(net, ema, optimizer, scheduler, grad_clip, ema_decay, scaling=None, loss=None):
    """Clip the gradient norm, take the Adam step on the warmup schedule, update the EMA.

    Returns `bad`, a device bool that is true when the gradient norm is not finite (a NaN or
    inf loss). Such a step changes nothing: not the weights, not Adam's moments or step
    count, not the EMA (only the warmup schedule counts it). The caller counts bad steps on
    the device and reads the count when it reads the loss anyway (log steps) and before
    every save, so that no NaN reaches a checkpoint.

    Skipping without reading `bad` on the host (a synchronisation per step on CUDA): fused
    Adam, the CUDA default, takes it as found_inf (as under GradScaler) and skips its update
    on the device; the EMA update is then weighted by 0. Other Adam implementations cannot
    skip on the device, so there `bad` is read on the host: free on the CPU, one
    synchronisation per step on CUDA with --nofused_adam.

    fp16 (scaling: an enabled LossScaling; the gradients are those of the scaled loss): the
    gradients are unscaled before clipping and a step whose gradients are not finite is
    skipped the same way, but counted as `bad` (against --max_bad_steps) only when the loss
    itself (loss: the step's, on the device) is not finite, or when the scale has backed off
    below 1, 17 overflows in a row: gradients that overflow at any scale, which fp16 cannot
    train. An overflow at a finite loss is the scaler's to handle: it skips, halves the scale
    and goes on. A skipped step does not advance the warm-up schedule (LossScaling.settle).
    """
    fp16 = scaling is not None and scaling.enabled
    if fp16:
        scaling.settle(scheduler)
        scaling.scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    skipped = ~torch.isfinite(norm)
    if optimizer.param_groups[0].get("fused"):
        optimizer.found_inf = skipped.float()
        optimizer.step()
        ema_update(ema, net, (1.0 - ema_decay) * (~skipped).float())
    elif not skipped.item():
        optimizer.step()
        ema_update(ema, net, 1.0 - ema_decay)
    optimizer.zero_grad(set_to_none=True)
    if not fp16:
        scheduler.step()
        return skipped
    bad = ~torch.isfinite(loss) | (skipped & (scaling.scaler._scale < 1))  # the scale before this update
    scaling.scaler.update()
    scaling.unsettled = ~skipped
    return bad


def restore_schedule(optimizer, scheduler, optim_state, sched_state, lr, warmup, path):
    """Adam's and the scheduler's state from a checkpoint, with this run's --lr and --warmup.

    load_state_dict would bring back the learning rate the run started with (the scheduler's
    base_lrs and each group's initial_lr); the step count is what continues.
    """
    try:
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(sched_state)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise checkpoint.CheckpointError(f"checkpoint {path}: its optimizer state does not fit "
                                         f"({type(error).__name__}: {error})") from None
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:  # LambdaLR's own formula, so an unchanged lr is bit-exact
        group["initial_lr"] = lr
        group["lr"] = lr * warmup_lr(warmup)(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class NonFiniteLoss(UserError, RuntimeError):
    """The loss turned NaN or infinite more often than --max_bad_steps allows."""


@dataclass
class TrainState:
    """What a training step changes and a checkpoint keeps. step: optimizer steps taken;
    x_T: the fixed noise of the training-time sample grids; t_sampler: with --t_sampling
    importance, the ImportanceSampler and its loss history (else None); precision: the
    network's arithmetic (speed.PRECISIONS) and scaling its LossScaling (enabled for fp16)."""
    net: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int
    x_T: torch.Tensor
    t_sampler: Optional[ImportanceSampler] = None
    precision: str = "fp32"
    scaling: LossScaling = field(default_factory=lambda: LossScaling("cpu", False))

    def to_checkpoint(self, rngs, world_size):
        """ckpt.pt's dict: the earlier port's keys plus every process's RNG states, the
        precision and, for fp16, the loss scale."""
        self.scaling.settle(self.scheduler)  # the schedule as of the last step
        state = {"net_model": self.net.state_dict(), "ema_model": self.ema.state_dict(),
                 "optim": self.optimizer.state_dict(), "sched": self.scheduler.state_dict(),
                 "step": self.step, "x_T": self.x_T.cpu(), "rng": rngs, "world_size": world_size,
                 "layout": self.net.layout, "format_version": checkpoint.FORMAT_VERSION,
                 "precision": self.precision}
        if self.t_sampler is not None:
            state["t_history"] = self.t_sampler.state_dict()
        if self.scaling.enabled:
            state["loss_scale"] = self.scaling.state_dict()
        return state

    def restore(self, saved, path, training, rank, world_size):
        """Continue from a loaded checkpoint, with this run's --lr and --warmup."""
        checkpoint.load_weights(self.net, saved["net_model"], path)
        checkpoint.load_weights(self.ema, saved["ema_model"], path)
        restore_schedule(self.optimizer, self.scheduler, saved["optim"], saved["sched"], training.lr,
                         training.warmup, path)
        self.step, self.x_T = step_of(saved["step"], path), saved["x_T"]
        # a run that sampled t uniformly until now starts the history afresh
        if self.t_sampler is not None and "t_history" in saved:
            try:
                self.t_sampler.load_state_dict(saved["t_history"])
            except (KeyError, TypeError, ValueError) as error:
                raise checkpoint.CheckpointError(f"checkpoint {path}: its timestep history does not fit "
                                                 f"({type(error).__name__}: {error})") from None
        if self.scaling.enabled and "loss_scale" in saved:
            self.scaling.load_state_dict(saved["loss_scale"], path)  # else it starts at 65,536
        if len(saved.get("rng", [])) == world_size:
            set_rng_state(saved["rng"][rank])


def step_of(value, path):
    """A checkpoint's step as an int >= 0 (a Python int, or the one-element integer tensor some
    writers store); else one line: every later count (the data order, the schedule) starts there."""
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise checkpoint.CheckpointError(f"checkpoint {path}: its step {value!r} is not a number of optimizer "
                                         "steps >= 0")
    return value


def saved_precision(saved, path):
    """The precision a checkpoint trained in, None for one written before it was recorded."""
    precision = saved.get("precision") if saved else None
    if precision is not None and precision not in speed.PRECISIONS:
        raise checkpoint.CheckpointError(f"checkpoint {path}: its precision {precision!r:.40} is none of "
                                         f"{', '.join(speed.PRECISIONS)}")
    return precision


def initial_state(config, fast, device, path, rank, world_size, saved=None):
    """A fresh TrainState, or with --resume the one saved at path (saved: it, loaded already)."""
    if saved is None and config.actions.resume:
        saved = checkpoint.load(path, checkpoint.TRAINING_KEYS)
    layout = checkpoint.layout_of(saved, path, config.model.layout) if saved else None
    net = speed.to_layout(build_model(config.model, config.diffusion, layout).to(device), fast)
    optimizer = speed.adam(net.parameters(), config.training.lr, fast)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=warmup_lr(config.training.warmup))
    x_T = torch.randn((config.training.sample_size, *config.model.image_shape),
                      generator=generator("cpu", config.run.seed, X_T))
    t_sampler = ImportanceSampler(config.diffusion.T) if config.training.t_sampling == "importance" else None
    state = TrainState(net, copy.deepcopy(net).eval().requires_grad_(False), optimizer, scheduler, 0, x_T,
                       t_sampler, fast.precision, LossScaling(device.type, fast.precision == "fp16"))
    if saved is not None:
        state.restore(saved, path, config.training, rank, world_size)
    state.x_T = state.x_T.to(device)
    return state


class BadSteps:
    """Steps whose loss was not finite, counted on the device (see apply_gradients), and the
    step that went past --max_bad_steps; read only at log steps and before saves."""

    def __init__(self, limit, device):
        self.limit, self.reported = limit, 0
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.over_at = torch.zeros((), dtype=torch.long, device=device)

    def add(self, bad, step):
        self.count += bad
        self.over_at = torch.where(bad & (self.count == self.limit + 1), step, self.over_at)

    def check(self, path, saved_step, say=None):
        """NonFiniteLoss past the limit, naming what became of the checkpoint at path (saved at
        saved_step, None: never); say(line) when new ones were skipped."""
        count = int(self.count)
        if count > self.limit:
            kept = (f"{path} (step {saved_step}) is left as it was" if saved_step is not None
                    else "no checkpoint was written")
            raise NonFiniteLoss(f"the loss is not finite at step {int(self.over_at)}: training stopped, "
                                f"that step's update was not applied and {kept} "
                                f"({count} non-finite step(s); --max_bad_steps {self.limit})")
        if count > self.reported and say is not None:
            say(f"skipped {count} step(s) whose loss was not finite so far (--max_bad_steps {self.limit})")
        self.reported = count


def train_step(state, trainer, ddp_net, batches, config, rank, world_size):
    """One optimizer step on global batch number state.step, in --accum_steps micro-batches
    of this process's share; a class-conditional network is given each example's label, or
    "no label" for those the step's `label_drops` drop (--cond_drop_prob). Returns the sum of the micro-batches' mean losses and `bad`
    (apply_gradients), both on the device.

    With an importance sampler (state.t_sampler) t is drawn from its p_t, each example's loss
    weighted by 1 / (T p_t), and the losses it records are gathered from every process in
    the global batch's order before they update its history, so that the history, and so
    the next step's t, are the same on 1 or N processes and with any --accum_steps."""
    training, accum = config.training, config.training.accum_steps
    micro_batch = training.batch_size // (world_size * accum)
    sampler = state.t_sampler
    probabilities = None if sampler is None else sampler.probabilities()
    flip, t, noise = step_draws(config.run.seed, state.step, training.batch_size, config.model.image_shape,
                                config.diffusion.T, state.x_T.device, probabilities)
    classes = config.model.num_classes
    if classes:
        dropped = label_drops(config.run.seed, state.step, training.batch_size, training.cond_drop_prob,
                              state.x_T.device)
    loss_sum, recorded = 0.0, []
    for micro in range(accum):
        x_0, y = next(batches)
        part = slice((rank * accum + micro) * micro_batch, (rank * accum + micro + 1) * micro_batch)
        if datasets.default_flip(config.data.dataset):
            x_0 = torch.where(flip[part, None, None, None], x_0.flip(-1), x_0)
        y = torch.where(dropped[part], classes, y) if classes else None
        # DDP averages gradients across processes on the last micro-batch only
        last = micro == accum - 1
        with ddp_net.no_sync() if world_size > 1 and not last else contextlib.nullcontext():
            if sampler is None:
                loss = trainer(x_0, t[part], noise[part], y).mean()
            else:
                losses, tracked = trainer.per_example_losses(x_0, t[part], noise[part], y)
                loss = (losses * sampler.weights(t[part], probabilities).to(losses.dtype)).mean()
                recorded.append(tracked.detach())
            state.scaling.scale(loss / accum).backward()
        loss_sum = loss_sum + loss.detach()
    bad = apply_gradients(state.net, state.ema, state.optimizer, state.scheduler, training.grad_clip,
                          ema_decay_at(training, state.step), state.scaling, loss_sum)
    if sampler is not None:
        # the global batch's losses in its order: this process's micro-batches are its
        # consecutive parts, the processes' shares follow one another
        gathered = distributed.all_gather_cat(torch.cat(recorded)).cpu()
        skipped = state.scaling.enabled and not bool(state.scaling.unsettled)  # an fp16 overflow
        if torch.isfinite(gathered).all() and not skipped:  # a step that changes nothing, the history neither
            sampler.update(t.cpu(), gathered.double())
    state.step += 1
    return loss_sum, bad


def training_batches(config, dataset, fast, start, rank, world_size, device):
    """This process's micro-batches from global batch `start` on: cut from the dataset held on
    the device (--data_on_device), or read by loader workers."""
    # encoded images (folders, LSUN) only when asked: decoding them all costs a pass at each start
    stored = datasets.as_tensor(dataset, device, decode=config.fast.data_on_device is True,
                            num_workers=config.data.num_workers) if fast.data_on_device else None
    order = GlobalBatchSampler(len(dataset), config.training.batch_size, world_size, rank,
                               config.training.accum_steps, config.run.seed, start,
                               device if stored is not None else "cpu")
    if stored is not None:
        labels = (torch.from_numpy(datasets.labels_of(dataset)).to(device) if config.model.num_classes
                  else None)
        return device_batches(stored.to(device), order, labels)
    return loader_batches(dataset, order, config.data.num_workers, config.run.seed, device)


class Logs:
    """The main process's outputs while training: the tqdm bar, TensorBoard, sample grids; other
    processes hold a silent one. The loss is averaged over processes at each log step.

    TensorBoard's file and sample/ appear once the first step is done: a run that fails before
    it (an unreadable image, a stop signal) leaves only what main.py's start-up wrote, which it
    takes back."""

    def __init__(self, config, dataset, state, is_main):
        self.logdir, self.is_main = config.run.logdir, is_main
        self.progress = tqdm(total=config.training.total_steps, initial=state.step, disable=not is_main,
                             dynamic_ncols=True)
        self.writer, self.real = None, None
        self.loss_sum, self.loss_count = 0.0, 0
        if is_main and state.step == 0:
            size = min(config.training.sample_size, len(dataset))
            self.real = grid(torch.stack([dataset[i][0] for i in range(size)]))

    def add_loss(self, loss_sum, count):
        """A finished step's loss; the first one opens TensorBoard's file and sample/."""
        if self.is_main and self.writer is None:
            self.writer = SummaryWriter(self.logdir)
            os.makedirs(os.path.join(self.logdir, "sample"), exist_ok=True)
            if self.real is not None:
                self.writer.add_image("real_sample", self.real, 0)
        self.loss_sum, self.loss_count = self.loss_sum + loss_sum, self.loss_count + count

    def report_loss(self, step, lr, loss_scale=None):
        loss = distributed.all_reduce_mean(self.loss_sum / self.loss_count).item()
        self.loss_sum, self.loss_count = 0.0, 0
        if self.is_main:
            self.progress.set_postfix(loss=f"{loss:.4f}")
            self.writer.add_scalar("loss", loss, step)
            self.writer.add_scalar("lr", lr, step)
            if loss_scale is not None:  # fp16: a drop is an overflow the scaler skipped
                self.writer.add_scalar("loss_scale", loss_scale, step)

    def sample_grid(self, images, per_row, step):
        require_finite(images, f"the sample grid of step {step}", "it was not written")
        files.save_png(grid(images, per_row), os.path.join(self.logdir, "sample", f"{step}.png"))
        self.writer.add_image("sample", grid(images, per_row), step)

    def close(self):
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def record_classes(dataset, logdir):
    """Print a labelled dataset's class balance and write its class names to the logdir."""
    names = datasets.class_names(dataset)
    print(datasets.class_balance(datasets.labels_of(dataset), names))
    files.write_bytes(os.path.join(logdir, logdir_files.CLASSES), "".join(f"{name}\n" for name in names).encode())


def grid_samples(sampler, net, x_T, num_classes, noise):
    """(the training-time grid's samples from the fixed x_T, images per row): a square of
    them, or a conditional model's row per class (`class_rows`)."""
    if not num_classes:
        return sampler(net, x_T, generator=noise), None
    labels, per_row = class_rows(num_classes, len(x_T), x_T.device)
    return sampler(net, x_T[:len(labels)], generator=noise, labels=labels), per_row


def save(state, bad_steps, path, saved_step, world_size, is_main):
    """Check for NaN (none may reach a checkpoint), gather the RNG states, write ckpt.pt."""
    bad_steps.check(path, saved_step)
    rngs = distributed.gather_objects(rng_state())
    if is_main:
        checkpoint.save(path, state.to_checkpoint(rngs, world_size))
    return state.step


def train(config, device_type):
    """Train as the configuration says; returns the number of the signal that stopped it, else 0."""
    import evaluate  # evaluation during training
    device = distributed.local_device(device_type)
    rank, world_size = distributed.rank(), distributed.world_size()
    is_main, training, logdir = rank == 0, config.training, config.run.logdir
    ckpt_path = logdir_files.ckpt_path(logdir)
    saved = checkpoint.load(ckpt_path, checkpoint.TRAINING_KEYS) if config.actions.resume else None
    resumed = saved_precision(saved, ckpt_path)
    fast = speed.resolve(config.fast, device_type, world_size, resumed)
    if is_main:
        print(speed.choice_words(fast, config.fast.precision, device_type, resumed))
        if resumed and resumed != fast.precision:
            print(f"note: the checkpoint trained in {resumed}, this run goes on in {fast.precision}: the weights, "
                  "Adam's state and the EMA are float32 in every precision, so nothing is converted"
                  + ("; fp16's loss scale starts at 65,536" if fast.precision == "fp16" else ""))
    torch.manual_seed(stream_seed(config.run.seed, rank))  # dropout; restored on resume
    dataset = datasets.configured(config.data, config.model, flip=False)
    if config.model.num_classes and is_main:
        record_classes(dataset, logdir)
    state = initial_state(config, fast, device, ckpt_path, rank, world_size, saved)
    del saved
    if state.step >= training.total_steps:  # a resumed run that is done: nothing to train or write
        if is_main:
            print(f"nothing to train: {ckpt_path} is at step {state.step}, and --total_steps is "
                  f"{training.total_steps}; nothing was written (raise --total_steps to train on)")
        return 0
    saved_step = state.step if config.actions.resume else None
    ddp_net = DistributedDataParallel(state.net) if world_size > 1 else state.net
    trainer = build_trainer(speed.wrap(ddp_net, fast), config.diffusion, config.training).to(device)
    ema_net = speed.wrap(state.ema, fast)
    sampler = build_sampler(config.sampling, config.diffusion, config.model.num_classes).to(device)
    batches = training_batches(config, dataset, fast, state.step, rank, world_size, device)
    evaluator = evaluate.make_evaluator(config, device) if config.eval.eval_step > 0 else None
    bad_steps, stop, logs = BadSteps(training.max_bad_steps, device), signals.StopRequest(), None
    stopping = 0
    try:  # the bar ends its line and the signal handlers go back, whatever ends the loop
        logs = Logs(config, dataset, state, is_main)
        state.net.train()
        while state.step < training.total_steps and not stopping:
            loss_sum, bad = train_step(state, trainer, ddp_net, batches, config, rank, world_size)
            step = state.step
            bad_steps.add(bad, step)
            logs.add_loss(loss_sum, training.accum_steps)
            logs.progress.update(1)
            if step % training.log_step == 0 or step == training.total_steps:
                bad_steps.check(ckpt_path, saved_step, logs.progress.write if is_main else None)
                state.scaling.settle(state.scheduler)  # read at log steps anyway
                logs.report_loss(step, state.scheduler.get_last_lr()[0],
                                 state.scaling.scaler.get_scale() if state.scaling.enabled else None)
            if training.sample_step > 0 and step % training.sample_step == 0:
                if is_main:
                    logs.sample_grid(*grid_samples(sampler, ema_net, state.x_T, config.model.num_classes,
                                                   generator(device, config.run.seed, SAMPLE_NOISE)), step)
                distributed.barrier()
            if config.eval.eval_step > 0 and step % config.eval.eval_step == 0:
                evaluate.evaluate_during_training(config, evaluator, sampler, ema_net, step, logs.writer)
            # the signal's number (0: none), agreed by every process at log steps
            stopping = stop.signum if world_size == 1 else (
                step % training.log_step == 0 and distributed.max_over_ranks(stop.signum, device))
            if (training.save_step > 0 and step % training.save_step == 0) or step == training.total_steps \
                    or stopping:
                saved_step = save(state, bad_steps, ckpt_path, saved_step, world_size, is_main)
    finally:
        stop.close()
        if logs is not None:
            logs.close()
    return finish(config, ckpt_path, stopping, state.step, is_main)


def finish(config, ckpt_path, stopping, step, is_main):
    """The closing line of a training run; the stop signal's number, else 0."""
    logdir = config.run.logdir
    if stopping:
        distributed.barrier()  # no process leaves before rank 0 has written the checkpoint
        if is_main:
            print(f"stopped by {signals.name(stopping)} at step {step}: checkpoint saved (continue with "
                  "--resume), nothing else runs")
    elif is_main:
        grids = f", sample grids in {os.path.join(logdir, 'sample')}/" if config.training.sample_step > 0 else ""
        print(f"wrote {ckpt_path} (step {config.training.total_steps}){grids}; TensorBoard: "
              f"tensorboard --logdir {logdir}")
    return stopping
