#!/usr/bin/env python
"""Probe a checkpoint: `python evaluate.py --checkpoint runs/split_cifar10 --knn` (see --help).

The program lives in streaming_ssl/cli/evaluate.py (installed as the console script streaming-ssl-evaluate).
"""

from streaming_ssl.cli.evaluate import entry

if __name__ == "__main__":
    entry()
