"""Evaluation: draw samples with the EMA model, sharded over processes, stream them through
the feature network, and score them; and the looking-inside runs (bits/dim, progressive
sampling, interpolation).

Sample batch i is drawn from a generator seeded by (--seed, i), and process r draws the r-th
contiguous block of batches: the images, and their order once gathered, are the same whatever
the number of processes. Each finished batch leaves its features (and, with --save_samples,
its 8-bit images) in <logdir>/eval_state/<key>/, written atomically, where the key hashes the
checkpoint and every flag the samples depend on. An interrupted --eval (a signal, kill -9, a
crash) run again with the same flags continues after the last finished batch and ends with
the numbers of an uninterrupted run; a new checkpoint or other flags start a store of their
own and keep the others (see BatchStore). Finished batches are checked before any sampling:
a malformed one is drawn again. Only
features (2,048 floats per image for Inception) and the first grid's images are held, so
memory grows with the number of samples, not with the image size.
"""
import dataclasses
import hashlib
import json
import os
import re
import shlex
import stat
import sys
import time
import zipfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import bpd
import checkpoint
import datasets
import distributed
import files
import reports
import speed
from builders import build_diffusion, build_model, build_sampler
from errors import UserError
from reports import grid
from sampling import SAMPLERS
from steps import SamplerStep
from streams import BPD_NOISE, EVAL_NOISE, INSPECT_NOISE, generator
from score import Evaluator, default_feature, gather, load_images, save_images
from score.scorer import PUBLISHED_SAMPLES
from score.metrics import to_uint8

GRID_IMAGES = 256


def make_evaluator(config, device):
    """The scorer for this run's data; raises ScoreError for missing weights or statistics.
    It carries the short sha256 of its weights and statistics, for the protocol record."""
    scoring, dataset = config.eval, config.data
    feature = scoring.fid_feature or default_feature(dataset.dataset)
    evaluator = Evaluator(feature, scoring.fid_cache or None, device, scoring.inception_weights,
                          quantize=scoring.fid_quantize, dataset=dataset.dataset,
                          data_root=dataset.data_root, img_size=config.model.img_size)
    evaluator.weights_sha256 = short_sha256(evaluator.weights_path)
    evaluator.statistics_sha256 = short_sha256(scoring.fid_cache) if scoring.fid_cache else None
    return evaluator


def short_sha256(path, length=12):
    digest = hashlib.sha256()
    with files.open_regular(path) as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def my_block(count):
    """This process's contiguous share [first, last) of count items."""
    rank, world_size = distributed.rank(), distributed.world_size()
    return count * rank // world_size, count * (rank + 1) // world_size


@torch.no_grad()
def sample_batches(config, sampler, net, num_images, device, skip=(), desc="generating"):
    """(i, images in [0, 1]) for each batch i of this process's share of num_images samples,
    but those in skip; batch i's noise comes from its own generator. A batch that is not
    finite is refused here (reports.NonFiniteSamples), before it can be scored or saved."""
    shape = (config.model.img_channels, config.model.img_size, config.model.img_size)
    batch = config.eval.eval_batch_size
    first_batch, last_batch = my_block(-(-num_images // batch))
    todo = [i for i in range(first_batch, last_batch) if i not in skip]
    for i in tqdm(todo, desc=desc, disable=not distributed.is_main(), dynamic_ncols=True, leave=False):
        size = min(batch, num_images - i * batch)
        noise = generator(device, config.run.seed, EVAL_NOISE, i)
        x_T = torch.randn((size, *shape), generator=noise, device=device)
        images = sampler(net, x_T, generator=noise)
        reports.require_finite(images, f"sample batch {i}",
                               f"nothing was scored and batch {i} was not saved")
        yield i, (images + 1) / 2


STORE_MARKER = "ddpm-eval"  # identity.json's "store": a folder this program made and may delete from
OWN_FILE = re.compile(r"(identity\.json|batch_\d{6,}\.pt)(\.\d+\.tmp)?")  # what a store writes
BATCH_FILE = re.compile(r"batch_(\d{6,})\.pt")
IDENTITY_LIMIT = 2 ** 20


class StoreError(UserError, RuntimeError):
    """An evaluation store that cannot be made, or a finished batch that cannot be used."""


def read_identity(folder):
    """The JSON of folder/identity.json if it is a regular file (a symlink is not followed),
    else None."""
    try:
        return json.loads(files.read_regular(os.path.join(folder, "identity.json"), IDENTITY_LIMIT,
                                             follow_links=False))
    except (OSError, ValueError):  # files.NotARegularFile is an OSError
        return None


def is_store(folder):
    """Whether folder is a folder (not a symlink to one) with a store's identity record."""
    record = read_identity(folder) if os.path.isdir(folder) and not os.path.islink(folder) else None
    return isinstance(record, dict) and record.get("store") == STORE_MARKER


def other_stores(root, key):
    """[(path, finished batches, bytes)] of the stores in root but key's, by name."""
    found = []
    for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
        if entry.name != key and is_store(entry.path):
            inside = [item for item in os.scandir(entry.path) if item.is_file(follow_symlinks=False)]
            found.append((entry.path, sum(1 for item in inside if item.name.startswith("batch_")),
                          sum(item.stat(follow_symlinks=False).st_size for item in inside)))
    return found


def mismatch(record, layout):
    """Why a loaded batch is not what this evaluation writes (keys, each tensor's dtype and
    shape, finite numbers), or None when it is."""
    if not isinstance(record, dict) or set(record) != set(layout):
        found = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        return f"keys {found}, expected {sorted(layout)}"
    for name, (dtype, shape) in layout.items():
        tensor = record[name]
        if not torch.is_tensor(tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            found = (f"{str(tensor.dtype)[6:]} {tuple(tensor.shape)}" if torch.is_tensor(tensor)
                     else type(tensor).__name__)
            return f"{name} is {found}, expected {str(dtype)[6:]} {shape}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} holds NaN or inf"
    return None


class BatchStore:
    """The finished batches of one --eval: <logdir>/eval_state/<key>/batch_<i>.pt, each a dict
    of tensors written atomically, beside identity.json (marked "store": STORE_MARKER), which
    makes the folder this store's. key: a hash of `identity`, everything the batches depend
    on. layout(i): {name: (dtype, shape)} of batch i; a batch is used only once it fits.

    It deletes only what it wrote: a finished batch that does not fit (to draw it again), and
    at the end its own files and then its folder. Other stores (other flags or another
    checkpoint) are kept, since a quick check must not cost an interrupted long evaluation
    its batches, and listed; whatever else is in eval_state is left alone. eval_state may be
    a symlink to scratch storage for a large evaluation: it is used, not refused (that is why
    it was linked), the store deletes there only what it wrote, as anywhere, and the link and
    the folder it points to are never removed."""

    def __init__(self, logdir, identity, layout):
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.root = os.path.join(logdir, "eval_state")
        self.folder = os.path.join(self.root, self.key)
        self.layout = layout
        if distributed.is_main():
            self.open(identity)
        distributed.barrier()

    def open(self, identity):
        """Make this store's folder, or take it up again (main process); list the others."""
        expected = json.loads(json.dumps(identity))  # as identity.json holds it: lists, not tuples
        record = read_identity(self.folder)
        mine = is_store(self.folder) and record.get("identity") == expected
        legacy = record == expected and not os.path.islink(self.folder)  # before stores were marked
        try:
            os.makedirs(self.root, exist_ok=True)
            if not os.path.lexists(self.folder):
                os.mkdir(self.folder)
            elif not (mine or legacy or (os.path.isdir(self.folder) and not os.path.islink(self.folder)
                                         and not os.listdir(self.folder))):
                raise StoreError(f"{self.folder} is not this evaluation's store (it has no identity.json "
                                 "of it): move it away, or use another --logdir; nothing was changed")
        except OSError as error:
            broken = os.path.islink(self.root) and not os.path.exists(self.root)  # purged scratch storage
            raise StoreError(f"cannot make {self.folder}: " + (
                f"{self.root} links to {os.readlink(self.root)}, which does not exist" if broken
                else error.strerror or str(error))) from None
        files.write_bytes(os.path.join(self.folder, "identity.json"), json.dumps(
            {"store": STORE_MARKER, "identity": identity}, indent=1, sort_keys=True).encode())
        others = other_stores(self.root, self.key)
        if others:
            listed = "; ".join(f"{os.path.basename(path)}: {count} batches, {files.readable(size)}"
                               for path, count, size in others)
            print(f"note: {len(others)} other unfinished evaluation(s) kept in {self.root} ({listed}): "
                  f"remove them with rm -r {' '.join(shlex.quote(path) for path, _, _ in others)}",
                  file=sys.stderr)

    def path(self, i):
        return os.path.join(self.folder, f"batch_{i:06d}.pt")

    def read(self, i):
        """(batch i, None), or (None, why it cannot be used). Only a regular file is read, never
        a link: what the store did not write (a link to a file elsewhere) is not a batch."""
        try:
            with files.open_regular(self.path(i), follow_links=False) as file:
                record = torch.load(file, map_location="cpu", weights_only=True)
        except files.NotARegularFile as error:
            return None, str(error)
        except Exception as error:
            detail = str(error).splitlines()[0] if str(error) else "no detail"
            return None, f"{type(error).__name__}: {detail}"
        why = mismatch(record, self.layout(i))
        return (None, why) if why else (record, None)

    def finished(self, batches):
        """Those of `batches` (a range) already on disk and sound, found in one listing of the
        folder. Each is loaded and checked against its layout; one that does not fit, or is no
        regular file (a link, a FIFO, an empty folder), is removed with a note, to be drawn
        again (batch i's noise is seeded by i: the same batch). A folder that holds something
        in a batch's place is not the store's to delete: one line."""
        done = set()
        found = sorted(int(match[1]) for name in os.listdir(self.folder) if (match := BATCH_FILE.fullmatch(name)))
        for i in (i for i in found if i in batches):
            why = self.read(i)[1]
            if why is None:
                done.add(i)
                continue
            print(f"note: {self.path(i)} is unreadable or malformed ({why}); drawing batch {i} again",
                  file=sys.stderr)
            try:  # os.remove takes a link away, never what it points to
                if stat.S_ISDIR(os.lstat(self.path(i)).st_mode):
                    os.rmdir(self.path(i))
                else:
                    os.remove(self.path(i))
            except OSError as error:
                raise StoreError(f"{self.path(i)} is in the place of batch {i} and cannot be removed "
                                 f"({error.strerror}): move it away and run the command again") from None
        return done

    def save(self, i, tensors):
        files.write_atomically(self.path(i), lambda file: torch.save(tensors, file),
                               files.state_size(tensors))

    def load(self, i):
        record, why = self.read(i)
        if why:
            raise StoreError(f"{self.path(i)} is unreadable or malformed ({why}); run the same command "
                             "again to draw that batch again")
        return record

    def remove(self):
        """Delete the files this store writes and then its folder, and eval_state once empty
        unless it is a symlink. os.remove never follows a symlink; a folder that holds anything
        else stays."""
        for entry in os.scandir(self.folder):
            if OWN_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
        try:
            os.rmdir(self.folder)
        except OSError:
            print(f"note: kept {self.folder}: it holds files this evaluation did not write", file=sys.stderr)
            return
        if not os.path.islink(self.root) and not os.listdir(self.root):
            os.rmdir(self.root)


def report(logdir, scores, step, writer=None, protocol=None):
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
    path = os.path.join(logdir, "eval.txt")
    files.append_line(path, json.dumps({"step": step, "time": time.time(), **scores, **(protocol or {})}))
    print(f"  appended to {path}")
    if writer is not None:
        for name, value in numbers.items():
            writer.add_scalar(name, value, step)


def protocol_record(config, sampler, evaluator, num_samples, step, ckpt_sha256, started):
    """How a score was measured, as eval.txt records it."""
    sampling = config.sampling
    record = {"num_samples": num_samples, "sampler": sampling.sampler, "steps": len(sampler.timesteps),
              "eta": sampling.eta, "skip_type": sampler.skip_type, "clip_denoised": sampling.clip_denoised,
              "beta_schedule": config.diffusion.beta_schedule,
              "ema": True, "checkpoint_step": step, "checkpoint_sha256": ckpt_sha256,
              "statistics": config.eval.fid_cache or None,
              "statistics_sha256": evaluator.statistics_sha256 if evaluator else None,
              "feature_network": evaluator.feature if evaluator else None,
              "feature_weights_sha256": evaluator.weights_sha256 if evaluator else None,
              "quantize": config.eval.fid_quantize, "seed": config.run.seed,
              "processes": distributed.world_size(),
              "torch": torch.__version__, "wall_time_s": round(time.time() - started, 1)}
    record.update(sampler.step.record())  # the sampler's own fields: what ran (solver_order: the order reached)
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
    sampler_words = SAMPLERS.get(record["sampler"], SamplerStep).describe(record)
    text = (f"{record['num_samples']:,} samples of the EMA model at step {record['checkpoint_step']} "
            f"(ckpt {record['checkpoint_sha256']}); {record.get('beta_schedule', 'linear')} schedule, "
            f"{record['sampler']} sampler{sampler_words}, {record['steps']} steps, "
            f"eta {record['eta']}, {record['skip_type']} skips, "
            f"{'clipped' if record['clip_denoised'] else 'unclipped'} x0; "
            f"{record['feature_network']} features ({record['feature_weights_sha256']}), {statistics}, "
            f"{'8-bit' if record['quantize'] else 'float'} samples; seed {record['seed']}, "
            f"{record['processes']} process(es), torch {record['torch']}, {record['wall_time_s']} s")
    return text + (f"; {record['comparable']}" if "comparable" in record else "")


def load_ema(config, device):
    """The EMA network of <logdir>/ckpt.pt, its step, and the checkpoint's short sha256."""
    path = os.path.join(config.run.logdir, "ckpt.pt")
    # the hash of the bytes loaded: a training run may save a new ckpt.pt meanwhile
    state, sha256 = checkpoint.load_hashed(path, required=("ema_model",))
    ema = build_model(config.model, config.diffusion, checkpoint.layout_of(state, path, config.model.layout))
    checkpoint.load_weights(ema, state["ema_model"], path)
    return ema.to(device).eval(), state.get("step"), sha256[:12]


def store_identity(config, ckpt_sha256, layout, fast, evaluator):
    """Everything the finished batches of an --eval depend on: the model, diffusion and
    sampling configurations whole (so that no new field can be forgotten here), the
    checkpoint, and how the batches were drawn and what they hold."""
    return {"model": dataclasses.asdict(config.model), "diffusion": dataclasses.asdict(config.diffusion),
            "sampling": dataclasses.asdict(config.sampling), "checkpoint": ckpt_sha256, "layout": layout,
            "seed": config.run.seed, "num_images": config.eval.num_images,
            "eval_batch_size": config.eval.eval_batch_size, "fast_path": dataclasses.asdict(fast),
            "feature": evaluator.feature if evaluator else None,
            "feature_weights": evaluator.weights_sha256 if evaluator else None,
            "quantize": config.eval.fid_quantize, "keep_samples": bool(config.actions.save_samples)}


def score_folder(config, evaluator):
    """--eval_dir: score a folder of images (or .npz) as they are."""
    scoring, folder = config.eval, config.actions.eval_dir
    everything = load_images(folder)
    first, last = my_block(len(everything))
    features, logits = evaluator.features(everything[first:last], progress=distributed.is_main())
    report(config.run.logdir, evaluator.score(gather(features), gather(logits)), step=None,
           protocol={"num_samples": len(everything), "images": folder, "feature_network": evaluator.feature,
                     "quantize": scoring.fid_quantize, "statistics": scoring.fid_cache or None})


def evaluate(config, device_type):
    """--eval: score --eval_dir, or draw --num_images samples with the EMA model, save them if
    asked, and score them unless --noscore."""
    started = time.time()
    device = distributed.local_device(device_type)
    # missing weights or statistics fail before any sampling
    evaluator = make_evaluator(config, device) if config.actions.score else None
    if config.actions.eval_dir:
        return score_folder(config, evaluator)
    fast = speed.resolve(config.fast, device_type, distributed.world_size())
    ema, step, ckpt_sha256 = load_ema(config, device)
    net, sampler = speed.wrap(speed.to_layout(ema, fast), fast), build_sampler(config.sampling, config.diffusion)
    sampler = sampler.to(device)
    widths = feature_widths(evaluator, config, device) if evaluator is not None else None
    store = BatchStore(config.run.logdir, store_identity(config, ckpt_sha256, ema.layout, fast, evaluator),
                       lambda i: batch_layout(config, widths, i))
    num_batches = -(-config.eval.num_images // config.eval.eval_batch_size)
    mine = range(*my_block(num_batches))
    done = store.finished(mine)
    if done:
        print(f"rank {distributed.rank()}: {len(done)} of its {len(mine)} batches were finished by an "
              f"earlier run ({store.folder}); continuing", file=sys.stderr)
    for i, images in sample_batches(config, sampler, net, config.eval.num_images, device, skip=done):
        store.save(i, batch_record(config, evaluator, i, images))
    distributed.barrier()  # every batch is on disk now; the logdir is shared by all ranks
    if distributed.is_main():
        write_samples(config, store, num_batches)
    if evaluator is not None:
        parts = [store.load(i) for i in mine]
        features = torch.cat([part["features"] for part in parts]).double().to(device)
        logits = torch.cat([part["logits"] for part in parts]).double().to(device)
        scores = evaluator.score(gather(features), gather(logits))
        report(config.run.logdir, scores, step, protocol=protocol_record(
            config, sampler, evaluator, config.eval.num_images, step, ckpt_sha256, started))
    distributed.barrier()
    if distributed.is_main():
        store.remove()


def saves_to_folder(config):
    path = config.actions.save_samples
    return bool(path) and not path.endswith(".npz")


def feature_widths(evaluator, config, device):
    """(D, K): how many features and logits the feature network gives per image of this model."""
    model = config.model
    blank = torch.zeros((1, model.img_channels, model.img_size, model.img_size), device=device)
    features, logits = evaluator.features(blank)
    return features.shape[1], logits.shape[1]


def batch_layout(config, widths, i):
    """{name: (dtype, shape)} of what batch_record keeps of batch i; widths: feature_widths, or
    None when nothing is scored."""
    model, batch = config.model, config.eval.eval_batch_size
    size = min(batch, config.eval.num_images - i * batch)
    image = (model.img_channels, model.img_size, model.img_size)
    layout = {}
    if widths is not None:
        layout.update(features=(torch.float32, (size, widths[0])), logits=(torch.float32, (size, widths[1])))
    if config.actions.save_samples and not saves_to_folder(config):
        layout["samples"] = (torch.uint8, (size, *image))
    if i * batch < GRID_IMAGES:
        layout["grid"] = (torch.uint8, (min(size, GRID_IMAGES - i * batch), *image))
    return layout


def batch_record(config, evaluator, i, images):
    """What the store keeps of batch i: its features and logits, its 8-bit samples for an
    .npz, the first GRID_IMAGES samples for the grid; a folder gets its PNGs now, before the
    batch counts as finished."""
    record, batch = {}, config.eval.eval_batch_size
    if evaluator is not None:
        features, logits = evaluator.features(images)
        record.update(features=features.float().cpu(), logits=logits.float().cpu())
    samples = to_uint8(images).cpu()
    if config.actions.save_samples and not saves_to_folder(config):
        record["samples"] = samples
    elif saves_to_folder(config):
        save_images(images.cpu(), config.actions.save_samples, start=i * batch)
    if i * batch < GRID_IMAGES:
        record["grid"] = samples[:GRID_IMAGES - i * batch]
    return record


def write_samples(config, store, num_batches):
    """samples_ema.png from the first batches, and the .npz of --save_samples."""
    batch, model, path = config.eval.eval_batch_size, config.model, config.actions.save_samples
    first = torch.cat([store.load(i)["grid"] for i in range(min(num_batches, -(-GRID_IMAGES // batch)))])
    grid_path = os.path.join(config.run.logdir, "samples_ema.png")
    files.save_png(grid(first.float() / 127.5 - 1), grid_path)
    print(f"wrote {grid_path} (the first {len(first)} samples)")
    if path and not saves_to_folder(config):
        write_npz(path, (store.load(i)["samples"] for i in range(num_batches)),
                  (config.eval.num_images, model.img_size, model.img_size, model.img_channels))
    if path:
        print(f"wrote {config.eval.num_images:,} samples to {path}")


def write_npz(path, batches, shape):
    """One .npz with uint8 (N, H, W, C) under 'arr_0' (the layout save_images writes),
    streamed batch by batch so that it never holds all the samples; written atomically."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}

    def write(file):
        with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_2_0(entry, header)
                for samples in batches:
                    entry.write(samples.permute(0, 2, 3, 1).contiguous().numpy().tobytes())

    files.write_atomically(path, write, int(np.prod(shape)))


def evaluate_during_training(config, evaluator, sampler, net, step, writer):
    """--eval_step: score --eval_num_images samples of the EMA model, batch by batch."""
    started = time.time()
    parts = [evaluator.features(images) for _, images in sample_batches(
        config, sampler, net, config.eval.eval_num_images, sampler.betas.device,
        desc=f"evaluating step {step}")]
    features, logits = (torch.cat([part[k] for part in parts]) for k in (0, 1))
    report(config.run.logdir, evaluator.score(gather(features), gather(logits)), step, writer,
           protocol_record(config, sampler, evaluator, config.eval.eval_num_images, step, None, started))


def bits_per_dim(config, device_type):
    """--bpd: the variational bound of the EMA model on a dataset split (official
    calc_bpd_loop), each process on its contiguous share, the sums combined."""
    device = distributed.local_device(device_type)
    ema, _, _ = load_ema(config, device)  # fp32 network: every bound term after it is float64
    diffusion, inspect, logdir = build_diffusion(config.diffusion).to(device), config.inspect, config.run.logdir
    dataset = datasets.build_dataset(config.data.dataset, config.data.data_root, config.model.img_size,
                                 train=inspect.bpd_split == "train", flip=False,
                                 channels=config.model.img_channels)
    # whole batches per process, each batch's noise seeded by its global index: the same
    # sums on any number of processes
    count = min(len(dataset), inspect.bpd_num_images or len(dataset))
    batch = config.eval.eval_batch_size
    first_batch, last_batch = my_block(-(-count // batch))
    loader = DataLoader(Subset(dataset, range(first_batch * batch, min(last_batch * batch, count))),
                        batch_size=batch, num_workers=config.data.num_workers)
    sums = bpd.bpd_sums(ema, diffusion, loader, config.diffusion.mean_type, config.diffusion.var_type,
                        config.sampling.clip_denoised, progress=distributed.is_main(),
                        generator=lambda n: generator(device, config.run.seed, BPD_NOISE, first_batch + n))
    sums = {name: distributed.all_reduce_sum(value) for name, value in sums.items()}
    if distributed.is_main():
        summary = bpd.save_bpd(sums, logdir)
        print(f"bits/dim {summary['total_bpd']:.4f} +- {summary['total_bpd_stderr']:.4f} "
              f"(prior {summary['prior_bpd']:.2e}) over {summary['num_images']} {inspect.bpd_split} "
              f"images; wrote {os.path.join(logdir, 'bpd.json')} and bpd.png")


def interpolation_image(model, name, dataset):
    """--interp_images entry: an index into the training set, or an image file."""
    if name.isdigit():
        return dataset[int(name)][0]
    try:
        with files.open_regular(name) as file, Image.open(file) as image:
            return datasets.image_transform(model.img_size, False, model.img_channels)(image)
    except (OSError, ValueError) as error:  # not a regular file (a FIFO would block), pixels of no known range
        raise datasets.DatasetError(f"--interp_images: {name} is neither a training-set index nor a "
                                f"readable image ({error})") from None


def look_inside(config, device_type):
    """--progressive_every and --interp_t with the EMA model, on the main process."""
    if not distributed.is_main():
        return
    device = distributed.local_device(device_type)
    ema, _, _ = load_ema(config, device)
    sampler = build_sampler(config.sampling, config.diffusion).to(device)
    noise = generator(device, config.run.seed, INSPECT_NOISE)
    model, actions, logdir = config.model, config.actions, config.run.logdir
    if actions.progressive_every > 0:
        x_T = torch.randn((config.training.sample_size, model.img_channels, model.img_size, model.img_size),
                          generator=noise, device=device)
        progressive = reports.progressive_samples(sampler, ema, x_T, actions.progressive_every, noise)
        paths = reports.save_progressive(progressive, os.path.join(logdir, "progressive"))
        print(f"wrote {len(paths) - 1} strips and {paths[-1]}")
    if actions.interp_t:
        dataset = datasets.build_dataset(config.data.dataset, config.data.data_root, model.img_size, train=True,
                                     flip=False, channels=model.img_channels)
        x0_a, x0_b = (interpolation_image(model, name, dataset)[None].to(device)
                      for name in config.inspect.interp_images)
        lambdas = torch.linspace(0, 1, config.inspect.interp_lambdas).tolist()
        folder = os.path.join(logdir, "interpolation")
        os.makedirs(folder, exist_ok=True)
        for t in map(int, actions.interp_t):
            mixed = reports.interpolate(sampler, ema, x0_a, x0_b, t, lambdas, noise)
            reports.save_interpolation(os.path.join(folder, f"t{t}.png"), x0_a, x0_b, mixed)
        print(f"wrote {len(actions.interp_t)} interpolation grids under {folder}")
