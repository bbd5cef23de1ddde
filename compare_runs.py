#!/usr/bin/env python
"""Compare finished runs: `python compare_runs.py runs/a runs/b runs/a@seed1 --out runs/cmp` (see --help).

The program lives in streaming_ssl/cli/compare.py (installed as the console script streaming-ssl-compare).
"""

from streaming_ssl.cli.compare import entry

if __name__ == "__main__":
    entry()
