"""test_inpainting.py with pair 1 (sacre_coeur_a of data/samples) failing mid-run, launched by
tests/test_sharded_evaluation.py under torchrun, where pair 1 is rank 1's. ``raise``: its file cannot be
read, as if it went away after the check; ``die``: its process dies at once (as when the kernel kills it),
with no chance to report anything. Usage: torchrun ... tests/sharded_failure_run.py raise|die <flags>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import test_inpainting  # noqa: E402
from leftrefill.data import test_pairs  # noqa: E402
from leftrefill.images import ImageInputError  # noqa: E402

readable = test_pairs.TestPairDataset.__getitem__


def failing(how: str):
    def getitem(self, index):
        if index == 1 and how == "die":
            os._exit(9)
        if index == 1:
            raise ImageInputError(f"target: file not found: {self.pairs[index].target}")
        return readable(self, index)
    return getitem


if __name__ == "__main__":
    test_pairs.TestPairDataset.__getitem__ = failing(sys.argv[1])
    sys.exit(test_inpainting.main(sys.argv[2:]))
