"""Download the FID Inception weights, once, with a connection; runs never download.

    python -m score.download                   # into $TORCH_HOME/hub/checkpoints/, where runs look
    python -m score.download --output PATH     # elsewhere; then pass --inception_weights PATH
"""
import argparse
import hashlib
import os
import sys

import torch

from . import inception
from .metrics import ScoreError


def download(path):
    """Fetch the weights to path and return their sha256. They are written under a temporary
    name and renamed only once they load into the network, so a truncated or wrong download
    never sits where runs look."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".download"
    try:
        torch.hub.download_url_to_file(inception.FID_WEIGHTS_URL, temporary, progress=True)
        inception.FIDInception(temporary)  # ScoreError for a file that is not these weights
        with open(temporary, "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return digest


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download the FID Inception weights "
                                     f"{inception.WEIGHTS_FILE} from {inception.FID_WEIGHTS_URL}.")
    parser.add_argument("--output", default=inception.hub_weights_path(),
                        help="where to write them (default: the torch hub cache, where runs look)")
    args = parser.parse_args(argv)
    if os.path.isfile(args.output):
        print(f"{args.output} is already there")
        return
    try:
        digest = download(args.output)
    except (OSError, ScoreError) as error:
        sys.exit(f"error: could not download {inception.FID_WEIGHTS_URL} to {args.output}: {error}")
    print(f"wrote {args.output} (sha256 {digest})")


if __name__ == "__main__":
    main()
