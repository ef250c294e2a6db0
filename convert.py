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
downsampling; anything else is refused, naming the field.

Export writes a DDPMPipeline folder (model_index.json, unet/, scheduler/) of a model trained
here in the official layout.
"""
import argparse
import json
import os
import re
import sys

import torch

import checkpoint
import files
import model
from builders import build_model
from config import Config, flagfile_text
from errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
# The configuration each official model was trained with (Ho et al. 2020, Appendix B).
DATASET_CONFIGS = {"cifar10": "cifar10_unet_example.cfg", "lsun_church": "lsun_church.cfg",
                   "lsun_bedroom": "lsun_bedroom.cfg", "lsun_cat": "lsun_cat.cfg",
                   "celebahq": "celebahq.cfg", "digits": "digits.cfg"}
NAME_TOKENS = {"cifar10": "cifar10", "church": "lsun_church", "bedroom": "lsun_bedroom",
               "cat": "lsun_cat", "celebahq": "celebahq"}
VARIANCES = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall"}
PREDICTIONS = {"epsilon": "epsilon", "sample": "xstart"}
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # --beta_schedule -> diffusers
# UNet2DModel settings that the official network has; a model with another value is refused.
OFFICIAL_SETTINGS = {"time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
                     "downsample_padding": 0, "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
                     "class_embed_type": None, "num_class_embeds": None, "center_input_sample": False,
                     "resnet_time_scale_shift": "default", "add_attention": True,
                     "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
                     "time_embedding_dim": None, "attn_norm_num_groups": None}
# A ResBlock's layers here -> in a diffusers ResnetBlock2D; an AttnBlock's -> an Attention
# (whose q/k/v/out are Linear [C, C] there and 1x1 convolutions [C, C, 1, 1] here).
RESNET_NAMES = {"block1.0": "norm1", "block1.2": "conv1", "temb_proj.1": "time_emb_proj",
                "block2.0": "norm2", "block2.3": "conv2", "shortcut": "conv_shortcut"}
ATTENTION_NAMES = {"group_norm": "group_norm", "proj_q": "to_q", "proj_k": "to_k",
                   "proj_v": "to_v", "proj": "to_out.0"}
# Attention names of diffusers checkpoints saved before its attention rewrite.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
EMBEDDING_TABLE = "time_embedding.timembedding.0.weight"  # computed here, on the fly there


class ConversionError(UserError, ValueError):
    """A source, configuration or destination that cannot be converted; one line says why."""


def module_names(ch_mult, attn, num_res_blocks):
    """{module path here: module path in a diffusers UNet2DModel} for every layer with weights."""
    names = {"head": "conv_in", "time_embedding.timembedding.1": "time_embedding.linear_1",
             "time_embedding.timembedding.3": "time_embedding.linear_2",
             "tail.0": "conv_norm_out", "tail.2": "conv_out"}

    def res_block(ours, theirs, attention):
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in RESNET_NAMES.items()})
        if attention:
            names.update({f"{ours}.attn.{a}": f"{attention}.{b}" for a, b in ATTENTION_NAMES.items()})

    levels, index = len(ch_mult), 0
    for level in range(levels):
        for j in range(num_res_blocks):
            res_block(f"downblocks.{index}", f"down_blocks.{level}.resnets.{j}",
                      level in attn and f"down_blocks.{level}.attentions.{j}")
            index += 1
        if level != levels - 1:
            names[f"downblocks.{index}.main"] = f"down_blocks.{level}.downsamplers.0.conv"
            index += 1
    res_block("middleblocks.0", "mid_block.resnets.0", "mid_block.attentions.0")
    res_block("middleblocks.1", "mid_block.resnets.1", None)
    index = 0
    for up, level in enumerate(reversed(range(levels))):  # up block 0 is the lowest resolution
        for j in range(num_res_blocks + 1):
            res_block(f"upblocks.{index}", f"up_blocks.{up}.resnets.{j}",
                      level in attn and f"up_blocks.{up}.attentions.{j}")
            index += 1
        if level != 0:
            names[f"upblocks.{index}.main"] = f"up_blocks.{up}.upsamplers.0.conv"
            index += 1
    return names


def tensor_names(net, architecture):
    """{tensor name here: tensor name in diffusers} for every tensor of net but the table."""
    modules = module_names(architecture["ch_mult"], architecture["attn"], architecture["num_res_blocks"])
    names = {}
    for name in net.state_dict():
        if name == EMBEDDING_TABLE:
            continue
        path, _, kind = name.rpartition(".")
        names[name] = f"{modules[path]}.{kind}"
    return names


def is_attention_projection(name):
    return re.search(r"\.attn\.proj(_[qkv])?\.weight$", name) is not None


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
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} is not readable JSON ({error})") from None


def read_weights(folder):
    """The state dict of a diffusers model folder, read without executing any pickle code."""
    safetensors_path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    bin_path = os.path.join(folder, "diffusion_pytorch_model.bin")
    try:
        if os.path.exists(safetensors_path):
            from safetensors.torch import load_file
            weights = load_file(safetensors_path)
        elif os.path.exists(bin_path):
            weights = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise ConversionError(f"{folder} has no diffusion_pytorch_model.safetensors or .bin")
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"the weights in {folder} are unreadable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    for old, new in LEGACY_ATTENTION_NAMES.items():
        weights = {re.sub(rf"(attentions\.\d+)\.{old}\.", rf"\1.{new}.", name): value
                   for name, value in weights.items()}
    return weights


def architecture_from_config(config):
    """UNet arguments of an official-family UNet2DModel config; ConversionError otherwise."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"_class_name is {config['_class_name']}: only UNet2DModel converts")
    for field, expected in OFFICIAL_SETTINGS.items():
        if field in config and config[field] != expected:
            raise ConversionError(f"{field} is {config[field]!r}; the official DDPM network has "
                                  f"{expected!r}, which is all this project's UNet computes")
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(width % ch for width in widths):
        raise ConversionError(f"block_out_channels {widths} are not multiples of the first, {ch}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if set(down) - {"DownBlock2D", "AttnDownBlock2D"}:
        raise ConversionError(f"down_block_types {down}: only DownBlock2D and AttnDownBlock2D convert")
    if set(up) - {"UpBlock2D", "AttnUpBlock2D"}:
        raise ConversionError(f"up_block_types {up}: only UpBlock2D and AttnUpBlock2D convert")
    attn = [level for level, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    if len(up) != len(down) or sorted(len(up) - 1 - u for u, kind in enumerate(up) if kind == "AttnUpBlock2D") != attn:
        raise ConversionError(f"up_block_types {up} do not mirror down_block_types {down}")
    if not attn:
        raise ConversionError(f"down_block_types {down} have no attention level; the official "
                              "networks attend at 16x16")
    head_dim = config.get("attention_head_dim")
    for width in [widths[level] for level in attn] + [widths[-1]]:
        if head_dim is not None and head_dim != width:
            raise ConversionError(f"attention_head_dim {head_dim} gives {width // head_dim} heads at "
                                  f"{width} channels; the official network has one head")
    channels = config.get("in_channels", 3)
    if config.get("out_channels", channels) != channels:
        raise ConversionError(f"out_channels {config['out_channels']} differs from in_channels "
                              f"{channels}: only the fixed-variance models convert")
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ConversionError(f"layers_per_block {layers}: one count for every level is expected")
    architecture = dict(ch=ch, ch_mult=[width // ch for width in widths], attn=attn,
                        num_res_blocks=layers, in_ch=channels, out_ch=channels)
    try:
        model.check_architecture(ch, architecture["ch_mult"], attn, config.get("sample_size"))
    except ValueError as error:
        raise ConversionError(str(error)) from None
    return architecture


def diffusion_flags(scheduler):
    """Flags of the noise schedule and sampler from a DDPMScheduler config."""
    schedule = scheduler.get("beta_schedule", "linear")
    if schedule not in SCHEDULES.values() or scheduler.get("trained_betas"):
        raise ConversionError(f"beta_schedule {schedule!r}: only {' and '.join(SCHEDULES.values())} "
                              "(--beta_schedule linear and cosine) convert")
    variance = scheduler.get("variance_type", "fixed_small")
    if variance not in VARIANCES:
        raise ConversionError(f"variance_type {variance!r}: one of {', '.join(VARIANCES)} converts")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ConversionError(f"prediction_type {prediction!r}: one of {', '.join(PREDICTIONS)} converts")
    return {"beta_schedule": {theirs: ours for ours, theirs in SCHEDULES.items()}[schedule],
            "T": scheduler.get("num_train_timesteps", 1000), "beta_1": scheduler.get("beta_start", 1e-4),
            "beta_T": scheduler.get("beta_end", 0.02), "var_type": VARIANCES[variance],
            "mean_type": PREDICTIONS[prediction], "clip_denoised": bool(scheduler.get("clip_sample", True))}


def guess_dataset(source):
    tokens = set(re.split(r"[^a-z0-9]+", os.path.basename(os.path.normpath(source)).lower()))
    for token, dataset in NAME_TOKENS.items():
        if token in tokens:
            return dataset
    return None


def run_config(logdir, dataset, values):
    """The configuration of the dataset's flagfile in config/ with `values` set, checked as
    main.py checks its flags."""
    flagfile = DATASET_CONFIGS.get(dataset)
    text = files.read_text(os.path.join(ROOT, "config", flagfile)) if flagfile else ""
    steps = Config.from_flagfile_text(text).sampling.sample_steps
    if steps > values.get("T", steps):  # the configuration's strided sampler is longer than this chain
        print(f"note: --sample_steps {steps} of {flagfile} exceeds the model's T = {values['T']}: "
              "writing --sample_steps 0 (all T)", file=sys.stderr)
        values = {**values, "sample_steps": 0}
    return Config.from_flagfile_text(text, dataset=dataset, logdir=logdir, **values)


def import_diffusers(source, logdir, dataset=None):
    """Convert a diffusers folder or hub name into <logdir>/ckpt.pt and flagfile.txt."""
    ckpt_path = os.path.join(logdir, "ckpt.pt")
    if os.path.exists(ckpt_path):
        raise ConversionError(f"{ckpt_path} exists; choose another --logdir (nothing was overwritten)")
    dataset = dataset or guess_dataset(source)
    if dataset is None:
        raise ConversionError(f"cannot tell from the name {source} which data it was trained on: "
                              "pass --dataset (cifar10, lsun_church, lsun_bedroom, lsun_cat, celebahq, folder)")
    folder = source if os.path.isdir(source) else download(source)
    model_folder, scheduler_path = find_folders(folder)
    config = read_json(os.path.join(model_folder, "config.json"))
    try:
        architecture = architecture_from_config(config)
    except KeyError as missing:
        raise ConversionError(f"{model_folder}/config.json has no {missing}") from None
    values = diffusion_flags(read_json(scheduler_path)) if scheduler_path else {}
    if scheduler_path is None:
        print(f"note: {source} has no scheduler config; the schedule of --dataset {dataset}'s "
              "configuration is kept", file=sys.stderr)
    values.update(ch=architecture["ch"], ch_mult=architecture["ch_mult"], attn=architecture["attn"],
                  num_res_blocks=architecture["num_res_blocks"], img_channels=architecture["in_ch"],
                  layout="official")
    if "dropout" in config:
        values["dropout"] = float(config["dropout"])
    if config.get("sample_size"):
        values["img_size"] = int(config["sample_size"])
    converted = run_config(logdir, dataset, values)
    net = build_model(converted.model, converted.diffusion)
    theirs = read_weights(model_folder)
    names = tensor_names(net, architecture)
    missing = [their for their in names.values() if their not in theirs]
    unused = sorted(set(theirs) - set(names.values()))
    if missing or unused:
        raise ConversionError(f"the weights in {model_folder} do not fit its config.json: "
                              + (f"{len(missing)} missing (first: {missing[0]})" if missing else "")
                              + ("; " if missing and unused else "")
                              + (f"{len(unused)} unexpected (first: {unused[0]})" if unused else ""))
    weights = {EMBEDDING_TABLE: net.state_dict()[EMBEDDING_TABLE]}
    for ours, tensor in net.state_dict().items():
        if ours != EMBEDDING_TABLE:
            weights[ours] = theirs[names[ours]].float().reshape(tensor.shape).clone()
    checkpoint.load_weights(net, weights, model_folder)  # the shapes, checked tensor by tensor
    os.makedirs(logdir, exist_ok=True)
    flagfile = os.path.join(logdir, "flagfile.txt")
    files.write_bytes(flagfile, flagfile_text(converted).encode())
    checkpoint.save(ckpt_path, {"net_model": weights, "ema_model": weights, "step": None,
                                "layout": "official", "format_version": checkpoint.FORMAT_VERSION,
                                "converted_from": source})
    return ckpt_path, flagfile


# ---------------------------------------------------------------------------------- export

def export_diffusers(logdir, out):
    """Write a diffusers DDPMPipeline folder of the EMA model in <logdir>."""
    flagfile = os.path.join(logdir, "flagfile.txt")
    if not os.path.exists(flagfile):
        raise ConversionError(f"{flagfile} does not exist: the schedule and image size are read from it")
    if os.path.exists(out) and os.listdir(out):
        raise ConversionError(f"{out} exists and is not empty; choose a new folder (nothing was overwritten)")
    net = checkpoint.load_model(logdir)
    if net.layout != "official":
        raise ConversionError(f"{logdir} holds a {net.layout}-layout network; diffusers computes only "
                              "the official layout")
    saved = Config.from_flagfile_text(files.read_text(flagfile))
    unet, diffusion = saved.model, saved.diffusion
    if diffusion.var_type == "learned":
        raise ConversionError("a learned variance has no diffusers equivalent (its 'learned' "
                              "variance is not a log-variance): only fixed-variance models export")
    if diffusion.mean_type not in PREDICTIONS.values():
        raise ConversionError(f"mean_type {diffusion.mean_type} has no diffusers equivalent (epsilon and "
                              "xstart do)")
    if diffusion.beta_schedule not in SCHEDULES:
        raise ConversionError(f"--beta_schedule {diffusion.beta_schedule} has no diffusers equivalent "
                              f"({', '.join(SCHEDULES)} do)")
    levels, attn = len(unet.ch_mult), list(unet.attn)
    unet_config = {
        "_class_name": "UNet2DModel", "sample_size": unet.img_size,
        "in_channels": unet.img_channels, "out_channels": unet.img_channels,
        "block_out_channels": [unet.ch * m for m in unet.ch_mult], "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels))],
        "attention_head_dim": None, "dropout": unet.dropout,
        **{k: v for k, v in OFFICIAL_SETTINGS.items() if v is not None}}
    scheduler_config = {
        "_class_name": "DDPMScheduler", "num_train_timesteps": diffusion.T,
        "beta_start": diffusion.beta_1, "beta_end": diffusion.beta_T,
        "beta_schedule": SCHEDULES[diffusion.beta_schedule],
        "variance_type": {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[diffusion.var_type],
        "clip_sample": saved.sampling.clip_denoised,
        "prediction_type": {v: k for k, v in PREDICTIONS.items()}[diffusion.mean_type]}
    architecture = dict(ch_mult=unet.ch_mult, attn=attn, num_res_blocks=unet.num_res_blocks)
    names = tensor_names(net, architecture)
    weights = {}
    for ours, tensor in net.state_dict().items():
        if ours in names:
            if is_attention_projection(ours):
                tensor = tensor.flatten(1)
            weights[names[ours]] = tensor.contiguous()
    from safetensors.torch import save
    os.makedirs(os.path.join(out, "unet"), exist_ok=True)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    files.write_bytes(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"), save(weights))
    for path, content in ((os.path.join(out, "unet", "config.json"), unet_config),
                          (os.path.join(out, "scheduler", "scheduler_config.json"), scheduler_config),
                          (os.path.join(out, "model_index.json"), {
                              "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                              "scheduler": ["diffusers", "DDPMScheduler"]})):
        files.write_bytes(path, json.dumps(content, indent=2).encode())
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source_or_out", help="import: a diffusers folder or hub name; "
                        "--to diffusers: the folder to write")
    parser.add_argument("--logdir", required=True, help="the run folder to write (import) or read (export)")
    parser.add_argument("--to", choices=["checkpoint", "diffusers"], default="checkpoint",
                        help="checkpoint: import into this project (default); diffusers: export")
    parser.add_argument("--dataset", choices=list(DATASET_CONFIGS) + ["folder"], default=None,
                        help="import: the data the model was trained on (default: from its name)")
    args = parser.parse_args(argv)
    try:
        if args.to == "diffusers":
            out = export_diffusers(args.logdir, args.source_or_out)
            print(f"wrote {out} (model_index.json, unet/, scheduler/): load it with "
                  f"diffusers.DDPMPipeline.from_pretrained({out!r})")
        else:
            ckpt_path, flagfile = import_diffusers(args.source_or_out, args.logdir, args.dataset)
            print(f"wrote {ckpt_path} and {flagfile}; score it with\n"
                  f"  python main.py --flagfile {flagfile} --notrain --eval")
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
