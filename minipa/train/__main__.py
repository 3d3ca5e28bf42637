"""`python -m minipa.train …` / `torchrun --nproc_per_node 2 -m minipa.train …`: retrain the tiny world."""

import sys

from minipa.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
