"""A 2-process CPU DDP run of the tiny training config, launched by tests/test_training.py.

Rank 1 gets a NaN loss at optimiser step 1, and the validation folder (argv[2]) leaves rank 1 only pairs
with empty masks: the two situations in which ranks could fall out of step. Lightning starts rank 1 by
running this script again. Usage: python tests/ddp_training_run.py <run dir> <validation folder>
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leftrefill.train_config import load_training_config  # noqa: E402
from leftrefill.trainer import train  # noqa: E402
from leftrefill.training_module import LeftRefillModule  # noqa: E402

clean_loss = LeftRefillModule.loss


def loss_with_one_nan(self, canvas, mask, conditions=None):
    value = clean_loss(self, canvas, mask, conditions)
    return value * float("nan") if self.global_rank == 1 and self.global_step == 1 else value


if __name__ == "__main__":
    LeftRefillModule.loss = loss_with_one_nan
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_training_config(ROOT / "configs" / "tiny_training_config.yaml",
                                  ["num_workers=0", "max_epochs=1", "val_steps=2", "val_batch_size=1",
                                   f"val_image_path={sys.argv[2]}"])
    train(config, Path(sys.argv[1]), accelerator="cpu", devices=2)
