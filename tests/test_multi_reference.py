"""Training-free multi-reference with the one-reference model (METHOD 7.3): K canvases [reference_k | target]
of one target share their target half while sampling; the result is the mean of the K decoded target halves.

On the tiny random model (checkpoints/tiny_random, ldm.random_weights), canvases of 64 x 128 (latent 8 x 16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from leftrefill import LeftRefillPipeline

SIZE = 64  # test_size: latent 8 x 16, the target half is latent columns 8..15
STEPS = 3


@pytest.fixture(scope="module")
def pipe() -> LeftRefillPipeline:
    return LeftRefillPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random", random_init=True, device="cpu",
                                             precision="fp32", test_size=SIZE)


def views(seed: int = 0, batch: int = 2, k: int = 2):
    """References (batch, k, 3, S, S) and targets (batch, 3, S, S) in [-1, 1]; a mask (batch, 1, S, S) over a
    rectangle of the target."""
    g = torch.Generator().manual_seed(seed)
    references = torch.rand(batch, k, 3, SIZE, SIZE, generator=g) * 2 - 1
    target = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[:, :, 16:48, 8:40] = 1
    return references, target, mask


def seeds(batch: int = 2, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def fill(pipe, references, target, mask, seed: int = 0, **options):
    return pipe.inpaint(references, target, mask, steps=STEPS, generator=seeds(len(target), seed), **options)


class RecordingUNet:
    """Records the noisy latent x of every UNet call."""

    def __init__(self, model, monkeypatch):
        self.inputs = []
        original = model.apply_model

        def recorded(x, t, cond):
            self.inputs.append(x.detach().clone())
            return original(x, t, cond)

        monkeypatch.setattr(model, "apply_model", recorded)


def test_one_reference_as_k_equals_one_is_the_plain_path(pipe):
    references, target, mask = views(k=1)
    plain = fill(pipe, references[:, 0], target, mask)
    assert torch.equal(fill(pipe, references, target, mask), plain)


def test_a_reference_given_twice_gives_the_one_reference_result(pipe):
    """Two equal canvases start from the item's noise and predict the same eps: their mean changes nothing."""
    references, target, mask = views(k=1)
    one = fill(pipe, references, target, mask)
    twice = fill(pipe, references.expand(-1, 2, -1, -1, -1), target, mask)
    torch.testing.assert_close(twice, one, rtol=0, atol=1e-5)


def test_the_result_depends_on_every_reference(pipe):
    references, target, mask = views()
    out = fill(pipe, references, target, mask)
    for k in range(2):
        changed = references.clone()
        changed[:, k] = -changed[:, k]
        assert (fill(pipe, changed, target, mask) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-3, k


def test_target_halves_share_one_latent_at_every_step(pipe, monkeypatch):
    """UNet inputs are [uncond; cond] x (2 targets x 2 canvases); within a target the canvases agree on the target
    half at every step and differ on the reference half after the first step (one start noise per target)."""
    references, target, mask = views()
    recorder = RecordingUNet(pipe.model, monkeypatch)
    fill(pipe, references, target, mask, cfg=2.5)
    assert len(recorder.inputs) == STEPS and recorder.inputs[0].shape == (8, 4, SIZE // 8, 2 * SIZE // 8)
    half = SIZE // 8
    for step, x in enumerate(recorder.inputs):
        canvases = x.unflatten(0, (2, 2, 2))  # (branch, target, canvas, 4, h, 2w)
        assert torch.equal(canvases[:, :, 0, ..., half:], canvases[:, :, 1, ..., half:]), step
        assert not torch.equal(canvases[:, 0, 0, ..., half:], canvases[:, 1, 0, ..., half:]), step
        reference_halves_equal = torch.equal(canvases[:, :, 0, ..., :half], canvases[:, :, 1, ..., :half])
        assert reference_halves_equal == (step == 0), step


def test_swapping_the_references_changes_only_rounding(pipe):
    """The mean is symmetric, and the target's noise comes from the item's generator whichever reference is first."""
    references, target, mask = views()
    out = fill(pipe, references, target, mask)
    swapped = fill(pipe, references.flip(1), target, mask)
    torch.testing.assert_close(swapped, out, rtol=0, atol=1e-4)


def test_pixels_outside_the_mask_are_the_target(pipe):
    references, target, mask = views(k=3)
    out = fill(pipe, references, target, mask)
    assert torch.equal(torch.where(mask > 0.5, 0, out), torch.where(mask > 0.5, 0, target))
    assert (out - target).abs()[mask.expand_as(out) > 0.5].mean() > 1e-2  # the hole was filled


def test_an_item_does_not_depend_on_its_batch(pipe):
    references, target, mask = views()
    both = fill(pipe, references, target, mask)
    alone = pipe.inpaint(references[1:], target[1:], mask[1:], steps=STEPS, generator=seeds(2)[1:])
    torch.testing.assert_close(alone[0], both[1], rtol=0, atol=1e-5)


def test_same_seed_same_result_and_other_seed_other_result(pipe):
    references, target, mask = views()
    assert torch.equal(fill(pipe, references, target, mask, seed=3), fill(pipe, references, target, mask, seed=3))
    assert not torch.allclose(fill(pipe, references, target, mask, seed=4), fill(pipe, references, target, mask, seed=3))
    shared = [pipe.inpaint(references, target, mask, steps=STEPS, generator=torch.Generator().manual_seed(3))
              for _ in range(2)]  # one generator for the batch: one seed per target drawn from it
    assert torch.equal(*shared)


def test_shapes_are_checked(pipe):
    references, target, mask = views()
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\) or \(B, K, 3, H, W\)"):
        pipe.inpaint(references[:1], target, mask, steps=1)
    with pytest.raises(ValueError, match="with K >= 1"):
        pipe.inpaint(references[:, :0], target, mask, steps=1)
    with pytest.raises(ValueError, match="got 3 generators for 2 targets"):
        pipe.inpaint(references, target, mask, steps=1, generator=seeds(3))


def rgb(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_pipeline_call_takes_a_list_of_references(pipe):
    target = rgb(0, 50, 70)
    hole = np.zeros((50, 70), dtype=np.uint8)
    hole[10:30, 20:50] = 255
    references = [rgb(1, 80, 60), rgb(2, 40, 40)]
    outputs = pipe(references, target, Image.fromarray(hole), steps=STEPS, seed=5, num_samples=2)
    assert [image.size for image in outputs] == [(70, 50), (70, 50)]
    arrays = [np.asarray(image) for image in outputs]
    assert all(np.array_equal(a[hole == 0], np.asarray(target)[hole == 0]) for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])  # sample k has seed 5 + k
    again = pipe(tuple(references), target, Image.fromarray(hole), steps=STEPS, seed=5)
    assert np.array_equal(np.asarray(again[0]), arrays[0])
    one = pipe(references[0], target, Image.fromarray(hole), steps=STEPS, seed=5)
    assert np.array_equal(np.asarray(pipe([references[0]], target, Image.fromarray(hole), steps=STEPS, seed=5)[0]),
                          np.asarray(one[0]))
    assert not np.array_equal(np.asarray(one[0]), arrays[0])
    with pytest.raises(ValueError, match="non-empty list"):
        pipe([], target, Image.fromarray(hole))
