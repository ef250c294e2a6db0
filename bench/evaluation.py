"""Peak memory of --eval: does it grow with the number of samples times the image size?

    python -m bench.evaluation                      # 64x64 and 256x256, 64 and 256 samples each
    python -m bench.evaluation --sizes 64 --num_images 1024 4096

For each size, a random tiny UNet (5 levels, ch 32) is saved as a run in a temporary logdir,
and `main.py --eval` draws each --num_images count of samples with one DDIM step, scores them
with the offline digits features (no download), and its peak resident memory (VmHWM) is read
while it runs. A streamed evaluation's peak is set by one batch (--batch) and the features,
so it should not grow with the count; holding every sample, as an all-at-once evaluation
does, would add the float32 images' size, printed beside it.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURE = dict(ch=32, ch_mult=(1, 1, 1, 1, 1), attn=(4,), num_res_blocks=1, T=10)


def make_run(logdir, size):
    """A run folder with a random network of ARCHITECTURE at this image size."""
    sys.path.insert(0, ROOT)
    import checkpoint
    import files
    import logdir_files
    from builders import build_model
    from config import Config, flagfile_text
    run = Config.make(**ARCHITECTURE, img_size=size, img_channels=3, dataset="folder", fid_cache="",
                      logdir=logdir, layout="official")
    net = build_model(run.model, run.diffusion)
    os.makedirs(logdir)
    checkpoint.save(logdir_files.ckpt_path(logdir), {"ema_model": net.state_dict(), "net_model": net.state_dict(),
                                                      "step": 0, "layout": "official"})
    files.write_bytes(logdir_files.flagfile_path(logdir), flagfile_text(run).encode())


def peak_memory(command):
    """(peak resident memory in bytes, seconds) of a command, read from /proc while it runs."""
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
    if process.returncode:
        sys.exit(f"error: {' '.join(command)} failed: {process.stderr.read().decode()[-500:]}")
    return peak, time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--num_images", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    print(f"# bench/evaluation.py on CPU x{os.cpu_count()}, torch {torch.__version__}, batch {args.batch}, "
          "digits features\n")
    print("| image size | samples | peak memory of --eval | time | the samples as float32, if all were held |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            logdir = os.path.join(folder, f"run{size}")
            make_run(logdir, size)
            for count in args.num_images:
                peak, seconds = peak_memory([
                    sys.executable, "main.py", "--flagfile", os.path.join(logdir, "flagfile.txt"), "--eval",
                    "--num_images", str(count), "--eval_batch_size", str(args.batch), "--sampler", "ddim",
                    "--sample_steps", "1", "--fid_feature", "digits", "--device", "cpu"])
                held = count * 3 * size * size * 4
                print(f"| {size}x{size} | {count:,} | {peak / 2 ** 20:,.0f} MiB | {seconds:.0f} s | "
                      f"{held / 2 ** 20:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
