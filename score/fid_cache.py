"""Write the FID reference statistics (mu, sigma) of a dataset to an .npz.

    python -m score.fid_cache --dataset cifar10 --output data/cifar-10-fid-cache/cifar10.train.npz
    python -m score.fid_cache --dataset folder --data_root DIR --img_size 256 --output stats.npz
    python -m score.fid_cache --dataset digits --output data/digits.train.npz

The images go through exactly the scoring path of samples (8-bit rounding, resize to 299,
FID Inception), without random flips; the output is the format pytorch_gan_metrics reads.
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
from .metrics import ScoreError, save_statistics, statistics
from .digits import CLASSIFIER


def dataset_statistics(dataset, data_root, img_size, evaluator, num_workers=2):
    """(mu, sigma) of the evaluator's features over a datasets.py dataset's training split."""
    img_size = img_size or datasets.DATASETS[dataset][2]
    if img_size is None:
        raise ScoreError(f"--dataset {dataset} has no native size: pass --img_size")
    images = datasets.build_dataset(dataset, data_root, img_size, train=True, flip=False)
    loader = torch.utils.data.DataLoader(images, batch_size=evaluator.batch_size,
                                         num_workers=num_workers)
    batches = ((x + 1) / 2 for x, _ in tqdm(loader, desc=f"{dataset} features", unit="batch"))
    try:
        return statistics(evaluator.features(batches)[0])
    except datasets.DatasetError as error:  # an unreadable image, maybe met by a loader worker
        raise datasets.worker_error(error) from None


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
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        evaluator = Evaluator(args.feature or default_feature(args.dataset), None, args.device, args.inception_weights,
                              batch_size=args.batch_size, digits_classifier=args.digits_classifier)
        mu, sigma = dataset_statistics(args.dataset, args.data_root, args.img_size, evaluator,
                                       args.num_workers)
    except (ScoreError, datasets.DatasetError) as error:
        sys.exit(f"error: {error}")
    save_statistics(args.output, mu, sigma)
    print(f"wrote {args.output}: {len(mu)} features of {args.dataset}")


if __name__ == "__main__":
    main()
