"""convert.py is as strict as main.py: a malformed diffusers config, a schedule main.py would
refuse, or weights that are not exactly the configured network's are one line, before anything
is allocated or written; the target is written whole or not at all (an error, a full disk, a
stop signal leave it as it was), and a run's files are replaced only with --force.

Each test runs convert in-process on a small official-family pipeline, but the stop signal's,
which needs a process to stop."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import convert
import files
import model
from config import parse_flags_text

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402  (diffusers brings safetensors)
from test_pretrained import (  # noqa: E402
    OFFICIAL, TINY_UNET_50, assert_same_outputs, diffusers_unet, perturb, relative_error)

from conftest import ROOT  # noqa: E402
# the smallest official-family UNet2DModel: two levels, attention at the second
SMALL = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             **OFFICIAL)
WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers pipeline folder (unet/, scheduler/) of SMALL, its name telling cifar10."""
    folder = tmp_path_factory.mktemp("pipelines") / "ddpm-cifar10-small"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="fixed_large")
    diffusers.DDPMPipeline(unet=diffusers_unet(SMALL, seed=0), scheduler=scheduler).save_pretrained(folder)
    return folder


def edited(pipeline, folder, unet=None, scheduler=None, weights=None):
    """A copy of the pipeline folder. unet, scheduler: fields to set in its configs (or, if not a
    dict, the whole config.json); weights: edits its dict of tensors in place."""
    shutil.copytree(pipeline, folder)
    for path, change in ((folder / "unet" / "config.json", unet),
                         (folder / "scheduler" / "scheduler_config.json", scheduler)):
        if change is not None:
            content = json.loads(path.read_text())
            path.write_text(json.dumps({**content, **change} if isinstance(change, dict) else change))
    if weights is not None:
        tensors = load_file(folder / WEIGHTS)
        weights(tensors)
        save_file(tensors, folder / WEIGHTS)
    return folder


def refusal(*args):
    """convert.main's error for these arguments, checked to be one line."""
    with pytest.raises(SystemExit) as stop:
        convert.main([str(arg) for arg in args])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def contents(folder):
    """{path inside folder: bytes} of every file under folder; None if there is no folder."""
    if not os.path.exists(folder):
        return None
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(parent, name), "rb") as file:
                found[os.path.relpath(os.path.join(parent, name), folder)] = file.read()
    return found


def temporaries(folder):
    return [os.path.join(parent, name) for parent, folders, names in os.walk(folder)
            for name in folders + names if name.endswith(files.TEMPORARY)]


@pytest.fixture
def built(monkeypatch):
    """The devices of the UNets built during the test. Building one anywhere but on the meta
    device (shapes, no memory) fails the test before the network is allocated."""
    devices, build = [], model.UNet.__init__

    def init(self, *args, **kwargs):
        devices.append(torch.empty(()).device.type)
        assert devices[-1] == "meta", "a UNet was allocated before the weights were checked against it"
        build(self, *args, **kwargs)

    monkeypatch.setattr(model.UNet, "__init__", init)
    return devices


# ------------------------------------------------------------- the configs and the weights

UNET, SCHEDULER = "unet/config.json", "scheduler/scheduler_config.json"
MALFORMED = [  # (file, its fields set (or the whole content), the field the error must name)
    (UNET, {"block_out_channels": []}, "block_out_channels"),
    (UNET, {"block_out_channels": [0, 0]}, "block_out_channels"),
    (UNET, {"block_out_channels": [-32, -64]}, "block_out_channels"),
    (UNET, {"block_out_channels": "abc"}, "block_out_channels"),
    (UNET, {"block_out_channels": [48, 96]}, "block_out_channels"),  # GroupNorm(32) cannot split 48
    (UNET, {"block_out_channels": [32, 64, 64]}, "down_block_types"),  # a level without its block
    (UNET, [1, 2], "not an object"),
    (UNET, {"in_channels": 0, "out_channels": 0}, "in_channels"),
    (UNET, {"out_channels": 5}, "out_channels 5 is neither in_channels 3"),
    (UNET, {"dropout": "0.1"}, "dropout"),
    (UNET, {"dropout": 1.5}, "dropout"),
    (UNET, {"layers_per_block": [1, 1]}, "layers_per_block"),
    (UNET, {"attention_head_dim": 0}, "attention_head_dim"),
    (UNET, {"sample_size": 0}, "sample_size"),
    (UNET, {"sample_size": -8}, "sample_size"),
    (UNET, {"sample_size": [8, 16]}, "sample_size"),
    (UNET, {"num_class_embeds": 1}, "num_class_embeds"),  # the no-label entry alone: no class
    (UNET, {"num_class_embeds": True}, "num_class_embeds"),
    (UNET, {"class_embed_type": "timestep", "num_class_embeds": 11}, "class_embed_type"),
    (UNET, {"class_embed_type": "identity"}, "class_embed_type"),
    (SCHEDULER, {"num_train_timesteps": 0}, "num_train_timesteps"),
    (SCHEDULER, {"num_train_timesteps": "1000"}, "num_train_timesteps"),
    (SCHEDULER, {"num_train_timesteps": 10 ** 12}, "num_train_timesteps"),
    (SCHEDULER, {"beta_start": 0.0}, "beta_start"),
    (SCHEDULER, {"beta_end": 1.0}, "beta_end"),
    (SCHEDULER, {"beta_start": 0.03, "beta_end": 0.02}, "beta_start 0.03, beta_end 0.02"),
    (SCHEDULER, {"beta_end": float("nan")}, "beta_end"),
    (SCHEDULER, {"clip_sample": "false"}, "clip_sample"),
    (SCHEDULER, {"variance_type": ["fixed_large"]}, "variance_type"),
    (SCHEDULER, "linear", "not an object"),
]


def case_id(where, change):
    """unet-block_out_channels=[0,0], scheduler-whole='linear': a test id without spaces."""
    fields = change.items() if isinstance(change, dict) else [("whole", change)]
    return "-".join([where.split("/")[0]] + [f"{name}={json.dumps(value, separators=(',', ':'))}".replace('"', "'")
                                              for name, value in fields])


@pytest.mark.parametrize("where, change, field", MALFORMED, ids=[case_id(w, c) for w, c, _ in MALFORMED])
def test_a_malformed_config_is_one_line_naming_the_field_before_anything_is_built_or_read(
        pipeline, tmp_path, monkeypatch, built, where, change, field):
    changes = {"unet": change} if where == UNET else {"scheduler": change}
    source = edited(pipeline, tmp_path / "ddpm-cifar10-edited", **changes)
    monkeypatch.setattr(convert, "read_weights", lambda folder: pytest.fail("the weights were read"))
    message = refusal(source, "--logdir", tmp_path / "run")
    assert str(source / where) in message and field in message, message
    assert built == []  # not even on the meta device
    assert not (tmp_path / "run").exists() and temporaries(tmp_path) == []


MISFITS = {  # weights that are not the configured network's: (edits, the words the error must hold)
    "another_count": (dict(weights=lambda t: t.update({"conv_in.weight": torch.zeros(32, 3, 3, 2)})),
                      ["conv_in.weight", "(32, 3, 3, 2)", "(32, 3, 3, 3)"]),
    "same_count_other_shape": (dict(weights=lambda t: t["conv_in.weight"].resize_(3, 32, 3, 3)),
                               ["conv_in.weight", "(3, 32, 3, 3)", "(32, 3, 3, 3)"]),
    "not_finite": (dict(weights=lambda t: t["conv_in.weight"].view(-1)[5:7].fill_(float("inf"))),
                   ["conv_in.weight", "infinite"]),
    "integers": (dict(weights=lambda t: t.update({"conv_out.bias": torch.zeros(3, dtype=torch.int64)})),
                 ["conv_out.bias", "int64"]),
    # a 1 kB config whose network would need terabytes (T = 4 keeps its table small, should a bug build it)
    "gigabytes": (dict(unet={"block_out_channels": [2 ** 20, 2 ** 21]}, scheduler={"num_train_timesteps": 4}),
                  ["time_embedding.linear_1.weight", "(128, 32)", "(4194304, 1048576)"]),
    "blocks_past_the_weights": (dict(unet={"layers_per_block": 10 ** 6}), ["ResBlocks"]),
}


@pytest.mark.parametrize("case", MISFITS)
def test_weights_that_are_not_exactly_the_configured_networks_are_refused_before_it_is_allocated(
        pipeline, tmp_path, built, case):
    edits, words = MISFITS[case]
    source = edited(pipeline, tmp_path / "ddpm-cifar10-edited", **edits)
    message = refusal(source, "--logdir", tmp_path / "run")
    assert all(word in message for word in words), message
    assert set(built) <= {"meta"}
    assert not (tmp_path / "run").exists() and temporaries(tmp_path) == []


# ------------------------------------------------------------- the target

def test_a_logdir_holding_a_run_is_refused_without_force_and_its_files_replaced_with_it(
        pipeline, tmp_path, capsys):
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "flagfile.txt").write_text("--dataset=digits\n")
    (logdir / "notes.txt").write_text("mine")
    before = contents(logdir)
    message = refusal(pipeline, "--logdir", logdir)
    assert "flagfile.txt" in message and "--force" in message
    assert contents(logdir) == before
    os.rename(logdir / "flagfile.txt", logdir / "ckpt.pt")  # a checkpoint alone is a run too
    assert "ckpt.pt" in refusal(pipeline, "--logdir", logdir)
    convert.main([str(pipeline), "--logdir", str(logdir), "--force"])
    assert "wrote" in capsys.readouterr().out
    assert (logdir / "notes.txt").read_text() == "mine"  # only the run's two files are replaced
    flags = parse_flags_text((logdir / "flagfile.txt").read_text())
    assert flags["dataset"] == ["cifar10"] and flags["T"] == ["20"] and flags["var_type"] == ["fixedlarge"]
    assert_same_outputs(checkpoint.load_model(str(logdir)), diffusers_unet(SMALL, seed=0), size=8, T=20)
    assert temporaries(tmp_path) == []


def disk_full(path, state):
    """checkpoint.save on a full disk, after part of the file was written."""
    with open(path, "wb") as file:
        file.write(b"part of a checkpoint")
    raise files.WriteError(f"cannot write {path}: the disk is full: it needs about 2.4 MB")


@pytest.mark.parametrize("existing", [False, True], ids=["new_logdir", "forced_over_a_run"])
def test_a_write_that_fails_midway_leaves_the_logdir_as_it_was(pipeline, tmp_path, monkeypatch, existing):
    logdir = tmp_path / "runs" / "run"
    if existing:
        logdir.mkdir(parents=True)
        (logdir / "flagfile.txt").write_text("--dataset=digits\n")
        checkpoint.save(str(logdir / "ckpt.pt"), {"step": 3})
    before = contents(tmp_path)
    monkeypatch.setattr(checkpoint, "save", disk_full)
    message = refusal(pipeline, "--logdir", logdir, *["--force"] * existing)
    assert "the disk is full" in message
    assert contents(tmp_path) == before
    assert os.path.exists(tmp_path / "runs") == existing  # a new logdir and runs/ above it: gone again
    assert temporaries(tmp_path) == []


def test_a_logdir_that_is_a_file_or_under_one_is_one_line_and_left_as_it_was(pipeline, tmp_path):
    (tmp_path / "run").write_text("a file")
    assert "is not a folder" in refusal(pipeline, "--logdir", tmp_path / "run")
    assert (tmp_path / "run").read_text() == "a file"
    assert "cannot write" in refusal(pipeline, "--logdir", tmp_path / "run" / "run")
    assert contents(tmp_path) == {"run": b"a file"}


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_logdir_or_parent_is_one_line_and_left_as_it_was(pipeline, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    for target in (locked / "run", locked):  # a new logdir in a read-only folder, or a read-only logdir
        os.chmod(locked, 0o555)
        try:
            assert "Permission denied" in refusal(pipeline, "--logdir", target)
        finally:
            os.chmod(locked, 0o755)
        assert os.listdir(locked) == [] and temporaries(tmp_path) == []


SLOW_SAVE = """
import sys, time
import checkpoint, convert
def save(path, state):  # the checkpoint is being written when the stop comes
    open(path, "wb").write(b"part of a checkpoint")
    print("saving", flush=True)
    time.sleep(120)
checkpoint.save = save
convert.main(sys.argv[1:])
"""


@pytest.mark.slow  # a process of its own
def test_sigterm_during_an_import_leaves_nothing_and_exits_143(pipeline, tmp_path):
    logdir = tmp_path / "runs" / "run"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(pipeline), "--logdir", str(logdir)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "saving\n", process.stderr.read()
        assert os.listdir(tmp_path) == ["runs"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip() == "error: stopped by SIGTERM before the command finished"
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- export

def trained_run(logdir, num_classes=0, seed=2):
    """(logdir, the network) of a small official-layout run of TINY_UNET_50 at 16x16, written
    into the new folder logdir; num_classes > 0: class-conditional, on a folder of that many
    class subfolders."""
    logdir.mkdir()
    net = perturb(model.UNet(**TINY_UNET_50, layout="official", num_classes=num_classes), seed=seed)
    checkpoint.save(str(logdir / "ckpt.pt"), {"ema_model": net.state_dict(), "net_model": net.state_dict(),
                                              "layout": "official", "step": 5})
    classes = f"--dataset=folder\n--num_classes={num_classes}\n" if num_classes else ""
    (logdir / "flagfile.txt").write_text("--T=50\n--ch=32\n--ch_mult=1\n--ch_mult=2\n--attn=1\n"
                                         "--num_res_blocks=1\n--dropout=0.0\n--img_size=16\n" + classes)
    return logdir, net.eval()


@pytest.fixture
def trained(tmp_path):
    """A logdir of a small official-layout run."""
    return trained_run(tmp_path / "trained")[0]


def test_export_writes_a_new_or_empty_folder_whole_and_refuses_any_other(trained, tmp_path):
    out = tmp_path / "exported"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    for target, words in ((tmp_path / "full", "not empty"), (tmp_path / "file", "not a folder")):
        before = contents(tmp_path)
        assert words in refusal("--to", "diffusers", "--logdir", trained, target)
        assert contents(tmp_path) == before
    assert "--force" in refusal("--to", "diffusers", "--logdir", trained, "--force", out)
    out.mkdir()
    convert.main(["--to", "diffusers", "--logdir", str(trained), str(out)])
    assert sorted(contents(out)) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                     WEIGHTS]
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new_folder", "empty_folder"])
def test_an_export_that_fails_midway_leaves_nothing(trained, tmp_path, monkeypatch, existing):
    out = tmp_path / "new" / "exported"
    if existing:
        out.mkdir(parents=True)
    before, written = contents(tmp_path), []

    def write_bytes(path, content):  # the disk fills after the first file
        if written:
            raise files.WriteError(f"cannot write {path}: the disk is full")
        written.append(path)
        with open(path, "wb") as file:
            file.write(content)

    monkeypatch.setattr(files, "write_bytes", write_bytes)
    assert "the disk is full" in refusal("--to", "diffusers", "--logdir", trained, out)
    assert written and contents(tmp_path) == before
    assert os.path.isdir(out) == existing and os.path.exists(tmp_path / "new") == existing
    assert temporaries(tmp_path) == []


# ------------------------------------------------------------- a learned_range model, both ways

@pytest.fixture(scope="module")
def learned_range_pipeline(tmp_path_factory):
    """A pipeline folder of SMALL with 2 * 3 outputs and variance_type learned_range."""
    folder = tmp_path_factory.mktemp("pipelines") / "ddpm-cifar10-learned-range"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    diffusers.DDPMPipeline(unet=diffusers_unet({**SMALL, "out_channels": 6}, seed=3),
                           scheduler=scheduler).save_pretrained(folder)
    return folder


def test_a_learned_range_model_imports_and_exports_as_the_same_network(learned_range_pipeline, tmp_path):
    logdir, out = tmp_path / "imported", tmp_path / "exported"
    convert.main([str(learned_range_pipeline), "--logdir", str(logdir)])
    flags = parse_flags_text((logdir / "flagfile.txt").read_text())
    assert flags["var_type"] == ["learned_range"] and flags["loss_type"] == ["hybrid"]
    net = checkpoint.load_model(str(logdir))
    theirs = diffusers.UNet2DModel.from_pretrained(learned_range_pipeline / "unet").eval()
    assert_same_outputs(net, theirs, size=8, T=20)  # all six channels: the mean, then v
    convert.main(["--to", "diffusers", "--logdir", str(logdir), str(out)])
    back = diffusers.DDPMPipeline.from_pretrained(out)
    assert back.scheduler.config.variance_type == "learned_range" and back.unet.config.out_channels == 6
    assert_same_outputs(net, back.unet.eval(), size=8, T=20)


@pytest.mark.parametrize("source, change, words", [
    ("fixed", {"variance_type": "learned_range"}, "out_channels 3 with variance_type learned_range"),
    ("learned_range", {"variance_type": "fixed_large"}, "out_channels 6 with variance_type fixed_large"),
])
def test_outputs_that_do_not_fit_the_variance_type_are_one_line(pipeline, learned_range_pipeline, tmp_path,
                                                                source, change, words):
    folder = edited(pipeline if source == "fixed" else learned_range_pipeline, tmp_path / "ddpm-cifar10-x",
                    scheduler=change)
    assert words in refusal(folder, "--logdir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------- a class-conditional model, both ways

@pytest.fixture(scope="module")
def conditional_pipeline(tmp_path_factory):
    """A pipeline folder of SMALL with num_class_embeds 11: cifar10's 10 classes, then the
    no-label entry; its class embedding as random as every other weight."""
    folder = tmp_path_factory.mktemp("pipelines") / "ddpm-cifar10-conditional"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="fixed_large")
    diffusers.DDPMPipeline(unet=diffusers_unet({**SMALL, "num_class_embeds": 11}, seed=4),
                           scheduler=scheduler).save_pretrained(folder)
    return folder


def assert_same_labelled_outputs(ours, theirs, labels, size, T):
    """ours(x, t, y) is diffusers' unet(x, t, class_labels=y) in float64 for each label, one
    image under every label, so that the labels are all that tells the outputs apart."""
    y = torch.tensor(labels)
    x = torch.randn(1, 3, size, size, dtype=torch.float64).expand(len(labels), -1, -1, -1)
    ours, theirs = ours.double(), theirs.double()
    with torch.no_grad():
        for t in (0, T // 2, T - 1):
            steps = torch.full((len(labels),), t)
            mine, expected = ours(x, steps, y), theirs(x, steps, class_labels=y).sample
            for i, label in enumerate(labels):
                assert relative_error(mine[i], expected[i]) < 1e-6, (t, label)
            assert relative_error(mine[0], mine[-1]) > 1e-3  # the labels change what is computed


def test_a_conditional_model_imports_as_the_same_network_its_last_label_the_no_label_entry(
        conditional_pipeline, tmp_path, capsys):
    logdir = tmp_path / "run"
    convert.main([str(conditional_pipeline), "--logdir", str(logdir)])
    assert "num_class_embeds 11 converts as --num_classes 10" in capsys.readouterr().err
    flags = parse_flags_text((logdir / "flagfile.txt").read_text())
    assert flags["dataset"] == ["cifar10"] and flags["num_classes"] == ["10"]
    theirs = diffusers.UNet2DModel.from_pretrained(conditional_pipeline / "unet").eval()
    assert_same_labelled_outputs(checkpoint.load_model(str(logdir)), theirs, [0, 3, 9, 10], size=8, T=20)


@pytest.mark.parametrize("num_classes", [0, 3], ids=["unconditional", "conditional"])
def test_a_model_exports_with_a_row_per_class_and_the_no_label_one_and_imports_back(
        tmp_path, capsys, num_classes):
    (logdir, net), out = trained_run(tmp_path / "trained", num_classes, seed=7), tmp_path / "exported"
    convert.main(["--to", "diffusers", "--logdir", str(logdir), str(out)])
    config = json.loads((out / "unet" / "config.json").read_text())
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    if not num_classes:  # as before class-conditional models: no class field at all
        assert not {"num_class_embeds", "class_embed_type"} & set(config) and theirs.class_embedding is None
        assert_same_outputs(net, theirs, size=16, T=50)
        return
    assert config["num_class_embeds"] == num_classes + 1
    assert "class_labels 0..2, and 3 for no label" in capsys.readouterr().err
    assert_same_labelled_outputs(net, theirs, [0, 1, 2, 3], size=16, T=50)
    convert.main([str(out), "--logdir", str(tmp_path / "back"), "--dataset", "folder"])
    assert parse_flags_text((tmp_path / "back" / "flagfile.txt").read_text())["num_classes"] == ["3"]
    back, original = checkpoint.load(str(tmp_path / "back" / "ckpt.pt"))["ema_model"], net.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())


@pytest.mark.parametrize("change, dataset, words", [
    ({"num_class_embeds": 10}, None, ["num_class_embeds 10:", "--num_classes 9 does not fit cifar10",
                                      "the last embedding read as the no-label entry", "--dataset"]),
    (None, "lsun_church", ["num_class_embeds 11:", "lsun_church has no labels", "no-label entry"]),
    ({"num_class_embeds": 2 ** 64}, "folder", ["num_class_embeds must be", "1000000"]),  # past a tensor's shape
], ids=["ten_for_cifar10", "lsun", "past_int64"])
def test_class_counts_that_do_not_convert_are_one_line_before_anything_is_built_or_read(
        conditional_pipeline, tmp_path, monkeypatch, built, change, dataset, words):
    source = edited(conditional_pipeline, tmp_path / "ddpm-cifar10-edited", unet=change)
    monkeypatch.setattr(convert, "read_weights", lambda folder: pytest.fail("the weights were read"))
    message = refusal(source, "--logdir", tmp_path / "run", *(["--dataset", dataset] if dataset else []))
    assert str(source / UNET) in message and all(word in message for word in words), message
    assert built == [] and not (tmp_path / "run").exists() and temporaries(tmp_path) == []
