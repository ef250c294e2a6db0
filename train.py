"""The training loop: Algorithm 1 with Adam, warmup, clipping and an EMA of the weights.

Every random draw of a step (data order, flips, timesteps, noise) comes from generators
seeded by (--seed, step), for the global batch, which each process then slices. So a run
is the same whatever the number of processes or micro-batches, and a resumed run continues
exactly where the interrupted one stopped. Only dropout uses the per-process RNG, whose
state the checkpoint keeps.
"""
import contextlib
import copy
import os
import random
import signal

import numpy as np
import torch
from tensorboardX import SummaryWriter
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import checkpoint
import data
import distributed
import files
import speed
from reports import grid
from builders import DATA_ORDER, SAMPLE_NOISE, TIMESTEP_NOISE, X_T, build_model, build_sampler, stream_seed
from diffusion import GaussianDiffusionTrainer

class GlobalBatchSampler(Sampler):
    """This process's micro-batches of the global batches start, start + 1, ...

    Global batch g is slice g % per_epoch of a permutation of the dataset drawn afresh for
    each epoch g // per_epoch (the last incomplete batch of an epoch is dropped). Process r
    takes the r-th of world_size equal parts and cuts it into accum_steps micro-batches.
    """

    def __init__(self, dataset_size, global_batch, world_size, rank, accum_steps, seed, start,
                 device="cpu"):
        self.per_epoch = dataset_size // global_batch
        if self.per_epoch == 0:
            raise data.DatasetError(f"the dataset has {dataset_size} images, fewer than one "
                                    f"batch of {global_batch}")
        self.size, self.global_batch = dataset_size, global_batch
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.seed, self.start, self.device = seed, start, device

    def __iter__(self):
        local = self.global_batch // self.world_size
        epoch, order = None, None
        for g in range(self.start, 2 ** 62):
            if g // self.per_epoch != epoch:
                epoch = g // self.per_epoch
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(
                    stream_seed(self.seed, DATA_ORDER, epoch))).to(self.device)
            first = (g % self.per_epoch) * self.global_batch + self.rank * local
            yield from order[first:first + local].chunk(self.accum_steps)


def device_batches(images, batch_sampler):
    """(batch, None) pairs cut from a dataset held whole on the device: no loader, no copies."""
    for indices in batch_sampler:
        yield data.from_stored(images[indices]), None


def loader_batches(dataset, batch_sampler, flags, device):
    loader = DataLoader(
        dataset, num_workers=flags.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=flags.num_workers > 0,
        # its own generator: creating the iterator must not draw from the dropout RNG
        generator=torch.Generator().manual_seed(stream_seed(flags.seed, DATA_ORDER)),
        batch_sampler=(indices.tolist() for indices in batch_sampler))
    try:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y
    except data.DatasetError as error:
        raise data.worker_error(error) from None


def global_batch_draws(seed, step, global_batch, img_shape, T, device):
    """Flip mask, timesteps and noise for the whole global batch of this step, drawn on
    the device (seeding a generator there needs no synchronisation)."""
    gen = torch.Generator(device).manual_seed(stream_seed(seed, TIMESTEP_NOISE, step))
    flip = torch.rand(global_batch, generator=gen, device=device) < 0.5
    t = torch.randint(T, (global_batch,), generator=gen, device=device)
    noise = torch.randn((global_batch, *img_shape), generator=gen, device=device)
    return flip, t, noise


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


def apply_gradients(net, ema, optimizer, scheduler, flags):
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
    """
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), flags.grad_clip)
    bad = ~torch.isfinite(norm)
    if optimizer.param_groups[0].get("fused"):
        optimizer.found_inf = bad.float()
        optimizer.step()
        ema_update(ema, net, (1.0 - flags.ema_decay) * (~bad).float())
    elif not bad.item():
        optimizer.step()
        ema_update(ema, net, 1.0 - flags.ema_decay)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return bad


class NonFiniteLoss(RuntimeError):
    """The loss turned NaN or infinite more often than --max_bad_steps allows."""


def rng_state():
    """This process's RNG states as tensors and plain values, which weights_only loading reads."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restores rng_state(), or the ndarray numpy state of checkpoints before it."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


class StopRequest:
    """Turns SIGINT/SIGTERM into a number the loop checks (the signal's, 0 for none), so it
    can checkpoint before exiting; the previous handlers come back on close()."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self.previous = {signum: signal.signal(signum, self.request) for signum in self.SIGNALS}

    def request(self, signum, frame):
        self.signum = signum

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(flags, device_type):
    """Train as the flags say; returns the number of the signal that stopped it, else 0."""
    import evaluate  # evaluation during training
    device = distributed.local_device(device_type)
    rank, world_size = distributed.rank(), distributed.world_size()
    is_main = rank == 0
    torch.manual_seed(stream_seed(flags.seed, rank))  # dropout; restored on resume
    micro_batch = flags.batch_size // (world_size * flags.accum_steps)
    img_shape = (flags.img_channels, flags.img_size, flags.img_size)

    dataset = data.build_dataset(flags.dataset, flags.data_root, flags.img_size, train=True,
                                 flip=False, channels=flags.img_channels)
    random_flip = data.default_flip(flags.dataset)

    ckpt_path = os.path.join(flags.logdir, "ckpt.pt")
    state = checkpoint.load(ckpt_path, checkpoint.TRAINING_KEYS) if flags.resume else None
    layout = checkpoint.layout_of(state, ckpt_path, flags.layout) if flags.resume else None
    fast = speed.settings(flags, device_type, world_size)
    net = speed.to_layout(build_model(flags, layout).to(device), fast)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = speed.adam(net.parameters(), flags.lr, fast)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=warmup_lr(flags.warmup))
    x_T = torch.randn((flags.sample_size, *img_shape),
                      generator=torch.Generator().manual_seed(stream_seed(flags.seed, X_T)))
    start = 0
    if flags.resume:
        checkpoint.load_weights(net, state["net_model"], ckpt_path)
        checkpoint.load_weights(ema, state["ema_model"], ckpt_path)
        restore_schedule(optimizer, scheduler, state["optim"], state["sched"], flags.lr, flags.warmup,
                         ckpt_path)
        start, x_T = int(state["step"]), state["x_T"]
        if len(state.get("rng", [])) == world_size:
            set_rng_state(state["rng"][rank])
    x_T = x_T.to(device)

    ddp_net = DistributedDataParallel(net) if world_size > 1 else net
    trainer = GaussianDiffusionTrainer(speed.fast(ddp_net, fast), flags.beta_1, flags.beta_T, flags.T,
                                       flags.mean_type, flags.loss_type, flags.var_type).to(device)
    ema_sampler = build_sampler(flags, speed.fast(ema, fast)).to(device)

    # encoded images (folders, LSUN) only when asked: decoding them all costs a pass at each start
    stored = data.as_tensor(dataset, device, decode=flags.data_on_device is True,
                            num_workers=flags.num_workers) if fast.data_on_device else None
    batch_sampler = GlobalBatchSampler(len(dataset), flags.batch_size, world_size, rank, flags.accum_steps,
                                       flags.seed, start, device if stored is not None else "cpu")
    if stored is not None:
        batches = device_batches(stored.to(device), batch_sampler)
    else:
        batches = loader_batches(dataset, batch_sampler, flags, device)

    writer = SummaryWriter(flags.logdir) if is_main else None
    if is_main:
        os.makedirs(os.path.join(flags.logdir, "sample"), exist_ok=True)
        if start == 0:
            real = torch.stack([dataset[i][0] for i in range(min(flags.sample_size, len(dataset)))])
            writer.add_image("real_sample", grid(real), 0)

    stop = StopRequest()
    # Steps whose loss was not finite, counted on the device (see apply_gradients), and the
    # step that went past --max_bad_steps; read only at log steps and before saves.
    bad_steps = torch.zeros((), dtype=torch.long, device=device)
    over_at = torch.zeros((), dtype=torch.long, device=device)
    reported_bad, saved_step = 0, start if flags.resume else None

    def check_finite():
        nonlocal reported_bad
        count = int(bad_steps)
        if count > flags.max_bad_steps:
            kept = (f"{ckpt_path} (step {saved_step}) is left as it was" if saved_step is not None
                    else "no checkpoint was written")
            raise NonFiniteLoss(f"the loss is not finite at step {int(over_at)}: training stopped, "
                                f"that step's update was not applied and {kept} "
                                f"({count} non-finite step(s); --max_bad_steps {flags.max_bad_steps})")
        if count > reported_bad and is_main:
            progress.write(f"skipped {count} step(s) whose loss was not finite so far "
                           f"(--max_bad_steps {flags.max_bad_steps})")
        reported_bad = count

    def save(step):
        nonlocal saved_step
        check_finite()
        rngs = distributed.gather_objects(rng_state())
        saved_step = step
        if is_main:
            checkpoint.save(ckpt_path, {
                "net_model": net.state_dict(), "ema_model": ema.state_dict(),
                "optim": optimizer.state_dict(), "sched": scheduler.state_dict(),
                "step": step, "x_T": x_T.cpu(), "rng": rngs, "world_size": world_size,
                "layout": net.layout, "format_version": checkpoint.FORMAT_VERSION})

    def sample(step):
        if is_main:
            images = ema_sampler(x_T, generator=torch.Generator(device).manual_seed(
                stream_seed(flags.seed, SAMPLE_NOISE)))
            files.save_png(grid(images), os.path.join(flags.logdir, "sample", f"{step}.png"))
            writer.add_image("sample", grid(images), step)
        distributed.barrier()

    evaluator = evaluate.make_evaluator(flags, device) if flags.eval_step > 0 else None
    loss_sum, loss_count = torch.zeros((), device=device), 0
    stopping = 0
    progress = tqdm(total=flags.total_steps, initial=start, disable=not is_main, dynamic_ncols=True)
    try:  # the bar ends its line and the signal handlers go back, whatever ends the loop
        net.train()
        for step in range(start + 1, flags.total_steps + 1):
            # One optimizer step consumes global batch number step - 1.
            flip, t, noise = global_batch_draws(flags.seed, step - 1, flags.batch_size, img_shape, flags.T,
                                                device)
            for micro in range(flags.accum_steps):
                x_0, _ = next(batches)
                part = slice((rank * flags.accum_steps + micro) * micro_batch,
                             (rank * flags.accum_steps + micro + 1) * micro_batch)
                if random_flip:
                    x_0 = torch.where(flip[part, None, None, None], x_0.flip(-1), x_0)
                last = micro == flags.accum_steps - 1
                # DDP averages gradients across processes on the last micro-batch only
                with ddp_net.no_sync() if world_size > 1 and not last else contextlib.nullcontext():
                    loss = trainer(x_0, t[part], noise[part]).mean()
                    (loss / flags.accum_steps).backward()
                loss_sum += loss.detach()
                loss_count += 1
            bad = apply_gradients(net, ema, optimizer, scheduler, flags)
            bad_steps += bad
            over_at = torch.where(bad & (bad_steps == flags.max_bad_steps + 1), step, over_at)
            progress.update(1)

            if step % flags.log_step == 0 or step == flags.total_steps:
                check_finite()
                loss_mean = distributed.all_reduce_mean(loss_sum / loss_count).item()
                loss_sum.zero_()
                loss_count = 0
                if is_main:
                    progress.set_postfix(loss=f"{loss_mean:.4f}")
                    writer.add_scalar("loss", loss_mean, step)
                    writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            if flags.sample_step > 0 and step % flags.sample_step == 0:
                sample(step)
            if flags.eval_step > 0 and step % flags.eval_step == 0:
                evaluate.evaluate_during_training(flags, evaluator, ema_sampler, step, writer)
            # the signal's number (0: none), agreed by every process at log steps
            stopping = stop.signum if world_size == 1 else (
                step % flags.log_step == 0 and distributed.max_over_ranks(stop.signum, device))
            if (flags.save_step > 0 and step % flags.save_step == 0) or step == flags.total_steps or stopping:
                save(step)
            if stopping:
                distributed.barrier()  # no process leaves before rank 0 has written the checkpoint
                if is_main:
                    progress.write(f"stopped by {signal.Signals(stopping).name} at step {step}: checkpoint "
                                   "saved (continue with --resume), nothing else runs")
                break
    finally:
        progress.close()
        stop.close()
    if writer is not None:
        writer.close()
    if is_main and not stopping:
        grids = f", sample grids in {os.path.join(flags.logdir, 'sample')}/" if flags.sample_step > 0 else ""
        print(f"wrote {ckpt_path} (step {flags.total_steps}){grids}; TensorBoard: "
              f"tensorboard --logdir {flags.logdir}")
    return stopping
