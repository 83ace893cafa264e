"""Entry script that `accelerate launch` runs on every rank.

    accelerate launch --config_file accelerate_configs/cpu.yaml launch/train.py \
        --config configs/tiny.yaml training.max_steps=10

Thin on purpose: parsing and training live in raft_dist so the script works the same from a
checkout and from an installed package.
"""

import sys

from raft_dist.cli import run
from raft_dist.distributed import die_with_parent

if __name__ == "__main__":
    die_with_parent()  # a rank never outlives its launcher (killed launch: no orphan ranks)
    run(["train", *sys.argv[1:]])
