#!/usr/bin/env python
"""Train EMP-SSL on a stream: `python run_stream.py --config configs/split_cifar10.yaml` (see --help).

The program lives in streaming_ssl/cli/train.py (installed as the console script streaming-ssl-train).
"""

from streaming_ssl.cli.train import entry

if __name__ == "__main__":
    entry()
