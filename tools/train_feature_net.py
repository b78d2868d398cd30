"""Train the offline feature network for FID/KID when the Inception weights are unavailable.

    python tools/train_feature_net.py --data /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \\
        --format idx --test-data /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \\
        --out featnet-fmnist.pt [--epochs 2] [--batch 128] [--limit N] [--seed 0]

The same as ``ctmkit feature-net`` (plugins/metrics/command.py, which says what the file holds).
"""

from __future__ import annotations

import sys

import _common
from plugins.metrics.command import feature_net_main


def main(argv=None) -> int:
    return feature_net_main(sys.argv[1:] if argv is None else list(argv),
                            prog="python tools/train_feature_net.py",
                            command=_common.command_line())


if __name__ == "__main__":
    sys.exit(main())
