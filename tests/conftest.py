"""Shared fixtures: the tiny SD2-structured model with every parameter perturbed away from its init."""

from __future__ import annotations

import csv
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.latent_diffusion import LatentInpaintDiffusion, load_model

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_sd2_inpainting.yaml"
FULL_CONFIG = ROOT / "configs" / "sd2_inpainting.yaml"


@torch.no_grad()
def perturb_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values, zero-initialised output layers included, so that no
    residual branch is trivially zero: matrices ~ N(0, 1/fan_in), norm scales ~ N(1, 0.1), rest ~ N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            std = 1 / math.sqrt(param[0].numel())
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        elif "norm" in name or "ln_" in name:
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return module


@pytest.fixture(scope="session")
def tiny_model() -> LatentInpaintDiffusion:
    torch.manual_seed(0)
    return perturb_(load_model(TINY_CONFIG))


@pytest.fixture(scope="session")
def tiny_state_dict(tiny_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


def run_two_ranks(command: list[str]) -> tuple[str, list[tuple[str, str, str, str]]]:
    """Run a 2-process CPU DDP training ``command`` (Lightning relaunches it for rank 1); its output and the
    per-rank digest lines of leftrefill.callbacks.RankDigest, ``(rank, items, id digest, tensor checksum)``,
    sorted by rank, one per rank."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stderr + result.stdout
    assert result.returncode == 0, output[-3000:]
    lines = sorted(re.findall(r"rank (\d): last epoch trained on (\d+) samples \(id digest (\w+)\); trained-tensor "
                              r"checksum (\w+)", output))
    assert [rank for rank, *_ in lines] == ["0", "1"], output[-3000:]
    return output, lines


def read_csv(path) -> list[dict]:
    """The rows of a CSV file an entry point wrote (metrics.csv, selection.csv, scores.csv), as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
