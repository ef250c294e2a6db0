"""FID and Inception Score, exact and offline-capable.

    evaluator = Evaluator("inception", "data/cifar-10-fid-cache/cifar10.train.npz", device)
    features, logits = evaluator.features(samples_in_0_1)    # this rank's share
    scores = evaluator.score(gather(features), gather(logits))  # {'IS', 'IS_std', 'FID'}

metrics.py: quantization, statistics, Frechet distance, Inception Score, gather.
inception.py: the FID Inception network.  digits.py: the offline digits classifier.
scorer.py: the Evaluator and image I/O.  fid_cache.py: the statistics CLI.
download.py: fetch the Inception weights once.
"""
import importlib

# Loaded on first use, so that `python -m score.fid_cache` can answer a stop signal with one
# line before torch loads (running a package's module imports the package first).
EXPORTS = {"Evaluator": "scorer", "default_feature": "scorer", "load_images": "scorer", "save_images": "scorer",
           "ScoreError": "metrics", "frechet_distance": "metrics", "gather": "metrics",
           "inception_score": "metrics", "load_statistics": "metrics", "quantize": "metrics",
           "save_statistics": "metrics", "statistics": "metrics"}
__all__ = sorted(EXPORTS)


def __getattr__(name):
    if name not in EXPORTS:
        raise AttributeError(f"module 'score' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{EXPORTS[name]}", __name__), name)
