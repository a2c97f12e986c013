"""A 2-process CPU DDP run of the tiny NVS config (tests/test_nvs_training.py launches it; Lightning starts
rank 1 by running this script again). Usage: python tests/ddp_nvs_run.py <run dir>"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leftrefill.train_config import load_training_config  # noqa: E402
from leftrefill.trainer import train  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_training_config(ROOT / "configs" / "tiny_nvs.yaml",
                                  ["data.batch_size=1", "trainer.max_epochs=2", "validation.steps=2"])
    train(config, Path(sys.argv[1]), accelerator="cpu", devices=2)
