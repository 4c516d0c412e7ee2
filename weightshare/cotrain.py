"""``torchrun --nproc_per_node N -m weightshare.cotrain CONFIG``: one co-training worker per process.

The command's short name (README, Co-training); everything it runs is in ``weightshare.merge.cotrain``
(``worker.main``), and ``weightshare cotrain CONFIG --nproc N`` launches it on this machine.
"""

import sys

from weightshare.merge.cotrain.worker import main

if __name__ == "__main__":
    sys.exit(main())
