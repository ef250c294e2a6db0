"""DDPM (Ho et al. 2020): train a diffusion model, sample from it, and score it (FID, IS).

    python main.py --flagfile ./config/digits.cfg --train --eval          # the demo: no download
    python main.py --flagfile ./config/cifar10_unet_example.cfg --train   # the paper's CIFAR10 run
    python main.py --flagfile ./ckpt/<run>/flagfile.txt --notrain --eval  # score a trained run

Any flag overrides the flagfile's; CUDA_VISIBLE_DEVICES=0,1 ... --nprocs=2 trains on two GPUs.
"""
import math
import os
import signal
import sys
import textwrap

from absl import app, flags

import checkpoint
import data
import distributed
import files
import model
import train
from diffusion import (LOSS_TYPES, MEAN_TYPES, SAMPLERS, SKIP_TYPES, VAR_TYPES,
                       GaussianDiffusionSampler, GaussianDiffusionTrainer)
from score import ScoreError

FLAGS = flags.FLAGS
SECTIONS = []  # (title, index in definition order of the section's first flag)


def section(title):
    """Starts a group of flags for --help: those defined after this call, up to the next."""
    SECTIONS.append((title, len(list(FLAGS))))


section("What to do")
flags.DEFINE_bool("train", False, "train from scratch, or continue with --resume")
flags.DEFINE_bool("eval", False, "generate samples with the EMA model and score them (FID, IS)")
flags.DEFINE_bool("resume", False, "continue training from <logdir>/ckpt.pt")
section("UNet")
flags.DEFINE_integer("ch", 128, "base channel count of the UNet")
flags.DEFINE_multi_integer("ch_mult", [1, 2, 2, 2], "channel multiplier of each resolution level")
flags.DEFINE_multi_integer("attn", [1], "levels (indices into ch_mult) with self-attention")
flags.DEFINE_integer("num_res_blocks", 2, "ResBlocks per level")
flags.DEFINE_float("dropout", 0.1, "dropout inside the ResBlocks")
flags.DEFINE_enum("layout", None, list(model.LAYOUTS), "official: the network of the official "
                  "TF code; seed: the earlier PyTorch port's (its checkpoints). Unset: official for "
                  "new runs, the checkpoint's record when loading")
section("Gaussian diffusion")
flags.DEFINE_float("beta_1", 1e-4, "first beta of the linear schedule")
flags.DEFINE_float("beta_T", 0.02, "last beta of the linear schedule")
flags.DEFINE_integer("T", 1000, "number of diffusion steps")
flags.DEFINE_enum("mean_type", "epsilon", MEAN_TYPES, "what the network predicts")
flags.DEFINE_enum("var_type", "fixedlarge", VAR_TYPES, "reverse-process variance (learned: "
                  "the network also outputs the log-variance; needs --loss_type=kl)")
flags.DEFINE_enum("loss_type", "mse", LOSS_TYPES, "mse: Algorithm 1; kl: the variational bound term")
section("Sampling (training-time grids, --eval, training-time FID)")
flags.DEFINE_enum("sampler", "ddpm", SAMPLERS, "ddpm: ancestral (strided when --sample_steps < T); ddim")
flags.DEFINE_integer("sample_steps", 0, "sampler steps (0: all T)")
flags.DEFINE_float("eta", 0.0, "DDIM noise scale: 0 deterministic, 1 ancestral-like")
flags.DEFINE_enum("skip_type", "uniform", SKIP_TYPES, "which timesteps a strided sampler keeps")
flags.DEFINE_bool("clip_denoised", True, "clip x0_hat to [-1, 1] before forming the mean")
section("Data")
flags.DEFINE_enum("dataset", "cifar10", list(data.DATASETS), "training data")
flags.DEFINE_string("data_root", "./data", "where the dataset lives (a folder of images for 'folder')")
flags.DEFINE_integer("img_size", 32, "image height and width")
flags.DEFINE_integer("img_channels", 3, "image channels: 3 (RGB) or 1 (grayscale)")
flags.DEFINE_integer("num_workers", 4, "data-loading processes per training process")
section("Training")
flags.DEFINE_float("lr", 2e-4, "Adam learning rate")
flags.DEFINE_float("grad_clip", 1.0, "gradient-norm clipping threshold")
flags.DEFINE_integer("total_steps", 800000, "optimizer steps")
flags.DEFINE_integer("warmup", 5000, "linear learning-rate warmup steps")
flags.DEFINE_integer("batch_size", 128, "global batch size, over all processes and micro-batches")
flags.DEFINE_integer("accum_steps", 1, "micro-batches per optimizer step (gradient accumulation)")
flags.DEFINE_float("ema_decay", 0.9999, "decay of the exponential moving average of the weights")
flags.DEFINE_integer("max_bad_steps", 0, "steps whose loss is NaN or inf that are skipped (their "
                     "update not applied) before training stops with an error")
flags.DEFINE_integer("seed", 0, "seed of every random stream (data order, noise, timesteps, x_T)")
section("Devices and processes")
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "auto: CUDA when present, else CPU")
flags.DEFINE_integer("nprocs", 1, "processes started here, one GPU each (DistributedDataParallel)")
section("Logging, sample grids, checkpoints")
flags.DEFINE_string("logdir", "./logs/DDPM_CIFAR10_EPS", "log directory")
flags.DEFINE_integer("log_step", 100, "steps between loss reports (tqdm, TensorBoard)")
flags.DEFINE_integer("sample_size", 64, "images in the training-time sample grid")
flags.DEFINE_integer("sample_step", 1000, "steps between sample grids (0: never)")
flags.DEFINE_integer("save_step", 5000, "steps between checkpoints (0: only the one always saved at the end)")
section("The fast GPU path (unset: on for CUDA; off on the CPU, where fp32 eager is the reference)")
flags.DEFINE_enum("precision", None, ["fp32", "bf16"], "arithmetic of the network (bf16: autocast)")
flags.DEFINE_bool("compile", None, "torch.compile the network")
flags.DEFINE_bool("cuda_graphs", None, "with --compile on one GPU: replay steps as CUDA graphs")
flags.DEFINE_bool("channels_last", None, "NHWC memory layout for the convolutions")
flags.DEFINE_bool("fused_adam", None, "Adam's fused CUDA kernel")
flags.DEFINE_bool("data_on_device", None, "hold the whole dataset on the device as uint8 (unset: "
                  "cifar10 and digits on CUDA; folders, celebahq and lsun only when set: decoded "
                  "once at each start, and they must fit in half the free device memory)")
section("Evaluation")
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
flags.DEFINE_bool("score", True, "with --eval: score the samples (--noscore: only draw them, for "
                  "--save_samples; no Inception weights or statistics needed)")
section("Looking inside (the EMA model of <logdir>/ckpt.pt)")
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
section("Accepted for the earlier port's flagfiles")
flags.DEFINE_bool("parallel", None, "accepted for the earlier port's flagfiles and ignored: "
                  "processes are set with --nprocs")
flags.DEFINE_bool("fid_use_torch", False, "accepted for the seed's flagfiles; the Frechet "
                  "distance is always the exact float64 one, on the evaluation device")


class ConfigError(ValueError):
    """A flag, file or path that cannot work; the message says what is expected."""


LIST_FLAGS = ("ch_mult", "attn")
EXPECTED_ERRORS = (ConfigError, data.DatasetError, checkpoint.CheckpointError, ScoreError,
                   files.WriteError, train.NonFiniteLoss, distributed.PeerLost)
# Flags that define the network and the diffusion process: a resumed run cannot change them.
FIXED_ON_RESUME = ("ch", "ch_mult", "attn", "num_res_blocks", "dropout", "img_size", "img_channels",
                   "T", "beta_1", "beta_T", "mean_type", "var_type", "loss_type")


class Stopped(BaseException):
    """SIGINT/SIGTERM outside the training loop (which checkpoints first, then returns).
    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""


def stop_now(signum, frame):
    raise Stopped(signum)


def exit_stopped(signum):
    """Ends the command as a stop signal asks: exit status 128 + its number, as a shell
    reports a process killed by it, so schedulers and scripts see the stop."""
    if distributed.env_rank() == 0:
        print(f"error: stopped by {signal.Signals(signum).name} before the command finished",
              file=sys.stderr)
    sys.exit(128 + signum)


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


def print_help():
    """--help: what the program does, its common commands, then this file's flags by section."""
    print(__doc__)
    names = list(FLAGS)
    mine = {flag.name for flag in FLAGS.get_flags_for_module(sys.modules[__name__])}
    bounds = [start for _, start in SECTIONS] + [len(names)]
    for (title, _), start, end in zip(SECTIONS, bounds, bounds[1:]):
        print(f"{title}:")
        for name in (n for n in names[start:end] if n in mine):
            flag = FLAGS[name]
            default = "" if flag.default is None else f" (default: {flag.default_as_str.strip(chr(39))})"
            print(textwrap.fill(f"--{name}: {' '.join(flag.help.split())}{default}", width=100,
                                initial_indent="  ", subsequent_indent="      "))
        print()
    print("--helpfull lists absl's own flags too.")


def parse_flags(argv):
    if any(arg in ("-h", "-help", "--help", "-helpshort", "--helpshort", "-?") for arg in argv[1:]):
        print_help()
        sys.exit(0)
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


def check_ranges():
    """Every number flag within the range where it means something; NaN never is."""
    checks = [
        (FLAGS.T >= 1, f"--T must be at least 1 diffusion step, got {FLAGS.T}"),
        (FLAGS.ch >= 1 and FLAGS.ch % model.GROUPS == 0,
         f"--ch must be a positive multiple of {model.GROUPS} (the GroupNorm groups), got {FLAGS.ch}"),
        (min(FLAGS.ch_mult, default=1) >= 1, f"--ch_mult must be >= 1 at every level, got {FLAGS.ch_mult}"),
        (FLAGS.num_res_blocks >= 1, f"--num_res_blocks must be at least 1, got {FLAGS.num_res_blocks}"),
        (FLAGS.img_size >= 1, f"--img_size must be at least 1, got {FLAGS.img_size}"),  # then its
        # divisibility by 2^(levels - 1): model.check_architecture
        (0 <= FLAGS.dropout < 1, f"--dropout must be in [0, 1), got {FLAGS.dropout}"),
        (0 <= FLAGS.ema_decay <= 1, f"--ema_decay must be in [0, 1], got {FLAGS.ema_decay}"),
        (FLAGS.grad_clip > 0, f"--grad_clip must be > 0 (the largest gradient norm), got {FLAGS.grad_clip}"),
        (0 < FLAGS.lr < math.inf, f"--lr must be a finite number > 0, got {FLAGS.lr}"),
        (FLAGS.warmup >= 0, f"--warmup must be a number of steps >= 0, got {FLAGS.warmup}"),
        (FLAGS.max_bad_steps >= 0, f"--max_bad_steps must be >= 0, got {FLAGS.max_bad_steps}"),
        (FLAGS.seed >= 0, f"--seed must be >= 0, got {FLAGS.seed}"),
        (FLAGS.num_workers >= 0, f"--num_workers must be >= 0, got {FLAGS.num_workers}"),
        (0 <= FLAGS.eta < math.inf, f"--eta must be a finite number >= 0, got {FLAGS.eta}"),
        (FLAGS.sample_size >= 1 or not (FLAGS.train or FLAGS.progressive_every > 0),
         f"--sample_size must be at least 1 (the images of a sample grid), got {FLAGS.sample_size}"),
        (FLAGS.bpd_num_images >= 0, f"--bpd_num_images must be >= 0 (0: the whole split), got "
                                    f"{FLAGS.bpd_num_images}"),
        (FLAGS.progressive_every >= 0, f"--progressive_every must be >= 0 (0: off), got "
                                       f"{FLAGS.progressive_every}"),
        (FLAGS.interp_lambdas >= 2 or not FLAGS.interp_t,
         f"--interp_lambdas must be at least 2 (the two ends), got {FLAGS.interp_lambdas}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def flag_values(text):
    """{name: value} of flagfile lines; a list flag's values joined with commas."""
    return {name: ",".join(values) for name, values in checkpoint.parse_flags_text(text, FLAGS).items()}


def compare_with_saved_flags(path):
    """(fixed, changed): "--name saved -> now" for each flag of main.py that differs from
    the run's flagfile.txt; fixed ones define the network and diffusion. Flags unset now, and
    flags the file predates left at their default, are not differences."""
    with open(path) as file:
        saved = flag_values(file.read())
    now = flag_values(FLAGS.flags_into_string())
    fixed, changed = [], []
    for flag in FLAGS.get_flags_for_module(FLAGS.find_module_defining_flag("train")):
        name = flag.name
        if name in ("train", "eval", "resume") or name not in now:
            continue
        if name not in saved and flag.value == flag.default:
            continue
        before = saved.get(name, "(not in the file)")
        if before != now[name]:
            (fixed if name in FIXED_ON_RESUME else changed).append(f"--{name} {before} -> {now[name]}")
    return fixed, changed


def check_resume_flags():
    """--resume: refuse a change of the network or diffusion, and list the other changes."""
    path = os.path.join(FLAGS.logdir, "flagfile.txt")
    if not os.path.exists(path):  # the earlier port's runs have none
        return
    fixed, changed = compare_with_saved_flags(path)
    if fixed:
        raise ConfigError(f"--resume: {'; '.join(fixed)}: these flags differ from {path} and define "
                          "the network or the diffusion, which a run cannot change; resume with "
                          f"--flagfile {path}, or train in a new --logdir")
    if changed and distributed.env_rank() == 0:
        print(f"note: --resume with flags that differ from {path}; they take effect: "
              f"{'; '.join(changed)}", file=sys.stderr)


# What to do now, not what the run is: left out of flagfile.txt, so that --flagfile
# <logdir>/flagfile.txt brings back the configuration and does only what the command says.
ACTIONS = ("train", "eval", "resume", "score", "eval_dir", "save_samples", "bpd", "progressive_every",
           "interp_t", "parallel")


def run_configuration():
    """The text of <logdir>/flagfile.txt: every flag of this file that has a value, but the
    actions; absl's own flags left out too."""
    own = FLAGS.get_flags_for_module(sys.modules[__name__])
    return "".join(flag.serialize() + "\n" for flag in own
                   if flag.name not in ACTIONS and flag.value is not None)


def validate(world_size, device):
    """Every check that needs no data and no model: one line per problem, before any work."""
    inspecting = FLAGS.bpd or FLAGS.progressive_every > 0 or FLAGS.interp_t
    if not (FLAGS.train or FLAGS.eval or inspecting):
        raise ConfigError("nothing to do: pass --train, --eval, --bpd, --progressive_every or --interp_t")
    check_ranges()
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
    if FLAGS.resume:
        check_resume_flags()
    if FLAGS.eval and not FLAGS.score and (FLAGS.eval_dir or not FLAGS.save_samples):
        raise ConfigError("--noscore only draws samples to save them: pass --save_samples DIR|FILE.npz "
                          "(and no --eval_dir, which is scored)")
    needs_model = (FLAGS.eval and not FLAGS.eval_dir) or inspecting
    if needs_model and not FLAGS.train and not os.path.exists(ckpt_path):
        raise ConfigError(f"there is no checkpoint {ckpt_path} to evaluate; train first or point "
                          "--logdir at a run")


def run(rank, world_size, device):
    """The work of one process: train, then evaluate, as the flags say.

    A stop signal during training ends the command once the checkpoint is saved (the loop
    says so); anywhere else it ends it at once (Stopped). Nothing runs after it, and the exit
    status is 128 + the signal's number.
    """
    import evaluate
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_now)
    distributed.setup(rank, world_size, device)
    try:
        if FLAGS.train:
            stopped_by = train.train(FLAGS, device)
            if stopped_by:
                sys.exit(128 + stopped_by)
        if FLAGS.eval:
            evaluate.evaluate(FLAGS, device)
        if FLAGS.bpd:
            evaluate.bits_per_dim(FLAGS, device)
        if FLAGS.progressive_every > 0 or FLAGS.interp_t:
            evaluate.look_inside(FLAGS, device)
    except RuntimeError as error:  # a dead peer: one line instead of the backend's traceback
        lost = distributed.peer_lost(error)
        if lost is None:
            raise
        raise lost from None
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
    except Stopped as stopped:
        exit_stopped(stopped.args[0])


def main(argv):
    try:
        device = resolve_device()
        launched = distributed.launched_by_torchrun()
        if launched:  # a worker whose torchrun agent died (its node is lost) must not go on alone
            distributed.die_with_parent(os.getppid())
        if launched and FLAGS.nprocs > 1:
            raise ConfigError("under torchrun, set processes with --nproc_per_node, not --nprocs")
        world_size = distributed.env_world_size() if launched else FLAGS.nprocs
        validate(world_size, device)
        if FLAGS.train:  # a missing dataset fails here, once, before any process starts
            data.build_dataset(FLAGS.dataset, FLAGS.data_root, FLAGS.img_size, train=True,
                               channels=FLAGS.img_channels)
    except EXPECTED_ERRORS as error:
        sys.exit(f"error: {error}")
    if FLAGS["parallel"].present and distributed.env_rank() == 0:
        print("note: --parallel / --noparallel of the earlier port is ignored; start processes "
              "with --nprocs", file=sys.stderr)
    if FLAGS.train and not FLAGS.resume:
        FLAGS.layout = FLAGS.layout or "official"  # recorded in flagfile.txt
    try:
        if FLAGS.train and distributed.env_rank() == 0:
            # a killed save's ckpt.pt.tmp would keep a full disk full
            for name in files.remove_stale_temporaries(FLAGS.logdir):
                print(f"note: removed {name} in {FLAGS.logdir}, left by an interrupted write",
                      file=sys.stderr)
        if FLAGS.train and not FLAGS.resume and distributed.env_rank() == 0:
            # replaces a stale file (a run that died before its first checkpoint) in one rename
            files.write_bytes(os.path.join(FLAGS.logdir, "flagfile.txt"), run_configuration().encode())
        if launched or FLAGS.nprocs == 1:
            run(distributed.env_rank(), world_size, device)
        else:
            distributed.spawn(spawned, FLAGS.nprocs, device, sys.argv)
    except EXPECTED_ERRORS as error:
        sys.exit(f"error: {error}")
    except Stopped as stopped:
        exit_stopped(stopped.args[0])


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
