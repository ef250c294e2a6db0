"""DDPM: train and evaluate from flagfiles.

    python main.py --flagfile ./config/cifar10_unet_example.cfg --train
    python main.py --flagfile ./ckpt/cifar10_unet_example/flagfile.txt --notrain --eval
    CUDA_VISIBLE_DEVICES=0,1,2,3 python main.py --flagfile ... --train --nprocs=4
    torchrun --nnodes=2 --nproc_per_node=8 ... main.py --flagfile ... --train

This file holds the flags, checks them before any expensive work, and dispatches.
"""
import os
import sys

from absl import app, flags

import checkpoint
import data
import distributed
import model
from diffusion import (LOSS_TYPES, MEAN_TYPES, SAMPLERS, SKIP_TYPES, VAR_TYPES,
                       GaussianDiffusionSampler, GaussianDiffusionTrainer)
from score import ScoreError

FLAGS = flags.FLAGS
# What to do
flags.DEFINE_bool("train", False, "train from scratch, or continue with --resume")
flags.DEFINE_bool("eval", False, "generate samples with the EMA model and score them (FID, IS)")
flags.DEFINE_bool("resume", False, "continue training from <logdir>/ckpt.pt")
# UNet
flags.DEFINE_integer("ch", 128, "base channel count of the UNet")
flags.DEFINE_multi_integer("ch_mult", [1, 2, 2, 2], "channel multiplier of each resolution level")
flags.DEFINE_multi_integer("attn", [1], "levels (indices into ch_mult) with self-attention")
flags.DEFINE_integer("num_res_blocks", 2, "ResBlocks per level")
flags.DEFINE_float("dropout", 0.1, "dropout inside the ResBlocks")
# Gaussian diffusion
flags.DEFINE_float("beta_1", 1e-4, "first beta of the linear schedule")
flags.DEFINE_float("beta_T", 0.02, "last beta of the linear schedule")
flags.DEFINE_integer("T", 1000, "number of diffusion steps")
flags.DEFINE_enum("mean_type", "epsilon", MEAN_TYPES, "what the network predicts")
flags.DEFINE_enum("var_type", "fixedlarge", VAR_TYPES, "reverse-process variance (learned: "
                  "the network also outputs the log-variance; needs --loss_type=kl)")
flags.DEFINE_enum("loss_type", "mse", LOSS_TYPES, "mse: Algorithm 1; kl: the variational bound term")
# Sampling (training-time grids, --eval, training-time FID)
flags.DEFINE_enum("sampler", "ddpm", SAMPLERS, "ddpm: ancestral (strided when --sample_steps < T); ddim")
flags.DEFINE_integer("sample_steps", 0, "sampler steps (0: all T)")
flags.DEFINE_float("eta", 0.0, "DDIM noise scale: 0 deterministic, 1 ancestral-like")
flags.DEFINE_enum("skip_type", "uniform", SKIP_TYPES, "which timesteps a strided sampler keeps")
flags.DEFINE_bool("clip_denoised", True, "clip x0_hat to [-1, 1] before forming the mean")
# Data
flags.DEFINE_enum("dataset", "cifar10", list(data.DATASETS), "training data")
flags.DEFINE_string("data_root", "./data", "where the dataset lives (a folder of images for 'folder')")
flags.DEFINE_integer("img_size", 32, "image height and width")
flags.DEFINE_integer("img_channels", 3, "image channels: 3 (RGB) or 1 (grayscale)")
flags.DEFINE_integer("num_workers", 4, "data-loading processes per training process")
# Training
flags.DEFINE_float("lr", 2e-4, "Adam learning rate")
flags.DEFINE_float("grad_clip", 1.0, "gradient-norm clipping threshold")
flags.DEFINE_integer("total_steps", 800000, "optimizer steps")
flags.DEFINE_integer("warmup", 5000, "linear learning-rate warmup steps")
flags.DEFINE_integer("batch_size", 128, "global batch size, over all processes and micro-batches")
flags.DEFINE_integer("accum_steps", 1, "micro-batches per optimizer step (gradient accumulation)")
flags.DEFINE_float("ema_decay", 0.9999, "decay of the exponential moving average of the weights")
flags.DEFINE_integer("seed", 0, "seed of every random stream (data order, noise, timesteps, x_T)")
# Devices
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "auto: CUDA when present, else CPU")
flags.DEFINE_integer("nprocs", 1, "processes started here, one GPU each (DistributedDataParallel)")
# Logging, sampling, checkpoints
flags.DEFINE_string("logdir", "./logs/DDPM_CIFAR10_EPS", "log directory")
flags.DEFINE_integer("log_step", 100, "steps between loss reports (tqdm, TensorBoard)")
flags.DEFINE_integer("sample_size", 64, "images in the training-time sample grid")
flags.DEFINE_integer("sample_step", 1000, "steps between sample grids (0: never)")
flags.DEFINE_integer("save_step", 5000, "steps between checkpoints (0: only the one always saved at the end)")
# Speed (unset: on for CUDA, off for the CPU, where fp32 eager is the reference path)
flags.DEFINE_enum("precision", None, ["fp32", "bf16"], "arithmetic of the network (bf16: autocast)")
flags.DEFINE_bool("compile", None, "torch.compile the network")
flags.DEFINE_bool("cuda_graphs", None, "with --compile on one GPU: replay steps as CUDA graphs")
flags.DEFINE_bool("channels_last", None, "NHWC memory layout for the convolutions")
flags.DEFINE_bool("fused_adam", None, "Adam's fused CUDA kernel")
flags.DEFINE_bool("data_on_device", None, "hold the whole dataset on the device (cifar10, digits)")
# Evaluation
flags.DEFINE_integer("eval_step", 0, "steps between evaluations during training (0: never)")
flags.DEFINE_integer("num_images", 50000, "samples generated by --eval")
flags.DEFINE_integer("eval_batch_size", 256, "samples generated at once per process")
flags.DEFINE_integer("eval_num_images", 5000, "samples scored by each evaluation during training")
flags.DEFINE_string("fid_cache", "./data/cifar-10-fid-cache/cifar10.train.npz",
                    "FID statistics of the data (make them with python -m score.fid_cache); "
                    "empty: digits statistics computed on the fly, or no FID for inception")
flags.DEFINE_enum("fid_feature", None, ["inception", "digits"],
                  "feature network; unset: the digits classifier for --dataset=digits, else inception")
flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth "
                    "(unset: $TORCH_HOME/hub/checkpoints/)")
flags.DEFINE_bool("fid_quantize", True, "round samples to 8 bits before scoring, as a saved PNG is")
flags.DEFINE_string("eval_dir", None, "with --eval: score this folder of images (or .npz) instead of sampling")
flags.DEFINE_string("save_samples", None, "with --eval: also write the samples to this folder (PNGs) or .npz")
# Looking inside (EMA model of <logdir>/ckpt.pt)
flags.DEFINE_bool("bpd", False, "the variational bound in bits/dim on --bpd_split; writes bpd.json, bpd.png")
flags.DEFINE_enum("bpd_split", "test", ["train", "test"], "dataset split for --bpd")
flags.DEFINE_integer("bpd_num_images", 0, "images for --bpd (0: the whole split)")
flags.DEFINE_integer("progressive_every", 0, "write x_t and x0_hat every N sampler steps for "
                     "--sample_size samples as PNG strips and a GIF under <logdir>/progressive (0: off)")
flags.DEFINE_list("interp_t", [], "interpolate at these timesteps: diffuse, mix, denoise; "
                  "writes <logdir>/interpolation/t<t>.png")
flags.DEFINE_list("interp_images", ["0", "1"], "the two images to interpolate: training-set "
                  "indices or image files")
flags.DEFINE_integer("interp_lambdas", 9, "mixing weights from 0 to 1 in the interpolation grid")
flags.DEFINE_bool("fid_use_torch", False, "accepted for the seed's flagfiles; the Frechet "
                  "distance is always the exact float64 one, on the evaluation device")


class ConfigError(ValueError):
    """A flag, file or path that cannot work; the message says what is expected."""


LIST_FLAGS = ("ch_mult", "attn")
EXPECTED_ERRORS = (ConfigError, data.DatasetError, checkpoint.CheckpointError, ScoreError)


def list_flags_from_last_source(argv):
    """absl appends every occurrence of a multi-valued flag, so `--flagfile f --ch_mult 1`
    would extend f's list instead of replacing it. Here the last source that names a list
    flag (a flagfile, or the command line after it) replaces what came before."""
    args = []
    for arg in argv[1:]:  # "--flagfile PATH" -> "--flagfile=PATH"
        if args and args[-1] in ("--flagfile", "-flagfile"):
            args[-1] = f"--flagfile={arg}"
        else:
            args.append(arg)
    segments, command_line = [], []
    for arg in args:
        if arg.startswith(("--flagfile=", "-flagfile=")):
            segments += [command_line, FLAGS.read_flags_from_files([arg], force_gnu=False)]
            command_line = []
        else:
            command_line.append(arg)
    segments.append(command_line)

    def names(segment):
        return {arg.lstrip("-").split("=")[0] for arg in segment if arg.startswith("-")}

    kept = []
    for index, segment in enumerate(segments):
        later = set().union(*map(names, segments[index + 1:]))
        skip_value = False
        for arg in segment:
            if skip_value:
                skip_value = False
                continue
            name = arg.lstrip("-").split("=")[0] if arg.startswith("-") else None
            if name in LIST_FLAGS and name in later:
                skip_value = "=" not in arg
                continue
            kept.append(arg)
    return [argv[0]] + kept


def parse_flags(argv):
    try:
        return FLAGS(list_flags_from_last_source(argv))
    except flags.Error as error:  # a missing flagfile, a bad enum value, a malformed number
        sys.exit(f"error: {str(error).replace('ERROR:: ', '')}")


def resolve_device():
    import torch
    if FLAGS.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if FLAGS.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    return FLAGS.device


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--logdir {folder} is not writable: {error.strerror}") from None


def validate(world_size, device):
    """Every check that needs no data and no model: one line per problem, before any work."""
    inspecting = FLAGS.bpd or FLAGS.progressive_every > 0 or FLAGS.interp_t
    if not (FLAGS.train or FLAGS.eval or inspecting):
        raise ConfigError("nothing to do: pass --train, --eval, --bpd, --progressive_every or --interp_t")
    try:  # the diffusion classes check their own arguments; no model is needed for that
        GaussianDiffusionTrainer(None, FLAGS.beta_1, FLAGS.beta_T, FLAGS.T, FLAGS.mean_type,
                                 FLAGS.loss_type, FLAGS.var_type)
        sampler = GaussianDiffusionSampler(
            None, FLAGS.beta_1, FLAGS.beta_T, FLAGS.T, FLAGS.img_size, FLAGS.mean_type, FLAGS.var_type,
            FLAGS.clip_denoised, FLAGS.sampler, FLAGS.sample_steps or None, FLAGS.eta, FLAGS.skip_type)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for t in FLAGS.interp_t:
        if not (t.isdigit() and int(t) < FLAGS.T):
            raise ConfigError(f"--interp_t {t} is not a timestep in 0..{FLAGS.T - 1}")
        if int(t) not in sampler.timesteps:
            steps = sampler.timesteps
            raise ConfigError(f"--interp_t {t} is not one of the sampler's {len(steps)} timesteps "
                              f"({', '.join(map(str, steps[:3]))}, ..., {steps[-1]}): pick one of those, or "
                              "--sample_steps 0 for all T")
    if len(FLAGS.interp_images) != 2:
        raise ConfigError(f"--interp_images takes two images, got {FLAGS.interp_images}")
    if FLAGS.img_channels not in (1, 3):
        raise ConfigError(f"--img_channels must be 1 or 3, got {FLAGS.img_channels}")
    try:
        model.check_architecture(FLAGS.ch, FLAGS.ch_mult, FLAGS.attn, FLAGS.img_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for name in ("T", "batch_size", "accum_steps", "nprocs", "total_steps", "num_images",
                 "eval_num_images", "eval_batch_size", "log_step"):
        if getattr(FLAGS, name) < 1:
            raise ConfigError(f"--{name} must be positive, got {getattr(FLAGS, name)}")
    for name in ("sample_step", "save_step", "eval_step"):
        if getattr(FLAGS, name) < 0:
            raise ConfigError(f"--{name} must be a number of steps >= 0 (0: off), got {getattr(FLAGS, name)}")
    if not 0 < FLAGS.beta_1 <= FLAGS.beta_T < 1:
        raise ConfigError(f"need 0 < --beta_1 <= --beta_T < 1, got {FLAGS.beta_1} and {FLAGS.beta_T}")
    per_step = world_size * FLAGS.accum_steps
    if FLAGS.batch_size % per_step:
        raise ConfigError(f"--batch_size {FLAGS.batch_size} is not divisible by processes x "
                          f"--accum_steps = {world_size} x {FLAGS.accum_steps} = {per_step}")
    if device == "cuda":
        import torch
        visible = torch.cuda.device_count()
        if FLAGS.nprocs > visible:
            raise ConfigError(f"--nprocs {FLAGS.nprocs} exceeds the {visible} visible GPU(s); "
                              "set CUDA_VISIBLE_DEVICES or lower --nprocs")
    check_writable(FLAGS.logdir)
    ckpt_path = os.path.join(FLAGS.logdir, "ckpt.pt")
    if FLAGS.train and not FLAGS.resume and os.path.exists(ckpt_path):
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose "
                          "another --logdir; nothing was overwritten")
    if FLAGS.resume and not os.path.exists(ckpt_path):
        raise ConfigError(f"--resume: there is no checkpoint {ckpt_path} to continue from")
    needs_model = (FLAGS.eval and not FLAGS.eval_dir) or inspecting
    if needs_model and not FLAGS.train and not os.path.exists(ckpt_path):
        raise ConfigError(f"there is no checkpoint {ckpt_path} to evaluate; train first or point "
                          "--logdir at a run")


def run(rank, world_size, device):
    """The work of one process: train, then evaluate, as the flags say."""
    import evaluate
    import train
    distributed.setup(rank, world_size, device)
    try:
        if FLAGS.train:
            train.train(FLAGS, device)
        if FLAGS.eval:
            evaluate.evaluate(FLAGS, device)
        if FLAGS.bpd:
            evaluate.bits_per_dim(FLAGS, device)
        if FLAGS.progressive_every > 0 or FLAGS.interp_t:
            evaluate.look_inside(FLAGS, device)
    finally:
        distributed.cleanup()


def spawned(rank, world_size, device, argv):
    # A spawned process starts with fresh flags. app.run defined --help and friends in the
    # parent, and saved flagfiles name them, so define them here too.
    app.define_help_flags()
    parse_flags(argv)
    try:
        run(rank, world_size, device)
    except EXPECTED_ERRORS as error:
        sys.exit(f"error: {error}")


def main(argv):
    try:
        device = resolve_device()
        launched = distributed.launched_by_torchrun()
        if launched and FLAGS.nprocs > 1:
            raise ConfigError("under torchrun, set processes with --nproc_per_node, not --nprocs")
        world_size = distributed.env_world_size() if launched else FLAGS.nprocs
        validate(world_size, device)
        if FLAGS.train:  # a missing dataset fails here, once, before any process starts
            data.build_dataset(FLAGS.dataset, FLAGS.data_root, FLAGS.img_size, train=True,
                               channels=FLAGS.img_channels)
    except EXPECTED_ERRORS as error:
        sys.exit(f"error: {error}")
    if FLAGS.train and not FLAGS.resume and distributed.env_rank() == 0:
        # replaces a stale file (a run that died before its first checkpoint) in one rename
        path = os.path.join(FLAGS.logdir, "flagfile.txt")
        with open(path + ".tmp", "w") as file:
            file.write(FLAGS.flags_into_string())
        os.replace(path + ".tmp", path)
    try:
        if launched or FLAGS.nprocs == 1:
            run(distributed.env_rank(), world_size, device)
        else:
            distributed.spawn(spawned, FLAGS.nprocs, device, sys.argv)
    except EXPECTED_ERRORS as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
