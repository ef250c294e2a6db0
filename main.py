"""DDPM (Ho et al. 2020): train a diffusion model, sample from it, and score it (FID, IS).

    python main.py --flagfile ./config/digits.cfg --train --eval          # the demo: no download
    python main.py --flagfile ./config/cifar10_unet_example.cfg --train   # the paper's CIFAR10 run
    python main.py --flagfile ./ckpt/<run>/flagfile.txt --notrain --eval  # score a trained run

Any flag overrides the flagfile's; CUDA_VISIBLE_DEVICES=0,1 ... --nprocs=2 trains on two GPUs.
"""
import os
import sys

import signals

if __name__ == "__main__":  # Ctrl-C while the modules below load: one line, not a traceback
    signals.exit_at_once()

from absl import app

import cli
import config
import datasets
import distributed
import files
import lock
import logdir_files
import memory
from cli import FLAGS, configuration_from_flags
from config import ConfigError
from errors import UserError

# Where a machine keeps the data and how it loads it may differ between the nodes of a job;
# any other flag that differs would train apart, or deadlock in a collective, under one flagfile.
PER_NODE_FLAGS = ("data_root", "num_workers")


def resolve_device(device):
    """--device as a device type: "cuda" or "cpu"."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    return device


def compare_with_saved_flags(run_config, path):
    """(fixed, changed): "--name saved -> now" for each saved field that differs from the
    run's flagfile.txt; fixed ones define the network and diffusion. Fields unset now, and
    fields the file predates left at their default, are not differences."""
    saved = {name: ",".join(values) for name, values in config.parse_flags_text(files.read_text(path)).items()}
    now = {name: ",".join(values) for name, values in
           config.parse_flags_text(config.flagfile_text(run_config)).items()}
    defaults = config.Config.make().values()
    fixed, changed = [], []
    for name, value in run_config.values().items():
        if name in config.ACTIONS or value is None or (name not in saved and value == defaults[name]):
            continue
        before = saved.get(name, "(not in the file)")
        if before != now.get(name, ""):
            (fixed if name in config.FIXED_ON_RESUME else changed).append(
                f"--{name} {before} -> {now.get(name, '')}")
    return fixed, changed


def check_resume_flags(run_config):
    """--resume: refuse a change of the network or diffusion, and list the other changes."""
    path = logdir_files.flagfile_path(run_config.run.logdir)
    if not os.path.exists(path):  # the earlier port's runs have none
        return
    fixed, changed = compare_with_saved_flags(run_config, path)
    if fixed:
        raise ConfigError(f"--resume: {'; '.join(fixed)}: these flags differ from {path} and define "
                          "the network or the diffusion, which a run cannot change; resume with "
                          f"--flagfile {path}, or train in a new --logdir")
    if changed and distributed.env_rank() == 0:
        print(f"note: --resume with flags that differ from {path}; they take effect: "
              f"{'; '.join(changed)}", file=sys.stderr)


def validate(run_config, world_size, device_type):
    """Every check that needs the machine or the logdir, but no data and no model: one line
    per problem, before any work (the configuration checked its own values when made)."""
    actions, training, logdir = run_config.actions, run_config.training, run_config.run.logdir
    if not (actions.train or actions.eval or actions.inspecting):
        raise ConfigError("nothing to do: pass --train, --eval, --bpd, --progressive_every or --interp_t")
    per_step = world_size * training.accum_steps
    if training.batch_size % per_step:
        raise ConfigError(f"--batch_size {training.batch_size} is not divisible by processes x "
                          f"--accum_steps = {world_size} x {training.accum_steps} = {per_step}")
    if device_type == "cuda":
        import torch
        visible = torch.cuda.device_count()
        if run_config.run.nprocs > visible:
            raise ConfigError(f"--nprocs {run_config.run.nprocs} exceeds the {visible} visible GPU(s); "
                              "set CUDA_VISIBLE_DEVICES or lower --nprocs")
    logdir_files.check_writable(logdir)
    ckpt_path = logdir_files.ckpt_path(logdir)
    if actions.train and not actions.resume and os.path.exists(ckpt_path):
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose "
                          "another --logdir; nothing was overwritten")
    if actions.resume and not os.path.exists(ckpt_path):
        raise ConfigError(f"--resume: there is no checkpoint {ckpt_path} to continue from")
    if actions.resume:
        check_resume_flags(run_config)
    needs_model = (actions.eval and not actions.eval_dir) or actions.inspecting
    if needs_model and not actions.train and not os.path.exists(ckpt_path):
        raise ConfigError(f"there is no checkpoint {ckpt_path} to evaluate; train first or point "
                          "--logdir at a run")
    if actions.eval and actions.save_samples:
        check_samples_path(actions.save_samples)
    memory.check(run_config, world_size, device_type)


def check_samples_path(path):
    """--save_samples names an .npz file or a folder of PNGs; what is there already must be
    that, or the samples would be drawn and then have nowhere to go."""
    if path.endswith(".npz") and os.path.isdir(path):
        raise ConfigError(f"--save_samples {path} is a folder: a name ending in .npz is the file to write")
    if not path.endswith(".npz") and os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"--save_samples {path} exists and is not a folder: name a folder for PNGs, "
                          "or a file ending in .npz")


def run(rank, world_size, run_config, device_type):
    """The work of one process: train, then evaluate, as the configuration says.

    A stop signal during training ends the command once the checkpoint is saved (the loop
    says so); anywhere else it ends it at once (signals.Stopped). Nothing runs after it, and
    the exit status is 128 + the signal's number.
    """
    import evaluate
    import inspection
    import train
    signals.stop_at_once()
    distributed.setup(rank, world_size, device_type)
    actions = run_config.actions
    try:
        if actions.train:
            stopped_by = train.train(run_config, device_type)
            if stopped_by:
                sys.exit(128 + stopped_by)
        if actions.eval:
            evaluate.evaluate(run_config, device_type)
        if actions.bpd:
            inspection.bits_per_dim(run_config, device_type)
        if actions.progressive_every > 0 or actions.interp_t:
            inspection.look_inside(run_config, device_type)
    except RuntimeError as error:  # a dead peer: one line instead of the backend's traceback
        lost = distributed.peer_lost(error)
        if lost is None:
            raise
        raise lost from None
    finally:
        distributed.cleanup()


def spawned(rank, world_size, run_config, device_type):
    """One of the --nprocs processes: the parent's configuration, no flags to parse."""
    try:
        run(rank, world_size, run_config, device_type)
    except UserError as error:
        sys.exit(f"error: {error}")
    except signals.Stopped as stopped:
        signals.exit_stopped(stopped.args[0], say=rank == 0)


def start(launched, made, job=None):
    """Every check before any work, on every process: the configuration (under torchrun, the
    same as rank 0's: job, a distributed.JobStart), the machine, the logdir, the data; nothing
    is written before they pass. Then rank 0 prepares the logdir.
    Returns (run_config, device_type, world_size)."""
    run_config = configuration_from_flags()
    if job is not None:
        job.agree({name: value for name, value in run_config.values().items() if name not in PER_NODE_FLAGS})
    device_type = resolve_device(run_config.run.device)
    if launched and run_config.run.nprocs > 1:
        raise ConfigError("under torchrun, set processes with --nproc_per_node, not --nprocs")
    world_size = distributed.env_world_size() if launched else run_config.run.nprocs
    validate(run_config, world_size, device_type)
    first, logdir = distributed.env_rank() == 0, run_config.run.logdir
    if first and os.path.isdir(logdir):  # one command per logdir: a busy one is said before the data is read
        lock.hold(logdir)
    if run_config.actions.train:  # a missing dataset fails here, once, before any process starts
        datasets.configured(run_config.data, run_config.model)
    if FLAGS["parallel"].present and first:
        print("note: --parallel / --noparallel of the earlier port is ignored; start processes "
              "with --nprocs", file=sys.stderr)
    if run_config.actions.train and not run_config.actions.resume:
        run_config = run_config.replace(layout=run_config.model.layout or "official")  # in flagfile.txt
    if first:
        actions = run_config.actions
        logdir_files.prepare(logdir, actions.train, actions.resume, config.flagfile_text(run_config), made)
    return run_config, device_type, world_size


def start_failure_line(error):
    """What a process of a torchrun job tells the others when its start-up fails."""
    if isinstance(error, signals.Stopped):
        return f"stopped by {signals.name(error.args[0])}"
    if isinstance(error, UserError):
        return str(error)
    return f"{type(error).__name__}: {error}".splitlines()[0]  # a bug: its traceback is in its own log


def main(argv):
    """Start-up on every process (under torchrun, agreed by all: one that fails ends the
    others), then the work. A command that fails, or is stopped, before anything came of it
    takes back what its start-up made."""
    signals.stop_at_once()
    launched = distributed.launched_by_torchrun()
    if launched:  # a worker whose torchrun agent died (its node is lost) must not go on alone
        distributed.die_with_parent(os.getppid())
    made = logdir_files.StartUpFiles()
    try:
        try:
            with distributed.starting_together(start_failure_line) as job:
                run_config, device_type, world_size = start(launched, made, job)
            if launched or run_config.run.nprocs == 1:
                run(distributed.env_rank(), world_size, run_config, device_type)
            else:
                distributed.spawn(spawned, run_config.run.nprocs, run_config, device_type)
        except BaseException:
            made.take_back()
            raise
    except UserError as error:
        sys.exit(f"error: {error}")
    except signals.Stopped as stopped:  # one line per machine: a terminal's Ctrl-C reaches all its processes
        signals.exit_stopped(stopped.args[0], say=os.environ.get("LOCAL_RANK", "0") == "0")


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, __doc__))
