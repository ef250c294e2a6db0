"""FID and Inception Score, exact and offline-capable.

    evaluator = Evaluator("inception", "data/cifar-10-fid-cache/cifar10.train.npz", device)
    features, logits = evaluator.features(samples_in_0_1)    # this rank's share
    scores = evaluator.score(gather(features), gather(logits))  # {'IS', 'IS_std', 'FID'}

metrics.py: quantization, statistics, Frechet distance, Inception Score, gather.
inception.py: the FID Inception network.  digits.py: the offline digits classifier.
scorer.py: the Evaluator and image I/O.  fid_cache.py: the statistics CLI.
download.py: fetch the Inception weights once.
"""
from .scorer import Evaluator, default_feature, load_images, save_images
from .metrics import (ScoreError, frechet_distance, gather, inception_score, load_statistics,
                      quantize, save_statistics, statistics)

__all__ = ["Evaluator", "ScoreError", "default_feature", "frechet_distance", "gather", "inception_score",
           "load_images", "load_statistics", "quantize", "save_images", "save_statistics",
           "statistics"]
