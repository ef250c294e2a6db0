"""The configuration of a run: one frozen dataclass per concern, in the order and under the
titles of `python main.py --help`.

Each field is the flag of main.py of the same name: its type, default, help and choices are
written here once, and main.py defines its flags from them. Each class checks its own fields
when it is made, with one line naming the flag and what it expects (ConfigError); `Config`,
which holds one of each, checks what spans two of them. Code below main.py takes the
narrowest of these it needs, never the flags.

    config = Config.make(dataset="digits", img_size=8, ch=32)   # the defaults for the rest
    config.model.ch, config.sampling.sampler
    text = flagfile_text(config)                                 # <logdir>/flagfile.txt
    same = Config.from_flagfile_text(text)
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Optional

import builders
import datasets
import memory
import model
import sampling
from diffusion import BETA_SCHEDULES, LOSS_TYPES, MEAN_TYPES, VAR_TYPES, beta_schedule
from sampling import OPTION_DEFAULTS, SKIP_TYPES
from steps import DDIM_EPS
from errors import UserError
from score.metrics import IS_SPLITS
from score.scorer import DEFAULT_METRICS, FEATURES, METRICS


T_SAMPLINGS = ("uniform", "importance")


class ConfigError(UserError, ValueError):
    """A flag, file or path that cannot work; the message says what is expected."""


def option(default, help, choices=None, saved=True):
    """A field that is also a flag. saved: written to flagfile.txt; the actions (what to do
    now, not what the run is) are not, so that --flagfile <logdir>/flagfile.txt brings back
    the run and does only what the command says."""
    return field(default=default, metadata={"help": help, "choices": choices, "saved": saved})


def require(ok, message):
    if not ok:
        raise ConfigError(message)


class Section:
    """What every configuration class does when it is made: choices checked, then its own
    `check`."""

    def __post_init__(self):
        for item in dataclasses.fields(self):
            choices, value = item.metadata["choices"], getattr(self, item.name)
            if choices is not None and value is not None:
                require(value in choices, f"--{item.name} must be one of {', '.join(map(str, choices))}, "
                                          f"got {value!r}")
        self.check()

    def check(self):
        pass


@dataclass(frozen=True)
class Actions(Section):
    TITLE = "What to do"
    train: bool = option(False, "train from scratch, or continue with --resume", saved=False)
    eval: bool = option(False, "generate samples with the EMA model and score them (FID, IS)",
                        saved=False)
    resume: bool = option(False, "continue training from <logdir>/ckpt.pt", saved=False)
    score: bool = option(True, "with --eval: score the samples (--noscore: only draw them, for "
                         "--save_samples; no Inception weights or statistics needed)", saved=False)
    eval_dir: Optional[str] = option(None, "with --eval: score this folder of images (or .npz) "
                                     "instead of sampling", saved=False)
    save_samples: Optional[str] = option(None, "with --eval: also write the samples to this folder "
                                         "(PNGs) or .npz", saved=False)
    bpd: bool = option(False, "the variational bound in bits/dim on --bpd_split; writes bpd.json, "
                       "bpd.png", saved=False)
    progressive_every: int = option(0, "write x_t and x0_hat every N sampler steps for --sample_size "
                                    "samples as PNG strips and a GIF under <logdir>/progressive (0: off)",
                                    saved=False)
    interp_t: tuple[str, ...] = option((), "interpolate at these timesteps: diffuse, mix, denoise; "
                                       "writes <logdir>/interpolation/t<t>.png", saved=False)

    def check(self):
        require(self.progressive_every >= 0,
                f"--progressive_every must be >= 0 (0: off), got {self.progressive_every}")
        require(not (self.eval and not self.score and (self.eval_dir or not self.save_samples)),
                "--noscore only draws samples to save them: pass --save_samples DIR|FILE.npz "
                "(and no --eval_dir, which is scored)")

    @property
    def inspecting(self):
        return self.bpd or self.progressive_every > 0 or bool(self.interp_t)


@dataclass(frozen=True)
class ModelConfig(Section):
    TITLE = "UNet"
    ch: int = option(128, "base channel count of the UNet")
    ch_mult: tuple[int, ...] = option((1, 2, 2, 2), "channel multiplier of each resolution level")
    attn: tuple[int, ...] = option((1,), "levels (indices into ch_mult) with self-attention")
    num_res_blocks: int = option(2, "ResBlocks per level")
    dropout: float = option(0.1, "dropout inside the ResBlocks")
    layout: Optional[str] = option(
        None, "official: the network of the official TF code; port: the earlier PyTorch port's "
        "(its checkpoints; 'seed' is its old name). Unset: official for new runs, the "
        "checkpoint's record when loading", choices=model.LAYOUTS + tuple(model.LAYOUT_ALIASES))
    img_size: int = option(32, "image height and width")
    img_channels: int = option(3, "image channels: 3 (RGB) or 1 (grayscale)")
    num_classes: int = option(0, "class-conditional with this many classes of the data's labels, "
                              "for classifier-free guidance (0: unconditional, the paper's model)")

    @property
    def image_shape(self):
        """(C, H, W) of one image the network takes and gives."""
        return (self.img_channels, self.img_size, self.img_size)

    def check(self):
        if self.layout in model.LAYOUT_ALIASES:
            object.__setattr__(self, "layout", model.LAYOUT_ALIASES[self.layout])
        require(self.ch >= 1 and self.ch % model.GROUPS == 0,
                f"--ch must be a positive multiple of {model.GROUPS} (the GroupNorm groups), got {self.ch}")
        require(min(self.ch_mult, default=1) >= 1, f"--ch_mult must be >= 1 at every level, got "
                                                    f"{list(self.ch_mult)}")
        require(self.num_res_blocks >= 1, f"--num_res_blocks must be at least 1, got {self.num_res_blocks}")
        require(self.img_size >= 1, f"--img_size must be at least 1, got {self.img_size}")
        require(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        require(self.img_channels in (1, 3), f"--img_channels must be 1 or 3, got {self.img_channels}")
        require(self.num_classes >= 0, f"--num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        try:
            model.check_architecture(self.ch, self.ch_mult, self.attn, self.img_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class DiffusionConfig(Section):
    TITLE = "Gaussian diffusion"
    beta_schedule: str = option("linear", f"the betas, one of {', '.join(BETA_SCHEDULES)} (linear: the "
                                "paper's; see diffusion.beta_schedule)", choices=BETA_SCHEDULES)
    beta_1: float = option(1e-4, "first beta of the linear, quad and warmup schedules")
    beta_T: float = option(0.02, "last beta of the linear, quad and warmup schedules; const's beta")
    T: int = option(1000, "number of diffusion steps")
    mean_type: str = option("epsilon", "what the network predicts", choices=MEAN_TYPES)
    var_type: str = option("fixedlarge", "reverse-process variance (learned: the network also "
                           "outputs the log-variance; learned_range: a fraction between beta_t and "
                           "betatilde_t, Nichol & Dhariwal eq. 15; both need --loss_type kl or hybrid)",
                           choices=VAR_TYPES)
    loss_type: str = option("mse", "mse: Algorithm 1; kl: the variational bound term; hybrid: mse + "
                            "--hybrid_lambda * the bound (Nichol & Dhariwal eq. 16)", choices=LOSS_TYPES)

    def check(self):
        require(self.T >= 1, f"--T must be at least 1 diffusion step, got {self.T}")
        memory.check_schedule(self.T)  # before it is built, several times, below
        try:  # the diffusion checks its own arguments; no network is needed for that
            builders.build_trainer(None, self)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def betas(self):
        """beta_t for t = 0..T-1, float64."""
        return beta_schedule(self.beta_schedule, self.beta_1, self.beta_T, self.T)


@dataclass(frozen=True)
class SamplingConfig(Section):
    TITLE = "Sampling (training-time grids, --eval, training-time FID)"
    # the help of the samplers' flags and their checks come from the samplers' declarations
    # (sampling.py), so that a registered sampler is a choice too
    sampler: str = option("ddpm", sampling.option_help("sampler"))
    sample_steps: int = option(0, "network evaluations per sample, one per sampler step but heun's two "
                                  "(0: all T)")
    eta: float = option(OPTION_DEFAULTS["eta"], "noise scale (0: deterministic); " + sampling.option_help("eta"))
    solver_order: int = option(OPTION_DEFAULTS["solver_order"],
                               "order of the solvers; " + sampling.option_help("solver_order"))
    skip_type: str = option("auto", "which timesteps a strided sampler keeps: uniform or quadratic in "
                                    "time, uniform in log-SNR, Karras et al.'s sigmas (auto: the sampler's "
                                    "own, see README)", choices=("auto",) + SKIP_TYPES)
    karras_rho: float = option(7.0, "rho of the karras spacing (Karras et al. eq. 5)")
    sigma_min: float = option(0.0, "the karras spacing's smallest sigma = sqrt((1 - abar) / abar) (0: the "
                                   "chain's own, at t = 0)")
    sigma_max: float = option(0.0, "the karras spacing's largest sigma (0: the chain's own, at its last t)")
    churn: float = option(OPTION_DEFAULTS["churn"], "S_churn, the fresh noise of Karras et al.'s Algorithm 2 "
                                                    "(0: Algorithm 1); " + sampling.option_help("churn"))
    churn_tmin: float = option(OPTION_DEFAULTS["churn_tmin"], "S_tmin: churn only where sigma >= this")
    churn_tmax: float = option(OPTION_DEFAULTS["churn_tmax"], "S_tmax: churn only where sigma <= this (0: no bound)")
    churn_noise: float = option(OPTION_DEFAULTS["churn_noise"], "S_noise, the churned noise's scale")
    clip_denoised: bool = option(True, "clip x0_hat to [-1, 1] before forming the mean")
    ddim_eps: str = option(OPTION_DEFAULTS["ddim_eps"], "ddim's eps beside a clipped x0_hat: the network's own, or "
                                      "re-derived from the clipped x0_hat (from_x0)", choices=DDIM_EPS)
    guidance_scale: float = option(1.0, "classifier-free guidance w of a class-conditional model: eps_u + "
                                   "w (eps_c - eps_u) (1: conditional, unguided; 0: unconditional)")
    class_labels: tuple[str, ...] = option((), "classes a class-conditional model draws, in turn (empty: "
                                           "every class, balanced)")

    @property
    def labels(self):
        """--class_labels as ints."""
        return tuple(int(label) for label in self.class_labels)

    def check(self):
        require(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
                f"--guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        for label in self.class_labels:
            require(label.isdigit(), f"--class_labels takes class numbers 0, 1, ..., got {label!r}")
        require(self.sample_steps >= 0, f"--sample_steps must be >= 0 (0: all T), got {self.sample_steps}")
        require(math.isfinite(self.karras_rho) and self.karras_rho > 0,
                f"--karras_rho must be a finite number > 0, got {self.karras_rho}")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"--{name} must be a finite number >= 0 (0: the "
                    f"chain's own), got {value}")
        require(not (self.sigma_min and self.sigma_max) or self.sigma_min < self.sigma_max,
                f"--sigma_min {self.sigma_min} must be below --sigma_max {self.sigma_max}")
        require(self.sampler in sampling.SAMPLERS, f"--sampler must be one of {', '.join(sampling.SAMPLERS)}, "
                                                   f"got {self.sampler!r}")
        try:
            sampling.sampler_options(self.sampler, {name: getattr(self, name) for name in OPTION_DEFAULTS})
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class DataConfig(Section):
    TITLE = "Data"
    dataset: str = option("cifar10", "training data", choices=tuple(datasets.DATASETS))
    data_root: str = option("./data", "where the dataset lives (a folder of images for 'folder')")
    num_workers: int = option(4, "data-loading processes per training process")

    def check(self):
        require(self.num_workers >= 0, f"--num_workers must be >= 0, got {self.num_workers}")


def positive(section, *names):
    for name in names:
        value = getattr(section, name)
        require(value >= 1, f"--{name} must be positive, got {value}")


def steps_or_off(section, *names):
    for name in names:
        value = getattr(section, name)
        require(value >= 0, f"--{name} must be a number of steps >= 0 (0: off), got {value}")


@dataclass(frozen=True)
class TrainingConfig(Section):
    TITLE = "Training"
    lr: float = option(2e-4, "Adam learning rate")
    grad_clip: float = option(1.0, "gradient-norm clipping threshold")
    total_steps: int = option(800000, "optimizer steps")
    warmup: int = option(5000, "linear learning-rate warmup steps")
    batch_size: int = option(128, "global batch size, over all processes and micro-batches")
    accum_steps: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    ema_decay: float = option(0.9999, "decay of the exponential moving average of the weights")
    ema_warmup: bool = option(False, "EMA decay min(--ema_decay, (1 + k) / (10 + k)) at optimizer step "
                              "k = 0, 1, ... (TensorFlow's ExponentialMovingAverage num_updates)")
    t_sampling: str = option("uniform", "training timesteps: uniform (the paper's), or importance: "
                             "p_t ~ sqrt(E[L_t^2]) of the last 10 losses at each t, loss weighted by "
                             "1 / (T p_t) (Nichol & Dhariwal sec. 3.3)", choices=T_SAMPLINGS)
    snr_gamma: float = option(0.0, "Min-SNR-gamma loss weighting (Hang et al. 2023): the squared "
                              "error weighted as min(SNR_t, gamma) |x0_hat - x_0|^2 (0: off; mse and "
                              "hybrid losses)")
    cond_drop_prob: float = option(0.1, "with --num_classes: the chance that an example's label is "
                                   "dropped to train the unconditional branch (Ho & Salimans 2022)")
    hybrid_lambda: float = option(0.001, "lambda of --loss_type hybrid: L_simple + lambda L_vlb")
    max_bad_steps: int = option(0, "steps whose loss is NaN or inf that are skipped (their update "
                                "not applied) before training stops with an error")
    log_step: int = option(100, "steps between loss reports (tqdm, TensorBoard)")
    sample_size: int = option(64, "images in the training-time sample grid")
    sample_step: int = option(1000, "steps between sample grids (0: never)")
    save_step: int = option(5000, "steps between checkpoints (0: only the one always saved at the end)")

    def check(self):
        require(0 < self.lr < math.inf, f"--lr must be a finite number > 0, got {self.lr}")
        require(self.grad_clip > 0, f"--grad_clip must be > 0 (the largest gradient norm), got "
                                    f"{self.grad_clip}")
        require(self.warmup >= 0, f"--warmup must be a number of steps >= 0, got {self.warmup}")
        require(0 <= self.ema_decay <= 1, f"--ema_decay must be in [0, 1], got {self.ema_decay}")
        require(self.max_bad_steps >= 0, f"--max_bad_steps must be >= 0, got {self.max_bad_steps}")
        require(0 <= self.cond_drop_prob <= 1, f"--cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        positive(self, "batch_size", "accum_steps", "total_steps", "log_step")
        steps_or_off(self, "sample_step", "save_step")


@dataclass(frozen=True)
class RunConfig(Section):
    TITLE = "Devices, processes, randomness, log directory"
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=("auto", "cpu", "cuda"))
    nprocs: int = option(1, "processes started here, one GPU each (DistributedDataParallel)")
    seed: int = option(0, "seed of every random stream (data order, noise, timesteps, x_T)")
    logdir: str = option("./logs/DDPM_CIFAR10_EPS", "log directory")

    def check(self):
        positive(self, "nprocs")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class FastPathConfig(Section):
    TITLE = "The fast GPU path (unset: on for CUDA; off on the CPU, where fp32 eager is the reference)"
    precision: Optional[str] = option(None, "arithmetic of the network (bf16, fp16: autocast; fp16 trains "
                                      "with dynamic loss scaling); unset: a resumed run's, else bf16 on "
                                      "GPUs of compute capability 8.0 and up, fp16 on older ones, fp32 on "
                                      "the CPU", choices=("fp32", "bf16", "fp16"))
    compile: Optional[bool] = option(None, "torch.compile the network")
    cuda_graphs: Optional[bool] = option(None, "with --compile on one GPU: replay steps as CUDA graphs")
    channels_last: Optional[bool] = option(None, "NHWC memory layout for the convolutions")
    fused_adam: Optional[bool] = option(None, "Adam's fused CUDA kernel")
    data_on_device: Optional[bool] = option(
        None, "hold the whole dataset on the device as uint8 (unset: cifar10 and digits on CUDA; "
        "folders, celebahq and lsun only when set: decoded once at each start, and they must fit "
        "in half the free device memory)")


@dataclass(frozen=True)
class EvalConfig(Section):
    TITLE = "Evaluation"
    eval_step: int = option(0, "steps between evaluations during training (0: never)")
    num_images: int = option(50000, "samples generated by --eval")
    eval_batch_size: int = option(256, "samples generated at once per process")
    eval_num_images: int = option(5000, "samples scored by each evaluation during training")
    fid_cache: str = option("./data/cifar-10-fid-cache/cifar10.train.npz",
                            "FID statistics of the data (make them with python -m score.fid_cache); "
                            "empty: digits statistics computed on the fly, or no FID for inception")
    fid_feature: Optional[str] = option(None, "feature network; unset: the digits classifier for "
                                        "--dataset=digits, else inception", choices=FEATURES)
    inception_weights: Optional[str] = option(None, "pt_inception-2015-12-05-6726825d.pth "
                                              "(unset: $TORCH_HOME/hub/checkpoints/)")
    fid_quantize: bool = option(True, "round samples to 8 bits before scoring, as a saved PNG is")
    metrics: tuple[str, ...] = option(DEFAULT_METRICS, f"what a score holds, any of {','.join(METRICS)}: "
                                      "FID, Inception Score, precision/recall with density/coverage, KID, "
                                      "spatial FID (pr, kid and sfid need --fid_cache files that hold "
                                      "reference features, as python -m score.fid_cache writes them)")

    @property
    def statistics(self):
        """The FID statistics file, or None where they are computed here (empty --fid_cache)."""
        return self.fid_cache or None

    def check(self):
        positive(self, "num_images", "eval_batch_size", "eval_num_images")
        steps_or_off(self, "eval_step")
        unknown = [name for name in self.metrics if name not in METRICS]
        require(self.metrics and not unknown and len(set(self.metrics)) == len(self.metrics),
                f"--metrics {','.join(self.metrics) or '(empty)'}: expected some of {','.join(METRICS)}, "
                "each once" + (f" ({', '.join(unknown)} unknown)" if unknown else ""))


@dataclass(frozen=True)
class InspectConfig(Section):
    TITLE = "Looking inside (the EMA model of <logdir>/ckpt.pt)"
    bpd_split: str = option("test", "dataset split for --bpd", choices=("train", "test"))
    bpd_num_images: int = option(0, "images for --bpd (0: the whole split)")
    interp_images: tuple[str, ...] = option(("0", "1"), "the two images to interpolate: "
                                            "training-set indices or image files")
    interp_lambdas: int = option(9, "mixing weights from 0 to 1 in the interpolation grid")

    def check(self):
        require(self.bpd_num_images >= 0,
                f"--bpd_num_images must be >= 0 (0: the whole split), got {self.bpd_num_images}")
        require(len(self.interp_images) == 2,
                f"--interp_images takes two images, got {list(self.interp_images)}")


SECTIONS = {"actions": Actions, "model": ModelConfig, "diffusion": DiffusionConfig,
            "sampling": SamplingConfig, "data": DataConfig, "training": TrainingConfig,
            "run": RunConfig, "fast": FastPathConfig, "eval": EvalConfig, "inspect": InspectConfig}


def field_types(section):
    """{field name: its type} of a configuration class."""
    return typing.get_type_hints(section)


@dataclass(frozen=True)
class Config:
    """One configuration of each concern; made with `make`, which sorts flat values by field."""
    actions: Actions
    model: ModelConfig
    diffusion: DiffusionConfig
    sampling: SamplingConfig
    data: DataConfig
    training: TrainingConfig
    run: RunConfig
    fast: FastPathConfig
    eval: EvalConfig
    inspect: InspectConfig

    def __post_init__(self):
        steps = self.sampler().timesteps  # the sampler checks its steps against T and the variance
        try:  # the loss checks its weighting against the loss and variance types
            builders.build_trainer(None, self.diffusion, self.training)
            if self.actions.bpd:  # every term of the bound, as the kl loss needs them
                builders.build_diffusion(self.diffusion).check_bound(self.diffusion.mean_type, "--bpd")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for t in self.actions.interp_t:
            require(t.isdigit() and int(t) < self.diffusion.T,
                    f"--interp_t {t} is not a timestep in 0..{self.diffusion.T - 1}")
            require(int(t) in steps, f"--interp_t {t} is not one of the sampler's {len(steps)} timesteps "
                    f"({', '.join(map(str, steps[:3]))}, ..., {steps[-1]}): pick one of those, or "
                    "--sample_steps 0 for all T")
        require(self.training.sample_size >= 1 or not (self.actions.train or self.actions.progressive_every),
                f"--sample_size must be at least 1 (the images of a sample grid), got "
                f"{self.training.sample_size}")
        scoring_samples = self.actions.eval and self.actions.score and not self.actions.eval_dir
        require(self.eval.num_images >= IS_SPLITS or not scoring_samples,
                f"--num_images must be at least {IS_SPLITS} to score them (the Inception Score's "
                f"splits), got {self.eval.num_images}; or pass --noscore --save_samples")
        require(self.eval.eval_num_images >= IS_SPLITS or not self.eval.eval_step,
                f"--eval_num_images must be at least {IS_SPLITS} (the Inception Score's splits), got "
                f"{self.eval.eval_num_images}")
        self.check_classes()
        require(self.inspect.interp_lambdas >= 2 or not self.actions.interp_t,
                f"--interp_lambdas must be at least 2 (the two ends), got {self.inspect.interp_lambdas}")

    def check_classes(self):
        """What a class-conditional model needs of the data and asks of the sampler."""
        classes, sampling = self.model.num_classes, self.sampling
        if not classes:
            require(sampling.guidance_scale == 1.0, f"--guidance_scale {sampling.guidance_scale} needs a "
                    "class-conditional model (--num_classes > 0)")
            require(not sampling.class_labels, "--class_labels needs a class-conditional model (--num_classes > 0)")
            return
        labelled = datasets.DATASETS[self.data.dataset][3]
        require(labelled is not None, f"--num_classes {classes}: {self.data.dataset} has no labels (cifar10, "
                "digits and folders of class subfolders do)")
        require(labelled in (classes, "folder"), f"--num_classes {classes} does not fit {self.data.dataset}, "
                f"which has {labelled} classes")
        for label in sampling.labels:
            require(label < classes, f"--class_labels {label} is not a class of 0..{classes - 1}")
        require(self.training.sample_size >= classes or not (self.actions.train or self.actions.progressive_every),
                f"--sample_size {self.training.sample_size} is fewer than the {classes} classes: a "
                "conditional model's sample grids have one row per class")

    def sampler(self):
        """The sampler of the sampling and diffusion configurations, without a network."""
        try:
            return builders.build_sampler(self.sampling, self.diffusion)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @classmethod
    def make(cls, **values):
        """A configuration from flat {flag name: value}; the defaults for names not given.
        Lists become tuples; a name that is no field is an error."""
        unknown = set(values) - set(FIELD_SECTIONS)
        require(not unknown, f"unknown configuration field(s): {', '.join(sorted(unknown))}")
        sections = {}
        for name, section in SECTIONS.items():
            mine = {key: tuple(value) if isinstance(value, list) else value
                    for key, value in values.items() if FIELD_SECTIONS[key] == name}
            sections[name] = section(**mine)
        return cls(**sections)

    def values(self):
        """{flag name: value} of every field, flat."""
        return {item.name: getattr(getattr(self, name), item.name)
                for name in SECTIONS for item in dataclasses.fields(getattr(self, name))}

    def replace(self, **values):
        """This configuration with some values changed, checked afresh."""
        return Config.make(**{**self.values(), **values})

    @classmethod
    def from_flagfile_text(cls, text, **overrides):
        """The configuration a flagfile describes (lines --name=value, --flag, --noflag, as
        absl writes them); flags that are no field (absl's, the earlier port's) are ignored."""
        values = {}
        for name, raw in parse_flags_text(text).items():
            if name in FIELD_SECTIONS:
                values[name] = parse_value(name, raw)
        return cls.make(**{**values, **overrides})


FIELD_SECTIONS = {item.name: name for name, section in SECTIONS.items()
                  for item in dataclasses.fields(section)}
# Fields that define the network and the diffusion: a resumed run cannot change them.
FIXED_ON_RESUME = tuple(item.name for section in (ModelConfig, DiffusionConfig)
                        for item in dataclasses.fields(section))
ACTIONS = tuple(item.name for section in SECTIONS.values() for item in dataclasses.fields(section)
                if not item.metadata["saved"])


def is_multi(section, name):
    """A field given once per value (--ch_mult=1 --ch_mult=2), not as one comma list."""
    return field_types(section)[name] == tuple[int, ...]


MULTI_FLAGS = tuple(name for name, section in FIELD_SECTIONS.items() if is_multi(SECTIONS[section], name))


def parse_flags_text(text, known=()):
    """{flag: [values]} of flagfile lines: --name=value, and booleans --name ("true") and
    --noname ("false"), as absl writes them; a bare --noX whose whole name is in `known` is
    the flag noX itself."""
    values = {}
    for line in text.splitlines():
        if not line.startswith("--"):
            continue
        name, sep, value = line.strip()[2:].partition("=")
        if not sep:
            negated = name.startswith("no") and name not in known
            name, value = (name[2:], "false") if negated else (name, "true")
        values.setdefault(name, []).append(value)
    return values


def parse_value(name, raw):
    """A field's typed value from its flagfile strings (every occurrence, in order)."""
    kind = field_types(SECTIONS[FIELD_SECTIONS[name]])[name]
    last = raw[-1]
    try:
        if kind == tuple[int, ...]:
            return tuple(int(value) for value in raw)
        if kind == tuple[str, ...]:
            return tuple(last.split(",")) if last else ()
        if kind in (bool, Optional[bool]):
            require(last.lower() in ("true", "false", "1", "0"), f"--{name} takes true or false, got {last!r}")
            return last.lower() in ("true", "1")
        if kind is int:
            return int(last)
        if kind is float:
            return float(last)
    except ValueError:
        raise ConfigError(f"--{name}={last} is not a {kind.__name__}") from None
    return last


def flag_lines(name, value):
    """A field's flagfile lines, as absl serializes the flag."""
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no{name}"]
    if isinstance(value, tuple):
        if name in MULTI_FLAGS:
            return [f"--{name}={item}" for item in value]
        return [f"--{name}={','.join(value)}"]
    return [f"--{name}={value}"]


def flagfile_text(config):
    """The text of <logdir>/flagfile.txt: every saved field that has a value, in --help order."""
    lines = []
    for name, value in config.values().items():
        if name not in ACTIONS and value is not None:
            lines += flag_lines(name, value)
    return "".join(line + "\n" for line in lines)
