"""Record the reference-inpainting outputs and the trained tokens of today's code, for tests/test_unchanged.py.

    .venv/bin/python tests/golden/make_golden.py      # rewrites tests/golden/*.png and tokens.safetensors

Only to be run when a change of results is intended (and said so in the commit). Recorded at commit 8fd5c27.
The model is the tiny SD2 config with every parameter perturbed (tests/conftest.perturb_), loaded from a base
checkpoint plus a token file, as a user's model directory would be.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_inpainting  # noqa: E402
from conftest import TINY_CONFIG, perturb_  # noqa: E402
from ldm.latent_diffusion import load_model  # noqa: E402
from leftrefill.model_dir import TOKEN_KEY  # noqa: E402
from leftrefill.train_config import load_training_config  # noqa: E402
from leftrefill.trainer import train  # noqa: E402

EVAL_FLAGS = ["--test_size", "64", "--steps", "4", "--batch_size", "2", "--no_lpips", "--seed", "7",
              "--test_path", str(ROOT / "data" / "samples")]
TRAIN_OVERRIDES = ["num_workers=0", "val_image_path=null", "max_steps=3", "max_epochs=-1", "image_size=64"]


def model_files(folder: Path) -> tuple[Path, Path]:
    """(base checkpoint, model directory): the perturbed tiny model and a token file of seeded tokens."""
    torch.manual_seed(0)
    state = perturb_(load_model(TINY_CONFIG)).state_dict()
    base = folder / "base.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != TOKEN_KEY}}, base)
    model_dir = folder / "model"
    (model_dir / "ckpts").mkdir(parents=True)
    shutil.copy(ROOT / "checkpoints" / "tiny_random" / "model_config.yaml", model_dir / "model_config.yaml")
    tokens = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
    torch.save({"state_dict": {TOKEN_KEY: tokens}}, model_dir / "ckpts" / "tokens.ckpt")
    return base, model_dir


def evaluate(base: Path, model_dir: Path, output: Path) -> int:
    return test_inpainting.main(["--model_path", str(model_dir), "--base_ckpt", str(base),
                                 "--output_path", str(output), *EVAL_FLAGS])


def train_tokens(base: Path, run_dir: Path) -> torch.Tensor:
    config = load_training_config(ROOT / "configs" / "tiny_training_config.yaml",
                                  [*TRAIN_OVERRIDES, "random_init=false", f"resume_path={base}"])
    trainer = train(config, run_dir, accelerator="cpu")
    return trainer.lightning_module.tokens.detach().clone()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base, model_dir = model_files(Path(tmp))
        assert evaluate(base, model_dir, Path(tmp) / "eval") == 0
        for png in sorted((Path(tmp) / "eval" / "results").glob("*.png")):
            shutil.copy(png, HERE / png.name)
        save_file({"tokens": train_tokens(base, Path(tmp) / "run")}, HERE / "tokens.safetensors")


if __name__ == "__main__":
    main()
