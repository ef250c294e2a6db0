"""The cost of each metric of --metrics at the size of a published evaluation, on random features.

    python -m bench.metrics                      # 50,000 samples against 10,000 reference features
    python -m bench.metrics --samples 5000 --reference 5000

Features are random (the cost does not depend on their values) in the shapes the FID Inception
network gives: 2,048 pool3 features and 2,023 spatial ones per image. What is timed is what
--eval does once the samples' features are in hand: FID (statistics of the samples, Frechet
distance), pr (precision, recall, density, coverage), kid (100 subsets of 1,000), sfid (the
spatial features summed batch by batch as the store gives them, Frechet distance). Peak
memory is the process's, read from the kernel after each metric.
"""
import argparse
import resource
import time

import torch

from score.distribution import kernel_inception_distance, precision_recall_density_coverage
from score.inception import POOL_DIM, SPATIAL_DIM
from score.metrics import Moments, frechet_distance, statistics


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(name, work):
    started = time.perf_counter()
    work()
    print(f"| {name} | {time.perf_counter() - started:.1f} s | {peak_gb():.2f} GB |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--reference", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=256, help="samples per stored batch (sFID)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    fake = torch.rand(args.samples, POOL_DIM, generator=generator, dtype=torch.float64).to(args.device)
    real = torch.rand(args.reference, POOL_DIM, generator=generator, dtype=torch.float64).to(args.device)
    reference = statistics(real)
    reference_spatial = (torch.full((SPATIAL_DIM,), 0.5, dtype=torch.float64, device=args.device),
                         torch.eye(SPATIAL_DIM, dtype=torch.float64, device=args.device) / 12)
    print(f"{args.samples:,} samples, {args.reference:,} reference features, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| metric | time | peak memory so far |\n|---|---|---|")
    timed("fid", lambda: frechet_distance(*statistics(fake), *reference))
    timed("pr", lambda: precision_recall_density_coverage(real, fake))
    timed("kid", lambda: kernel_inception_distance(real, fake))

    def sfid():
        moments = Moments(reference_spatial[0])
        for start in range(0, args.samples, args.batch):  # as the store's batches arrive
            size = min(args.batch, args.samples - start)
            moments.add(torch.rand(size, SPATIAL_DIM, generator=generator).to(args.device))
        frechet_distance(*moments.statistics(), *reference_spatial)
    timed("sfid", sfid)


if __name__ == "__main__":
    main()
