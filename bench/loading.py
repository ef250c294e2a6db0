"""Images per second that the training loader delivers, on this machine's CPU: image files,
an LSUN lmdb and CIFAR10, at 32, 64 and 256 pixels, with 0, 1 and 2 loader workers.

    python -m bench.loading                    # the table for BENCHMARKS.md
    python -m bench.loading --seconds 1        # a quicker look

The data are made in a temporary folder: LSUN-like JPEGs (341x256, quality 75: LSUN's images
have a short side of 256) as files and as an LSUN-format lmdb, and CIFAR10's python-pickle
batches of random 32x32 images. Each measurement runs batches.loader_batches, the training
loop's own loader (data order from GlobalBatchSampler), and counts the images it delivers
after the first batch (worker start-up). The files are in the page cache: this measures
decoding and resizing, not the disk. The main process runs one torch thread, as the workers
do: with 0 workers its per-image float conversion is too small to share, and on a busy
machine two OpenMP threads spin against each other.
"""
import argparse
import io
import os
import pickle
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import cifar

import datasets
from batches import GlobalBatchSampler, loader_batches

SIZES = (32, 64, 256)
WORKERS = (0, 1, 2)


def lsun_like_jpegs(count, seed=0):
    """JPEG bytes of smooth random pictures, 341x256 like LSUN's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:341].astype(np.float32)
    for _ in range(count):
        a, b, c = rng.uniform(5, 40, 3)
        picture = np.stack([np.sin(x / a), np.cos(y / b), np.sin((x + y) / c)], -1) * 120 + 128
        buffer = io.BytesIO()
        Image.fromarray(picture.astype(np.uint8)).save(buffer, "JPEG", quality=75)
        yield buffer.getvalue()


def make_data(root, count):
    """{kind: (dataset name, data_root)} for folder, lmdb and cifar10 under root."""
    import lmdb
    jpegs = list(lsun_like_jpegs(count))
    folder = os.path.join(root, "folder")
    os.makedirs(folder)
    for index, content in enumerate(jpegs):
        with open(os.path.join(folder, f"{index:05d}.jpg"), "wb") as file:
            file.write(content)
    lsun = os.path.join(root, "lsun")
    os.makedirs(lsun)
    with lmdb.open(os.path.join(lsun, "church_outdoor_train_lmdb"), map_size=1 << 30) as env:
        with env.begin(write=True) as txn:
            for index, content in enumerate(jpegs):
                txn.put(f"{index:040x}".encode(), content)
    batches = os.path.join(root, "cifar", "cifar-10-batches-py")
    os.makedirs(batches)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(batches, name), "wb") as file:
            pickle.dump({"data": rng.integers(0, 256, (2000, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 2000).tolist()}, file)
    with open(os.path.join(batches, "batches.meta"), "wb") as file:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, file)
    # torchvision checks CIFAR10's files against the real ones' checksums
    cifar.check_integrity = lambda *args, **kwargs: True
    return {"image files (JPEG)": ("folder", folder), "LSUN lmdb (JPEG)": ("lsun_church", lsun),
            "CIFAR10 (pickled arrays)": ("cifar10", os.path.join(root, "cifar"))}


def loader_speed(dataset, workers, batch_size, seconds):
    """(images per second, CPU milliseconds of this process per image). With 0 workers this
    process does all the work, so the second is the cost of one image on one core, which the
    machine's other load does not change."""
    order = GlobalBatchSampler(len(dataset), batch_size, 1, 0, 1, seed=0, start=0)
    batches = loader_batches(dataset, order, workers, 0, torch.device("cpu"))
    next(batches)  # worker start-up
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)[0])
    rate = count / (time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu_start) * 1000 / count
    batches.close()  # ends the workers
    return rate, cpu_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512, help="images in each dataset")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured per cell")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        kinds = make_data(root, args.images)
        print(f"# bench/loading.py on CPU x{os.cpu_count()}, torch {torch.__version__}, batch "
              f"{args.batch_size}, {args.seconds:g} s per cell, load average "
              f"{os.getloadavg()[0]:.1f} at the start\n")
        print("| data | size | CPU per image | " +
              " | ".join(f"{w} worker{'s' * (w != 1)}" for w in WORKERS) + " |")
        print("|---|---|---|" + "---|" * len(WORKERS))
        for kind, (name, data_root) in kinds.items():
            for size in SIZES:
                dataset = datasets.build_dataset(name, data_root, size, flip=False)
                speeds = [loader_speed(dataset, workers, args.batch_size, args.seconds)
                          for workers in WORKERS]
                print(f"| {kind} | {size} | {speeds[0][1]:.2f} ms | " +
                      " | ".join(f"{rate:,.0f} img/s" for rate, _ in speeds) + " |", flush=True)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
