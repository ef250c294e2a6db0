"""Checkpoints: written atomically, read with one-line errors.

ckpt.pt is a dict with the seed port's keys (net_model, ema_model, sched, optim, step, x_T)
plus rng (every process's RNG states), world_size, layout (which network the weights are
for: "official" or "port", see model.py) and format_version. A checkpoint with no layout
record comes from the earlier PyTorch port, or from this project before layouts were
recorded (those have an rng entry, and the official layout).

    net = checkpoint.load_model("ckpt/cifar10")   # the EMA network, eval mode: net(x, t)
"""
import hashlib
import io
import os
import pickle
import sys

import numpy as np
import torch

import builders
import config
import files
import logdir_files
import model
from errors import UserError

FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the flags."""


def save(path, state):
    """Write to a temporary file beside path, then rename: a crash or a full disk mid-write
    leaves the previous checkpoint in place (files.WriteError says what was needed)."""
    files.write_atomically(path, lambda file: torch.save(state, file), files.state_size(state))


# Checkpoints written before RNG states were stored as tensors hold numpy's RNG state, an
# ndarray of uint32. Unpickling one calls only numpy's own array constructors; numpy 1.x
# named the first numpy.core.multiarray._reconstruct.
_RECONSTRUCT = np._core.multiarray._reconstruct
NUMPY_ARRAYS = [_RECONSTRUCT, (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"), np.ndarray,
                np.dtype, np.dtypes.UInt32DType]
TRAINING_KEYS = ("net_model", "ema_model", "optim", "sched", "step", "x_T")  # the seed port's


def unsafe_globals(source):
    """Names of the functions and classes a checkpoint's pickle calls beyond the allowed ones;
    source: a path or a file-like object."""
    allowed = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
               "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}
    try:
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(source)
                if name not in allowed]
    except Exception:  # not a zip checkpoint: nothing to list
        return []


def load(path, required=()):
    """The dict of a checkpoint, read with weights_only=True: tensors and plain values only,
    so a file made to run code when it is unpickled is refused, not run.

    required: keys the dict must have (TRAINING_KEYS to resume, "ema_model" to sample).
    """
    return load_hashed(path, required)[0]


def load_hashed(path, required=()):
    """load's dict, and the sha256 (hex) of the bytes it was unpickled from.

    The file is read once, into memory: a training run that saves meanwhile renames a new
    file over path, and hashing path again would name that checkpoint, not the one loaded.
    While it is unpickled, the bytes and the tensors are both held (about twice its size).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        content = files.read_regular(path)
    except files.NotARegularFile as error:
        raise CheckpointError(f"checkpoint {error}") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({error.strerror})") from None
    state = unpickle(content, path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of "
                              "weights: not a checkpoint of this project or of the earlier port")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} (its keys: "
                              f"{', '.join(map(str, state)) or 'none'}): not a training checkpoint "
                              "of this project or of the earlier port")
    return state, hashlib.sha256(content).hexdigest()


def refusal_detail(error):
    """What torch's weights_only refusal found, without its advice to load the file unsafely
    (with the pickle's code allowed to run)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        return text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
    found = [line.strip() for line in text.splitlines()
             if line.strip() and "weights_only" not in line and not line.startswith("Check the documentation")]
    return found[0] if found else "no detail"


def unpickle(content, path):
    """torch.load of a checkpoint's bytes with weights_only=True; one line if that fails."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS):
            return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = unsafe_globals(io.BytesIO(content))
        if unsafe:
            raise CheckpointError(f"checkpoint {path} was not loaded: it calls {', '.join(unsafe[:3])}, "
                                  "which a checkpoint does not need and which may be unsafe (code run "
                                  "on loading)") from None
        raise CheckpointError(f"checkpoint {path} was not loaded: it is corrupt, or holds more than "
                              f"tensors and plain values, which may be unsafe ({refusal_detail(error)})") from None
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None


def load_weights(module, state_dict, path):
    """load_state_dict(strict=True), with the first mismatch named in one line."""
    if not isinstance(state_dict, dict) or not all(map(torch.is_tensor, state_dict.values())):
        raise CheckpointError(f"checkpoint {path}: the weights are not a dict of tensors")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the flags: "
            + (f"{len(missing)} tensors missing (first: {missing[0]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else ""))
    for name, tensor in expected.items():
        if state_dict[name].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {path} does not fit the flags: {name} has shape "
                f"{tuple(state_dict[name].shape)} there, the flags build {tuple(tensor.shape)}")
    module.load_state_dict(state_dict, strict=True)


def layout_of(state, path, override=None):
    """The layout of a loaded checkpoint's networks: override if given, else its record
    (an old name replaced by today's: "seed" is "port")."""
    if override is not None:
        return model.check_layout(override)
    if "layout" in state:
        try:
            return model.check_layout(state["layout"])
        except ValueError:
            raise CheckpointError(f"checkpoint {path} records layout {state['layout']!r}, which this "
                                  f"version does not know ({', '.join(model.LAYOUTS)})") from None
    if "rng" in state:  # written by this project before it recorded layouts
        return "official"
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {path} records no layout, so it is the earlier PyTorch port's: loading it "
              "with --layout port (pass --layout to choose)", file=sys.stderr)
    return "port"


def config_beside(path):
    """The Config of the flagfile.txt beside a checkpoint, or None where there is none or it
    does not name the network's shape (then the weights' shapes tell it)."""
    flagfile = logdir_files.flagfile_path(os.path.dirname(path))
    if not os.path.exists(flagfile):
        return None
    text = files.read_text(flagfile)
    if not {"T", "ch", "ch_mult", "num_res_blocks"} <= set(config.parse_flags_text(text)):
        return None
    return config.Config.from_flagfile_text(text)


def config_from_weights(weights, path):
    """The Config whose network has exactly these weights' names and shapes (dropout 0)."""
    try:
        found = model.architecture_from_state_dict(weights)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: {error}") from None
    learned = found["out_ch"] == 2 * found["in_ch"]
    return config.Config.make(T=found["T"], ch=found["ch"], ch_mult=found["ch_mult"], attn=found["attn"],
                              num_res_blocks=found["num_res_blocks"], dropout=0.0,
                              img_size=2 ** (len(found["ch_mult"]) - 1), img_channels=found["in_ch"],
                              var_type="learned" if learned else "fixedlarge",
                              loss_type="kl" if learned else "mse")


def load_model(path, ema=True, device="cpu", layout=None):
    """The network of a checkpoint, in eval mode, ready for net(x, t).

    path: a ckpt.pt, or the logdir holding it. ema: the EMA weights (else the raw network's).
    layout: None reads it from the checkpoint ("port" when it has no record), or force one.
    The architecture comes from the flagfile.txt beside the checkpoint, or else from the
    shapes of the weights.
    """
    if os.path.isdir(path):
        path = logdir_files.ckpt_path(path)
    state = load(path)
    key = "ema_model" if ema else "net_model"
    if key not in state:
        raise CheckpointError(f"checkpoint {path} has no {key} weights")
    weights = state[key]
    found = config_beside(path) or config_from_weights(weights, path)
    net = builders.build_model(found.model, found.diffusion, layout=layout_of(state, path, layout))
    load_weights(net, weights, path)
    return net.to(device).eval()


def load_ema(config, device):
    """The EMA network of the configuration's <logdir>/ckpt.pt, its step, and the checkpoint's
    short sha256."""
    path = logdir_files.ckpt_path(config.run.logdir)
    # the hash of the bytes loaded: a training run may save a new ckpt.pt meanwhile
    state, sha256 = load_hashed(path, required=("ema_model",))
    ema = builders.build_model(config.model, config.diffusion, layout_of(state, path, config.model.layout))
    load_weights(ema, state["ema_model"], path)
    return ema.to(device).eval(), state.get("step"), sha256[:12]
