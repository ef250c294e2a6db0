"""The official DDPM models in, this project's models out, through the diffusers format.

    python convert.py google/ddpm-cifar10-32 --logdir ckpt/ddpm-cifar10-32   # from the hub
    python convert.py ./ddpm-cifar10-32 --logdir ckpt/ddpm-cifar10-32        # a local folder
    python main.py --flagfile ckpt/ddpm-cifar10-32/flagfile.txt --notrain --eval
    python convert.py --to diffusers --logdir ckpt/cifar10 ./cifar10-diffusers  # export

Import reads a diffusers UNet2DModel folder (config.json and diffusion_pytorch_model
.safetensors or .bin), or a pipeline folder holding unet/ and scheduler/, without diffusers
installed; a hub name needs huggingface_hub and a connection. It writes <logdir>/ckpt.pt (the
weights as both the EMA and the raw network, layout "official") and <logdir>/flagfile.txt.
Only the official model's family converts: DownBlock2D / AttnDownBlock2D and their up blocks,
one attention head, GroupNorm(32, eps 1e-6), the official positional embedding and TF-"SAME"
downsampling; anything else is refused, naming the field. A class-conditional model converts
too: num_class_embeds K (a table of label embeddings added to the time embedding; a null
class_embed_type) is --num_classes K - 1, its last label read as the no-label entry of
classifier-free guidance, as export writes it; the dataset must have K - 1 classes (a folder
of class subfolders, any number).

The files handed in are untrusted. Before anything is allocated or written, every field of the
configs that is used is checked: its type here, its range by the configuration classes that
check main.py's flags (the error names the diffusers field). Then the weights' names and shapes
must be exactly those of the network the configs describe, built on the meta device (shapes,
no memory), so that a small config asking for gigabytes gets one line. A --logdir that holds a
run's flagfile.txt or ckpt.pt is refused unless --force.

Export writes a DDPMPipeline folder (model_index.json, unet/, scheduler/) of a model trained
here in the official layout, into a new or empty folder; one of --num_classes N has
num_class_embeds N + 1, its unet called as unet(x, t, class_labels=y), y = N for no label
(DDPMPipeline's own sampling loop passes no labels).

Both write into a temporary folder beside the target, <target>.<pid>.tmp: export renames it to
the target; import, holding the logdir's lock (lock.py), moves its two files into the logdir
together, with the stop signals held back. An error, a full disk or a stop signal (exit status
128 + the signal) leaves the target as it was and removes the folders the command made.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys

import signals

if __name__ == "__main__":  # Ctrl-C while the modules below load: one line, not a traceback
    signals.exit_at_once()

import torch

import checkpoint
import files
import lock
import logdir_files
import model
from builders import build_model
from config import Config, ConfigError, flagfile_text
from diffusers_format import (
    ConversionError, EMBEDDING_TABLE, LEGACY_ATTENTION_NAMES, OFFICIAL_SETTINGS, PREDICTIONS,
    SCHEDULER_FLAGS, SCHEDULES, TENSORS_PER_RESBLOCK, UNET_FLAGS, architecture_from_config,
    diffusion_flags, is_attention_projection, is_name, shown, tensor_names)
from errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
# The configuration each official model was trained with (Ho et al. 2020, Appendix B).
DATASET_CONFIGS = {"cifar10": "cifar10_unet_example.cfg", "lsun_church": "lsun_church.cfg",
                   "lsun_bedroom": "lsun_bedroom.cfg", "lsun_cat": "lsun_cat.cfg",
                   "celebahq": "celebahq.cfg", "digits": "digits.cfg"}
NAME_TOKENS = {"cifar10": "cifar10", "church": "lsun_church", "bedroom": "lsun_bedroom",
               "cat": "lsun_cat", "celebahq": "celebahq"}
RUN_FILES = (logdir_files.FLAGFILE, logdir_files.CKPT)  # what import writes; a logdir holding either holds a run


# ------------------------------------------------------------- writing all or nothing

def missing_folders(folder):
    """The folders os.makedirs(folder) would make, outermost first."""
    missing, folder = [], os.path.abspath(folder)
    while not os.path.lexists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    return missing


def remove(path):
    """A file or a folder and all it holds, gone; nothing if it is not there. Used while a
    failure is being reported, so a removal that fails too is passed over."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


@contextlib.contextmanager
def staging(target, folder):
    """Yields (a temporary folder beside target to write into, <target>.<pid>.tmp; the list of
    paths this command made, to which the block adds its own), after making `folder` (target
    itself, or the folder that holds it).

    However the block ends, the temporary folder is removed. Unless it ends normally (an error,
    a stop signal), every path made is removed too, and an OSError becomes one line.
    """
    stage = f"{os.path.abspath(target)}.{os.getpid()}{files.TEMPORARY}"
    made, finished = missing_folders(folder), False
    try:
        remove(stage)  # a process with this pid left it, and that one is gone: containers reuse pids
        os.makedirs(folder, exist_ok=True)
        os.mkdir(stage)
        yield stage, made
        finished = True
    except OSError as error:
        raise ConversionError(f"cannot write {target}: {error.strerror or error}; nothing was "
                              "changed there") from None
    finally:
        with stops_held():  # a second Ctrl-C must not cut the clean-up short
            for path in [stage] + ([] if finished else made[::-1]):
                remove(path)


@contextlib.contextmanager
def stops_held():
    """The stop signals held back while the block runs, and delivered after it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def move_in(stage, folder, names):
    """Move stage/<name> over folder/<name> for each name, the stop signals held back meanwhile,
    so that a stop cannot leave some of the files new and the others old."""
    with stops_held():
        for name in names:
            os.replace(os.path.join(stage, name), os.path.join(folder, name))


def check_logdir(logdir, force):
    """One line if import may not write into logdir: it is not a folder, or it holds a run's
    files (and --force was not given, or one of them is not a file)."""
    if os.path.lexists(logdir) and not os.path.isdir(logdir):
        raise ConversionError(f"--logdir {logdir} exists and is not a folder: choose another "
                              "(nothing was changed)")
    for name in RUN_FILES:
        path = os.path.join(logdir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise ConversionError(f"{path} exists and is not a file: choose another --logdir "
                                  "(nothing was changed)")
        if os.path.lexists(path) and not force:
            raise ConversionError(f"{logdir} already holds {name}: choose another --logdir, or pass "
                                  f"--force to replace its {' and '.join(RUN_FILES)} (nothing was changed)")


def write_run(logdir, flagfile, state, force):
    """flagfile.txt (bytes) and ckpt.pt (a checkpoint's state) written into logdir together or
    not at all, holding its lock: both go into a temporary folder beside it, then are moved in.
    On failure the logdir is as it was; one this command made is removed."""
    with staging(logdir, logdir) as (stage, made):
        lock_file = os.path.join(logdir, lock.NAME)
        fresh = not os.path.exists(lock_file)
        lock.hold(logdir)
        if fresh:
            made.append(lock_file)
        check_logdir(logdir, force)  # again: another command may have written there meanwhile
        files.write_bytes(logdir_files.flagfile_path(stage), flagfile)
        checkpoint.save(logdir_files.ckpt_path(stage), state)
        move_in(stage, logdir, RUN_FILES)


def write_pipeline(out, contents):
    """{path inside out: bytes} written as the folder out, whole or not at all: into a temporary
    folder beside it that is renamed to out at the end (an empty folder out is replaced; one
    that filled meanwhile is kept, and the export refused)."""
    with staging(out, os.path.dirname(os.path.abspath(out))) as (stage, _):
        for relative, content in contents.items():
            path = os.path.join(stage, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            files.write_bytes(path, content)
        os.rename(stage, out)


# ---------------------------------------------------------------------------------- import

def find_folders(source):
    """(model folder, scheduler config path or None) of a local diffusers folder."""
    if os.path.exists(os.path.join(source, "unet", "config.json")):
        model_folder = os.path.join(source, "unet")
    elif os.path.exists(os.path.join(source, "config.json")):
        model_folder = source
    else:
        raise ConversionError(f"{source} holds neither config.json nor unet/config.json: expected a "
                              "diffusers UNet2DModel folder or a pipeline folder")
    parent = os.path.dirname(os.path.normpath(model_folder)) if model_folder != source else source
    for candidate in (os.path.join(source, "scheduler", "scheduler_config.json"),
                      os.path.join(source, "scheduler_config.json"),
                      os.path.join(parent, "scheduler", "scheduler_config.json")):
        if os.path.exists(candidate):
            return model_folder, candidate
    return model_folder, None


def download(name):
    """A hub model's files (configs and weights only) in the local hub cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(f"{name} is not a folder here; to fetch it from the hub, "
                              "pip install huggingface_hub (or download the folder yourself)") from None
    try:
        folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
        if not any(f.endswith(".safetensors") for _, _, files in os.walk(folder) for f in files):
            folder = snapshot_download(name, allow_patterns=["*.json", "*.bin"])
    except Exception as error:
        raise ConversionError(f"could not fetch {name} from the hub ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    return folder


def read_json(path):
    """The settings of a JSON config file: an object, or one line saying what is wrong."""
    try:
        content = json.loads(files.read_regular(path, files.TEXT_LIMIT).decode("utf-8"))
    except files.NotARegularFile as error:
        raise ConversionError(f"{error}: expected a JSON config file") from None
    except (OSError, ValueError, RecursionError) as error:
        raise ConversionError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(content, dict):
        raise ConversionError(f"{path} holds a JSON {type(content).__name__}, not an object of settings")
    return content


def in_file(path, read, content):
    """read(content), with a ConversionError's line starting with the file it is about."""
    try:
        return read(content)
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None


def read_weights(folder):
    """(the state dict of a diffusers model folder, read without executing any pickle code; the
    file it is in)."""
    safetensors_path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    bin_path = os.path.join(folder, "diffusion_pytorch_model.bin")
    path = safetensors_path if os.path.exists(safetensors_path) else bin_path
    if not os.path.exists(path):
        raise ConversionError(f"{folder} has no diffusion_pytorch_model.safetensors or .bin")
    try:
        content = files.read_regular(path)
        if path == safetensors_path:
            from safetensors.torch import load
            weights = load(content)
        else:  # a pickle: tensors and plain values only, and a refusal that names what it calls
            weights = checkpoint.unpickle(content, path)
    except (files.NotARegularFile, checkpoint.CheckpointError) as error:
        raise ConversionError(str(error)) from None
    except Exception as error:
        raise ConversionError(f"the weights in {folder} are unreadable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    if not isinstance(weights, dict) or not all(is_name(k) and torch.is_tensor(v) for k, v in weights.items()):
        raise ConversionError(f"{path} holds a {type(weights).__name__}, not a dict of named tensors")
    for old, new in LEGACY_ATTENTION_NAMES.items():
        weights = {re.sub(rf"(attentions\.\d+)\.{old}\.", rf"\1.{new}.", name): value
                   for name, value in weights.items()}
    return weights, path


def guess_dataset(source):
    tokens = set(re.split(r"[^a-z0-9]+", os.path.basename(os.path.normpath(source)).lower()))
    for token, dataset in NAME_TOKENS.items():
        if token in tokens:
            return dataset
    return None


def run_config(logdir, dataset, values):
    """(the configuration of the dataset's flagfile in config/ with `values` set, checked as
    main.py checks its flags; a note to print once the conversion is done, or None)."""
    flagfile = DATASET_CONFIGS.get(dataset)
    text = files.read_text(os.path.join(ROOT, "config", flagfile)) if flagfile else ""
    steps, note = Config.from_flagfile_text(text).sampling.sample_steps, None
    if steps > values.get("T", steps):  # the configuration's strided sampler is longer than this chain
        note = (f"note: --sample_steps {steps} of {flagfile} exceeds the model's T = {values['T']}: "
                "writing --sample_steps 0 (all T)")
        values = {**values, "sample_steps": 0}
    return Config.from_flagfile_text(text, dataset=dataset, logdir=logdir, **values), note


def refused(error, sources):
    """The ConfigError of a converted configuration as one line that starts with the diffusers
    fields it is about: sources, {flag: (file, field, value)} of the flags read from a file."""
    named = {}
    for flag, (path, field, value) in sources.items():
        if re.search(rf"(?<!\w){flag}(?!\w)", str(error)):
            named.setdefault(path, {})[field] = value
    where = "; ".join(f"{path}: " + ", ".join(f"{field} {shown(value)}" for field, value in fields.items())
                      for path, fields in named.items())
    return ConversionError(f"{where or 'the converted configuration'}: {error}")


def configuration(source, model_folder, scheduler_path, dataset, logdir):
    """(the run's configuration from the diffusers configs, the notes to print once the
    conversion is done). Every field is checked before anything is built; a value that the
    configuration refuses is one line naming the diffusers field and its file."""
    config_path = os.path.join(model_folder, "config.json")
    config = read_json(config_path)
    values = in_file(config_path, architecture_from_config, config)
    sources = {flag: (config_path, field, config[field]) for flag, field in UNET_FLAGS.items() if field in config}
    notes, variance = [], None
    if scheduler_path:
        scheduler = read_json(scheduler_path)
        variance = scheduler.get("variance_type", "fixed_small")
        values.update(in_file(scheduler_path, diffusion_flags, scheduler))
        sources.update({flag: (scheduler_path, field, scheduler[field])
                        for flag, field in SCHEDULER_FLAGS.items() if field in scheduler})
    else:
        notes.append(f"note: {source} has no scheduler config; the schedule of --dataset {dataset}'s "
                     "configuration is kept")
    classes = values.get("num_classes")
    # how K embeddings became K - 1 classes: the one reading of the file that it does not state
    reading = (f"num_class_embeds {classes + 1} converts as --num_classes {classes}, the last "
               "embedding read as the no-label entry") if classes else None
    try:
        converted, note = run_config(logdir, dataset, values)
    except ConfigError as error:
        refusal = refused(error, {flag: found for flag, found in sources.items() if flag in values})
        if reading and "--num_classes" in str(error):
            refusal = ConversionError(f"{refusal}; {reading} (--dataset names the data it was trained on)")
        raise refusal from None
    check_variance_outputs(config, config_path, variance)
    if reading:
        notes.append(f"note: {reading} (class_labels {classes} in diffusers, --guidance_scale's "
                     "unconditional branch here)")
    return converted, notes + ([note] if note else [])


def check_variance_outputs(config, config_path, variance):
    """One line unless the network's outputs fit the scheduler's variance_type (None: no
    scheduler config): twice in_channels for learned_range (the mean, then v of Nichol &
    Dhariwal eq. 15), in_channels for a fixed one."""
    channels = config.get("in_channels", 3)
    outputs = config.get("out_channels", channels)
    if (outputs == 2 * channels) != (variance == "learned_range"):
        raise ConversionError(f"{config_path}: out_channels {outputs} with variance_type "
                              f"{variance or '(no scheduler config)'}: "
                              f"2 * in_channels = {2 * channels} outputs convert with variance_type "
                              f"learned_range, in_channels = {channels} with a fixed variance")


def network_shapes(converted, config_path):
    """The state dict of the network `converted` describes, built on the meta device: every
    tensor's name and shape, and no memory however large the shapes."""
    try:
        with torch.device("meta"):
            return build_model(converted.model, converted.diffusion).state_dict()
    except (RuntimeError, OverflowError) as error:  # a size past what a tensor can describe
        raise ConversionError(f"{config_path}: the network it describes is too large to build "
                              f"({str(error).splitlines()[0]})") from None


def check_fit(theirs, expected, names, path):
    """One line unless the diffusers tensors are exactly those of the network: the same names,
    floating point, each of its shape. The one reshape allowed: an attention projection's Linear
    [C, C] there is the 1x1 convolution [C, C, 1, 1] here."""
    missing = [their for their in names.values() if their not in theirs]
    unused = sorted(set(theirs) - set(names.values()))
    if missing or unused:
        raise ConversionError(f"the weights in {path} do not fit its config.json: "
                              + (f"{len(missing)} missing (first: {missing[0]})" if missing else "")
                              + ("; " if missing and unused else "")
                              + (f"{len(unused)} unexpected (first: {unused[0]})" if unused else ""))
    for ours, their in names.items():
        tensor, shape = theirs[their], tuple(expected[ours].shape)
        allowed = {shape, shape[:2]} if is_attention_projection(ours) else {shape}
        if tuple(tensor.shape) not in allowed:
            raise ConversionError(f"{path}: {their} has shape {tuple(tensor.shape)}; the network of "
                                  f"its config.json needs {shape}")
        if not tensor.is_floating_point():
            raise ConversionError(f"{path}: {their} holds {tensor.dtype}, not floating-point numbers")


def converted_weights(model_folder, converted):
    """This project's state dict of the diffusers weights in model_folder, for the network
    `converted` describes. They must be its weights exactly (names, shapes, finite floating-point
    values), which is checked before any tensor of the network is made."""
    theirs, path = read_weights(model_folder)
    unet = converted.model
    blocks = len(unet.ch_mult) * (2 * unet.num_res_blocks + 1) + 2
    if TENSORS_PER_RESBLOCK * blocks > len(theirs):
        raise ConversionError(f"the weights in {path} do not fit its config.json: {len(theirs)} tensors, "
                              f"and the {blocks} ResBlocks it describes have {TENSORS_PER_RESBLOCK * blocks} or more")
    expected = network_shapes(converted, os.path.join(model_folder, "config.json"))
    names = tensor_names(expected, unet)
    check_fit(theirs, expected, names, path)
    weights = {EMBEDDING_TABLE: model.timestep_embedding_table(converted.diffusion.T, unet.ch)}
    for ours, their in names.items():
        if not torch.isfinite(theirs[their]).all():
            raise ConversionError(f"{path}: {their} holds NaN or infinite values")
        weights[ours] = theirs[their].float().reshape(expected[ours].shape).clone()
    return weights


def import_diffusers(source, logdir, dataset=None, force=False):
    """Convert a diffusers folder or hub name into <logdir>/ckpt.pt and flagfile.txt: everything
    checked first, then both written together or not at all (see the module's docstring)."""
    check_logdir(logdir, force)
    dataset = dataset or guess_dataset(source)
    if dataset is None:
        raise ConversionError(f"cannot tell from the name {source} which data it was trained on: "
                              "pass --dataset (cifar10, lsun_church, lsun_bedroom, lsun_cat, celebahq, folder)")
    folder = source if os.path.isdir(source) else download(source)
    model_folder, scheduler_path = find_folders(folder)
    converted, notes = configuration(source, model_folder, scheduler_path, dataset, logdir)
    weights = converted_weights(model_folder, converted)
    state = {"net_model": weights, "ema_model": weights, "step": None, "layout": "official",
             "format_version": checkpoint.FORMAT_VERSION, "converted_from": source}
    write_run(logdir, flagfile_text(converted).encode(), state, force)
    for note in notes:
        print(note, file=sys.stderr)
    return logdir_files.ckpt_path(logdir), logdir_files.flagfile_path(logdir)


# ---------------------------------------------------------------------------------- export

def check_out(out):
    """One line unless out is a new or an empty folder."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConversionError(f"{out} exists and is not a folder; choose a new folder (nothing was overwritten)")
    try:
        full = os.path.isdir(out) and os.listdir(out)
    except OSError as error:
        raise ConversionError(f"cannot read {out}: {error.strerror}") from None
    if full:
        raise ConversionError(f"{out} exists and is not empty; choose a new folder (nothing was overwritten)")


def pipeline_configs(saved):
    """(the UNet2DModel config, the DDPMScheduler config) of a run's configuration."""
    unet, diffusion = saved.model, saved.diffusion
    if diffusion.var_type == "learned":
        raise ConversionError("--var_type learned has no diffusers equivalent (its 'learned' "
                              "variance is not a log-variance): fixed-variance and learned_range "
                              "models export")
    outputs = unet.img_channels * (2 if diffusion.var_type == "learned_range" else 1)
    if diffusion.mean_type not in PREDICTIONS.values():
        raise ConversionError(f"mean_type {diffusion.mean_type} has no diffusers equivalent (epsilon and "
                              "xstart do)")
    if diffusion.beta_schedule not in SCHEDULES:
        raise ConversionError(f"--beta_schedule {diffusion.beta_schedule} has no diffusers equivalent "
                              f"({', '.join(SCHEDULES)} do)")
    levels, attn = len(unet.ch_mult), list(unet.attn)
    unet_config = {
        "_class_name": "UNet2DModel", "sample_size": unet.img_size,
        "in_channels": unet.img_channels, "out_channels": outputs,
        "block_out_channels": [unet.ch * m for m in unet.ch_mult], "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels))],
        "attention_head_dim": None, "dropout": unet.dropout,
        **{k: v for k, v in OFFICIAL_SETTINGS.items() if v is not None}}
    if unet.num_classes:  # the table's rows: the classes, then the no-label entry
        unet_config["num_class_embeds"] = unet.num_classes + 1
    scheduler_config = {
        "_class_name": "DDPMScheduler", "num_train_timesteps": diffusion.T,
        "beta_start": diffusion.beta_1, "beta_end": diffusion.beta_T,
        "beta_schedule": SCHEDULES[diffusion.beta_schedule],
        "variance_type": {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small",
                          "learned_range": "learned_range"}[diffusion.var_type],
        "clip_sample": saved.sampling.clip_denoised,
        "prediction_type": {v: k for k, v in PREDICTIONS.items()}[diffusion.mean_type]}
    return unet_config, scheduler_config


def export_diffusers(logdir, out):
    """Write a diffusers DDPMPipeline folder of the EMA model in <logdir> as out (a new or an
    empty folder), whole or not at all."""
    flagfile = logdir_files.flagfile_path(logdir)
    if not os.path.exists(flagfile):
        raise ConversionError(f"{flagfile} does not exist: the schedule and image size are read from it")
    check_out(out)
    saved = Config.from_flagfile_text(files.read_text(flagfile))
    unet_config, scheduler_config = pipeline_configs(saved)
    net = checkpoint.load_model(logdir)
    if net.layout != "official":
        raise ConversionError(f"{logdir} holds a {net.layout}-layout network; diffusers computes only "
                              "the official layout")
    names = tensor_names(net.state_dict(), saved.model)
    weights = {}
    for ours, tensor in net.state_dict().items():
        if ours in names:
            weights[names[ours]] = (tensor.flatten(1) if is_attention_projection(ours) else tensor).contiguous()
    from safetensors.torch import save
    pipeline = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"]}
    write_pipeline(out, {os.path.join("unet", "diffusion_pytorch_model.safetensors"): save(weights),
                         os.path.join("unet", "config.json"): json.dumps(unet_config, indent=2).encode(),
                         os.path.join("scheduler", "scheduler_config.json"):
                             json.dumps(scheduler_config, indent=2).encode(),
                         "model_index.json": json.dumps(pipeline, indent=2).encode()})
    classes = saved.model.num_classes
    if classes:
        print(f"note: num_class_embeds {classes + 1}: its unet takes class_labels 0..{classes - 1}, and "
              f"{classes} for no label; DDPMPipeline's sampling loop passes none", file=sys.stderr)
    return out


def convert(args):
    """The command: import or export as the arguments say, and what was written."""
    if args.to == "diffusers":
        if args.force:
            raise ConversionError("--force is for import: an export folder must be new or empty")
        out = export_diffusers(args.logdir, args.source_or_out)
        print(f"wrote {out} (model_index.json, unet/, scheduler/): load it with "
              f"diffusers.DDPMPipeline.from_pretrained({out!r})")
    else:
        ckpt_path, flagfile = import_diffusers(args.source_or_out, args.logdir, args.dataset, args.force)
        print(f"wrote {ckpt_path} and {flagfile}; score it with\n"
              f"  python main.py --flagfile {flagfile} --notrain --eval")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source_or_out", help="import: a diffusers folder or hub name; "
                        "--to diffusers: the folder to write")
    parser.add_argument("--logdir", required=True, help="the run folder to write (import) or read (export)")
    parser.add_argument("--to", choices=["checkpoint", "diffusers"], default="checkpoint",
                        help="checkpoint: import into this project (default); diffusers: export")
    parser.add_argument("--dataset", choices=list(DATASET_CONFIGS) + ["folder"], default=None,
                        help="import: the data the model was trained on (default: from its name)")
    parser.add_argument("--force", action="store_true", help="import: replace the flagfile.txt and "
                        "ckpt.pt that --logdir holds (without it, such a logdir is refused)")
    args = parser.parse_args(argv)
    handlers = {signum: signal.getsignal(signum) for signum in signals.SIGNALS}
    signals.stop_at_once()  # a stop raises, so that what the command was writing is removed
    try:
        convert(args)
    except UserError as error:
        sys.exit(f"error: {error}")
    except signals.Stopped as stopped:
        signals.exit_stopped(stopped.args[0])
    finally:  # main() may be called in a process that has its own handlers
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)


if __name__ == "__main__":
    main()
