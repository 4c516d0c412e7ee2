"""``python -m weightshare.compress SRC ... --out DIR``: ``weightshare compress``, as torchrun starts it on every
process (``torchrun --nnodes M --nproc_per_node N -m weightshare.compress SRC --data-free --out DIR``)."""

import sys

from weightshare.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
