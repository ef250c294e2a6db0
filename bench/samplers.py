"""Sample quality against network evaluations: FID of each sampler at 10, 20, 50, 100 steps.

    python -m bench.samplers --logdir ./ckpt/digits                    # the demo (digits FID)
    python -m bench.samplers --logdir ./ckpt/digits --steps 10 20 --skip_types uniform quadratic logsnr
    python -m bench.samplers --logdir ./ckpt/cifar10 --num_images 10000 --device cuda \\
        --samplers ddpm ddim dpm_solver++ sde_dpm_solver++ --steps 10 20 50 100   # a trained CIFAR10 run

Each run folder's flagfile.txt and the EMA weights of its ckpt.pt are used as `main.py --eval`
uses them: the same feature network and statistics (digits: the offline classifier; otherwise
Inception and --fid_cache), the same noise for the same --seed. For every sampler spec, skip
type, step count and seed, --num_images samples are drawn and scored, and the seconds spent
sampling (not scoring) are divided by the number of samples. Finished rows go to --out (JSON
lines) as they come, so a stopped run continues where it was; the table (mean and spread over
the seeds) is printed at the end.

A sampler spec is a --sampler name with options after colons: `ddim:from_x0` (DDIM's eps
re-derived from the clipped x0_hat; plain `ddim` keeps the network's), `dpm_solver++:3` (order
3; the sampler's default order without one), `heun:churn=10` (a sampling flag and its value).
"""
import argparse
import importlib
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import evaluate  # noqa: E402
import logdir_files  # noqa: E402
import speed  # noqa: E402
from builders import build_sampler  # noqa: E402
from config import Config  # noqa: E402
from files import read_text  # noqa: E402

DEFAULT_SAMPLERS = ["ddpm", "ddim", "ddim:from_x0", "dpm_solver++", "dpm_solver++:3", "sde_dpm_solver++",
                    "dpm_solver", "unipc"]


def spec_options(spec):
    """{--sampler and its options} of a spec such as dpm_solver++:3, ddim:from_x0 or
    heun:churn=10."""
    name, *options = spec.split(":")
    values = {"sampler": name, "solver_order": 0, "ddim_eps": "network"}
    for option in options:
        if option.isdigit():
            values["solver_order"] = int(option)
        elif "=" in option:
            flag, value = option.split("=")
            values[flag] = float(value)
        else:
            values["ddim_eps"] = option
    return values


def timed_batches(config, sampler, net, device):
    """(images, seconds spent drawing them) for each batch of config.eval.num_images samples,
    drawn as --eval draws them; the time the caller spends on a batch is not counted."""
    started = time.perf_counter()
    for _, images in evaluate.sample_batches(config, sampler, net, config.eval.num_images, device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield images, time.perf_counter() - started
        started = time.perf_counter()


def k_diffusion_sampling():
    """(k_diffusion.sampling, k_diffusion.external), imported without the package's __init__,
    which imports every submodule and their dependencies (kornia, CLIP, ...): k-diffusion is
    installed without them (requirements-nodeps.txt). ImportError when it is not installed."""
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise ImportError("k-diffusion is not installed: pip install --no-deps -r requirements-nodeps.txt")
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")


# k-diffusion's samplers as reference rows (spec "k:NAME"): the function, and its steps for
# a number of network evaluations
K_SAMPLERS = {"heun": ("sample_heun", lambda evaluations: (evaluations + 1) // 2),
              "euler_ancestral": ("sample_euler_ancestral", lambda evaluations: evaluations),
              "dpmpp_2m": ("sample_dpmpp_2m", lambda evaluations: evaluations),
              "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", lambda evaluations: evaluations)}


class KDiffusionSampler:
    """k-diffusion's sampler NAME driving an eps network as `evaluate.sample_batches` drives
    ours: from the same x_T (times sigma_max), on get_sigmas_karras of the chain's own sigma
    range, the network asked through its DiscreteEpsDDPMDenoiser(quantize=True) with D clipped
    to [-1, 1] as --clip_denoised clips x0_hat; the stochastic ones' noise from the batch's
    generator."""

    def __init__(self, name, evaluations, alphas_bar, device):
        self.sampling, self.external = k_diffusion_sampling()
        function, steps_for = K_SAMPLERS[name]
        self.function, self.steps, self.alphas_bar = getattr(self.sampling, function), steps_for(evaluations), alphas_bar
        self.evaluations = 2 * self.steps - 1 if name == "heun" else self.steps
        self.device = device

    def __call__(self, net, x_T, generator=None, labels=None):
        denoiser = self.external.DiscreteEpsDDPMDenoiser(net, self.alphas_bar.to(self.device, torch.float32),
                                                         quantize=True)
        sigmas = self.sampling.get_sigmas_karras(self.steps, denoiser.sigma_min.item(), denoiser.sigma_max.item(),
                                                 device=self.device)
        options = {}
        if "noise_sampler" in inspect.signature(self.function).parameters:
            options["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x_T.shape, generator=generator,
                                                                             device=x_T.device)
        x = self.function(lambda x, sigma: denoiser(x, sigma).clamp(-1.0, 1.0), x_T * sigmas[0], sigmas,
                          disable=True, **options)
        return x.clamp(-1.0, 1.0)


def measure(config, net, evaluator, device, sampler=None):
    """(FID, seconds of sampling per sample, evaluations, spacing) of config's sampler, or of
    the KDiffusionSampler given, on config.eval.num_images samples."""
    reference = sampler
    sampler = reference or build_sampler(config.sampling, config.diffusion, config.model.num_classes).to(device)
    features, logits, sampling_seconds = [], [], 0.0
    for images, seconds in timed_batches(config, sampler, net, device):
        sampling_seconds += seconds
        feature, logit = evaluator.features(images)
        features.append(feature)
        logits.append(logit)
    scores = evaluator.score(torch.cat(features), torch.cat(logits))
    if reference:
        return scores["FID"], sampling_seconds / config.eval.num_images, reference.evaluations, "karras (continuous)"
    return scores["FID"], sampling_seconds / config.eval.num_images, sampler.step.evaluations(), sampler.skip_type


def table(rows, seeds):
    """Markdown: one line per (sampler, skip type), one column per step count."""
    steps = sorted({row["steps"] for row in rows})
    groups = {}
    for row in rows:
        groups.setdefault((row["spec"], row["skip_type"]), {}).setdefault(row["steps"], []).append(row)
    lines = [f"| sampler | spacing | {' | '.join(str(s) for s in steps)} | ms/sample at each |",
             "|---|---|" + "---|" * len(steps) + "---|"]
    for (spec, skip), by_steps in groups.items():
        cells, times = [], []
        for count in steps:
            runs = by_steps.get(count, [])
            fids = [run["fid"] for run in runs]
            if not fids:
                cells.append("")
                continue
            spread = f" ± {statistics.stdev(fids):.2f}" if len(fids) > 1 else ""
            cells.append(f"{statistics.mean(fids):.2f}{spread}" + ("" if len(fids) == len(seeds) else f" ({len(fids)} seed{'s' * (len(fids) > 1)})"))
            times.append(f"{1000 * statistics.mean(run['seconds_per_sample'] for run in runs):.2f}")
        lines.append(f"| {spec} | {skip} | {' | '.join(cells)} | {' / '.join(times)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", required=True, help="a run folder with flagfile.txt and ckpt.pt")
    parser.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS, help="sampler specs (see above)")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50, 100])
    parser.add_argument("--skip_types", nargs="+", default=["auto"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500, help="samples per sampling batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON lines of finished rows (default: <logdir>/samplers.jsonl)")
    args = parser.parse_args()
    out = args.out or os.path.join(args.logdir, "samplers.jsonl")
    device = torch.device(args.device)
    base = Config.from_flagfile_text(read_text(logdir_files.flagfile_path(args.logdir)), logdir=args.logdir,
                                     num_images=args.num_images, eval_batch_size=args.batch,
                                     metrics=("fid", "is"))  # what it tabulates
    ema, step, ckpt_sha256 = checkpoint.load_ema(base, device)
    # the fast path as --eval takes it (on a GPU: the device's precision, compiled; on the CPU:
    # fp32 eager), so that every sampler, k-diffusion's too, drives the same network
    fast = speed.resolve(base.fast, device.type)
    net = speed.wrap(speed.to_layout(ema, fast), fast)
    evaluator = evaluate.make_evaluator(base, device)
    done = []
    if os.path.exists(out):
        with open(out) as file:
            done = [json.loads(line) for line in file if line.strip()]
    done = [row for row in done if row["checkpoint"] == ckpt_sha256 and row["num_images"] == args.num_images]
    finished = {(row["spec"], row["skip_asked"], row["steps_asked"], row["seed"]) for row in done}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"# bench/samplers.py on {name}, torch {torch.__version__}: {args.logdir} (step {step}, "
          f"ckpt {ckpt_sha256}), {args.num_images} samples, {evaluator.feature} FID, seeds {args.seeds}, "
          f"{speed.choice_words(fast, base.fast.precision, device.type)}",
          file=sys.stderr)
    for spec in args.samplers:
        for skip in args.skip_types:
            for count in args.steps:
                for seed in args.seeds:
                    if (spec, skip, count, seed) in finished:
                        continue
                    if spec.startswith("k:"):  # k-diffusion's own sampler: its karras sigmas, skip ignored
                        config = base.replace(sample_steps=count, seed=seed)
                        alphas_bar = torch.cumprod(1 - torch.as_tensor(base.diffusion.betas(), dtype=torch.float64), 0)
                        reference = KDiffusionSampler(spec[2:], count, alphas_bar, device)
                        fid, seconds, evaluations, resolved = measure(config, net, evaluator, device, reference)
                    else:
                        config = base.replace(**spec_options(spec), skip_type=skip, sample_steps=count, seed=seed)
                        fid, seconds, evaluations, resolved = measure(config, net, evaluator, device)
                    row = {"spec": spec, "skip_asked": skip, "skip_type": resolved, "steps_asked": count,
                           "steps": evaluations, "seed": seed, "fid": fid, "seconds_per_sample": seconds,
                           "checkpoint": ckpt_sha256, "num_images": args.num_images, "device": name,
                           "torch": torch.__version__, "precision": fast.precision}
                    print(f"{spec} {resolved} {evaluations} seed {seed}: FID {fid:.3f}, "
                          f"{1000 * seconds:.2f} ms/sample", file=sys.stderr, flush=True)
                    with open(out, "a") as file:
                        file.write(json.dumps(row) + "\n")
                    done.append(row)
    asked = [row for row in done if row["spec"] in args.samplers and row["skip_asked"] in args.skip_types
             and row["steps_asked"] in args.steps and row["seed"] in args.seeds]
    print(table(asked, args.seeds))


if __name__ == "__main__":
    main()
