"""Evaluation: draw samples with the EMA model, sharded over processes, stream them through
the feature network, and score them; and the looking-inside runs (bits/dim, progressive
sampling, interpolation).

Sample batch i is drawn from a generator seeded by (--seed, i), and process r draws the r-th
contiguous block of batches: the images, and their order once gathered, are the same whatever
the number of processes. Each finished batch leaves its features (and, with --save_samples,
its 8-bit images) in <logdir>/eval_state/<key>/, written atomically, where the key hashes the
checkpoint and every flag the samples depend on. An interrupted --eval (a signal, kill -9, a
crash) run again with the same flags continues after the last finished batch and ends with
the numbers of an uninterrupted run; a new checkpoint or other flags start afresh. Only
features (2,048 floats per image for Inception) and the first grid's images are held, so
memory grows with the number of samples, not with the image size.
"""
import hashlib
import json
import os
import shutil
import sys
import time
import zipfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import checkpoint
import data
import distributed
import files
import speed
import reports
from builders import BPD_NOISE, EVAL_NOISE, INSPECT_NOISE, build_model, build_sampler, stream_seed
from reports import grid
from score import Evaluator, default_feature, gather, load_images, save_images
from score.scorer import PUBLISHED_SAMPLES
from score.metrics import to_uint8

GRID_IMAGES = 256


def make_evaluator(flags, device):
    """The scorer for this run's data; raises ScoreError for missing weights or statistics.
    It carries the short sha256 of its weights and statistics, for the protocol record."""
    feature = flags.fid_feature or default_feature(flags.dataset)
    evaluator = Evaluator(feature, flags.fid_cache or None, device, flags.inception_weights,
                          quantize=flags.fid_quantize, dataset=flags.dataset,
                          data_root=flags.data_root, img_size=flags.img_size)
    evaluator.weights_sha256 = short_sha256(evaluator.weights_path)
    evaluator.statistics_sha256 = short_sha256(flags.fid_cache) if flags.fid_cache else None
    return evaluator


def short_sha256(path, length=12):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def my_block(count):
    """This process's contiguous share [first, last) of count items."""
    rank, world_size = distributed.rank(), distributed.world_size()
    return count * rank // world_size, count * (rank + 1) // world_size


@torch.no_grad()
def sample_batches(flags, sampler, num_images, device, skip=(), desc="generating"):
    """(i, images in [0, 1]) for each batch i of this process's share of num_images samples,
    but those in skip; batch i's noise comes from its own generator."""
    shape = (flags.img_channels, flags.img_size, flags.img_size)
    batch = flags.eval_batch_size
    first_batch, last_batch = my_block(-(-num_images // batch))
    todo = [i for i in range(first_batch, last_batch) if i not in skip]
    for i in tqdm(todo, desc=desc, disable=not distributed.is_main(), dynamic_ncols=True, leave=False):
        size = min(batch, num_images - i * batch)
        generator = torch.Generator(device).manual_seed(stream_seed(flags.seed, EVAL_NOISE, i))
        x_T = torch.randn((size, *shape), generator=generator, device=device)
        yield i, (sampler(x_T, generator=generator) + 1) / 2


class BatchStore:
    """The finished batches of one --eval: <logdir>/eval_state/<key>/batch_<i>.pt, each a dict
    of tensors written atomically. key: a hash of `identity`, everything the batches depend
    on; the main process removes the folders of other keys when it opens its own."""

    def __init__(self, logdir, identity):
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        root = os.path.join(logdir, "eval_state")
        self.folder = os.path.join(root, key)
        if distributed.is_main():
            os.makedirs(self.folder, exist_ok=True)
            for other in os.listdir(root):
                if other != key:
                    shutil.rmtree(os.path.join(root, other), ignore_errors=True)
            files.write_bytes(os.path.join(self.folder, "identity.json"),
                              json.dumps(identity, indent=1, sort_keys=True).encode())
        distributed.barrier()

    def path(self, i):
        return os.path.join(self.folder, f"batch_{i:06d}.pt")

    def finished(self, batches):
        return {i for i in batches if os.path.exists(self.path(i))}

    def save(self, i, tensors):
        files.write_atomically(self.path(i), lambda file: torch.save(tensors, file),
                               files.state_size(tensors))

    def load(self, i):
        try:
            return torch.load(self.path(i), map_location="cpu", weights_only=True)
        except Exception as error:
            raise checkpoint.CheckpointError(
                f"{self.path(i)} is unreadable ({type(error).__name__}); delete {self.folder} "
                "to start this evaluation afresh") from None

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)
        root = os.path.dirname(self.folder)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)


def report(flags, scores, step, writer=None, protocol=None):
    """Print the scores and their protocol, append both as a JSON line to <logdir>/eval.txt
    and log the scores to TensorBoard (main process)."""
    if not distributed.is_main():
        return
    numbers = {name: value for name, value in scores.items() if name != "warning"}
    if "warning" in scores:
        print(f"warning: {scores['warning']}", file=sys.stderr)
    print(", ".join(f"{name} {value:.4f}" for name, value in numbers.items()))
    if protocol:
        print(f"  {describe(protocol)}")
    path = os.path.join(flags.logdir, "eval.txt")
    files.append_line(path, json.dumps({"step": step, "time": time.time(), **scores, **(protocol or {})}))
    print(f"  appended to {path}")
    if writer is not None:
        for name, value in numbers.items():
            writer.add_scalar(name, value, step)


def protocol_record(flags, sampler, evaluator, num_samples, step, ckpt_sha256, started):
    """How a score was measured, as eval.txt records it."""
    record = {"num_samples": num_samples, "sampler": flags.sampler, "steps": len(sampler.timesteps),
              "eta": flags.eta, "skip_type": flags.skip_type, "clip_denoised": flags.clip_denoised,
              "ema": True, "checkpoint_step": step, "checkpoint_sha256": ckpt_sha256,
              "statistics": flags.fid_cache or None,
              "statistics_sha256": evaluator.statistics_sha256 if evaluator else None,
              "feature_network": evaluator.feature if evaluator else None,
              "feature_weights_sha256": evaluator.weights_sha256 if evaluator else None,
              "quantize": flags.fid_quantize, "seed": flags.seed, "processes": distributed.world_size(),
              "torch": torch.__version__, "wall_time_s": round(time.time() - started, 1)}
    if evaluator and evaluator.feature == "inception" and num_samples < PUBLISHED_SAMPLES:
        record["comparable"] = f"no: fewer than {PUBLISHED_SAMPLES:,} samples, not comparable with published FIDs"
    return record


def describe(record):
    """One line of a protocol record."""
    statistics = (f"statistics {record['statistics']} ({record.get('statistics_sha256')})"
                  if record["statistics"] else "statistics of the training data computed here")
    if "images" in record:  # --eval_dir: images scored as they are, no model or sampler
        return (f"{record['num_samples']:,} images of {record['images']}; {record['feature_network']} "
                f"features, {statistics}, {'8-bit' if record['quantize'] else 'float'} images")
    text = (f"{record['num_samples']:,} samples of the EMA model at step {record['checkpoint_step']} "
            f"(ckpt {record['checkpoint_sha256']}); {record['sampler']} sampler, {record['steps']} steps, "
            f"eta {record['eta']}, {record['skip_type']} skips, "
            f"{'clipped' if record['clip_denoised'] else 'unclipped'} x0; "
            f"{record['feature_network']} features ({record['feature_weights_sha256']}), {statistics}, "
            f"{'8-bit' if record['quantize'] else 'float'} samples; seed {record['seed']}, "
            f"{record['processes']} process(es), torch {record['torch']}, {record['wall_time_s']} s")
    return text + (f"; {record['comparable']}" if "comparable" in record else "")


def load_ema(flags, device):
    """The EMA network of <logdir>/ckpt.pt, its step, and the checkpoint's short sha256."""
    path = os.path.join(flags.logdir, "ckpt.pt")
    state = checkpoint.load(path, required=("ema_model",))
    ema = build_model(flags, checkpoint.layout_of(state, path, flags.layout))
    checkpoint.load_weights(ema, state["ema_model"], path)
    return ema.to(device).eval(), state.get("step"), short_sha256(path)


def evaluate(flags, device_type):
    """--eval: score --eval_dir, or draw --num_images samples with the EMA model, save them if
    asked, and score them unless --noscore."""
    started = time.time()
    device = distributed.local_device(device_type)
    # missing weights or statistics fail before any sampling
    evaluator = make_evaluator(flags, device) if flags.score else None
    if flags.eval_dir:
        everything = load_images(flags.eval_dir)
        first, last = my_block(len(everything))
        features, logits = evaluator.features(everything[first:last], progress=distributed.is_main())
        report(flags, evaluator.score(gather(features), gather(logits)), step=None,
               protocol={"num_samples": len(everything), "images": flags.eval_dir,
                         "feature_network": evaluator.feature, "quantize": flags.fid_quantize,
                         "statistics": flags.fid_cache or None})
        return
    fast = speed.settings(flags, device_type, distributed.world_size())
    ema, step, ckpt_sha256 = load_ema(flags, device)
    sampler = build_sampler(flags, speed.fast(speed.to_layout(ema, fast), fast)).to(device)
    identity = {name: getattr(flags, name) for name in (
        "sampler", "sample_steps", "eta", "skip_type", "clip_denoised", "mean_type", "var_type", "T",
        "beta_1", "beta_T", "seed", "num_images", "eval_batch_size", "img_size", "img_channels")}
    identity.update(checkpoint=ckpt_sha256, layout=ema.layout, fast_path=repr(fast),
                    feature=evaluator.feature if evaluator else None,
                    feature_weights=evaluator.weights_sha256 if evaluator else None,
                    quantize=flags.fid_quantize, keep_samples=bool(flags.save_samples))
    store = BatchStore(flags.logdir, identity)
    batch = flags.eval_batch_size
    num_batches = -(-flags.num_images // batch)
    mine = range(*my_block(num_batches))
    done = store.finished(mine)
    if done:
        print(f"rank {distributed.rank()}: {len(done)} of its {len(mine)} batches were finished by an "
              f"earlier run ({store.folder}); continuing", file=sys.stderr)
    to_folder = flags.save_samples and not flags.save_samples.endswith(".npz")
    for i, images in sample_batches(flags, sampler, flags.num_images, device, skip=done):
        result = {}
        if evaluator is not None:
            features, logits = evaluator.features(images)
            result.update(features=features.float().cpu(), logits=logits.float().cpu())
        samples = to_uint8(images).cpu()
        if flags.save_samples and not to_folder:
            result["samples"] = samples
        elif to_folder:  # written before the batch counts as finished
            save_images(images.cpu(), flags.save_samples, start=i * batch)
        if i * batch < GRID_IMAGES:
            result["grid"] = samples[:GRID_IMAGES - i * batch]
        store.save(i, result)
    distributed.barrier()  # every batch is on disk now; the logdir is shared by all ranks
    if distributed.is_main():
        first = torch.cat([store.load(i)["grid"] for i in range(min(num_batches, -(-GRID_IMAGES // batch)))])
        path = os.path.join(flags.logdir, "samples_ema.png")
        files.save_png(grid(first.float() / 127.5 - 1), path)
        print(f"wrote {path} (the first {len(first)} samples)")
        if flags.save_samples and not to_folder:
            write_npz(flags.save_samples, (store.load(i)["samples"] for i in range(num_batches)),
                      (flags.num_images, flags.img_size, flags.img_size, flags.img_channels))
        if flags.save_samples:
            print(f"wrote {flags.num_images:,} samples to {flags.save_samples}")
    if evaluator is not None:
        parts = [store.load(i) for i in mine]
        features = torch.cat([part["features"] for part in parts]).double().to(device)
        logits = torch.cat([part["logits"] for part in parts]).double().to(device)
        scores = evaluator.score(gather(features), gather(logits))
        report(flags, scores, step, protocol=protocol_record(
            flags, sampler, evaluator, flags.num_images, step, ckpt_sha256, started))
    distributed.barrier()
    if distributed.is_main():
        store.remove()


def write_npz(path, batches, shape):
    """One .npz with uint8 (N, H, W, C) under 'arr_0' (the layout save_images writes),
    streamed batch by batch so that it never holds all the samples."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    temporary = path + files.TEMPORARY
    with zipfile.ZipFile(temporary, "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_2_0(entry, header)
            for samples in batches:
                entry.write(samples.permute(0, 2, 3, 1).contiguous().numpy().tobytes())
    os.replace(temporary, path)


def evaluate_during_training(flags, evaluator, sampler, step, writer):
    """--eval_step: score --eval_num_images samples of the EMA model, batch by batch."""
    started = time.time()
    parts = [evaluator.features(images) for _, images in sample_batches(
        flags, sampler, flags.eval_num_images, sampler.betas.device, desc=f"evaluating step {step}")]
    features, logits = (torch.cat([part[k] for part in parts]) for k in (0, 1))
    report(flags, evaluator.score(gather(features), gather(logits)), step, writer,
           protocol_record(flags, sampler, evaluator, flags.eval_num_images, step, None, started))


def bits_per_dim(flags, device_type):
    """--bpd: the variational bound of the EMA model on a dataset split (official
    calc_bpd_loop), each process on its contiguous share, the sums combined."""
    device = distributed.local_device(device_type)
    ema, _, _ = load_ema(flags, device)
    # fp32 network: every bound term after it is float64
    sampler = build_sampler(flags, ema, full_chain=True).to(device)
    dataset = data.build_dataset(flags.dataset, flags.data_root, flags.img_size,
                                 train=flags.bpd_split == "train", flip=False, channels=flags.img_channels)
    # whole batches per process, each batch's noise seeded by its global index: the same
    # sums on any number of processes
    count, batch = min(len(dataset), flags.bpd_num_images or len(dataset)), flags.eval_batch_size
    first_batch, last_batch = my_block(-(-count // batch))
    loader = DataLoader(Subset(dataset, range(first_batch * batch, min(last_batch * batch, count))),
                        batch_size=batch, num_workers=flags.num_workers)

    def generator(n):
        return torch.Generator(device).manual_seed(stream_seed(flags.seed, BPD_NOISE, first_batch + n))
    sums = reports.bpd_sums(sampler, loader, progress=distributed.is_main(), generator=generator)
    sums = {name: distributed.all_reduce_sum(value) for name, value in sums.items()}
    if distributed.is_main():
        summary = reports.save_bpd(sums, flags.logdir)
        print(f"bits/dim {summary['total_bpd']:.4f} +- {summary['total_bpd_stderr']:.4f} "
              f"(prior {summary['prior_bpd']:.2e}) over {summary['num_images']} {flags.bpd_split} "
              f"images; wrote {os.path.join(flags.logdir, 'bpd.json')} and bpd.png")


def interpolation_image(flags, name, dataset):
    """--interp_images entry: an index into the training set, or an image file."""
    if name.isdigit():
        return dataset[int(name)][0]
    try:
        with Image.open(name) as image:
            return data.image_transform(flags.img_size, False, flags.img_channels)(image.convert("RGB"))
    except OSError as error:
        raise data.DatasetError(f"--interp_images: {name} is neither a training-set index nor a "
                                f"readable image ({error})") from None


def look_inside(flags, device_type):
    """--progressive_every and --interp_t with the EMA model, on the main process."""
    if not distributed.is_main():
        return
    device = distributed.local_device(device_type)
    ema, _, _ = load_ema(flags, device)
    sampler = build_sampler(flags, ema).to(device)
    generator = torch.Generator(device).manual_seed(stream_seed(flags.seed, INSPECT_NOISE))
    if flags.progressive_every > 0:
        x_T = torch.randn((flags.sample_size, flags.img_channels, flags.img_size, flags.img_size),
                          generator=generator, device=device)
        progressive = reports.progressive_samples(sampler, x_T, flags.progressive_every, generator)
        paths = reports.save_progressive(progressive, os.path.join(flags.logdir, "progressive"))
        print(f"wrote {len(paths) - 1} strips and {paths[-1]}")
    if flags.interp_t:
        dataset = data.build_dataset(flags.dataset, flags.data_root, flags.img_size, train=True,
                                     flip=False, channels=flags.img_channels)
        x0_a, x0_b = (interpolation_image(flags, name, dataset)[None].to(device)
                      for name in flags.interp_images)
        lambdas = torch.linspace(0, 1, flags.interp_lambdas).tolist()
        folder = os.path.join(flags.logdir, "interpolation")
        os.makedirs(folder, exist_ok=True)
        for t in map(int, flags.interp_t):
            mixed = reports.interpolate(sampler, x0_a, x0_b, t, lambdas, generator)
            reports.save_interpolation(os.path.join(folder, f"t{t}.png"), x0_a, x0_b, mixed)
        print(f"wrote {len(flags.interp_t)} interpolation grids under {folder}")
