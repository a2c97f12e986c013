"""RealFill inference on the bundled scene (a 341 x 256 target) with tiny random models: results at the target's
own size, the soft composite leaving every pixel outside the dilated mask untouched, seeds, merged adapters,
and test_realfill.py end to end (one scene, and a benchmark folder with metrics)."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import test_realfill
import train_realfill as train_script
from conftest import ROOT, read_csv
from ldm.latent_diffusion import model_builder
from leftrefill.data.realfill import load_target, model_inputs, read_scene
from leftrefill.lora import merge_lora
from leftrefill.model_dir import build_model
from leftrefill.pipeline import WrongTaskError
from leftrefill.realfill_pipeline import RealFillPipeline, soft_composite

SCENE = ROOT / "data" / "samples_realfill" / "sacre_coeur"
TINY_DIR = ROOT / "checkpoints" / "tiny_random_realfill"
FAST = {"steps": 3, "sampler": "ddpm"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny scene trained through the command line (the first half of the end-to-end path)."""
    out = tmp_path_factory.mktemp("realfill_model") / "sacre_coeur"
    code = train_script.main(["--config", str(ROOT / "configs" / "tiny_realfill.yaml"), "--scene", str(SCENE),
                              "--output_dir", str(out), "--random_init", "--accelerator", "cpu", "--max_steps", "2"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def pipe(trained):
    return RealFillPipeline.from_model_dir(trained, random_init=True, device="cpu")


@pytest.fixture(scope="module")
def scene():
    target, hole = load_target(read_scene(SCENE))
    return target, hole


def test_samples_have_the_targets_size_and_only_the_dilated_mask_changes(pipe, scene):
    target, hole = scene
    [out] = pipe(target, hole, num_samples=1, **FAST)
    assert out.shape == target.shape == (256, 341, 3) and out.dtype == np.uint8
    # alpha's support: the 3 x 3 dilation, widened by one more pixel by the radius-1 blur (a 5 x 5 dilation)
    support = cv2.dilate(hole.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.array_equal(out[~support], target[~support])  # bit-exact outside the soft mask
    ring = support & ~(cv2.dilate(hole.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    assert (out[ring] != target[ring]).any()  # the blur's outer ring blends a little (alpha 1/9 to 3/9)
    assert (out[hole] != target[hole]).any(axis=-1).mean() > 0.9  # the hole is filled


def test_soft_composite_is_the_pil_recipe_at_the_targets_size(scene):
    target, hole = scene
    generated = np.random.default_rng(0).integers(0, 256, target.shape, dtype=np.uint8)
    out = soft_composite(generated, target, hole)
    # the reference's post-processing: PIL MaxFilter(3) then BoxBlur(1) of the mask, Image.composite
    alpha = Image.fromarray(hole.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.BoxBlur(1))
    reference = np.asarray(Image.composite(Image.fromarray(generated), Image.fromarray(target), alpha))
    assert np.abs(out.astype(int) - reference).max() <= 2  # PIL rounds alpha to 8 bits
    assert np.array_equal(out[hole & (cv2.erode(hole.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)],
                          generated[cv2.erode(hole.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0])


def test_each_sample_has_its_own_seed_whatever_the_batch(pipe, scene):
    target, hole = scene
    three = pipe(target, hole, num_samples=3, seed=5, batch_size=2, **FAST)
    single = pipe(target, hole, num_samples=1, seed=7, **FAST)
    again = pipe(target, hole, num_samples=3, seed=5, batch_size=3, **FAST)
    assert np.array_equal(three[2], single[0])
    assert all(np.array_equal(a, b) for a, b in zip(three, again))
    assert not np.array_equal(three[0], three[1])


def test_merged_adapters_sample_as_the_unmerged_ones(trained, pipe, scene):
    target, hole = scene
    unmerged = build_model(model_builder(trained / "model_config.yaml"), trained=trained / "adapters.safetensors",
                           random_init=True)
    image, mask = (t[None] for t in model_inputs(target, hole, 64))
    outputs = []
    for model in (unmerged, pipe.model):
        other = RealFillPipeline(model, resolution=64)
        outputs.append(other.sample(image, mask, generator=torch.Generator().manual_seed(0), **FAST))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)
    assert merge_lora(unmerged) > 0


def test_the_adapters_and_the_prompt_change_the_samples(trained, pipe, scene):
    target, hole = scene
    with_adapters = pipe(target, hole, num_samples=1, **FAST)[0]
    bare = TINY_DIR  # the same random backbone, no adapters
    without = RealFillPipeline.from_model_dir(bare, random_init=True, device="cpu")(target, hole, num_samples=1, **FAST)[0]
    other_prompt = RealFillPipeline(pipe.model, resolution=64, prompt="a photo of a dog")(target, hole, num_samples=1,
                                                                                        **FAST)[0]
    assert not np.array_equal(with_adapters, without)
    assert not np.array_equal(with_adapters, other_prompt)


def test_guidance_other_than_one_runs_the_unconditional_branch(pipe, scene):
    target, hole = scene
    one = pipe(target, hole, num_samples=1, cfg=1.0, **FAST)[0]
    three = pipe(target, hole, num_samples=1, cfg=3.0, **FAST)[0]
    assert not np.array_equal(one, three)


def test_bad_calls_are_named(pipe, scene):
    target, hole = scene
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        pipe(target, hole, num_samples=0)
    with pytest.raises(ValueError, match="marks nothing to fill"):
        pipe(target, np.zeros_like(hole), num_samples=1)
    with pytest.raises(WrongTaskError, match="TextConditioner"):
        RealFillPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random", random_init=True, device="cpu")


def test_one_scene_end_to_end_writes_samples_scores_top_k_and_a_grid(trained, tmp_path):
    out = tmp_path / "out"
    code = test_realfill.main(["--scene", str(SCENE), "--model_path", str(trained), "--random_init",
                               "--num_samples", "3", "--steps", "2", "--keep", "2", "--output_path", str(out)])
    assert code == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0.png", "1.png", "2.png"]
    rows = read_csv(out / "scores.csv")
    assert [int(r["sample"]) for r in rows] == [0, 1, 2] and sorted(int(r["rank"]) for r in rows) == [1, 2, 3]
    assert all(int(r["matches"]) == sum(int(r[f"matches_{p.name}"]) for p in read_scene(SCENE).references)
               for r in rows)
    best = next(r for r in rows if r["rank"] == "1")
    top = sorted((out / "top").iterdir())
    assert [p.name for p in top][0] == f"1_{best['sample']}.png" and len(top) == 2
    assert np.array_equal(np.asarray(Image.open(top[0])), np.asarray(Image.open(out / "samples" / f"{best['sample']}.png")))
    assert Image.open(out / "grid.png").size[0] == 3 * 341


def test_benchmark_folder_is_scored_over_all_samples_and_the_top_k(trained, tmp_path):
    root, models = tmp_path / "bench", tmp_path / "models"
    shutil.copytree(SCENE, root / "sacre_coeur")
    shutil.copytree(SCENE, root / "no_gt")
    (root / "no_gt" / "target" / "gt.png").unlink()  # scenes without ground truth are not scored
    shutil.copytree(trained, models / "sacre_coeur")
    out = tmp_path / "out"
    code = test_realfill.main(["--benchmark_root", str(root), "--model_path", str(models), "--random_init",
                               "--num_samples", "4", "--steps", "2", "--output_path", str(out), "--no_lpips",
                               "--match_method", "sift"])
    assert code == 0
    rows = read_csv(out / "metrics.csv")
    assert [r["scene"] for r in rows] == ["sacre_coeur"] * 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"]["scenes"] == 1 and set(summary["scenes"]) == {"sacre_coeur"}
    scene = summary["scenes"]["sacre_coeur"]
    assert set(scene["top"]) == {"0", "25", "50", "75"}
    best = next(r for r in rows if r["rank"] == "1")
    assert scene["top"]["75"]["masked_psnr"] == pytest.approx(float(best["masked_psnr"]), abs=1e-5)
    assert scene["all"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]), abs=1e-5)
    assert "dino" in summary["skipped_metrics"] and "clip" in summary["skipped_metrics"]


def test_benchmark_without_a_model_for_a_scene_is_named(tmp_path, caplog):
    root = tmp_path / "bench"
    shutil.copytree(SCENE, root / "sacre_coeur")
    code = test_realfill.main(["--benchmark_root", str(root), "--model_path", str(tmp_path / "models"),
                               "--random_init", "--no_lpips", "--output_path", str(tmp_path / "out")])
    assert code == 2 and "no model directory for scene(s) sacre_coeur" in caplog.text
