"""The typed configuration against absl, which parses and writes the flags: every flag is one
field, flagfile.txt is written as absl writes flags, old flagfiles load, and the lists that
used to be kept by hand (resume's refusals, the actions, the evaluation store's identity)
follow the fields."""
import dataclasses
import os
import re

import pytest
from absl import flags

import config
import evaluate
import main
import speed
import cli
from config import Config, ConfigError
from sampling import SAMPLERS

from conftest import ROOT
# Every kind of field away from its default: lists, bools, None, strings, floats.
CHANGED = dict(ch=64, ch_mult=(1, 2, 2), attn=(0, 2), num_res_blocks=1, dropout=0.0, layout="port",
               img_size=16, img_channels=1, beta_schedule="cosine", T=400, mean_type="xstart",
               var_type="fixedsmall", sampler="ddim", sample_steps=50, eta=0.5, skip_type="quadratic",
               clip_denoised=False, dataset="digits", num_workers=0, lr=1e-3, batch_size=64,
               ema_decay=0.999, seed=7, logdir="/tmp/somewhere", precision="bf16", compile=False,
               fid_cache="", fid_feature="digits", fid_quantize=False, interp_images=("3", "x.png"),
               metrics=("fid", "pr", "sfid"))


def absl_flagfile(values):
    """flagfile.txt as absl writes it: every saved flag of main.py set to values, serialized by
    the flag itself (the way this project wrote it before the configuration was typed)."""
    main.FLAGS.unparse_flags()
    main.FLAGS(["main.py"])
    try:
        for name, value in values.items():
            setattr(main.FLAGS, name, list(value) if isinstance(value, tuple) else value)
        return "".join(main.FLAGS[name].serialize() + "\n" for name in config.FIELD_SECTIONS
                       if name not in config.ACTIONS and main.FLAGS[name].value is not None)
    finally:
        main.FLAGS.unparse_flags()


def test_every_flag_of_main_is_one_field_with_the_same_default():
    own = {flag.name: flag for flag in main.FLAGS.get_flags_for_module(cli)}
    assert set(own) == set(config.FIELD_SECTIONS) | set(cli.LEGACY_FLAGS)
    defaults = Config.make().values()
    for name, section in config.FIELD_SECTIONS.items():
        default = own[name].default
        assert (tuple(default) if isinstance(default, list) else default) == defaults[name], name
        assert isinstance(defaults[name], (list, tuple)) == (name in config.MULTI_FLAGS or name in
                                                            ("interp_t", "interp_images", "class_labels", "metrics")), name


def test_flagfile_text_is_what_absl_writes_and_reads_back_the_same_configuration():
    changed = Config.make(**CHANGED)
    assert config.flagfile_text(changed) == absl_flagfile(CHANGED)
    assert config.flagfile_text(Config.make()) == absl_flagfile({})
    assert Config.from_flagfile_text(config.flagfile_text(changed)) == changed
    # and absl itself reads the text back to the same values
    main.FLAGS.unparse_flags()
    path = os.path.join(ROOT, "tests", ".flagfile_roundtrip.txt")
    try:
        with open(path, "w") as file:
            file.write(config.flagfile_text(changed))
        main.FLAGS(["main.py", f"--flagfile={path}"])
        assert main.configuration_from_flags() == changed
    finally:
        main.FLAGS.unparse_flags()
        os.remove(path)


def test_a_flagfile_written_before_the_typed_configuration_loads_unchanged():
    """The digits demo's flagfile.txt as the earlier version wrote it: no --beta_schedule, the
    port's layout under its old name, absl's and the earlier port's flags, which are ignored."""
    old = ("--ch=32\n--ch_mult=1\n--ch_mult=2\n--attn=1\n--num_res_blocks=1\n--dropout=0.0\n"
           "--layout=seed\n--beta_1=0.0001\n--beta_T=0.02\n--T=1000\n--mean_type=epsilon\n"
           "--var_type=fixedlarge\n--loss_type=mse\n--sampler=ddpm\n--sample_steps=100\n--noclip_denoised\n"
           "--dataset=digits\n--img_size=8\n--img_channels=1\n--nofid_use_torch\n--parallel\n--logtostderr\n")
    loaded = Config.from_flagfile_text(old)
    assert loaded.model.layout == "port" and loaded.diffusion.beta_schedule == "linear"
    assert loaded.model.ch_mult == (1, 2) and loaded.sampling.clip_denoised is False
    assert loaded.model.img_size == 8 and loaded.sampling.sample_steps == 100


def test_the_lists_that_were_kept_by_hand_follow_the_fields():
    assert config.MULTI_FLAGS == ("ch_mult", "attn")
    assert {"train", "eval", "resume", "score", "eval_dir", "save_samples", "bpd", "progressive_every",
            "interp_t"} == set(config.ACTIONS)
    fixed = set(config.FIXED_ON_RESUME)
    assert {"ch", "ch_mult", "attn", "num_res_blocks", "dropout", "img_size", "img_channels", "T", "beta_1",
            "beta_T", "mean_type", "var_type", "loss_type", "layout", "beta_schedule", "num_classes"} == fixed


def other_value(section, item, value):
    """A valid value of a field other than value, or None where there is none to try."""
    choices = item.metadata["choices"] or (tuple(SAMPLERS) if item.name == "sampler" else None)
    if choices:
        return next((choice for choice in choices if choice != value and choice != "seed"), None)
    if item.name in ("ch_mult", "attn", "class_labels"):  # base: ch_mult (1, 2), attn (1,), no labels
        return {"ch_mult": (2, 2), "attn": (0,), "class_labels": ("3",)}[item.name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        special = {"ch": value * 2, "img_size": value * 2, "img_channels": 4 - value,  # 3 <-> 1
                   "num_classes": 10 - value}  # cifar10's 10 <-> unconditional
        return special.get(item.name, value + 1)
    if isinstance(value, float):
        return value / 2 if value else 0.5
    return None


@pytest.mark.parametrize("section", [config.ModelConfig, config.DiffusionConfig, config.SamplingConfig])
def test_every_field_of_the_model_diffusion_and_sampling_reaches_the_evaluation_store(section):
    """A change of any of their fields must start a new store: its batches were drawn with other
    settings. A forgotten field would resume from batches of another model or sampler."""
    base = Config.make(ch_mult=(1, 2), attn=(1,), img_size=8, T=100, sample_steps=10, num_classes=10)
    fast = speed.resolve(base.fast, "cpu")

    def key(run):
        return evaluate.store_identity(run, "abc", run.model.layout, fast, None)

    tried = 0
    for item in dataclasses.fields(section):
        value = getattr(base, config.FIELD_SECTIONS[item.name]).__getattribute__(item.name)
        changed = other_value(section, item, value)
        try:
            other = base.replace(**{item.name: changed})
        except ConfigError:
            continue  # no valid neighbour from here (e.g. eta with ddpm)
        assert key(other) != key(base), item.name
        tried += 1
    assert tried >= len(dataclasses.fields(section)) - 2 * (section is config.SamplingConfig)  # eta, churn: not ddpm's


def test_resume_refuses_a_new_schedule_or_layout_and_lets_the_rest_change(tmp_path):
    saved = Config.make(dataset="digits", img_size=8, ch_mult=(1, 2), layout="official")
    path = tmp_path / "flagfile.txt"
    path.write_text(config.flagfile_text(saved))
    fixed, changed = main.compare_with_saved_flags(saved.replace(beta_schedule="cosine", lr=1e-3), str(path))
    assert fixed == ["--beta_schedule linear -> cosine"] and changed == ["--lr 0.0002 -> 0.001"]
    fixed, _ = main.compare_with_saved_flags(saved.replace(layout="port"), str(path))
    assert fixed == ["--layout official -> port"]
    fixed, changed = main.compare_with_saved_flags(saved.replace(layout=None), str(path))
    assert fixed == changed == []  # unset now: the checkpoint's layout is used
    # the recipes' weighting and sampling may change (the history and step count are in the
    # checkpoint); the variance and the loss define the network's outputs and objective
    fixed, changed = main.compare_with_saved_flags(
        saved.replace(ema_warmup=True, t_sampling="importance", snr_gamma=5.0), str(path))
    assert fixed == [] and changed == ["--ema_warmup false -> true", "--t_sampling uniform -> importance",
                                       "--snr_gamma 0.0 -> 5.0"]
    fixed, _ = main.compare_with_saved_flags(saved.replace(var_type="learned_range", loss_type="hybrid"), str(path))
    assert fixed == ["--var_type fixedlarge -> learned_range", "--loss_type mse -> hybrid"]


@pytest.mark.parametrize("values, message", [
    (dict(beta_schedule="cosinus"), "--beta_schedule must be one of linear"),
    (dict(T=0), "--T must be at least 1"),
    (dict(sample_steps=2000), "sample_steps"),
    (dict(sampler="ddpm", eta=0.5), "eta"),
    (dict(interp_t=("5",), T=100, sample_steps=10), "--interp_t 5 is not one of the sampler's"),
    (dict(unknown_flag=1), "unknown configuration field(s): unknown_flag"),
    (dict(eval=True, score=False), "--noscore only draws samples"),
    (dict(eval=True, num_images=9), "--num_images must be at least 10 to score them"),
    (dict(eval_step=100, eval_num_images=4), "--eval_num_images must be at least 10"),
    (dict(loss_type="hybrid"), "loss_type 'hybrid' trains the variance by its bound term"),
    (dict(var_type="learned_range"), "use loss_type 'kl' or 'hybrid' with var_type 'learned_range'"),
    (dict(var_type="learned", loss_type="kl", sample_steps=10), "var_type 'learned' is the variance of one"),
    (dict(var_type="learned_range", loss_type="kl", snr_gamma=5.0), "--snr_gamma weights the squared error"),
    (dict(snr_gamma=-1.0), "--snr_gamma must be >= 0"),
    (dict(snr_gamma=float("nan")), "--snr_gamma must be >= 0"),
    (dict(var_type="learned", loss_type="hybrid", hybrid_lambda=-0.1), "--hybrid_lambda must be a finite number >= 0"),
    (dict(t_sampling="loss"), "--t_sampling must be one of uniform, importance"),
])
def test_each_configuration_refuses_what_cannot_work_in_one_line(values, message):
    with pytest.raises(ConfigError) as error:
        Config.make(**values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_flagfile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "flags.txt"
    path.write_bytes(b"--ch=32\n--logdir=\xff\xfe\n")
    with pytest.raises(SystemExit) as stop:
        cli.configuration(["main.py", f"--flagfile={path}", "--train"])
    assert "is not UTF-8 text" in str(stop.value.code) and "\n" not in str(stop.value.code)


def test_no_module_below_main_reads_the_flags():
    """The flags end in main.py and cli.py, which makes them: every other module takes
    configurations."""
    for folder in (ROOT, os.path.join(ROOT, "score"), os.path.join(ROOT, "bench")):
        for name in os.listdir(folder):
            if name.endswith(".py") and name not in ("main.py", "cli.py"):
                text = open(os.path.join(folder, name)).read()
                assert not re.search(r"^\s*(from|import) absl|\bFLAGS\b", text, re.MULTILINE), name
    assert isinstance(flags.FLAGS, flags.FlagValues)
