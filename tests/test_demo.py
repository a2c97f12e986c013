"""The Gradio demo, driven like a person would in Debian's Chromium (Playwright), and through gradio_client.

The app runs on a free localhost port with the tiny random model. Chromium comes from apt
(``/usr/bin/chromium``, installed by ``make test`` when missing); Playwright never downloads a browser.
"""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from leftrefill.demo import build_demo  # noqa: E402
from leftrefill.pipeline import LeftRefillPipeline  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
TARGET_SIZE = (200, 150)  # (width, height): neither square nor the model's size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(folder / "reference.png")
    ramp = np.linspace(0, 255, TARGET_SIZE[0]).astype(np.uint8)
    target = np.stack([np.tile(ramp, (TARGET_SIZE[1], 1))] * 3, axis=-1)
    target[:, :, 2] = 90
    Image.fromarray(target).save(folder / "target.png")
    mask = np.zeros(TARGET_SIZE[::-1], dtype=np.uint8)
    mask[40:100, 60:150] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.zeros(TARGET_SIZE[::-1], dtype=np.uint8)).save(folder / "empty_mask.png")
    (folder / "notes.png").write_text("not an image")
    Image.new("L", (6000, 5000)).save(folder / "huge.png")  # 30 megapixels, a small file
    return folder, target, mask > 0


@pytest.fixture(scope="module")
def app():
    pipe = LeftRefillPipeline.from_model_dir("checkpoints/tiny_random", random_init=True, device="cpu",
                                             precision="fp32", test_size=64)
    demo = build_demo(pipe, "tiny random model", max_samples=2)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, max_file_size="5mb")
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app, verbose=False)


def fill(client, images, *, reference="reference.png", target="target.png", mask="mask.png", samples=1, seed=7):
    from gradio_client import handle_file

    folder = images[0]
    editor = {"background": handle_file(str(folder / target)), "layers": [], "composite": None}
    return client.predict([{"image": handle_file(str(folder / reference))}] if reference else [], editor,
                          handle_file(str(folder / mask)) if mask else None, 3, 2.5, 1.0, seed, samples,
                          api_name="/fill")


def test_gradio_client_fills_the_mask_and_keeps_the_rest(client, images):
    _, target, mask = images
    gallery, overlay = fill(client, images, samples=2)
    assert len(gallery) == 2
    for item in gallery:
        result = np.asarray(Image.open(item["image"]).convert("RGB"))
        assert result.shape == target.shape  # the target's own size, not the model's 64 x 64
        assert np.array_equal(result[~mask], target[~mask])
        assert (result[mask] != target[mask]).any(axis=-1).mean() > 0.5
    drawn = np.asarray(Image.open(overlay).convert("RGB"))
    assert drawn.shape == target.shape and (drawn[..., 0] == 255).sum() > 100  # the red outline


@pytest.mark.parametrize("case, message", [
    (dict(reference=None), "Add a reference image"),
    (dict(mask="empty_mask.png"), "The mask is empty"),
    (dict(mask="notes.png"), "mask could not be read: 'notes.png' is not an image file"),
    (dict(reference="notes.png"), "reference could not be read: 'notes.png' is not an image file"),
    (dict(reference="huge.png"), "the limit is 25 megapixels"),
    (dict(samples=3), "greater than maximum value 2"),  # the slider's own bound: the sample cap
    (dict(seed=-1), "less than minimum value 0"),  # the seed field's own bounds: torch needs < 2**64
    (dict(seed=2**40), "greater than maximum value 4294967295"),
    (dict(seed=None), "The seed must be a whole number from 0 to 4294967295"),  # an empty field
])
def test_bad_input_gives_a_readable_message_and_the_app_keeps_serving(client, images, case, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        fill(client, images, **case)
    gallery, _ = fill(client, images)  # still serving
    assert len(gallery) == 1


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_a_person_paints_a_stroke_and_gets_the_target_back_filled(app, images, tmp_path):
    from playwright.sync_api import sync_playwright

    folder, target, _ = images
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(app)
        page.locator("#run").click()  # nothing uploaded yet: a readable error, not a crash
        page.get_by_text("Add a reference image").first.wait_for(timeout=30_000)
        page.locator("#reference input[type=file]").set_input_files(str(folder / "reference.png"))
        page.locator("#target input[type=file]").set_input_files(str(folder / "target.png"))
        page.locator("#target img, #target canvas").first.wait_for()
        page.wait_for_timeout(1000)
        box = _image_box(page)
        y = box["y"] + box["height"] * 0.5
        page.mouse.move(box["x"] + box["width"] * 0.35, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.65, y, steps=15)
        page.mouse.up()
        page.locator("#run").click()
        result_image = page.locator("#results img").first
        result_image.wait_for(timeout=120_000)
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        if os.environ.get("LEFTREFILL_SCREENSHOT"):  # keep a copy, e.g. for the docs
            page.screenshot(path=os.environ["LEFTREFILL_SCREENSHOT"], full_page=True)
        body = page.request.get(result_image.get_attribute("src")).body()
        browser.close()
    result = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert result.shape == target.shape
    changed = (result != target).any(axis=-1)
    assert changed.any()  # the stroke was filled
    rows, cols = np.nonzero(changed)
    # The stroke runs along the middle row from 35 % to 65 % of the width with a brush of about 25 px
    # radius (measured: rows 50-99, columns 39-160): only that band may change, nothing else.
    assert 30 < rows.min() and rows.max() < 120 and 20 < cols.min() and cols.max() < 180
    assert changed.mean() < 0.3
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def _image_box(page) -> dict:
    """Where the target image is drawn inside the editor (the canvas is larger than the image)."""
    canvas = page.locator("#target canvas").first.bounding_box()
    scale = min(canvas["width"] / TARGET_SIZE[0], canvas["height"] / TARGET_SIZE[1])
    width, height = TARGET_SIZE[0] * scale, TARGET_SIZE[1] * scale
    return {"x": canvas["x"] + (canvas["width"] - width) / 2, "y": canvas["y"] + (canvas["height"] - height) / 2,
            "width": width, "height": height}


def test_safe_defaults_and_the_random_weight_fallback_is_announced(tmp_path):
    import ref_inpainting_gradio
    from leftrefill.demo import weights_banner

    args = ref_inpainting_gradio.parse_args(["--base_ckpt", str(tmp_path / "absent.ckpt"), "--device", "cpu"])
    assert args.server_name == "127.0.0.1" and args.share is False
    pipe, description = ref_inpainting_gradio.load_pipeline(args)
    assert pipe.random_weights and "tiny random model" in description
    banner = weights_banner(pipe, description)
    assert "Random weights: results are noise" in banner and "pretrained_models/" in banner
    pipe.random_weights = False
    assert weights_banner(pipe, "tokens from `x`") == "Weights: tokens from `x` · cpu, float32"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_a_bundled_example_loads_and_runs(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(app)
        page.locator("table tbody tr").first.click()  # data/samples/building, with its mask.png
        page.locator("#target canvas").first.wait_for()
        page.wait_for_timeout(2000)
        page.locator("#run").click()
        result_image = page.locator("#results img").first
        result_image.wait_for(timeout=120_000)
        body = page.request.get(result_image.get_attribute("src")).body()
        browser.close()
    assert Image.open(io.BytesIO(body)).size == Image.open("data/samples/building/target.jpg").size
