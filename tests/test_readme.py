"""The README's random-weight Python example runs as written (the one a newcomer without SD2 tries first)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_random_weight_example_runs_as_written(tmp_path):
    [example] = [block for block in readme_python_blocks() if "random_init=True" in block]
    # A folder that looks like the repository root (the example's relative paths), so its output lands here.
    for name in ("checkpoints", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    filled = np.asarray(Image.open(tmp_path / "filled_random_weights.png"))
    target = np.asarray(Image.open(ROOT / "data" / "samples" / "building" / "target.jpg").convert("RGB"))
    hole = np.asarray(Image.open(ROOT / "data" / "samples" / "building" / "mask.png").convert("L")) > 127
    assert filled.shape == target.shape
    assert np.array_equal(filled[~hole], target[~hole]) and not np.array_equal(filled[hole], target[hole])
