"""Write the reference of a dataset to an .npz: the FID statistics (mu, sigma), the
spatial statistics of sFID (mu_s, sigma_s) and the features of a seeded random subset of the
data (features, features_seed, features_of), which precision/recall and KID compare against.

    python -m score.fid_cache --dataset cifar10 --output data/cifar-10-fid-cache/cifar10.train.npz
    python -m score.fid_cache --dataset folder --data_root DIR --img_size 256 --output stats.npz
    python -m score.fid_cache --dataset digits --output data/digits.train.npz

The images go through exactly the scoring path of samples (8-bit rounding, resize to 299,
FID Inception), without random flips; mu and sigma are what pytorch_gan_metrics reads, and
mu_s, sigma_s are named as in guided-diffusion's reference batches. --reference_features K
(default 10,000, guided-diffusion's reference batch; 0: none) keeps the features of the
images at torch.randperm(N, generator seeded with --seed)[:K], in that order (float32: 80 MB
for 10,000 Inception features); the whole dataset when it has K or fewer.
"""
import argparse
import sys

import signals

if __name__ == "__main__":  # a stop while the modules load, or later: one line, not a traceback
    signals.exit_at_once()

import torch
from tqdm import tqdm

import datasets
from .scorer import FEATURES, Evaluator, default_feature
from .metrics import Moments, ScoreError, save_statistics, statistics
from .digits import CLASSIFIER


def dataset_reference(dataset, data_root, img_size, evaluator, num_workers=2, num_features=10000, seed=0):
    """{mu, sigma, mu_s, sigma_s} of the evaluator's features and spatial features over a
    datasets.py dataset's training split, and with num_features > 0 {features, features_seed,
    features_of}: the features of its images at torch.randperm(N, seeded)[:num_features].
    The spatial features are summed batch by batch (Moments), never held."""
    img_size = img_size or datasets.DATASETS[dataset][2]
    if img_size is None:
        raise ScoreError(f"--dataset {dataset} has no native size: pass --img_size")
    images = datasets.build_dataset(dataset, data_root, img_size, train=True, flip=False)
    loader = torch.utils.data.DataLoader(images, batch_size=evaluator.batch_size,
                                         num_workers=num_workers)
    features, moments = [], None
    try:
        for x, _ in tqdm(loader, desc=f"{dataset} features", unit="batch"):
            pool, _, spatial = evaluator.run((x + 1) / 2, spatial=True)
            moments = moments or Moments(spatial.mean(0))
            moments.add(spatial)
            features.append(pool)
    except datasets.DatasetError as error:  # an unreadable image, maybe met by a loader worker
        raise datasets.worker_error(error) from None
    features = torch.cat(features)
    mu, sigma = statistics(features)
    mu_s, sigma_s = moments.statistics()
    reference = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if num_features > 0:
        chosen = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:num_features]
        reference.update(features=features[chosen.to(features.device)].float(), features_seed=seed,
                         features_of=len(features))
    return reference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=list(datasets.DATASETS))
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--data_root", default="./data",
                        help="dataset location (the image folder for --dataset folder)")
    parser.add_argument("--img_size", type=int, default=None,
                        help="resize to this size (default: the dataset's native size)")
    parser.add_argument("--feature", default=None, choices=FEATURES,
                        help="feature network (default: digits for --dataset digits, else inception; "
                             "as main.py scores it)")
    parser.add_argument("--inception_weights", default=None,
                        help="path to pt_inception-2015-12-05-6726825d.pth "
                             "(default: $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--digits_classifier", default=CLASSIFIER,
                        help="digits classifier cache, trained if missing")
    parser.add_argument("--reference_features", type=int, default=10000,
                        help="keep the features of this many images, a seeded random subset, for "
                             "precision/recall and KID (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that subset")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.reference_features < 0 or args.seed < 0:
        parser.error("--reference_features and --seed must be >= 0")
    try:
        evaluator = Evaluator(args.feature or default_feature(args.dataset), None, args.device, args.inception_weights,
                              batch_size=args.batch_size, digits_classifier=args.digits_classifier)
        reference = dataset_reference(args.dataset, args.data_root, args.img_size, evaluator,
                                      args.num_workers, args.reference_features, args.seed)
    except (ScoreError, datasets.DatasetError) as error:
        sys.exit(f"error: {error}")
    save_statistics(args.output, **reference)
    kept = (f", and the features of {len(reference['features']):,} of its {reference['features_of']:,} images "
            f"(seed {args.seed})" if "features" in reference else "")
    print(f"wrote {args.output}: statistics of {len(reference['mu'])} features and of "
          f"{len(reference['mu_s'])} spatial features of {args.dataset}{kept}")


if __name__ == "__main__":
    main()
