"""Evaluation: draw samples with the EMA model, sharded over processes, stream them through
the feature network, score them, and write what was asked for (samples_ema.png, the
--save_samples .npz or PNGs, eval.txt with the protocol record of each score).

Sample batch i is drawn from a generator seeded by (--seed, i), and process r draws the r-th
contiguous block of batches: the images, and their order once gathered, are the same whatever
the number of processes. Each finished batch leaves its features (and, with --save_samples,
its 8-bit images) in <logdir>/eval_state/<key>/, written atomically, where the key hashes the
checkpoint and every flag the samples depend on. An interrupted --eval (a signal, kill -9, a
crash) run again with the same flags continues after the last finished batch and ends with
the numbers of an uninterrupted run; a new checkpoint or other flags start a store of their
own and keep the others (store.py). Finished batches are checked before any sampling:
a malformed one is drawn again. Only
features (2,048 floats per image for Inception) and the first grid's images are held, so
memory grows with the number of samples, not with the image size; sFID's spatial features
(2,023 per image) are kept on disk with each batch and summed into their mean and covariance
one batch at a time.
"""
import dataclasses
import hashlib
import json
import os
import sys
import time
import zipfile

import numpy as np
import torch
from tqdm import tqdm

import distributed
import files
import logdir_files
import reports
import speed
from builders import build_sampler
from checkpoint import load_ema
from reports import grid
from sampling import SAMPLERS, draw_labels
from steps import SamplerStep
from store import BatchStore
from streams import EVAL_NOISE, generator
from score import Evaluator, default_feature, gather, load_images, save_images
from score.scorer import PUBLISHED_SAMPLES
from score.metrics import Moments, to_uint8
from tensorboardX import SummaryWriter

GRID_IMAGES = 256


def make_evaluator(config, device):
    """The scorer for this run's data; raises ScoreError for missing weights or statistics.
    It carries the short sha256 of its weights and statistics, for the protocol record."""
    scoring, dataset = config.eval, config.data
    feature = scoring.fid_feature or default_feature(dataset.dataset)
    evaluator = Evaluator(feature, scoring.statistics, device, scoring.inception_weights,
                          quantize=scoring.fid_quantize, dataset=dataset.dataset,
                          data_root=dataset.data_root, img_size=config.model.img_size,
                          metrics=scoring.metrics)
    evaluator.weights_sha256 = short_sha256(evaluator.weights_path)
    evaluator.statistics_sha256 = short_sha256(scoring.statistics) if scoring.statistics else None
    return evaluator


def short_sha256(path, length=12):
    digest = hashlib.sha256()
    with files.open_regular(path) as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def sample_labels(config, first, count):
    """The classes samples first..first + count - 1 of a class-conditional model ask for
    (`sampling.draw_labels`), None for an unconditional one."""
    classes = config.model.num_classes
    return draw_labels(first, count, classes, config.sampling.labels) if classes else None


@torch.no_grad()
def sample_batches(config, sampler, net, num_images, device, skip=(), desc="generating"):
    """(i, images in [0, 1]) for each batch i of this process's share of num_images samples,
    but those in skip; batch i's noise comes from its own generator, and a conditional
    model's classes from `sample_labels`. A batch that is not finite is refused here
    (reports.NonFiniteSamples), before it can be scored or saved."""
    shape, batch = config.model.image_shape, config.eval.eval_batch_size
    first_batch, last_batch = distributed.my_block(-(-num_images // batch))
    todo = [i for i in range(first_batch, last_batch) if i not in skip]
    for i in tqdm(todo, desc=desc, disable=not distributed.is_main(), dynamic_ncols=True, leave=False):
        size = min(batch, num_images - i * batch)
        noise = generator(device, config.run.seed, EVAL_NOISE, i)
        x_T = torch.randn((size, *shape), generator=noise, device=device)
        labels = sample_labels(config, i * batch, size)
        images = sampler(net, x_T, generator=noise, labels=None if labels is None else labels.to(device))
        reports.require_finite(images, f"sample batch {i}",
                               f"nothing was scored and batch {i} was not saved")
        yield i, (images + 1) / 2


def label_accuracy(config, evaluator, logits, labels):
    """{'label_accuracy': the share of samples the feature network classifies as the class they
    were drawn for} where its classes are the data's (the digits classifier on the digits);
    else {}."""
    if labels is None or evaluator.feature != "digits" or config.data.dataset != "digits":
        return {}
    return {"label_accuracy": (logits.argmax(1).cpu() == labels).double().mean().item()}


def report(logdir, scores, step, writer=None, protocol=None, tag=""):
    """Print the scores and their protocol, append both as a JSON line to <logdir>/eval.txt
    and log the scores to TensorBoard as tag + name (main process)."""
    if not distributed.is_main():
        return
    numbers = {name: value for name, value in scores.items() if name != "warning"}
    if "warning" in scores:
        print(f"warning: {scores['warning']}", file=sys.stderr)
    # KID is small on Inception features (1e-3 is a good model): shown with its exponent
    print(", ".join(f"{name} {value:.4g}" if name.startswith("KID") else f"{name} {value:.4f}"
                    for name, value in numbers.items()))
    if protocol:
        print(f"  {describe(protocol)}")
    path = os.path.join(logdir, logdir_files.EVAL_LOG)
    files.append_line(path, json.dumps({"step": step, "time": time.time(), **scores, **(protocol or {})}))
    print(f"  appended to {path}")
    if writer is not None:
        for name, value in numbers.items():
            writer.add_scalar(tag + name, value, step)


def protocol_record(config, sampler, evaluator, num_samples, step, ckpt_sha256, started, precision="fp32"):
    """How a score was measured, as eval.txt records it; precision: the network's arithmetic."""
    sampling = config.sampling
    record = {"num_samples": num_samples, "sampler": sampling.sampler, "steps": len(sampler.timesteps),
              "eta": sampling.eta, "skip_type": sampler.skip_type, "clip_denoised": sampling.clip_denoised,
              "beta_schedule": config.diffusion.beta_schedule,
              "ema": True, "checkpoint_step": step, "checkpoint_sha256": ckpt_sha256,
              "statistics": config.eval.statistics,
              "statistics_sha256": evaluator.statistics_sha256 if evaluator else None,
              "feature_network": evaluator.feature if evaluator else None,
              "feature_weights_sha256": evaluator.weights_sha256 if evaluator else None,
              "quantize": config.eval.fid_quantize, "seed": config.run.seed,
              "processes": distributed.world_size(), "network_precision": precision,  # "precision" is a metric
              "torch": torch.__version__, "wall_time_s": round(time.time() - started, 1)}
    record.update(sampler.step.record())  # the sampler's own fields: what ran (solver_order: the order reached)
    if sampler.skip_type == "karras":
        record.update(karras_rho=sampling.karras_rho, sigma_min=sampling.sigma_min or "chain's",
                      sigma_max=sampling.sigma_max or "chain's")
    if config.model.num_classes:
        record.update(num_classes=config.model.num_classes, guidance_scale=sampling.guidance_scale,
                      class_labels=list(sampling.labels) or "balanced")
    if evaluator:
        record.update(evaluator.record(num_samples))
    if evaluator and evaluator.feature == "inception" and num_samples < PUBLISHED_SAMPLES:
        record["comparable"] = f"no: fewer than {PUBLISHED_SAMPLES:,} samples, not comparable with published FIDs"
    return record


def karras_words(record):
    """The karras spacing's parameters in a record's line, if it is the spacing used."""
    if "karras_rho" not in record:
        return ""
    low, high = (record[name] for name in ("sigma_min", "sigma_max"))
    if low == high == "chain's":
        return f" (rho {record['karras_rho']}, the chain's sigmas)"
    return f" (rho {record['karras_rho']}, sigma {low} to {high})"


def describe(record):
    """One line of a protocol record."""
    statistics = (f"statistics {record['statistics']} ({record.get('statistics_sha256')})"
                  if record["statistics"] else "statistics of the training data computed here")
    if "images" in record:  # --eval_dir: images scored as they are, no model or sampler
        return (f"{record['num_samples']:,} images of {record['images']}; {record['feature_network']} "
                f"features, {statistics}, {'8-bit' if record['quantize'] else 'float'} images{metric_words(record)}")
    sampler_words = SAMPLERS.get(record["sampler"], SamplerStep).describe(record)
    text = (f"{record['num_samples']:,} samples of the EMA model at step {record['checkpoint_step']} "
            f"(ckpt {record['checkpoint_sha256']}); {record.get('beta_schedule', 'linear')} schedule, "
            f"{record['sampler']} sampler{sampler_words}, {record['steps']} steps, "
            f"eta {record['eta']}, {record['skip_type']} skips"
            f"{karras_words(record)}, "
            f"{'clipped' if record['clip_denoised'] else 'unclipped'} x0; "
            f"{record['feature_network']} features ({record['feature_weights_sha256']}), {statistics}, "
            f"{'8-bit' if record['quantize'] else 'float'} samples; seed {record['seed']}, "
            f"{record['processes']} process(es), torch {record['torch']}, {record['wall_time_s']} s"
            + (f", {record['network_precision']} network" if record.get("network_precision", "fp32") != "fp32" else ""))
    if "num_classes" in record:
        labels = record["class_labels"]
        text += (f"; {record['num_classes']} classes, guidance scale {record['guidance_scale']}, classes "
                 f"{labels if isinstance(labels, str) else ','.join(map(str, labels))}")
    return text + metric_words(record) + (f"; {record['comparable']}" if "comparable" in record else "")


def metric_words(record):
    """How the metrics beyond FID and IS were measured, in a record's line (nothing for FID
    and IS alone, the default)."""
    words = []
    if "pr_k" in record:
        words.append(f"precision/recall k {record['pr_k'][0]}, density/coverage k {record['pr_k'][1]}")
    if "kid_subsets" in record:
        words.append(f"KID over {record['kid_subsets'][0]} subsets of {record['kid_subsets'][1]}")
    if "reference_features" in record:
        seed = record["reference_features_seed"]
        words[-1] += (f", against {record['reference_features']:,} reference features"
                      + ("" if seed is None else f" (subset seed {seed})"))
    if "sfid" in record.get("metrics", ()):
        words.append("sFID on spatial features")
    return "".join(f"; {word}" for word in words)


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
            "quantize": config.eval.fid_quantize, "keep_samples": bool(config.actions.save_samples),
            **({"spatial": True} if evaluator and evaluator.spatial else {})}


def score_folder(config, evaluator):
    """--eval_dir: score a folder of images (or .npz) as they are."""
    scoring, folder = config.eval, config.actions.eval_dir
    everything = load_images(folder)
    first, last = distributed.my_block(len(everything))
    features = evaluator.features(everything[first:last], progress=distributed.is_main())
    report(config.run.logdir, evaluator.score(*map(gather, features)), step=None,
           protocol={"num_samples": len(everything), "images": folder, "feature_network": evaluator.feature,
                     "quantize": scoring.fid_quantize, "statistics": scoring.statistics,
                     **evaluator.record(len(everything))})


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
    if distributed.is_main() and not config.actions.train:  # a --train --eval command said it already
        print(speed.choice_words(fast, config.fast.precision, device_type))
    ema, step, ckpt_sha256 = load_ema(config, device)
    net = speed.wrap(speed.to_layout(ema, fast), fast)
    sampler = build_sampler(config.sampling, config.diffusion, config.model.num_classes)
    sampler = sampler.to(device)
    widths = feature_widths(evaluator, config.model, device) if evaluator is not None else None
    store = BatchStore(config.run.logdir, store_identity(config, ckpt_sha256, ema.layout, fast, evaluator),
                       lambda i: batch_layout(config, widths, i))
    num_batches = -(-config.eval.num_images // config.eval.eval_batch_size)
    mine = range(*distributed.my_block(num_batches))
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
        features, logits, spatial = stored_features(store, mine, evaluator, widths, device)
        scores = evaluator.score(features, logits, spatial)
        scores.update(label_accuracy(config, evaluator, logits, sample_labels(config, 0, config.eval.num_images)))
        writer = SummaryWriter(config.run.logdir) if distributed.is_main() else None
        report(config.run.logdir, scores, step, writer, protocol=protocol_record(
            config, sampler, evaluator, config.eval.num_images, step, ckpt_sha256, started, fast.precision),
            tag="eval/")
        if writer is not None:
            writer.close()
    distributed.barrier()
    if distributed.is_main():
        store.remove()


def stored_features(store, batches, evaluator, widths, device):
    """All ranks' features and logits, float64 on the device, from this rank's finished
    batches (none where there are more processes than batches), and the (mean, covariance) of
    their spatial features when sFID is scored: summed batch by batch (score.metrics.Moments),
    since 50,000 x 2,023 of them would not be small."""
    features, logits = [torch.empty(0, widths[0])], [torch.empty(0, widths[1])]
    moments = Moments(evaluator.reference_spatial[0].to(device)) if evaluator.spatial else None
    for i in batches:
        part = store.load(i)
        features.append(part["features"])
        logits.append(part["logits"])
        if moments is not None:
            moments.add(part["spatial"])
    features, logits = (gather(torch.cat(parts).double().to(device)) for parts in (features, logits))
    return features, logits, moments.all_reduce().statistics() if moments is not None else None


def saves_to_folder(path):
    """Whether --save_samples names a folder of PNGs (else an .npz file, or nothing)."""
    return bool(path) and not path.endswith(".npz")


def feature_widths(evaluator, model, device):
    """(D, K) or, with sFID, (D, K, S): how many features, logits and spatial features the
    feature network gives per image of a ModelConfig."""
    return tuple(part.shape[1] for part in evaluator.features(torch.zeros((1, *model.image_shape), device=device)))


def batch_layout(config, widths, i):
    """{name: (dtype, shape)} of what batch_record keeps of batch i; widths: feature_widths, or
    None when nothing is scored."""
    batch = config.eval.eval_batch_size
    size, image = min(batch, config.eval.num_images - i * batch), config.model.image_shape
    layout = {}
    if widths is not None:
        layout.update({name: (torch.float32, (size, width))
                       for name, width in zip(("features", "logits", "spatial"), widths)})
    if config.actions.save_samples and not saves_to_folder(config.actions.save_samples):
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
        record.update({name: part.float().cpu() for name, part in
                       zip(("features", "logits", "spatial"), evaluator.features(images))})
    samples = to_uint8(images).cpu()
    path = config.actions.save_samples
    if path and not saves_to_folder(path):
        record["samples"] = samples
    elif saves_to_folder(path):
        save_images(images.cpu(), path, start=i * batch)
    if i * batch < GRID_IMAGES:
        record["grid"] = samples[:GRID_IMAGES - i * batch]
    return record


def by_class(config, images):
    """The first samples of a conditional model's draw as (images, per row): one row per class
    of the cycle they were drawn in (`sampling.draw_labels`: sample j is of the cycle's class
    j % its length), as many of each as all rows can hold; (images, None) for an unconditional
    model, or too few samples for a row of each."""
    if not config.model.num_classes:
        return images, None
    cycle = len(config.sampling.labels) or config.model.num_classes
    per_row = len(images) // cycle
    if per_row == 0:
        return images, None
    rows = images[:cycle * per_row].unflatten(0, (per_row, cycle)).transpose(0, 1)
    return rows.flatten(0, 1), per_row


def write_samples(config, store, num_batches):
    """samples_ema.png from the first batches (a conditional model's: a row per class), and
    the .npz of --save_samples, with the classes asked for under 'labels'."""
    batch, model, path = config.eval.eval_batch_size, config.model, config.actions.save_samples
    first = torch.cat([store.load(i)["grid"] for i in range(min(num_batches, -(-GRID_IMAGES // batch)))])
    grid_path = os.path.join(config.run.logdir, logdir_files.SAMPLES_GRID)
    images, per_row = by_class(config, first.float() / 127.5 - 1)
    files.save_png(grid(images, per_row), grid_path)
    print(f"wrote {grid_path} (the first {len(images)} samples{', a row per class' if per_row else ''})")
    if path and not saves_to_folder(path):
        write_npz(path, (store.load(i)["samples"] for i in range(num_batches)),
                  (config.eval.num_images, model.img_size, model.img_size, model.img_channels),
                  sample_labels(config, 0, config.eval.num_images))
    if path:
        print(f"wrote {config.eval.num_images:,} samples to {path}")


def write_npz(path, batches, shape, labels=None):
    """One .npz with uint8 (N, H, W, C) under 'arr_0' (the layout save_images writes),
    streamed batch by batch so that it never holds all the samples, and int64 (N,) labels
    under 'labels' when given; written atomically."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}

    def write(file):
        with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_2_0(entry, header)
                for samples in batches:
                    entry.write(samples.permute(0, 2, 3, 1).contiguous().numpy().tobytes())
            if labels is not None:
                with archive.open("labels.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, labels.numpy().astype(np.int64), allow_pickle=False)

    files.write_atomically(path, write, int(np.prod(shape)))


def evaluate_during_training(config, evaluator, sampler, net, step, writer):
    """--eval_step: score --eval_num_images samples of the EMA model, batch by batch."""
    started = time.time()
    parts = [evaluator.features(images) for _, images in sample_batches(
        config, sampler, net, config.eval.eval_num_images, sampler.betas.device,
        desc=f"evaluating step {step}")]
    features, logits, *spatial = (gather(torch.cat(kind)) for kind in zip(*parts))
    scores = evaluator.score(features, logits, *spatial)
    scores.update(label_accuracy(config, evaluator, logits, sample_labels(config, 0, config.eval.eval_num_images)))
    report(config.run.logdir, scores, step, writer,
           protocol_record(config, sampler, evaluator, config.eval.eval_num_images, step, None, started,
                           getattr(net, "precision", "fp32")))
