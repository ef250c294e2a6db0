"""DDPM (Ho et al. 2020): train a diffusion model, sample from it, and score it (FID, IS).

    python main.py --flagfile ./config/digits.cfg --train --eval          # the demo: no download
    python main.py --flagfile ./config/cifar10_unet_example.cfg --train   # the paper's CIFAR10 run
    python main.py --flagfile ./ckpt/<run>/flagfile.txt --notrain --eval  # score a trained run

Any flag overrides the flagfile's; CUDA_VISIBLE_DEVICES=0,1 ... --nprocs=2 trains on two GPUs.
"""
import contextlib
import os
import sys
import textwrap
import typing

import signals

if __name__ == "__main__":  # Ctrl-C while the modules below load: one line, not a traceback
    signals.exit_at_once()

from absl import app, flags

import config
import datasets
import distributed
import files
import lock
import memory
from config import ConfigError
from errors import UserError

FLAGS = flags.FLAGS
LEGACY_TITLE = "Accepted for the earlier port's flagfiles"
# Where a machine keeps the data and how it loads it may differ between the nodes of a job;
# any other flag that differs would train apart, or deadlock in a collective, under one flagfile.
PER_NODE_FLAGS = ("data_root", "num_workers")


def define_flag(item, kind):
    """The absl flag of one configuration field, from its type, default, help and choices."""
    name, default, help_text = item.name, item.default, item.metadata["help"]
    if item.metadata["choices"]:
        flags.DEFINE_enum(name, default, list(item.metadata["choices"]), help_text)
    elif kind in (bool, typing.Optional[bool]):
        flags.DEFINE_bool(name, default, help_text)
    elif kind is int:
        flags.DEFINE_integer(name, default, help_text)
    elif kind is float:
        flags.DEFINE_float(name, default, help_text)
    elif name in config.MULTI_FLAGS:
        flags.DEFINE_multi_integer(name, list(default), help_text)
    elif kind == tuple[str, ...]:
        flags.DEFINE_list(name, list(default), help_text)
    else:
        flags.DEFINE_string(name, default, help_text)


for _section in config.SECTIONS.values():
    for _item in config.dataclasses.fields(_section):
        define_flag(_item, config.field_types(_section)[_item.name])
flags.DEFINE_bool("parallel", None, "accepted for the earlier port's flagfiles and ignored: "
                  "processes are set with --nprocs")
flags.DEFINE_bool("fid_use_torch", False, "accepted for the seed's flagfiles; the Frechet "
                  "distance is always the exact float64 one, on the evaluation device")
LEGACY_FLAGS = ("parallel", "fid_use_torch")


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
            segments += [command_line, read_flagfile_args(arg.partition("=")[2])]
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
            if name in config.MULTI_FLAGS and name in later:
                skip_value = "=" not in arg
                continue
            kept.append(arg)
    return [argv[0]] + kept


def read_flagfile_args(path):
    """A flagfile's arguments, as absl reads them; a file that is not UTF-8 text, or not a
    regular file (a FIFO would block absl's read, /dev/zero never end it), is one line."""
    if os.path.lexists(path):
        files.read_text(path)
    return FLAGS.read_flags_from_files([f"--flagfile={path}"], force_gnu=False)


def print_help():
    """--help: what the program does, its common commands, then the flags by section."""
    print(__doc__)
    groups = [(section.TITLE, [item.name for item in config.dataclasses.fields(section)])
              for section in config.SECTIONS.values()] + [(LEGACY_TITLE, list(LEGACY_FLAGS))]
    for title, names in groups:
        print(f"{title}:")
        for name in names:
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
        exit_at_start(str(error).replace('ERROR:: ', ''))
    except UserError as error:
        exit_at_start(str(error))


def exit_at_start(line):
    """Ends the command with its one error line, once the other processes of a torchrun job
    know (they would otherwise wait for this one until their start-up deadline)."""
    distributed.report_start_failure(line)
    sys.exit(f"error: {line}")


def configuration_from_flags():
    """The Config of the parsed flags, each section checked by its own code."""
    return config.Config.make(**{name: FLAGS[name].value for name in config.FIELD_SECTIONS})


def configuration(argv):
    """The Config of a command line (argv[0] is the program's name), as main.py would run it;
    the flags are left unparsed. For scripts and tests that start a run in their own process."""
    FLAGS.unparse_flags()
    try:
        parse_flags(argv)
        return configuration_from_flags()
    finally:
        FLAGS.unparse_flags()


def resolve_device(device):
    """--device as a device type: "cuda" or "cpu"."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    return device


def check_writable(folder):
    """--logdir can be written, checked without making it: a probe file in it, or in its nearest
    existing parent while it is still to be made (rank 0 makes it once every check passed)."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    try:
        probe = os.path.join(existing, f".write_test.{os.getpid()}")  # one per process: no race
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--logdir {folder} is not writable: {error.strerror}") from None


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
    path = os.path.join(run_config.run.logdir, "flagfile.txt")
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
    check_writable(logdir)
    ckpt_path = os.path.join(logdir, "ckpt.pt")
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
            evaluate.bits_per_dim(run_config, device_type)
        if actions.progressive_every > 0 or actions.interp_t:
            evaluate.look_inside(run_config, device_type)
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


class StartUpFiles:
    """What start-up made in the logdir (rank 0): its folders, when new, and flagfile.txt.
    take_back() removes them after a failed command unless something else came of it."""

    def __init__(self):
        self.logdir, self.folders, self.files = None, [], []

    def take_back(self):
        """Best effort: the command's own error is what it reports."""
        if self.logdir is None:
            return
        ours = {os.path.basename(path) for path in self.files} | {lock.NAME}
        with contextlib.suppress(OSError):
            if set(os.listdir(self.logdir)) - ours:
                return  # a checkpoint, TensorBoard's file, samples: kept, with the flagfile that explains them
            for path in self.files:
                os.remove(path)
            if self.folders:
                os.remove(os.path.join(self.logdir, lock.NAME))
                for folder in self.folders:  # the deepest first
                    os.rmdir(folder)


def prepare_logdir(run_config, made):
    """Rank 0, once its checks have passed: the logdir made if new and locked, stale temporary
    files removed, flagfile.txt written; `made` (StartUpFiles) notes what this made."""
    logdir, actions = run_config.run.logdir, run_config.actions
    missing, folder = [], os.path.abspath(logdir)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--logdir {logdir} is not writable: {error.strerror}") from None
    lock.hold(logdir)
    made.logdir, made.folders = logdir, missing
    if actions.train:
        # a killed save's ckpt.pt.tmp would keep a full disk full
        for name in files.remove_stale_temporaries(logdir):
            print(f"note: removed {name} in {logdir}, left by an interrupted write", file=sys.stderr)
    if actions.train and not actions.resume:
        # replaces a stale file (a run that died before its first checkpoint) in one rename
        path = os.path.join(logdir, "flagfile.txt")
        files.write_bytes(path, config.flagfile_text(run_config).encode())
        made.files.append(path)


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
        datasets.build_dataset(run_config.data.dataset, run_config.data.data_root, run_config.model.img_size,
                           train=True, channels=run_config.model.img_channels)
    if FLAGS["parallel"].present and first:
        print("note: --parallel / --noparallel of the earlier port is ignored; start processes "
              "with --nprocs", file=sys.stderr)
    if run_config.actions.train and not run_config.actions.resume:
        run_config = run_config.replace(layout=run_config.model.layout or "official")  # in flagfile.txt
    if first:
        prepare_logdir(run_config, made)
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
    made = StartUpFiles()
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
    app.run(main, flags_parser=parse_flags)
