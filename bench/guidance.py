"""The guidance trade-off of a class-conditional model: FID, IS and label accuracy against the
classifier-free guidance scale w.

    python -m bench.guidance --logdir ./ckpt/digits_cond                  # the conditional demo
    python -m bench.guidance --logdir ./ckpt/digits_cond --scales 0 1 2 --seeds 0 --out docs

The run folder's flagfile.txt and the EMA weights of its ckpt.pt are used as `main.py --eval`
uses them (its sampler, feature network and statistics), with --guidance_scale w and --seed s
for every w of --scales and s of --seeds: --num_images class-balanced samples each, scored, and
the seconds spent sampling divided by the samples. Label accuracy is the share of samples the
feature network classifies as the class they were drawn for (the digits classifier's classes
are the digits; other feature networks give none). Finished rows go to <logdir>/guidance.jsonl
as they come, so a stopped run continues where it was. At the end: the table (mean and spread
over the seeds), a plot of FID against label accuracy with each w marked (guidance_curve.png),
and the grids of seed 0 at w = 1 and at the best w (the lowest FID among the scales whose
accuracy reaches --accuracy_goal, else the most accurate): a row per class, written to --out.
"""
import argparse
import json
import math
import os
import statistics
import sys

import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
import logdir_files  # noqa: E402
from bench.samplers import timed_batches  # noqa: E402
from builders import build_sampler  # noqa: E402
from config import Config  # noqa: E402
from reports import grid  # noqa: E402

ERROR_FLOOR = 1e-3


def measure(config, net, evaluator, device):
    """{FID, IS, label_accuracy, seconds_per_sample} of config's guided sampler, and the first
    samples as a grid with a row per class."""
    sampler = build_sampler(config.sampling, config.diffusion, config.model.num_classes).to(device)
    features, logits, first, seconds = [], [], [], 0.0
    for images, batch_seconds in timed_batches(config, sampler, net, device):
        seconds += batch_seconds
        feature, logit = evaluator.features(images)
        features.append(feature)
        logits.append(logit)
        first.append(images[:evaluate.GRID_IMAGES - sum(map(len, first))])
    logits = torch.cat(logits)
    scores = evaluator.score(torch.cat(features), logits)
    scores.update(evaluate.label_accuracy(config, evaluator, logits,
                                          evaluate.sample_labels(config, 0, config.eval.num_images)))
    images, per_row = evaluate.by_class(config, torch.cat(first) * 2 - 1)
    return {"fid": scores["FID"], "is": scores["IS"], "accuracy": scores.get("label_accuracy"),
            "seconds_per_sample": seconds / config.eval.num_images}, grid(images, per_row)


def summary(rows, scales):
    """{w: {quantity: (mean, spread over the seeds)}} of the rows."""
    out = {}
    for w in scales:
        runs = [row for row in rows if row["guidance_scale"] == w]
        if runs:
            out[w] = {name: (statistics.mean(run[name] for run in runs),
                             statistics.stdev(run[name] for run in runs) if len(runs) > 1 else 0.0, len(runs))
                      for name in ("fid", "is", "accuracy", "seconds_per_sample") if runs[0][name] is not None}
    return out


def table(means):
    lines = ["| w | FID | IS | label accuracy | ms/sample |", "|---|---|---|---|---|"]
    for w, row in means.items():
        cells = [f"{row[name][0]:.{digits}f} ± {row[name][1]:.{digits}f}" if name in row else "-"
                 for name, digits in (("fid", 2), ("is", 2), ("accuracy", 3))]
        lines.append(f"| {w:g} | {' | '.join(cells)} | {1000 * row['seconds_per_sample'][0]:.2f} |")
    return "\n".join(lines)


def best_scale(means, goal):
    """The lowest mean FID among the scales whose mean accuracy reaches goal, else the most accurate."""
    reaching = [w for w, row in means.items() if row["accuracy"][0] >= goal]
    if reaching:
        return min(reaching, key=lambda w: means[w]["fid"][0])
    return max(means, key=lambda w: means[w]["accuracy"][0])


def plot(means, path, reference=None, goal=None, width=640, height=440, margin=60):
    """FID (y) against label accuracy (x), one point per w with its spread over the seeds as a
    bar; reference: a dashed line at an FID to compare with (the unconditional model's); goal:
    one at the label accuracy asked for. Both axes are logarithmic: FID, and the label error
    1 - accuracy (down to ERROR_FLOOR, where 1 of 1,000 samples is wrong), so that the scales
    near accuracy 1 are told apart."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = margin, margin // 2, width - 2 * margin, height - margin
    fids = [row["fid"][0] + s * row["fid"][1] for row in means.values() for s in (-1, 1)] + ([reference] if reference else [])
    y_low, y_high = math.log10(max(1.0, 0.8 * min(fids))), math.log10(1.2 * max(fids))
    x_low, x_high = 0.0, -math.log10(ERROR_FLOOR)  # -log10 of the label error: 0 at accuracy 0

    def at(accuracy, fid):
        x = -math.log10(max(ERROR_FLOOR, 1 - accuracy))
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (math.log10(fid) - y_low) / (y_high - y_low) * (bottom - top))
    draw.rectangle((left, top, right, bottom), outline="black")
    for accuracy in (0.0, 0.9, 0.99, 0.999):
        x, _ = at(accuracy, 10 ** y_low)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 12, bottom + 6), f"{accuracy:g}", fill="black")
    for fid in (1, 2, 5, 10, 20, 50, 100, 200):
        if y_low <= math.log10(fid) <= y_high:
            _, y = at(0.0, fid)
            draw.line([(left - 4, y), (left, y)], fill="black")
            draw.text((left - 28, y - 6), f"{fid}", fill="black")
    if reference:
        _, y = at(0.0, reference)
        for x in range(left, right, 8):
            draw.line([(x, y), (min(x + 4, right), y)], fill="gray")
        draw.text((left + 4, y + 2), f"unconditional demo: FID {reference:g}", fill="gray")
    if goal:
        x, _ = at(goal, 10 ** y_low)
        for y in range(top, bottom, 8):
            draw.line([(x, y), (x, min(y + 4, bottom))], fill="gray")
        draw.text((x + 4, top + 4), f"accuracy {goal:g}", fill="gray")
    for w, row in means.items():
        x, y = at(row["accuracy"][0], row["fid"][0])
        _, y_top = at(0.0, row["fid"][0] + row["fid"][1])
        _, y_bottom = at(0.0, max(10 ** y_low, row["fid"][0] - row["fid"][1]))
        draw.line([(x, y_top), (x, y_bottom)], fill="blue")
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="blue")
        draw.text((x + 6, y - 6), f"w={w:g}", fill="black")
    draw.text((4, top - 20), "FID (log)", fill="black")
    draw.text((left, height - 34), "label accuracy (log of the error 1 - accuracy)", fill="black")
    draw.text((left, height - 18), "mean and spread over the sampling seeds", fill="black")
    files.save_image(image, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", required=True, help="a class-conditional run folder with flagfile.txt and ckpt.pt")
    parser.add_argument("--scales", nargs="+", type=float, default=[0, 1, 1.5, 2, 3, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--accuracy_goal", type=float, default=0.97)
    parser.add_argument("--reference_fid", type=float, default=None, help="an FID to draw as a line (unconditional)")
    parser.add_argument("--out", default=None, help="folder of the plot and grids (default: the logdir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, out = torch.device(args.device), args.out or args.logdir
    base = Config.from_flagfile_text(files.read_text(logdir_files.flagfile_path(args.logdir)), logdir=args.logdir,
                                     num_images=args.num_images, metrics=("fid", "is"))  # what it tabulates
    if not base.model.num_classes:
        sys.exit(f"error: {args.logdir} is not a class-conditional run (--num_classes 0)")
    ema, step, ckpt_sha256 = checkpoint.load_ema(base, device)
    evaluator = evaluate.make_evaluator(base, device)
    rows_path = os.path.join(args.logdir, "guidance.jsonl")
    done = []
    if os.path.exists(rows_path):
        with open(rows_path) as file:
            done = [json.loads(line) for line in file if line.strip()]
    done = [row for row in done if row["checkpoint"] == ckpt_sha256 and row["num_images"] == args.num_images]
    print(f"# bench/guidance.py, torch {torch.__version__}: {args.logdir} (step {step}, ckpt {ckpt_sha256}), "
          f"{base.sampling.sampler} with {base.sampling.sample_steps} evaluations per branch, "
          f"{args.num_images} samples, seeds {args.seeds}")
    os.makedirs(out, exist_ok=True)
    grids = {}
    for w in args.scales:
        for seed in args.seeds:
            known = any(row["guidance_scale"] == w and row["seed"] == seed for row in done)
            if known and seed != args.seeds[0]:  # the first seed is drawn again for its grid
                continue
            row, picture = measure(base.replace(guidance_scale=w, seed=seed), ema, evaluator, device)
            if seed == args.seeds[0]:
                grids[w] = picture
            if known:
                continue
            row.update(guidance_scale=w, seed=seed, checkpoint=ckpt_sha256, num_images=args.num_images)
            done.append(row)
            files.append_line(rows_path, json.dumps(row))
            print(f"w {w:g} seed {seed}: FID {row['fid']:.2f}, IS {row['is']:.2f}, accuracy {row['accuracy']}",
                  flush=True)
    means = summary(done, args.scales)
    print(table(means))
    plot(means, os.path.join(out, "guidance_curve.png"), args.reference_fid, args.accuracy_goal)
    best = best_scale(means, args.accuracy_goal)
    for name, w in (("guidance_w1.png", 1.0), ("guidance_best.png", best)):
        if w in grids:
            files.save_png(grids[w], os.path.join(out, name))
    print(f"best w {best:g} (accuracy goal {args.accuracy_goal}); wrote guidance_curve.png, guidance_w1.png, "
          f"guidance_best.png under {out}")


if __name__ == "__main__":
    main()
