"""Block-causal autoregressive NVS (METHOD 3.3) on the tiny random 3-view model: the causal mask, view-by-view
generation, the known views' adaptive masks, the scored view's seed slot, the pipeline's task checks and
test_nvs.py --views."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import test_nvs
from conftest import ROOT, read_csv
from ldm.fill import Conditioning, fill
from ldm.latent_diffusion import model_builder
from leftrefill.canvas import canvas_mask, right_half, stitch
from leftrefill.data.nvs_masks import adaptive_mask
from leftrefill.model_dir import build_random
from leftrefill.multiview_inpaint import ViewCountError, view_generators
from leftrefill.nvs_autoregressive import (AutoregressiveNVSPipeline, ViewSeeds, autoregressive_view_count,
                                           generate_views, predict_last_view, view_silhouette)
from leftrefill.nvs_pipeline import NVSPipeline
from leftrefill.pipeline import WrongTaskError
from tests.test_nvs_data import make_object

TINY_AR = ROOT / "checkpoints" / "tiny_random_nvs_autoregressive"
TINY_NVS = ROOT / "checkpoints" / "tiny_random_nvs"
S = 32  # view size: canvases 32 x 64, latents 4 x 8
STEPS = 2


@pytest.fixture(scope="module")
def model():
    return build_random(model_builder(TINY_AR / "model_config.yaml")).eval()


def images(*shape: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] of ``shape``, seeded."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def poses(b: int, v: int, seed: int) -> torch.Tensor:
    """(b, v, 4) relative poses [d_polar, sin, cos, d_radius]."""
    angle = torch.rand(b, v, generator=torch.Generator().manual_seed(seed)) * 6.28
    return torch.stack([0.3 * torch.sin(3 * angle), angle.sin(), angle.cos(), 0.1 * angle.cos()], dim=-1)


def masks(b: int, v: int) -> torch.Tensor:
    """(b, v, 1, S, S): a centred square to generate on every view."""
    mask = torch.zeros(b, v, 1, S, S)
    mask[..., S // 4:3 * S // 4, S // 4:3 * S // 4] = 1
    return mask


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def objects(b: int, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(b, n, 3, S, S) views in [-1, 1]: a dark rectangle at a random place on white, and their silhouettes
    bool (b, n, S, S)."""
    rng = np.random.default_rng(seed)
    views, silhouettes = torch.ones(b, n, 3, S, S), np.zeros((b, n, S, S), bool)
    for s in range(b):
        for m in range(n):
            y, x, h, w = rng.integers(2, S // 2, size=4)
            views[s, m, :, y:y + h, x:x + w] = torch.from_numpy(rng.uniform(-1, 0.5, (3, 1, 1))).float()
            silhouettes[s, m, y:y + h, x:x + w] = True
    return views, silhouettes


def known_seed(seed: int, slot: int, num_views: int = 3) -> int:
    """The "known" seed of ``slot`` for a sample seeded ``seed``: the second half of the 2 * num_views seeds
    that leftrefill.multiview_inpaint.view_generators draws from its generator."""
    return view_generators(seeded(seed), 2 * num_views)[num_views + slot].initial_seed()


def latent_canvas_mask(mask: np.ndarray) -> torch.Tensor:
    """A target mask bool (S, S) as the model's concat channel sees it: on the canvas's right half, resized to
    the latent grid with nearest neighbour (1, S/8, 2S/8)."""
    canvas = canvas_mask(torch.from_numpy(mask).float()[None, None])
    return F.interpolate(canvas, size=(S // 8, S // 4))[0]


def recorded_calls(monkeypatch, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every ``model.apply_model`` call as (x_t (B v, 4, h, w), the concat mask channel (B v, 1, h, w)) of its
    conditional half (guidance batches [uncond; cond] with the same x_t and c_concat)."""
    calls, apply = [], model.apply_model

    def record(x_t, t, cond):
        half = x_t.shape[0] // 2
        calls.append((x_t[half:].clone(), cond["c_concat"][half:, :1].clone()))
        return apply(x_t, t, cond)

    monkeypatch.setattr(model, "apply_model", record)
    return calls


def fingerprint(x: torch.Tensor) -> list[float]:
    """Mean, mean |x| and a position-weighted mean: a few numbers that move when any value does."""
    x = x.double()
    weights = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view(x.shape)
    return [x.mean().item(), x.abs().mean().item(), (x * weights).mean().item()]


# ------------------------------------------------------------------------------- the causal mask


def joint_fill(model, reference, targets, pose, mask) -> torch.Tensor:
    """The 2 views of one sample denoised jointly (as in training: no view known) under the causal grouping;
    each view's decoded target half (2, 3, S, S)."""
    embedder = model.cond_stage_model
    canvases = stitch(reference.expand(2, -1, -1, -1), targets)
    conditioning = Conditioning(embedder.context({"pose": pose}, 2, num_views=2), embedder.empty_context(2))
    filled = fill(model, canvases, canvas_mask(mask), conditioning, steps=STEPS, guidance=2.5, composite="none",
                  generator=seeded(1, 2), views=embedder.grouping(2))
    return right_half(filled)


def test_under_the_causal_mask_view_0_ignores_view_1_and_view_1_sees_view_0(model):
    reference, targets, pose, mask = images(1, 3, S, S, seed=0), images(2, 3, S, S, seed=1), poses(1, 2, 0)[0], \
        masks(1, 2)[0]
    assert model.cond_stage_model.causal
    base = joint_fill(model, reference, targets, pose, mask)
    later_changed = joint_fill(model, reference, torch.stack([targets[0], -targets[1]]),
                               torch.stack([pose[0], pose[1] + 0.5]), mask)
    torch.testing.assert_close(later_changed[0], base[0], rtol=0, atol=1e-6)  # measured: exactly equal
    assert (later_changed[1] - base[1]).abs().max() > 1e-2
    earlier_changed = joint_fill(model, reference, torch.stack([-targets[0], targets[1]]),
                                 torch.stack([pose[0] + 0.5, pose[1]]), mask)
    # through the joint self-attention only, weak in the tiny random model (measured 0.005), but far from 0
    assert (earlier_changed[1] - base[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- generation


def test_view_0_generated_alone_is_the_fill_of_one_canvas(model):
    reference, pose, mask = images(1, 3, S, S, seed=0), poses(1, 1, 0), masks(1, 1)
    [generated] = generate_views(model, reference, pose, mask, steps=STEPS, generator=seeded(7))[0]
    embedder = model.cond_stage_model
    conditioning = Conditioning(embedder.context({"pose": pose[0]}, 1, num_views=1), embedder.empty_context(1))
    filled = fill(model, stitch(reference, torch.ones_like(reference)), canvas_mask(mask[0]), conditioning,
                  steps=STEPS, guidance=2.5, composite="none", generator=ViewSeeds(seeded(7), 3).step([0]),
                  views=embedder.grouping(1))
    torch.testing.assert_close(generated, right_half(filled)[0], rtol=0, atol=0)


def test_a_later_view_is_generated_from_the_earlier_generated_ones(model):
    reference, pose, mask = images(1, 3, S, S, seed=0), poses(1, 2, 0), masks(1, 2)
    first, second = generate_views(model, reference, pose, mask, steps=STEPS, generator=seeded(7))[0]
    # the same seed with the first view given in its slot: the second view comes out as when it was generated ...
    again = generate_views(model, reference, pose, mask, known_targets=first[None, None], steps=STEPS,
                           generator=seeded(7))[0, 0]
    torch.testing.assert_close(again, second, rtol=0, atol=0)
    # ... and another first view changes it (weakly in the tiny random model: measured 0.005)
    other = generate_views(model, reference, pose, mask, known_targets=-first[None, None], steps=STEPS,
                           generator=seeded(7))[0, 0]
    assert (other - second).abs().max() > 1e-3


def test_views_are_deterministic_per_seed(model):
    reference, pose, mask = images(1, 3, S, S, seed=0), poses(1, 2, 0), masks(1, 2)
    run = [generate_views(model, reference, pose, mask, steps=STEPS, generator=seeded(seed)) for seed in (7, 7, 8)]
    assert run[0].shape == (1, 2, 3, S, S)
    torch.testing.assert_close(run[0], run[1], rtol=0, atol=0)
    assert (run[2] - run[0]).abs().max() > 1e-2
    shared = [generate_views(model, reference, pose, mask, steps=STEPS, generator=torch.Generator().manual_seed(3))
              for _ in range(2)]  # one generator for the batch: the adaptive masks draw their seeds from it
    torch.testing.assert_close(shared[0], shared[1], rtol=0, atol=0)


def test_a_sample_s_views_do_not_depend_on_the_batch(model):
    reference, pose, mask = images(2, 3, S, S, seed=0), poses(2, 2, 0), masks(2, 2)
    both = generate_views(model, reference, pose, mask, steps=STEPS, generator=seeded(7, 8))
    alone = generate_views(model, reference[1:], pose[1:], mask[1:], steps=STEPS, generator=seeded(8))
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("known", "generated"), [(0, 4), (2, 2), (3, 1)])
def test_more_views_than_the_model_has_are_refused(model, known, generated):
    total = known + generated
    with pytest.raises(ViewCountError, match=f"{known} known \\+ {generated} generated = {total} views, but this "
                                             f"model was trained for 3 views"):
        generate_views(model, images(1, 3, S, S, seed=0), poses(1, total, 0), masks(1, total),
                       known_targets=images(1, known, 3, S, S, seed=1) if known else None, steps=STEPS)


def test_nothing_to_generate_and_bad_shapes_are_refused(model):
    reference = images(1, 3, S, S, seed=0)
    with pytest.raises(ValueError, match="nothing to generate"):
        generate_views(model, reference, poses(1, 2, 0), masks(1, 2), known_targets=images(1, 2, 3, S, S, seed=1))
    with pytest.raises(ValueError, match="masks must be"):
        generate_views(model, reference, poses(1, 2, 0), masks(1, 1))


# --------------------------------------------------------------------------------- known masks


def test_a_known_view_carries_the_adaptive_mask_of_its_own_silhouette_drawn_from_its_seed(model, monkeypatch):
    reference, pose, mask = images(2, 3, S, S, seed=0), poses(2, 3, 0), masks(2, 3)
    known, silhouettes = objects(2, 2, seed=1)
    calls = recorded_calls(monkeypatch, model)
    predict_last_view(model, reference, known, pose, mask, steps=STEPS, generator=seeded(7, 8))
    carried = calls[0][1].view(2, 3, 1, S // 8, S // 4)  # (b, v, 1, h, w)
    for s, seed in enumerate((7, 8)):
        for m, slot in enumerate((1, 2)):  # the earlier views' slots, the scored view's is 0
            drawn = adaptive_mask(silhouettes[s, m], np.random.default_rng(known_seed(seed, slot)))
            assert drawn[silhouettes[s, m]].all() and not np.array_equal(drawn, mask[s, m, 0].numpy() > 0)
            torch.testing.assert_close(carried[s, m], latent_canvas_mask(drawn), rtol=0, atol=0)
    torch.testing.assert_close(carried[:, 2], F.interpolate(canvas_mask(mask[:, 2]), size=(S // 8, S // 4)))
    assert all(torch.equal(call[1], calls[0][1]) for call in calls)  # the same masks at every step
    # a sample's masks do not depend on the batch, and another seed draws others
    calls.clear()
    predict_last_view(model, reference[1:], known[1:], pose[1:], mask[1:], steps=STEPS, generator=seeded(8))
    torch.testing.assert_close(calls[0][1].view(1, 3, 1, S // 8, S // 4), carried[1:], rtol=0, atol=0)
    calls.clear()
    predict_last_view(model, reference[1:], known[1:], pose[1:], mask[1:], steps=STEPS, generator=seeded(9))
    assert not torch.equal(calls[0][1].view(1, 3, 1, S // 8, S // 4)[:, :2], carried[1:, :2])


def test_a_generated_view_is_known_with_the_adaptive_mask_of_what_was_generated(model, monkeypatch):
    reference, pose, mask = images(1, 3, S, S, seed=0), poses(1, 2, 0), masks(1, 2)
    calls = recorded_calls(monkeypatch, model)
    first, _ = generate_views(model, reference, pose, mask, steps=STEPS, generator=seeded(7))[0]
    torch.testing.assert_close(calls[0][1], F.interpolate(canvas_mask(mask[:, 0]), size=(S // 8, S // 4)))
    drawn = adaptive_mask(view_silhouette(first), np.random.default_rng(known_seed(7, 0)))
    known_then_new = calls[STEPS][1]  # the second fill: view 0 known, view 1 generated under its given mask
    torch.testing.assert_close(known_then_new[0], latent_canvas_mask(drawn), rtol=0, atol=0)
    torch.testing.assert_close(known_then_new[1:], F.interpolate(canvas_mask(mask[:, 1]), size=(S // 8, S // 4)))


def test_view_silhouette_is_every_pixel_not_near_white():
    view = torch.ones(3, S, S)
    view[0, 3, 4] = 249 / 127.5 - 1  # one channel below 250 of 255: object
    view[:, 5, 6] = 251 / 127.5 - 1  # near white: background
    expected = np.zeros((S, S), bool)
    expected[3, 4] = True
    assert np.array_equal(view_silhouette(view), expected)


def test_given_known_masks_reproduce_the_results_from_before_known_masks_existed(model, monkeypatch):
    reference, pose, mask = images(2, 3, S, S, seed=0), poses(2, 3, 0), masks(2, 3)
    views = generate_views(model, reference, pose, mask, known_masks="given", steps=STEPS, generator=seeded(7, 8))
    calls = recorded_calls(monkeypatch, model)
    last = predict_last_view(model, reference, images(2, 2, 3, S, S, seed=1), pose, mask, known_masks="given",
                             slots=[0, 1, 2], steps=STEPS, generator=seeded(7, 8))
    torch.testing.assert_close(calls[0][1], F.interpolate(canvas_mask(mask.flatten(0, 1)), size=(S // 8, S // 4)))
    # recorded with the code of commit 924557a, before known_masks and slots existed (positions as slots)
    assert fingerprint(views) == pytest.approx([-0.032264, 0.231306, -0.009526], abs=1e-5)
    assert fingerprint(last) == pytest.approx([-0.053766, 0.26321, -0.014768], abs=1e-5)
    adaptive = generate_views(model, reference, pose, mask, steps=STEPS, generator=seeded(7, 8))
    torch.testing.assert_close(adaptive[:, 0], views[:, 0], rtol=0, atol=0)  # view 0 sees no known view
    assert (adaptive[:, 1:] - views[:, 1:]).abs().max() > 1e-2


def test_unknown_known_masks_and_bad_slots_are_refused(model):
    reference, pose, mask = images(1, 3, S, S, seed=0), poses(1, 2, 0), masks(1, 2)
    with pytest.raises(ValueError, match="known_masks must be one of adaptive, given, got 'none'"):
        generate_views(model, reference, pose, mask, known_masks="none", steps=STEPS)
    with pytest.raises(ValueError, match=r"slots must be 2 distinct seed slots in \[0, 3\), one per view, got "
                                         r"\[1, 1\]"):
        generate_views(model, reference, pose, mask, slots=[1, 1], steps=STEPS)
    with pytest.raises(ValueError, match="slots must be 2 distinct"):
        generate_views(model, reference, pose, mask, slots=[0, 3], steps=STEPS)


# ------------------------------------------------------------------------------ the scored view's seed


def test_the_scored_view_starts_from_the_same_noise_after_any_number_of_earlier_views(model, monkeypatch):
    reference = images(1, 3, S, S, seed=0)
    calls = recorded_calls(monkeypatch, model)
    alone = generate_views(model, reference, poses(1, 1, 0), masks(1, 1), steps=STEPS, generator=seeded(7))[:, 0]
    starts = [calls[0][0][0]]  # x_T of view 0 generated alone: one-reference NVS through the model
    for earlier in (0, 1, 2):
        calls.clear()
        last = predict_last_view(model, reference, objects(1, earlier, seed=1)[0], poses(1, earlier + 1, 0),
                                 masks(1, earlier + 1), steps=STEPS, generator=seeded(7))
        starts.append(calls[0][0][earlier])  # the (b v) batch: the last view is item `earlier`
        if earlier == 0:
            torch.testing.assert_close(last, alone, rtol=0, atol=0)
    for start in starts[1:]:
        torch.testing.assert_close(start, starts[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ pipeline


def test_each_pipeline_refuses_the_other_kind_of_nvs_model(model):
    with pytest.raises(WrongTaskError, match="multi-view model \\(3 views\\).*AutoregressiveNVSPipeline"):
        NVSPipeline(model, test_size=64)
    one_view = build_random(model_builder(TINY_NVS / "model_config.yaml"))
    with pytest.raises(WrongTaskError, match="a one-view NVS model.*NVSPipeline"):
        AutoregressiveNVSPipeline(one_view, test_size=64)


def test_pipeline_generates_a_list_of_views_from_one_image(model):
    pipe = AutoregressiveNVSPipeline(model, test_size=64)
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[20:60, 25:55] = (200, 40, 40, 255)
    reference = Image.fromarray(rgba, "RGBA")
    views = pipe.generate_views(reference, poses=[(0, 30, 0), (10, 60, 0)], steps=STEPS, seed=3)
    assert [view.size for view in views] == [(64, 64)] * 2
    assert np.array_equal(np.asarray(views[1]), np.asarray(pipe.generate_views(
        reference, poses=[(0, 30, 0), (10, 60, 0)], steps=STEPS, seed=3)[1]))
    with pytest.raises(ViewCountError, match="4 poses, but this model generates at most 3 views"):
        pipe.generate_views(reference, poses=[(0, 30, 0)] * 4, steps=STEPS)


def test_the_one_view_call_generates_view_0_alone(model):
    pipe = AutoregressiveNVSPipeline(model, test_size=64)
    reference = Image.fromarray(np.full((64, 64, 3), 90, np.uint8))
    [view] = pipe(reference, pose=(0, 30, 0), steps=STEPS, seed=5)
    [first] = pipe.generate_views(reference, poses=[(0, 30, 0)], steps=STEPS, seed=5)
    assert np.array_equal(np.asarray(view), np.asarray(first))


def test_the_view_count_is_read_from_the_config_alone():
    assert autoregressive_view_count(TINY_AR) == 3
    assert autoregressive_view_count(ROOT / "checkpoints" / "nvs_autoregressive") == 4
    assert autoregressive_view_count(TINY_NVS) is None


# -------------------------------------------------------------------------------- test_nvs.py


@pytest.fixture(scope="module")
def views_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("objaverse") / "views_release"
    for uid in ("obj_a", "obj_b"):
        make_object(root, uid)
    return root


def cli(views_root, output, *flags, model_dir=TINY_AR) -> list[str]:
    return ["--model_path", str(model_dir), "--random_init", "--test_size", "64", "--steps", "2", "--device", "cpu",
            "--no_lpips", "--test_path", str(views_root), "--output_path", str(output), *flags]


def test_cli_scores_the_last_of_two_views_given_the_first(views_root, tmp_path, caplog):
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert test_nvs.main(cli(views_root, output, "--views", "2")) == 0
    assert sorted(p.name for p in (output / "results").iterdir()) == ["obj_a.png", "obj_b.png"]
    assert sorted(p.name for p in (output / "grids").iterdir()) == ["obj_a_RANDOM-WEIGHTS.jpg",
                                                                    "obj_b_RANDOM-WEIGHTS.jpg"]
    assert Image.open(output / "grids" / "obj_a_RANDOM-WEIGHTS.jpg").width == 5 * 64  # reference, given 001, ...
    assert [row["id"] for row in read_csv(output / "metrics.csv")] == ["obj_a", "obj_b"]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["num_scored"] == 2
    assert summary["nvs"]["views"] == 2 and summary["nvs"]["target_view"] == 0
    assert summary["nvs"]["earlier_views"] == [1] and summary["nvs"]["earlier_views_are"] == "ground truth"
    assert summary["nvs"]["known_masks"] == "adaptive"
    assert not (output / "generated").exists()


def test_cli_autoregressive_generates_the_model_s_views_and_writes_each(views_root, tmp_path, caplog):
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert test_nvs.main(cli(views_root, output, "--autoregressive", "--known_masks", "given", "--limit", "1")) == 0
    assert sorted(p.name for p in (output / "generated").iterdir()) == ["000", "001", "003"]
    assert np.array_equal(np.asarray(Image.open(output / "generated" / "000" / "obj_a.png")),
                          np.asarray(Image.open(output / "results" / "obj_a.png")))
    nvs = json.loads((output / "summary.json").read_text())["nvs"]
    assert (nvs["views"], nvs["earlier_views"], nvs["target_view"]) == (3, [1, 3], 0)  # K: the model's 3
    assert nvs["earlier_views_are"] == "generated" and nvs["known_masks"] == "given"


@pytest.mark.parametrize("autoregressive", [False, True])
def test_cli_views_1_is_one_reference_nvs_through_the_model_and_later_k_keep_its_noise(model, views_root,
                                                                                       monkeypatch, autoregressive):
    """What test_nvs.py --views K samples for a batch: the scored view for K = 1 is that of the pipeline's
    one-view call with the same generator, and it starts from the same noise for every K."""
    pipe = AutoregressiveNVSPipeline(model, test_size=64)
    calls, starts = recorded_calls(monkeypatch, model), []
    for views in (1, 2, 3):
        flags = ["--views", str(views), "--limit", "1"] + (["--autoregressive"] if autoregressive else [])
        _, task = test_nvs.evaluation_task(test_nvs.parse_args(cli(views_root, "unused", *flags)))
        batch = torch.utils.data.default_collate([task.dataset[0]])
        calls.clear()
        result = task.sample(pipe, batch, steps=STEPS, generator=seeded(42))
        starts.append(calls[-STEPS][0][views - 1])  # the last fill's first step: the scored view, item K - 1
        if views == 1:
            one_view = pipe.synthesize(batch["reference"], batch["pose"], batch["mask"], batch["target_visible"],
                                       steps=STEPS, generator=seeded(42))
            torch.testing.assert_close(result, one_view, rtol=0, atol=0)
    for start in starts[1:]:
        torch.testing.assert_close(start, starts[0], rtol=0, atol=0)


def refuse_to_build_a_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was built although the input was bad")

    monkeypatch.setattr(NVSPipeline, "from_model_dir", fail)


@pytest.mark.parametrize(("model_dir", "flags", "message"), [
    (TINY_AR, ["--views", "4"], f"--views 4: --model_path {TINY_AR} is an autoregressive NVS model of 3 views; "
                                f"--views must be in [1, 3]"),
    (TINY_AR, ["--earlier_views", "1", "3", "4"], "--views 4: "),  # K = 1 + the earlier views
    (TINY_AR, ["--views", "2", "--earlier_views", "1", "3"], "--earlier_views [1, 3]: 2 views, but --views 2 needs 1"),
    (TINY_AR, ["--earlier_views", "2"], "--earlier_views [2] + --target_view 0: target_views [2, 0] contains the "
                                        "reference_view 2"),
    (TINY_NVS, ["--views", "2"], "--views 2: needs a block-causal multi-view NVS model"),
    (TINY_NVS, ["--autoregressive"], "--autoregressive: needs a block-causal multi-view NVS model"),
    (TINY_NVS, ["--known_masks", "given"], "--known_masks given: needs a block-causal multi-view NVS model"),
])
def test_cli_refuses_views_the_model_or_the_data_cannot_have(views_root, tmp_path, caplog, monkeypatch, model_dir,
                                                             flags, message):
    refuse_to_build_a_model(monkeypatch)
    output = tmp_path / "out"
    assert test_nvs.main(cli(views_root, output, *flags, model_dir=model_dir)) == 2
    [error] = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert error.startswith(message)
    assert not output.exists()
