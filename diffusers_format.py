"""The diffusers format of a UNet2DModel and its scheduler, as convert.py reads and writes it:
the config fields and the kinds of value each may hold (an untrusted config.json is checked
field by field before anything is built from it), the settings the official network has,
and the names of the tensors on both sides.
"""
import math
import re

from errors import UserError

VARIANCES = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",
             "learned_range": "learned_range"}
PREDICTIONS = {"epsilon": "epsilon", "sample": "xstart"}
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # --beta_schedule -> diffusers
# UNet2DModel settings that the official network has; a model with another value is refused.
# class_embed_type None: a conditional model's class embedding is a table of num_class_embeds
# rows, as --num_classes' is; the other types pass the labels through layers this UNet lacks.
OFFICIAL_SETTINGS = {"time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
                     "downsample_padding": 0, "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
                     "class_embed_type": None, "center_input_sample": False,
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
# The schedule and the timestep embedding table have a row per diffusion step: a larger count in
# an untrusted scheduler config would only ask for memory (the official models have 1000).
MAX_TIMESTEPS = 100_000
# The class embedding has a row per label. A count past any labelled data set's is refused with
# the config's other fields: one past what a tensor's shape holds would fail the network's build
# on the meta device with torch's error, not one line (ImageNet-21k has 21,841 classes).
MAX_CLASS_EMBEDS = 1_000_000
# Every ResBlock has at least this many tensors (two GroupNorms, two convolutions and the time
# projection, a weight and a bias each): a config with more blocks than its weights could hold
# is refused before its network is built, even on the meta device.
TENSORS_PER_RESBLOCK = 10


class ConversionError(UserError, ValueError):
    """A source, configuration or destination that cannot be converted; one line says why."""


# ------------------------------------------------------------- the kinds of the config fields

def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_name(value):
    return isinstance(value, str)


def is_names(value):
    return isinstance(value, (list, tuple)) and all(map(is_name, value))


def is_widths(value):
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(is_integer(width) and width > 0 for width in value))


def is_size(value):
    """An image size as diffusers writes it: null, n or [n, n]."""
    return value is None or is_integer(value) or (
        isinstance(value, (list, tuple)) and len(value) == 2 and is_integer(value[0]) and value[0] == value[1])


def is_head_dim(value):
    return value is None or (is_integer(value) and value > 0)


def is_class_count(value):
    """num_class_embeds as it converts: null, or at least one class and the no-label entry."""
    return value is None or (is_integer(value) and 2 <= value <= MAX_CLASS_EMBEDS)


# The fields convert.py reads, with their kind, checked before any is used; their ranges are the
# configuration's (run_config): one set of rules with main.py's flags.
UNET_FIELDS = {"block_out_channels": (is_widths, "a list of positive integers"),
               "down_block_types": (is_names, "a list of block type names"),
               "up_block_types": (is_names, "a list of block type names"),
               "layers_per_block": (is_integer, "one integer (the ResBlocks of every level)"),
               "in_channels": (is_integer, "an integer"), "out_channels": (is_integer, "an integer"),
               "attention_head_dim": (is_head_dim, "null or a positive integer"),
               "sample_size": (is_size, "null, an integer or [size, size]"),
               "dropout": (is_finite, "a finite number"),
               "num_class_embeds": (is_class_count, f"null (unconditional) or an integer from 2 to "
                                    f"{MAX_CLASS_EMBEDS} (the classes, then the no-label entry)")}
REQUIRED_UNET_FIELDS = ("block_out_channels", "down_block_types", "up_block_types")
SCHEDULER_FIELDS = {"num_train_timesteps": (is_integer, "an integer"),
                    "beta_start": (is_finite, "a finite number"), "beta_end": (is_finite, "a finite number"),
                    "beta_schedule": (is_name, "a name"), "variance_type": (is_name, "a name"),
                    "prediction_type": (is_name, "a name"),
                    "clip_sample": (lambda value: isinstance(value, bool), "true or false")}
# The flags written from a diffusers field, so that a refused flag's error names the field.
UNET_FLAGS = {"ch": "block_out_channels", "ch_mult": "block_out_channels", "attn": "down_block_types",
              "num_res_blocks": "layers_per_block", "img_channels": "in_channels", "img_size": "sample_size",
              "dropout": "dropout", "num_classes": "num_class_embeds"}
SCHEDULER_FLAGS = {"T": "num_train_timesteps", "beta_1": "beta_start", "beta_T": "beta_end"}


def shown(value):
    """A config's value as an error shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(content, kinds, required=()):
    """ConversionError naming the first field that is missing or not of its kind."""
    for field in required:
        if field not in content:
            raise ConversionError(f"{field} is missing")
    for field, (test, expected) in kinds.items():
        if field in content and not test(content[field]):
            raise ConversionError(f"{field} must be {expected}, got {shown(content[field])}")


# ------------------------------------------------------------- the names of the tensors

def module_names(ch_mult, attn, num_res_blocks):
    """{module path here: module path in a diffusers UNet2DModel} for every layer with weights."""
    names = {"head": "conv_in", "time_embedding.timembedding.1": "time_embedding.linear_1",
             "time_embedding.timembedding.3": "time_embedding.linear_2", "class_embedding": "class_embedding",
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


def tensor_names(state_dict, unet):
    """{tensor name here: tensor name in diffusers} for every tensor but the table of a state
    dict of the network of `unet` (a ModelConfig)."""
    modules = module_names(unet.ch_mult, unet.attn, unet.num_res_blocks)
    names = {}
    for name in state_dict:
        if name == EMBEDDING_TABLE:
            continue
        path, _, kind = name.rpartition(".")
        names[name] = f"{modules[path]}.{kind}"
    return names


def is_attention_projection(name):
    """Whether a tensor here is an attention q/k/v/out weight: a 1x1 convolution [C, C, 1, 1]
    here, a Linear [C, C] in diffusers (the one reshape a conversion makes)."""
    return re.search(r"\.attn\.proj(_[qkv])?\.weight$", name) is not None


def attention_levels(down, up, levels):
    """The levels with attention of an official-family UNet2DModel's block types."""
    if set(down) - {"DownBlock2D", "AttnDownBlock2D"}:
        raise ConversionError(f"down_block_types {down}: only DownBlock2D and AttnDownBlock2D convert")
    if set(up) - {"UpBlock2D", "AttnUpBlock2D"}:
        raise ConversionError(f"up_block_types {up}: only UpBlock2D and AttnUpBlock2D convert")
    if len(down) != levels:
        raise ConversionError(f"down_block_types has {len(down)} blocks and block_out_channels {levels} "
                              "widths: one block per width is expected")
    attn = [level for level, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    if len(up) != len(down) or sorted(len(up) - 1 - u for u, kind in enumerate(up) if kind == "AttnUpBlock2D") != attn:
        raise ConversionError(f"up_block_types {up} do not mirror down_block_types {down}")
    if not attn:
        raise ConversionError(f"down_block_types {down} have no attention level; the official "
                              "networks attend at 16x16")
    return attn


def architecture_from_config(config):
    """The UNet flags of an official-family UNet2DModel config; ConversionError naming the field
    otherwise. Each field's kind is checked first; the ranges, by the configuration."""
    check_fields(config, UNET_FIELDS, REQUIRED_UNET_FIELDS)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"_class_name is {shown(config['_class_name'])}: only UNet2DModel converts")
    for field, expected in OFFICIAL_SETTINGS.items():
        if field in config and config[field] != expected:
            raise ConversionError(f"{field} is {shown(config[field])}; the official DDPM network has "
                                  f"{expected!r}, which is all this project's UNet computes")
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(width % ch for width in widths):
        raise ConversionError(f"block_out_channels {widths} are not multiples of the first, {ch}")
    attn = attention_levels(list(config["down_block_types"]), list(config["up_block_types"]), len(widths))
    head_dim = config.get("attention_head_dim")
    for width in [widths[level] for level in attn] + [widths[-1]]:
        if head_dim is not None and head_dim != width:
            raise ConversionError(f"attention_head_dim {head_dim} gives {width / head_dim:g} heads at "
                                  f"{width} channels; the official network has one head")
    channels = config.get("in_channels", 3)
    if config.get("out_channels", channels) not in (channels, 2 * channels):
        raise ConversionError(f"out_channels {config['out_channels']} is neither in_channels {channels} "
                              "(a fixed variance) nor twice it (variance_type learned_range)")
    flags = dict(ch=ch, ch_mult=[width // ch for width in widths], attn=attn,
                 num_res_blocks=config.get("layers_per_block", 2), img_channels=channels, layout="official")
    if "dropout" in config:
        flags["dropout"] = float(config["dropout"])
    if config.get("num_class_embeds") is not None:
        flags["num_classes"] = config["num_class_embeds"] - 1  # the last row: the no-label entry
    size = config.get("sample_size")
    if size is not None:  # none: the dataset configuration's
        flags["img_size"] = size if is_integer(size) else size[0]
    return flags


def diffusion_flags(scheduler):
    """Flags of the noise schedule and sampler from a DDPMScheduler config."""
    check_fields(scheduler, SCHEDULER_FIELDS)
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
    steps = scheduler.get("num_train_timesteps", 1000)
    if steps > MAX_TIMESTEPS:
        raise ConversionError(f"num_train_timesteps {steps} is more than {MAX_TIMESTEPS}, the most that "
                              "converts (the schedule and the embedding table have a row per step)")
    # a learned_range model trains on the bound: improved-diffusion's hybrid loss, as it trained
    loss = {"loss_type": "hybrid"} if variance == "learned_range" else {}
    return {**loss, "beta_schedule": {theirs: ours for ours, theirs in SCHEDULES.items()}[schedule],
            "T": steps, "beta_1": float(scheduler.get("beta_start", 1e-4)),
            "beta_T": float(scheduler.get("beta_end", 0.02)), "var_type": VARIANCES[variance],
            "mean_type": PREDICTIONS[prediction], "clip_denoised": scheduler.get("clip_sample", True)}
