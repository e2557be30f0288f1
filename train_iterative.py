#!/usr/bin/env python
"""Entry point for the guide's command lines: `torchrun ... train_iterative.py --model_name ... --output_dir ...`.

Equivalent to `itertrain train ...`.
"""

import sys

from itertrain.cli import entry

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "train", *sys.argv[1:]]
    entry()
