"""Pretrained models: the two layouts of the UNet against a reference written here, the
earlier port's checkpoints, and diffusers' UNet2DModel imported and exported by convert.py.

diffusers is the second library: a UNet2DModel in the official DDPM configuration family,
with perturbed random weights, must give the outputs of the converted network."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import convert
import model
from config import parse_flags_text
from conftest import run_convert, run_main
from model import UNet

diffusers = pytest.importorskip("diffusers")

# the UNet keyword arguments of a tiny network of T 50 (main.py flags: conftest.TINY_ARGS)
TINY_UNET_50 = dict(T=50, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.0)
# google/ddpm-cifar10-32's UNet2DModel settings, at small widths
OFFICIAL = dict(downsample_padding=0, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                attention_head_dim=None, norm_num_groups=32, act_fn="silu")
CIFAR_STYLE = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64),
                   layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), **OFFICIAL)
# the 256x256 models' six levels with attention at the fifth (16x16 of 256), at 64x64
LSUN_STYLE = dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64, 96, 96),
                  layers_per_block=1,
                  down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, **OFFICIAL)


def perturb(net, seed, scale=0.05):
    """Move every trained weight off its initial value, so that no layer is trivially zero
    (the frozen timestep table stays as the layout computes it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in filter(lambda p: p.requires_grad, net.parameters()):
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return net


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------- a reference UNet, written here

def group_norm_reference(h, weight, bias, eps, groups=32):
    B, C, H, W = h.shape
    g = h.reshape(B, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return g.reshape(B, C, H, W) * weight[None, :, None, None] + bias[None, :, None, None]


def stride2_conv_reference(x, weight, bias, pad_before, pad_after):
    """out[i, j] = sum_ab W[a, b] . xpad[2i + a, 2j + b], xpad zero-padded as given."""
    xp = F.pad(x, (pad_before, pad_after, pad_before, pad_after))
    size = (xp.shape[-1] - 3) // 2 + 1
    out = bias[None, :, None, None].expand(x.shape[0], -1, size, size).clone()
    for a in range(3):
        for b in range(3):
            patch = xp[:, :, a:a + 2 * size - 1:2, b:b + 2 * size - 1:2]
            out = out + torch.einsum("oc,bchw->bohw", weight[:, :, a, b], patch)
    return out


def seed_embedding_reference(T, dim):
    """The earlier port's table: w_k = 1e4^(-2k/dim), [sin, cos] interleaved per frequency."""
    table = np.zeros((T, dim))
    for t in range(T):
        for k in range(dim // 2):
            table[t, 2 * k] = math.sin(t * 10000 ** (-2 * k / dim))
            table[t, 2 * k + 1] = math.cos(t * 10000 ** (-2 * k / dim))
    return torch.from_numpy(table)


def read_flagfile(path):
    """{flag: [values]} of a flagfile, as absl writes one."""
    return parse_flags_text(open(path).read())


def reference_unet(sd, x, t, ch_mult, attn, num_res_blocks, layout):
    """The UNet of Ho et al. computed from a state dict with plain tensor operations:
    official: downsampling padded (0, 1), GroupNorm eps 1e-6; port: padded (1, 1), eps 1e-5."""
    eps = {"official": 1e-6, "port": 1e-5}[layout]
    pad = {"official": (0, 1), "port": (1, 1)}[layout]

    def norm(h, name):
        return group_norm_reference(h, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def conv(h, name):
        k = sd[f"{name}.weight"].shape[-1] // 2
        return F.conv2d(F.pad(h, (k, k, k, k)), sd[f"{name}.weight"], sd[f"{name}.bias"])

    def attention(h, name):
        B, C, H, W = h.shape
        q, k, v = (conv(norm(h, f"{name}.group_norm"), f"{name}.proj_{p}").reshape(B, C, -1) for p in "qkv")
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
        return h + conv(torch.einsum("bij,bcj->bci", weights, v).reshape(B, C, H, W), f"{name}.proj")

    def res_block(h, name, temb):
        out = conv(F.silu(norm(h, f"{name}.block1.0")), f"{name}.block1.2")
        out = out + F.linear(F.silu(temb), sd[f"{name}.temb_proj.1.weight"], sd[f"{name}.temb_proj.1.bias"])[:, :, None, None]
        out = conv(F.silu(norm(out, f"{name}.block2.0")), f"{name}.block2.3")
        skip = conv(h, f"{name}.shortcut") if f"{name}.shortcut.weight" in sd else h
        out = out + skip
        return attention(out, f"{name}.attn") if f"{name}.attn.proj.weight" in sd else out

    temb = sd["time_embedding.timembedding.0.weight"][t]
    temb = F.linear(temb, sd["time_embedding.timembedding.1.weight"], sd["time_embedding.timembedding.1.bias"])
    temb = F.linear(F.silu(temb), sd["time_embedding.timembedding.3.weight"], sd["time_embedding.timembedding.3.bias"])
    h = conv(x, "head")
    skips, index = [h], 0
    for level in range(len(ch_mult)):
        for _ in range(num_res_blocks):
            h = res_block(h, f"downblocks.{index}", temb)
            skips.append(h)
            index += 1
        if level != len(ch_mult) - 1:
            h = stride2_conv_reference(h, sd[f"downblocks.{index}.main.weight"],
                                       sd[f"downblocks.{index}.main.bias"], *pad)
            skips.append(h)
            index += 1
    h = res_block(res_block(h, "middleblocks.0", temb), "middleblocks.1", temb)
    index = 0
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            h = res_block(torch.cat([h, skips.pop()], dim=1), f"upblocks.{index}", temb)
            index += 1
        if level != 0:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"upblocks.{index}.main")
            index += 1
    return conv(F.silu(norm(h, "tail.0")), "tail.2")


@pytest.mark.parametrize("layout", ["official", "port"])
def test_each_layout_computes_the_reference_network(layout):
    torch.manual_seed(0)
    net = perturb(UNet(**TINY_UNET_50, layout=layout), seed=1).double().eval()
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([3, 41])
    with torch.no_grad():
        ours = net(x, t)
    sd = {k: v.double() for k, v in net.state_dict().items()}
    expected = reference_unet(sd, x, t, TINY_UNET_50["ch_mult"], TINY_UNET_50["attn"], TINY_UNET_50["num_res_blocks"], layout)
    assert relative_error(ours, expected) < 1e-10
    other = reference_unet(sd, x, t, TINY_UNET_50["ch_mult"], TINY_UNET_50["attn"], TINY_UNET_50["num_res_blocks"],
                           "port" if layout == "official" else "official")
    assert relative_error(ours, other) > 1e-2  # the layouts are different networks


def test_seed_layout_pieces_against_their_definitions():
    down = model.DownSample(32, "port").double()
    x = torch.randn(1, 32, 8, 8, dtype=torch.float64)
    expected = stride2_conv_reference(x, down.main.weight, down.main.bias, 1, 1)
    torch.testing.assert_close(down(x, None), expected, rtol=1e-12, atol=1e-12)
    net = UNet(**TINY_UNET_50, layout="seed")  # the old name of the port's layout
    assert net.layout == "port"
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    table = net.time_embedding.timembedding[0].weight.double()
    torch.testing.assert_close(table, seed_embedding_reference(TINY_UNET_50["T"], TINY_UNET_50["ch"]), rtol=0, atol=2e-6)
    assert all(m.eps == 1e-6 for m in UNet(**TINY_UNET_50).modules() if isinstance(m, torch.nn.GroupNorm))


# ------------------------------------------------------------- the earlier port's checkpoints

def seed_checkpoint(folder, seed=3):
    """A checkpoint as the earlier port writes it: its keys only, no layout record."""
    net = perturb(UNet(**TINY_UNET_50, in_ch=3, layout="port"), seed=seed)
    state = {"net_model": net.state_dict(), "ema_model": net.state_dict(), "sched": {"last_epoch": 7},
             "optim": {"state": {}, "param_groups": []}, "step": 7, "x_T": torch.randn(4, 3, 16, 16)}
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "ckpt.pt"))
    return net.eval()


def test_a_checkpoint_without_layout_loads_as_the_seed_port(tmp_path, capfd):
    reference = seed_checkpoint(tmp_path)
    loaded = checkpoint.load_model(str(tmp_path))  # no flagfile: the architecture from shapes
    assert loaded.layout == "port" and not loaded.training
    assert "records no layout" in capfd.readouterr().err
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 49])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), reference(x, t), rtol=0, atol=0)
        official = checkpoint.load_model(str(tmp_path), layout="official")
        assert relative_error(official(x, t), reference(x, t)) > 1e-2


def test_the_seed_ports_flagfile_and_checkpoint_run_here(tmp_path):
    logdir = tmp_path / "seed_run"
    seed_checkpoint(logdir)
    # the original port's flag set, as its flagfile.txt names them
    (logdir / "flagfile.txt").write_text("\n".join([
        "--attn=1", "--batch_size=16", "--beta_1=0.0001", "--beta_T=0.02", "--ch=32", "--ch_mult=1",
        "--ch_mult=2", "--dropout=0.0", "--ema_decay=0.9999", "--noeval", "--eval_step=0",
        "--fid_cache=./stats/cifar10.train.npz", "--nofid_use_torch", "--grad_clip=1.0", "--img_size=16",
        f"--logdir={logdir}", "--lr=0.0002", "--mean_type=epsilon", "--num_images=50000",
        "--num_res_blocks=1", "--num_workers=0", "--noparallel", "--sample_size=2", "--sample_step=1000",
        "--save_step=5000", "--T=50", "--total_steps=800000", "--train", "--var_type=fixedlarge",
        "--warmup=5000", ""]))
    result = run_main("--flagfile", logdir / "flagfile.txt", "--notrain", "--progressive_every", "25",
                      "--device", "cpu", tiny=False)
    assert "--parallel / --noparallel of the earlier port is ignored" in result.stderr
    assert "records no layout" in result.stderr
    assert (logdir / "progressive" / "progressive.gif").exists()


def test_load_model_reads_the_architecture_from_the_flagfile_and_picks_raw_weights(tmp_path):
    net = perturb(UNet(**TINY_UNET_50, layout="official"), seed=5)
    raw = perturb(UNet(**TINY_UNET_50, layout="official"), seed=6)
    checkpoint.save(str(tmp_path / "ckpt.pt"), {"ema_model": net.state_dict(), "net_model": raw.state_dict(),
                                                "layout": "official", "step": 1})
    (tmp_path / "flagfile.txt").write_text("--T=50\n--ch=32\n--ch_mult=1\n--ch_mult=2\n--attn=1\n"
                                           "--num_res_blocks=1\n--dropout=0.3\n--img_channels=3\n")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        ema = checkpoint.load_model(str(tmp_path / "ckpt.pt"))
        assert isinstance(ema.downblocks[0].block2[2], torch.nn.Dropout) and ema.downblocks[0].block2[2].p == 0.3
        torch.testing.assert_close(ema(x, t), net.eval()(x, t), rtol=0, atol=0)
        torch.testing.assert_close(checkpoint.load_model(str(tmp_path), ema=False)(x, t), raw.eval()(x, t),
                                   rtol=0, atol=0)


# ------------------------------------------------------------- diffusers: import and export

def diffusers_unet(config, seed):
    torch.manual_seed(seed)
    return perturb(diffusers.UNet2DModel(**config), seed=seed).eval()


def assert_same_outputs(ours, theirs, size, channels=3, T=1000):
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    ours, theirs = ours.double(), theirs.double()
    with torch.no_grad():
        for t in (0, T // 2, T - 1):
            steps = torch.full((2,), t)
            assert relative_error(ours(x, steps), theirs(x, steps).sample) < 1e-5, t


def test_an_official_pipeline_converts_and_computes_the_same_network(tmp_path):
    unet = diffusers_unet(CIFAR_STYLE, seed=0)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        variance_type="fixed_large", clip_sample=True)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "ddpm-cifar10-32")
    result = run_convert(str(tmp_path / "ddpm-cifar10-32"), "--logdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--notrain --eval" in result.stdout
    net = checkpoint.load_model(str(tmp_path / "run"))
    assert net.layout == "official"
    assert_same_outputs(net, unet, size=16)
    saved = read_flagfile(tmp_path / "run" / "flagfile.txt")
    expected = {"dataset": "cifar10", "ch": "32", "ch_mult": ["1", "2", "2", "2"], "attn": ["1"],
                "num_res_blocks": "2", "img_size": "16", "T": "1000", "var_type": "fixedlarge",
                "mean_type": "epsilon", "layout": "official", "clip_denoised": "true",
                "fid_cache": "./data/cifar-10-fid-cache/cifar10.train.npz", "logdir": str(tmp_path / "run")}
    for name, value in expected.items():
        assert (saved[name] if isinstance(value, list) else saved[name][-1]) == value, name
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    for name in state["ema_model"]:
        assert torch.equal(state["ema_model"][name], state["net_model"][name])


@pytest.mark.slow
def test_a_256_style_model_with_legacy_attention_names_in_a_bin_file_converts(tmp_path):
    unet = diffusers_unet(LSUN_STYLE, seed=1)
    folder = tmp_path / "ddpm-church-256"
    unet.save_pretrained(folder, safe_serialization=False)
    weights = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, tensor in weights.items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = tensor
    assert any(".query." in name for name in renamed)
    torch.save(renamed, folder / "diffusion_pytorch_model.bin")
    result = run_convert(str(folder), "--logdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no scheduler config" in result.stderr
    saved = read_flagfile(tmp_path / "run" / "flagfile.txt")
    assert saved["dataset"] == ["lsun_church"] and saved["ch_mult"] == ["1", "1", "2", "2", "3", "3"]
    assert saved["attn"] == ["4"] and saved["var_type"] == ["fixedsmall"]  # the church configuration's
    assert_same_outputs(checkpoint.load_model(str(tmp_path / "run")), unet, size=64)


@pytest.mark.slow
def test_export_then_import_gives_identical_tensors_and_diffusers_loads_it(tmp_path):
    net = perturb(UNet(**dict(TINY_UNET_50, T=1000), layout="official"), seed=2)
    logdir = tmp_path / "trained"
    os.makedirs(logdir)
    checkpoint.save(str(logdir / "ckpt.pt"), {"ema_model": net.state_dict(), "net_model": net.state_dict(),
                                              "layout": "official", "step": 5})
    (logdir / "flagfile.txt").write_text("--T=1000\n--ch=32\n--ch_mult=1\n--ch_mult=2\n--attn=1\n"
                                         "--num_res_blocks=1\n--dropout=0.0\n--img_size=16\n--beta_1=0.0001\n"
                                         "--beta_T=0.02\n--var_type=fixedsmall\n--mean_type=epsilon\n--noclip_denoised\n")
    result = run_convert("--to", "diffusers", "--logdir", str(logdir), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr[-2000:]
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "exported")
    assert pipeline.scheduler.config.variance_type == "fixed_small"
    assert pipeline.scheduler.config.clip_sample is False
    assert_same_outputs(net.eval(), pipeline.unet.eval(), size=16)
    result = run_convert(str(tmp_path / "exported"), "--logdir", str(tmp_path / "back"), "--dataset", "folder")
    assert result.returncode == 0, result.stderr[-2000:]
    back = torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)["ema_model"]
    original = net.state_dict()
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert read_flagfile(tmp_path / "back" / "flagfile.txt")["clip_denoised"] == ["false"]


@pytest.mark.parametrize("field, value", [
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("downsample_padding", 1), ("norm_eps", 1e-5),
    ("attention_head_dim", 8), ("class_embed_type", "timestep"), ("norm_num_groups", 16)])
def test_a_configuration_outside_the_official_family_is_refused_naming_the_field(field, value):
    config = dict(CIFAR_STYLE, **{field: value}, _class_name="UNet2DModel")
    with pytest.raises(convert.ConversionError, match=field):
        convert.architecture_from_config(config)


def test_other_block_types_and_schedulers_are_refused_in_one_line(tmp_path):
    config = dict(CIFAR_STYLE, down_block_types=("ResnetDownsampleBlock2D",) + CIFAR_STYLE["down_block_types"][1:])
    with pytest.raises(convert.ConversionError, match="down_block_types"):
        convert.architecture_from_config(config)
    for scheduler, field in (({"beta_schedule": "scaled_linear"}, "beta_schedule"),
                             ({"variance_type": "learned"}, "variance_type"),  # learned_range converts; learned does not
                             ({"prediction_type": "v_prediction"}, "prediction_type")):
        with pytest.raises(convert.ConversionError, match=field):
            convert.diffusion_flags(scheduler)
    folder = tmp_path / "ddpm-cifar10-heads"
    os.makedirs(folder)
    (folder / "config.json").write_text(json.dumps(dict(CIFAR_STYLE, attention_head_dim=8)))
    result = run_convert(str(folder), "--logdir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "attention_head_dim" in result.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
def test_training_records_the_layout_and_a_seed_layout_model_trains_from_scratch(tmp_path):
    for layout in ("official", "port"):
        logdir = tmp_path / layout
        extra = [] if layout == "official" else ["--layout", "seed"]  # official is the default; seed: port's old name
        run_main("--train", "--logdir", str(logdir), "--total_steps", "2", "--sample_step", "0", *extra)
        state = torch.load(logdir / "ckpt.pt", weights_only=True)
        assert state["layout"] == layout and state["format_version"] == checkpoint.FORMAT_VERSION
        assert read_flagfile(logdir / "flagfile.txt")["layout"] == [layout]
        net = checkpoint.load_model(str(logdir))
        assert net.layout == layout
        assert all(torch.isfinite(p).all() for p in net.parameters())
        norms = {m.eps for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
        assert norms == {model.GN_EPS[layout]}


@pytest.mark.slow
def test_a_converted_model_is_scored_by_main_from_its_flagfile(tmp_path):
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  **OFFICIAL)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="fixed_small")
    diffusers.DDPMPipeline(unet=diffusers_unet(config, seed=4), scheduler=scheduler).save_pretrained(tmp_path / "tiny")
    result = run_convert(str(tmp_path / "tiny"), "--logdir", str(tmp_path / "run"), "--dataset", "digits")
    assert result.returncode == 0, result.stderr[-2000:]
    run_main("--flagfile", tmp_path / "run" / "flagfile.txt", "--notrain", "--eval", "--num_images", "16",
             "--eval_batch_size", "16", "--sample_steps", "0", "--device", "cpu", tiny=False)
    record = json.loads((tmp_path / "run" / "eval.txt").read_text().splitlines()[-1])
    assert math.isfinite(record["FID"]) and record["FID"] > 0


def test_a_hub_name_is_fetched_with_huggingface_hub(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = tmp_path / "snapshot"
    diffusers_unet(CIFAR_STYLE, seed=5).save_pretrained(folder / "unet")
    asked = []

    def snapshot_download(name, allow_patterns):
        asked.append((name, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    convert.import_diffusers("google/ddpm-cifar10-32", str(tmp_path / "run"))
    assert asked == [("google/ddpm-cifar10-32", ["*.json", "*.safetensors"])]
    assert read_flagfile(tmp_path / "run" / "flagfile.txt")["dataset"] == ["cifar10"]
