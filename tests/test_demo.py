"""The Gradio demo, driven like a person would in Debian's Chromium (Playwright), and through gradio_client.

The app runs on a free localhost port with the tiny random model. Chromium comes from apt
(``/usr/bin/chromium``, installed by ``make test`` when missing); Playwright never downloads a browser.
Values JSON cannot carry through gradio_client (NaN) go in hand-written request bodies; the command line
(``ref_inpainting_gradio.py``: paths, --help, flags, startup log) is tested at the end.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from leftrefill.demo import CACHE_CLEANUP, build_demo  # noqa: E402
from leftrefill.pipeline import LeftRefillPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
MAX_FILE_SIZE = 5 * 1024 * 1024  # the app fixture's max_file_size="5mb"
MAX_SEED = 2**63 - 1  # torch and numpy take seeds in [0, 2^63 - 1]
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
    Image.fromarray(np.full(TARGET_SIZE[::-1], 255, dtype=np.uint8)).save(folder / "full_mask.png")
    stroke = np.zeros((*TARGET_SIZE[::-1], 4), dtype=np.uint8)  # a painted layer: the mask's rectangle, opaque
    stroke[40:100, 60:150] = (255, 0, 255, 255)
    Image.fromarray(stroke).save(folder / "stroke.png")
    (folder / "notes.png").write_text("not an image")
    Image.new("L", (6000, 5000)).save(folder / "huge.png")  # 30 megapixels, a small file
    (folder / "bomb.png").write_bytes(png_header(20_000, 20_000))  # 400 megapixels: over Pillow's bomb limit
    jpeg = io.BytesIO()
    Image.fromarray(target).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "big.png").write_bytes(b"\0" * (MAX_FILE_SIZE + 1))  # over --max_file_size
    return folder, target, mask > 0


def png_header(width: int, height: int) -> bytes:
    """An 8-bit grayscale PNG of that size whose pixel data is missing (an empty IDAT chunk): a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def launch(demo) -> str:
    """Start ``demo`` on a free localhost port (not blocking) and return its URL."""
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, max_file_size="5mb")
    return url


@pytest.fixture(scope="module")
def pipe():
    return LeftRefillPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random", random_init=True, device="cpu",
                                             precision="fp32", test_size=64)


@pytest.fixture(scope="module")
def app(pipe):
    demo = build_demo(pipe, "tiny random model", max_samples=2)
    yield launch(demo)
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app, verbose=False)


def fill(client, images, *, reference="reference.png", target="target.png", mask="mask.png", layers=(), steps=3,
         cfg=2.5, eta=1.0, seed=7, samples=1, sampler="ddim"):
    from gradio_client import handle_file

    folder = images[0]
    editor = {"background": handle_file(str(folder / target)) if target else None,
              "layers": [handle_file(str(folder / layer)) for layer in layers], "composite": None}
    return client.predict([{"image": handle_file(str(folder / reference))}] if reference else [], editor,
                          handle_file(str(folder / mask)) if mask else None, steps, cfg, eta, seed, samples,
                          sampler, api_name="/fill")


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


def test_a_layer_painted_through_the_api_is_the_mask(client, images):
    _, target, mask = images
    gallery, _ = fill(client, images, mask=None, layers=["stroke.png"])
    result = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    assert np.array_equal(result[~mask], target[~mask])
    assert (result[mask] != target[mask]).any(axis=-1).mean() > 0.5


@pytest.mark.parametrize("case, message", [
    (dict(reference=None), "Add a reference image: a photo of the same place from another viewpoint."),
    (dict(target=None), "Add a target image: the photo with the region to fill."),
    (dict(mask="empty_mask.png"), "The mask is empty: paint over the part of the target to fill"),
    (dict(mask="notes.png"), "The mask could not be read: 'notes.png' is not an image file Pillow can read"),
    (dict(reference="notes.png"), "The reference could not be read: 'notes.png' is not an image file Pillow can read"),
    (dict(reference="huge.png"), "The reference is 6000x5000 pixels; the limit is 25 megapixels."),
    # A bad target gets the same messages as a bad reference (it used to be Gradio's generic error).
    (dict(target="notes.png"), "The target could not be read: 'notes.png' is not an image file Pillow can read"),
    (dict(target="truncated.jpg"), "The target could not be read: 'truncated.jpg' cannot be decoded (truncated "
                                   "or corrupt?): image file is truncated"),
    (dict(target="huge.png"), "The target is 6000x5000 pixels; the limit is 25 megapixels."),
    (dict(layers=["notes.png"]), "The painted layers of the target could not be read: each must be an image file "
                                 "Pillow can read."),
    (dict(target="bomb.png"), "The target could not be read: 'bomb.png' is too large to open safely (Image size "
                              "(400000000 pixels) exceeds limit of"),  # Pillow's decompression-bomb limit
])
def test_bad_input_gives_a_readable_message_and_the_app_keeps_serving(client, images, case, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=re.escape(message)):
        fill(client, images, **case)
    gallery, _ = fill(client, images)  # still serving
    assert len(gallery) == 1


@pytest.mark.parametrize("case, message", [
    (dict(steps=0), "steps must be an integer in [1, 999], got 0"),
    (dict(steps=2.5), "steps must be an integer in [1, 999], got 2.5"),
    (dict(eta=-0.5), "eta must be a finite number >= 0, got -0.5"),
    (dict(seed=-1), f"seed must be an integer in [0, {MAX_SEED}], got -1"),
    (dict(seed=MAX_SEED + 1), f"seed must be an integer in [0, {MAX_SEED}], got {MAX_SEED + 1}"),
    (dict(seed=MAX_SEED, samples=2), f"seed must be an integer in [0, {MAX_SEED - 1}] so that seed + 1 (the last "
                                     f"item's seed) fits, got {MAX_SEED}"),
    (dict(seed=None), "seed is empty: enter a number."),  # an emptied field
    (dict(samples=3), "num_samples must be an integer in [1, 2], got 3"),  # the app's cap (max_samples=2)
])
def test_each_bad_sampling_option_gets_the_shared_message_naming_it(client, images, case, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        fill(client, images, **case)
    assert caught.value.message == message


@pytest.mark.parametrize("cfg, eta, message", [
    ("NaN", "1.0", "cfg must be a finite number >= 0, got nan"),  # what Python's json writes for nan
    ("1e999", "1.0", "cfg must be a finite number >= 0, got inf"),  # valid JSON that parses to inf
    ("2.5", "-Infinity", "eta must be a finite number >= 0, got -inf"),
])
def test_non_finite_options_get_the_shared_message(app, cfg, eta, message):
    import httpx

    # gradio_client refuses to write NaN, so the body is written by hand, as another client might send it.
    body = (f'{{"data": [[], {{"background": null, "layers": [], "composite": null}}, null, 3, {cfg}, {eta}, 7, 1, '
            f'"ddim"]}}')
    event = httpx.post(f"{app}gradio_api/call/fill", content=body, headers={"Content-Type": "application/json"})
    stream = httpx.get(f"{app}gradio_api/call/fill/{event.json()['event_id']}", timeout=60).text
    assert stream.startswith("event: error\ndata: ")
    assert json.loads(stream.split("data: ", 1)[1])["error"] == message


def test_an_upload_over_max_file_size_is_refused_with_a_message(app, client, images):
    import httpx

    folder = images[0]
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {MAX_FILE_SIZE} bytes"):
        fill(client, images, target="big.png")  # gradio_client refuses before sending
    with open(folder / "big.png", "rb") as file:  # and so does the server, for any other client
        response = httpx.post(f"{app}gradio_api/upload", files=[("files", ("big.png", file))])
    assert response.status_code == 413
    assert response.text == f"File size exceeded maximum allowed size of {MAX_FILE_SIZE} bytes."


def test_the_sampler_dropdown_reaches_the_pipeline(client, images):
    from gradio_client.exceptions import AppError

    ddim = fill(client, images, sampler="ddim")
    dpm = fill(client, images, sampler="dpmpp_2m")  # its eta is DDIM's and is not passed on
    first = lambda results: np.asarray(Image.open(results[0][0]["image"]))  # noqa: E731
    assert first(ddim).shape == first(dpm).shape and not np.array_equal(first(ddim), first(dpm))
    with pytest.raises(AppError, match="sampler must be one of ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, got 'euler'"):
        fill(client, images, sampler="euler")


def test_example_rows_are_labelled_by_pair_folder(client):
    [dataset] = [c for c in client.config["components"] if c["type"] == "dataset"]
    folders = sorted(p.name for p in (ROOT / "data" / "samples").iterdir() if p.is_dir())
    assert folders and dataset["props"]["sample_labels"] == folders


def test_uploads_older_than_the_cache_age_are_deleted_and_the_examples_kept(pipe):
    import httpx

    assert build_demo(pipe, "tiny").delete_cache == CACHE_CLEANUP == (600, 3600)
    demo = build_demo(pipe, "tiny", delete_cache=(1, 1))  # sweep every second, files older than a second
    examples = {path for block in demo.blocks.values() for path in block.temp_files}  # nothing uploaded yet
    assert {Path(path).name for path in examples} == {"source.jpg", "target.jpg", "mask.png"}
    url = launch(demo)
    try:
        upload = ("upload.txt", os.urandom(64))  # content of its own: a cache path no other test shares
        [cached] = httpx.post(f"{url}gradio_api/upload", files=[("files", upload)]).json()
        assert Path(cached).read_bytes() == upload[1]
        deadline = time.monotonic() + 15
        while Path(cached).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(cached).exists()
        assert all(Path(path).is_file() for path in examples)  # the examples still load
    finally:
        demo.close()


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
        page.get_by_text("building", exact=True).first.click()  # data/samples/building, with its mask.png
        page.locator("#target canvas").first.wait_for()
        page.wait_for_timeout(2000)
        page.locator("#run").click()
        result_image = page.locator("#results img").first
        result_image.wait_for(timeout=120_000)
        body = page.request.get(result_image.get_attribute("src")).body()
        browser.close()
    assert Image.open(io.BytesIO(body)).size == Image.open(ROOT / "data/samples/building/target.jpg").size


def test_default_paths_resolve_from_the_project_folder_not_the_working_directory(tmp_path, monkeypatch):
    import ref_inpainting_gradio

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LEFTREFILL_HOME", raising=False)
    args = ref_inpainting_gradio.parse_args([])
    assert Path(args.model_path) == ROOT / "checkpoints" / "ref_guided_inpainting"
    assert Path(args.model_path, "model_config.yaml").is_file()
    home = tmp_path / "home"
    (home / "pretrained_models").mkdir(parents=True)
    (home / "pretrained_models" / "512-inpainting-ema.ckpt").touch()
    monkeypatch.setenv("LEFTREFILL_HOME", str(home))
    assert Path(ref_inpainting_gradio.parse_args([]).base_ckpt) == home / "pretrained_models" / "512-inpainting-ema.ckpt"
    typed = ref_inpainting_gradio.parse_args(["--model_path", "mine", "--base_ckpt", "sd2.ckpt"])
    assert (typed.model_path, typed.base_ckpt) == ("mine", "sd2.ckpt")  # typed paths: relative to the cwd


def test_help_shows_every_default_and_keeps_the_example_commands(capsys, monkeypatch):
    import ref_inpainting_gradio

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        ref_inpainting_gradio.parse_args(["--help"])
    text = capsys.readouterr().out
    assert ("\n    python ref_inpainting_gradio.py                      # http://127.0.0.1:7860, released tokens "
            "+ SD2\n    python ref_inpainting_gradio.py --server_name 0.0.0.0 --server_port 8080 --share\n") in text
    entries = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]
    flags = [entry.split()[0] for entry in entries]
    assert flags == ["--model_path", "--base_ckpt", "--nvs_model_path", "--no_nvs", "--realfill_models",
                     "--realfill_max_steps", "--no_realfill", "--device", "--precision",
                     "--server_name", "--server_port", "--share", "--max_samples", "--max_file_size"]
    assert all("(default: " in " ".join(entry.split()) for entry in entries)
    assert all(action.help for action in ref_inpainting_gradio.build_parser()._actions)  # what each flag does


@pytest.mark.parametrize("argv, message", [
    (["--max_samples", "0"], "argument --max_samples: expected an integer >= 1, got '0'"),
    (["--max_file_size", "20 megs"], "argument --max_file_size: expected a number and a unit (b, kb, mb, gb, tb), "
                                     "e.g. 20mb; got '20 megs'"),
])
def test_bad_flags_give_one_line(argv, message, capsys):
    import ref_inpainting_gradio

    with pytest.raises(SystemExit):
        ref_inpainting_gradio.parse_args(argv)
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")  # after the program name


def test_the_cli_serves_with_its_flags_and_its_log_names_the_share_flag(tmp_path, monkeypatch, caplog, capsys):
    import gradio as gr

    import ref_inpainting_gradio

    launched = []
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda demo: launched.append(demo))  # return, don't serve
    port = free_port()
    with caplog.at_level(logging.INFO, logger="ref_inpainting_gradio"):
        code = ref_inpainting_gradio.main(["--base_ckpt", str(tmp_path / "absent.ckpt"), "--device", "cpu",
                                           "--server_port", str(port), "--max_file_size", "3kb"])
    launched[0].close()
    assert code == 0 and launched[0].max_file_size == 3 * 1024  # what Gradio's upload route enforces
    messages = [record.getMessage() for record in caplog.records if record.name == "ref_inpainting_gradio"]
    assert messages[-1] == (f"Demo running on http://127.0.0.1:{port}/; to create a public link, "
                                   f"restart with --share")
    assert "share=True" not in capsys.readouterr().out  # Gradio's own hint names its Python argument
    assert ref_inpainting_gradio.startup_message("http://127.0.0.1:7860/", "https://x.gradio.live", True) == (
        "Demo running on http://127.0.0.1:7860/ and publicly on https://x.gradio.live (a temporary gradio.live link)")
    assert ref_inpainting_gradio.startup_message("http://127.0.0.1:7860/", None, True) == (
        "Demo running on http://127.0.0.1:7860/; --share could not create a public link (Gradio says why above)")


def test_a_taken_port_gives_one_log_line_and_exit_code_2(tmp_path, caplog):
    import ref_inpainting_gradio

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = ref_inpainting_gradio.main(["--base_ckpt", str(tmp_path / "absent.ckpt"), "--device", "cpu",
                                           "--server_port", str(port)])
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert code == 2 and errors == [f"cannot serve on 127.0.0.1:{port} (Cannot find empty port in range: "
                                    f"{port}-{port}); pick another --server_port or --server_name"]


# ---------------------------------------------------------------------------------- novel view synthesis tab

NVS_RENDER = ROOT / "data" / "samples_nvs" / "views_release" / "proc_totem" / "002.png"
TURNTABLE_CAPTIONS = [f"azimuth +{azimuth}°" for azimuth in range(0, 360, 45)]


@pytest.fixture(scope="module")
def nvs_pipe():
    from leftrefill.nvs_pipeline import NVSPipeline

    return NVSPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random_nvs", random_init=True, device="cpu",
                                      precision="fp32", test_size=64)


@pytest.fixture(scope="module")
def nvs(nvs_pipe):
    from leftrefill.demo_nvs import NVSHandler

    return NVSHandler(nvs_pipe)


def upload(path) -> dict:
    """The raw payload of an uploaded file, as the events receive it (preprocess=False)."""
    return {"path": str(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_the_view_and_turntable_callbacks_reach_the_pipeline(nvs):
    view = nvs.view(upload(NVS_RENDER), 0, 0, 0.0, 2, 2.5, 7)
    assert view.size == (64, 64)
    assert np.array_equal(pixels(nvs.view(upload(NVS_RENDER), 0, 0, 0.0, 2, 2.5, 7)), pixels(view))  # seeded
    for moved in ((90, 0, 0.0), (0, 30, 0.0), (0, 0, 0.3)):  # azimuth, polar, radius: each slider counts
        assert not np.array_equal(pixels(nvs.view(upload(NVS_RENDER), *moved, 2, 2.5, 7)), pixels(view)), moved
    turntable = nvs.turntable(upload(NVS_RENDER), 0, 0.0, 2, 2.5, 7)
    assert [caption for _, caption in turntable] == TURNTABLE_CAPTIONS
    assert all(image.size == (64, 64) for image, _ in turntable)
    # view k of the turntable is the single view at azimuth 45 k with seed + k
    assert np.abs(pixels(turntable[0][0]) - pixels(view)).max() <= 1
    second = nvs.view(upload(NVS_RENDER), 45, 0, 0.0, 2, 2.5, 8)
    assert np.abs(pixels(turntable[1][0]) - pixels(second)).max() <= 1


def test_an_rgb_object_image_on_white_is_taken(nvs, tmp_path):
    rgb = np.full((96, 80, 3), 255, np.uint8)
    rgb[30:70, 20:60] = (200, 40, 40)
    Image.fromarray(rgb).save(tmp_path / "object.jpg")
    assert nvs.view(upload(tmp_path / "object.jpg"), 30, -10, 0.1, 2, 2.5, 0).size == (64, 64)


@pytest.mark.parametrize("case, message", [
    (dict(image=None), "Add an object image: one object, on a transparent or white background."),
    (dict(image="notes.png"), "The object image could not be read: 'notes.png' is not an image file Pillow can read"),
    (dict(image="huge.png"), "The object image is 6000x5000 pixels; the limit is 25 megapixels."),
    (dict(azimuth=200), "azimuth change must be a number in [-180, 180] degrees, got 200"),
    (dict(polar=None), "polar change is empty: enter a number."),
    (dict(radius=0.6), "radius change must be a number in [-0.5, 0.5] world units, got 0.6"),
    (dict(radius=float("nan")), "radius change must be a number in [-0.5, 0.5] world units, got nan"),
    (dict(steps=0), "steps must be an integer in [1, 999], got 0"),
    (dict(cfg=float("inf")), "cfg must be a finite number >= 0, got inf"),
    (dict(seed=-1), f"seed must be an integer in [0, {MAX_SEED}], got -1"),
])
def test_bad_nvs_input_gives_a_readable_message(nvs, images, case, message):
    import gradio as gr

    values = {"image": "reference.png", "azimuth": 90, "polar": 0, "radius": 0.0, "steps": 2, "cfg": 2.5, "seed": 7,
              **case}
    image = upload(images[0] / values["image"]) if values["image"] else None
    with pytest.raises(gr.Error) as caught:
        nvs.view(image, values["azimuth"], values["polar"], values["radius"], values["steps"], values["cfg"],
                 values["seed"])
    assert message in str(caught.value.message)


def test_the_turntable_seeds_must_all_fit(nvs):
    import gradio as gr

    with pytest.raises(gr.Error) as caught:
        nvs.turntable(upload(NVS_RENDER), 0, 0.0, 2, 2.5, MAX_SEED - 1)
    assert caught.value.message == (f"seed must be an integer in [0, {MAX_SEED - 7}] so that seed + 7 (the last "
                                    f"item's seed) fits, got {MAX_SEED - 1}")


@pytest.fixture(scope="module")
def nvs_app(pipe, nvs_pipe):
    demo = build_demo(pipe, "tiny random model", nvs=(nvs_pipe, "tiny random NVS model"))
    yield launch(demo)
    demo.close()


def test_the_nvs_tab_serves_its_two_buttons_through_the_api(nvs_app):
    from gradio_client import Client, handle_file

    client = Client(nvs_app, verbose=False)
    view = client.predict(handle_file(str(NVS_RENDER)), 90, 0, 0, 2, 2.5, 7, api_name="/novel_view")
    assert Image.open(view).size == (64, 64)
    gallery = client.predict(handle_file(str(NVS_RENDER)), 0, 0, 2, 2.5, 7, api_name="/turntable")
    assert [item["caption"] for item in gallery] == TURNTABLE_CAPTIONS
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/fill", "/novel_view", "/turntable"} <= set(endpoints)  # the inpainting event is still there
    labels = [c["props"].get("sample_labels") for c in client.config["components"] if c["type"] == "dataset"]
    assert ["proc_box_stripes", "proc_sphere_checker", "proc_totem"] in labels  # the bundled renders as examples


def test_the_nvs_banner_says_loudly_that_the_weights_are_random(nvs_pipe, tmp_path):
    import ref_inpainting_gradio
    from leftrefill.demo_nvs import nvs_weights_banner

    args = ref_inpainting_gradio.parse_args(["--base_ckpt", str(tmp_path / "absent.ckpt"), "--device", "cpu"])
    assert Path(args.nvs_model_path) == ROOT / "checkpoints" / "nvs_objaverse"  # a config, no trained weights
    fallback, description = ref_inpainting_gradio.load_nvs_pipeline(args)
    assert fallback.random_weights and "tiny random NVS model" in description
    banner = nvs_weights_banner(fallback, description)
    assert banner.startswith("### ⚠️ Random weights: results are noise") and "--nvs_model_path" in banner
    assert ref_inpainting_gradio.load_nvs_pipeline(ref_inpainting_gradio.parse_args(["--no_nvs"])) is None
    with pytest.raises(FileNotFoundError, match="^--nvs_model_path .*absent: no such model directory$"):
        ref_inpainting_gradio.load_nvs_pipeline(ref_inpainting_gradio.parse_args(
            ["--nvs_model_path", str(tmp_path / "absent")]))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_the_nvs_tab_is_on_the_page_beside_inpainting(nvs_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(nvs_app)
        page.locator("#run").wait_for(timeout=30_000)  # the inpainting tab is the first one
        page.get_by_role("tab", name="Novel view synthesis").click()
        page.locator("#nvs_run").wait_for(timeout=30_000)
        assert page.locator("#nvs_turntable").is_visible() and not page.locator("#run").is_visible()
        assert "Random weights: results are noise" in page.locator("#nvs_weights").inner_text()
        browser.close()


def test_the_sliders_map_to_polar_azimuth_radius_in_that_order(nvs, monkeypatch):
    """The handler passes pose = (polar, azimuth, radius) as NVSPipeline takes it, and the turntable the polar
    and radius sliders (a swap of two sliders would still change the output, so the arguments are checked)."""
    seen = {}
    monkeypatch.setattr(type(nvs.pipe), "__call__", lambda self, image, **kw: seen.update(call=kw) or ["view"])
    monkeypatch.setattr(type(nvs.pipe), "turntable",
                        lambda self, image, n, **kw: seen.update(turntable=kw) or ["view"] * n)
    nvs.view(upload(NVS_RENDER), 60, -20, 0.25, 2, 2.5, 7)
    assert seen["call"]["pose"] == (-20.0, 60.0, 0.25)
    nvs.turntable(upload(NVS_RENDER), 15, -0.3, 2, 2.5, 7)
    assert seen["turntable"]["d_polar"] == 15.0 and seen["turntable"]["d_radius"] == -0.3


@pytest.mark.parametrize("payload, message", [
    ("transparent", "The object image shows no object: it is all transparent or all white."),
    ("white", "The object image shows no object: it is all transparent or all white."),
    ("not a dict", "Add an object image: one object, on a transparent or white background."),
])
def test_an_image_without_an_object_or_a_malformed_payload_is_refused(nvs, tmp_path, payload, message):
    import gradio as gr

    if payload == "transparent":
        Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(tmp_path / "empty.png")
        image = upload(tmp_path / "empty.png")
    elif payload == "white":
        Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "white.png")
        image = upload(tmp_path / "white.png")
    else:
        image = "/etc/passwd"
    with pytest.raises(gr.Error) as caught:
        nvs.view(image, 90, 0, 0.0, 2, 2.5, 7)
    assert message in str(caught.value.message)


# ---------------------------------------------------------------------------------- RealFill tab

REALFILL_SCENE = ROOT / "data" / "samples_realfill" / "sacre_coeur"
REALFILL_REFERENCES = sorted((REALFILL_SCENE / "ref").iterdir())  # three views
CAPTION = re.compile(r"#(\d+) · (\d+) match(?:es)? \((\d+) \+ (\d+) \+ (\d+)\) · seed (\d+)")


@pytest.fixture(scope="module")
def realfill_settings(tmp_path_factory):
    from leftrefill.demo_realfill import RealFillSettings

    folder = tmp_path_factory.mktemp("realfill")
    # SIFT: ALIKED + LightGlue ranks 2 samples against 3 references in ~30 s on a busy 2-core CPU
    return RealFillSettings(ROOT / "configs" / "tiny_realfill.yaml", None, model_root=folder / "models",
                            device="cpu", precision="fp32", max_train_steps=50, train_steps=2, match_method="sift",
                            work_dir=folder / "runs")


@pytest.fixture(scope="module")
def realfill_demo(pipe, realfill_settings):
    demo = build_demo(pipe, "tiny random model", max_samples=2, realfill=realfill_settings)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def realfill(realfill_demo):
    """The tab's RealFillHandler, as its events call it."""
    [event] = [fn for fn in realfill_demo.fns.values() if fn.api_name == "realfill_train"]
    return event.fn.__self__


def scene_inputs(references=REALFILL_REFERENCES, target=REALFILL_SCENE / "target" / "target.png",
                 mask=REALFILL_SCENE / "target" / "mask.png") -> tuple:
    """(references, target editor, mask) as the RealFill events receive them (preprocess=False)."""
    editor = {"background": upload(target) if target else None, "layers": [], "composite": None}
    return [{"image": upload(path), "caption": None} for path in references], editor, upload(mask) if mask else None


@pytest.fixture(scope="module")
def trained(realfill):
    """Two fine-tuning steps on the bundled scene: (status, adapter file, session model, progress calls)."""
    calls = []
    status, adapter, model = realfill.train(*scene_inputs(), 2, None,
                                            progress=lambda value, **kw: calls.append((value, kw)))
    return status, Path(adapter), model, calls


def test_fine_tuning_reports_each_step_and_keeps_only_the_adapters(trained, realfill_settings):
    from leftrefill.realfill_pipeline import ADAPTER_NAME

    status, adapter, model, calls = trained
    assert calls == [((step, 2), {"desc": "Fine-tuning", "unit": "steps"}) for step in (1, 2)]
    assert status.startswith("Fine-tuned 2 steps on 3 reference(s) and the target in ")
    assert model.owned and adapter == model.model_dir / ADAPTER_NAME
    assert model.model_dir.parent.parent == realfill_settings.work_dir
    assert sorted(p.name for p in model.model_dir.iterdir()) == [ADAPTER_NAME, "model_config.yaml",
                                                                 "training_config.yaml"]
    assert [p.name for p in model.model_dir.parent.iterdir()] == ["model"]  # the uploaded scene is gone


def test_fill_gives_the_samples_ranked_by_matches_and_keeps_the_known_pixels(realfill, trained):
    import cv2

    from leftrefill.images import load_mask, load_rgb

    model = trained[2]
    calls = []
    gallery, kept = realfill.fill(*scene_inputs(), "ddpm", 2, 5, 2, model,
                                  progress=lambda value, **kw: calls.append((value, kw["desc"])))
    assert kept == model
    assert ((2, 2), "Sampling") in calls and calls[-1] == ((2, 2), "Ranking by matches")
    target = load_rgb(REALFILL_SCENE / "target" / "target.png", "target")
    hole = load_mask(REALFILL_SCENE / "target" / "mask.png", "mask")
    seam = cv2.dilate(hole.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # the soft composite's reach
    captions = [CAPTION.fullmatch(caption) for _, caption in gallery]
    assert len(gallery) == 2 and all(captions), [caption for _, caption in gallery]
    ranks, matches, seeds = zip(*[(int(c[1]), int(c[2]), int(c[6])) for c in captions])
    assert ranks == (1, 2) and matches[0] >= matches[1] and sorted(seeds) == [5, 6]
    assert all(int(c[2]) == int(c[3]) + int(c[4]) + int(c[5]) for c in captions)  # the sum over references
    for image, _ in gallery:
        assert image.shape == target.shape and np.array_equal(image[~seam], target[~seam])
        assert (image[hole] != target[hole]).any()


@pytest.fixture(scope="module")
def realfill_url(realfill_demo):
    return launch(realfill_demo)  # closed with the demo


def test_the_tab_fine_tunes_and_fills_through_the_api(realfill_url):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(realfill_url, verbose=False)
    tabs = [c["props"].get("label") for c in client.config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Reference-guided inpainting", "RealFill"]
    labels = [c["props"].get("sample_labels") for c in client.config["components"] if c["type"] == "dataset"]
    assert ["sacre_coeur"] in labels  # the bundled scene as an example
    references = [{"image": handle_file(str(path))} for path in REALFILL_REFERENCES]
    target = {"background": handle_file(str(REALFILL_SCENE / "target" / "target.png")), "layers": [],
              "composite": None}
    mask = handle_file(str(REALFILL_SCENE / "target" / "mask.png"))
    with pytest.raises(AppError, match="There is no model to fill with yet: press"):
        client.predict(references, target, mask, "ddpm", 2, 0, 2, api_name="/realfill_fill")
    status, adapter = client.predict(references, target, mask, 2, api_name="/realfill_train")
    assert status.startswith("Fine-tuned 2 steps") and Path(adapter).name == "adapters.safetensors"
    gallery = client.predict(references, target, mask, "ddpm", 2, 0, 2, api_name="/realfill_fill")  # same session
    assert [item["caption"].split(" · ")[0] for item in gallery] == ["#1", "#2"]
    assert Image.open(gallery[0]["image"]).size == Image.open(REALFILL_SCENE / "target" / "target.png").size


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_the_realfill_tab_is_on_the_page_with_its_banner_and_errors(realfill_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(realfill_url)
        page.get_by_role("tab", name="RealFill").click()
        page.locator("#realfill_fill").click()  # before any model: a readable error, not a crash
        page.get_by_text("There is no model to fill with yet").first.wait_for(timeout=30_000)
        assert page.locator("#realfill_train").is_visible() and not page.locator("#run").is_visible()
        assert "Random weights: results are noise" in page.locator("#realfill_weights").inner_text()
        browser.close()


@pytest.mark.parametrize("event, case, message", [
    ("train", dict(references=[]), "Add 1 to 5 reference images: photos of the same scene as the target"),
    ("train", dict(references=REALFILL_REFERENCES * 2), "RealFill takes 1 to 5 reference images, got 6: remove 1."),
    ("train", dict(references=[REALFILL_REFERENCES[0], "notes.png"]),
     "The reference 2 could not be read: 'notes.png' is not an image file Pillow can read"),
    ("train", dict(target=None), "Add a target image: the photo with the region to fill."),
    ("train", dict(mask="empty_mask.png"), "The mask is empty: paint over the part of the target to fill"),
    ("train", dict(mask="full_mask.png"), "The mask covers the whole target: RealFill also fine-tunes on the "
                                          "target's known pixels"),
    ("train", dict(steps=0), "fine-tuning steps must be an integer in [1, 50], got 0"),  # the server's cap
    ("train", dict(steps=51), "fine-tuning steps must be an integer in [1, 50], got 51"),
    ("fill", dict(), "There is no model to fill with yet: press Fine-tune (or load a saved model) first."),
    ("fill", dict(samples=3), "num_samples must be an integer in [1, 2], got 3"),
    ("fill", dict(steps=0), "steps must be an integer in [1, 999], got 0"),
    ("load", dict(name=None), "Choose a saved model from the list (or fine-tune one on your scene)."),
    ("load", dict(name="../runs"), "There is no saved model '../runs' on this server; press ↻ to list them again."),
])
def test_bad_realfill_input_gives_one_message_naming_it(realfill, images, event, case, message):
    import gradio as gr

    folder = images[0]
    values = {"references": [folder / "reference.png"], "target": "target.png", "mask": "mask.png", "steps": 2,
              "samples": 2, "name": "", **case}
    inputs = scene_inputs([folder / path for path in values["references"]],
                          values["target"] and folder / values["target"], folder / values["mask"])
    with pytest.raises(gr.Error) as caught:
        if event == "train":
            realfill.train(*inputs, values["steps"], None)
        elif event == "fill":
            realfill.fill(*inputs, "ddpm", values["steps"], 0, values["samples"], None)
        else:
            realfill.load(values["name"], None)
    assert message in str(caught.value.message)


def test_saved_models_are_offered_by_folder_name_and_only_those_this_server_can_load(realfill, trained,
                                                                                     realfill_settings, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from leftrefill.demo_realfill import SessionModel
    from leftrefill.model_dir import METADATA_KEY

    root, saved = realfill_settings.model_root, trained[2].model_dir
    shutil.copytree(saved, root / "sacre_coeur_tiny")
    shutil.copytree(saved, root / "on_sd2")  # adapters trained on a base checkpoint: not for random weights
    adapter = root / "on_sd2" / "adapters.safetensors"
    save_file(load_file(adapter), adapter, metadata={METADATA_KEY: json.dumps({"base_checkpoint": {"sha256": "0"}})})
    (root / "no_adapters").mkdir()
    assert realfill.refresh()["choices"] == ["sacre_coeur_tiny"]
    status, download, model = realfill.load("sacre_coeur_tiny", trained[2])
    assert status == "Loaded the saved model `sacre_coeur_tiny`. Press **Fill**." and download is None
    assert model == SessionModel(root / "sacre_coeur_tiny", "saved model `sacre_coeur_tiny`", owned=False)
    assert list(realfill.pipes.pipes) == [root / "sacre_coeur_tiny"]  # loaded now, the only one in memory
    realfill.forget(model)  # a saved model stays on disk when its session ends
    assert not realfill.pipes.pipes and (root / "sacre_coeur_tiny" / "adapters.safetensors").is_file()
    (tmp_path / "run" / "model").mkdir(parents=True)
    realfill.forget(SessionModel(tmp_path / "run" / "model", "fine-tuned here", owned=True))
    assert not (tmp_path / "run").exists()  # a session's own run goes with it


def test_the_realfill_tab_falls_back_to_random_weights_and_says_so_loudly(tmp_path):
    import ref_inpainting_gradio
    from leftrefill.demo_realfill import realfill_banner

    args = ref_inpainting_gradio.parse_args(["--base_ckpt", str(tmp_path / "absent.ckpt"), "--device", "cpu"])
    settings = ref_inpainting_gradio.realfill_settings(args)
    assert settings.random_weights and settings.config == ROOT / "configs" / "tiny_realfill.yaml"
    assert settings.model_root == ROOT / "checkpoints" and settings.max_train_steps == 2000
    [override] = settings.overrides  # the model config from the project folder, whatever the working directory
    assert override == f'model.config="{ROOT / "checkpoints" / "tiny_random_realfill" / "model_config.yaml"}"'
    banner = realfill_banner(settings)
    assert banner.startswith("### ⚠️ Random weights: results are noise") and "pretrained_models/" in banner
    assert ref_inpainting_gradio.realfill_settings(ref_inpainting_gradio.parse_args(["--no_realfill"])) is None


def test_with_the_sd2_checkpoint_the_tab_fine_tunes_the_recipe_and_its_overrides_fit_it(tmp_path):
    import ref_inpainting_gradio
    from leftrefill.demo_realfill import realfill_banner, training_overrides
    from leftrefill.realfill_training import realfill_config

    (tmp_path / "sd2.ckpt").touch()  # only its presence is looked at before a fine-tune
    args = ref_inpainting_gradio.parse_args(["--base_ckpt", str(tmp_path / "sd2.ckpt"), "--device", "cpu",
                                             "--realfill_max_steps", "500"])
    settings = ref_inpainting_gradio.realfill_settings(args)
    assert (settings.config, settings.base_ckpt) == (ROOT / "configs" / "realfill.yaml", tmp_path / "sd2.ckpt")
    assert (settings.train_steps, settings.max_train_steps, settings.training_target()) == (200, 500, ("cpu", "32"))
    assert realfill_banner(settings) == (f"Fine-tunes LoRA adapters of `{tmp_path / 'sd2.ckpt'}` with "
                                         f"`{ROOT / 'configs' / 'realfill.yaml'}` · cpu, precision 32")
    config = realfill_config(settings.config, REALFILL_SCENE, max_steps=200, random_init=True,
                             overrides=[*settings.overrides, *training_overrides(200)])
    assert config.model.config == str(ROOT / "checkpoints" / "realfill" / "model_config.yaml")
    assert (config.data.num_workers, config.trainer.logger_freq, config.trainer.save_last_every_n_steps) == (0, 201, 0)


# ------------------------------------------------------------------------------------ multi-view models

@pytest.fixture(scope="module")
def multiview_demo():
    from leftrefill.multiview_pipeline import MultiViewPipeline

    pipe = MultiViewPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random_multiview", random_init=True,
                                            device="cpu", precision="fp32", test_size=64)
    demo = build_demo(pipe, "tiny random multi-view model", max_samples=2)
    yield demo
    demo.close()


def fill_handler(demo):
    """The inpainting tab's InpaintingHandler, as its Run event calls it (preprocess=False)."""
    [event] = [fn for fn in demo.fns.values() if fn.api_name == "fill"]
    return event.fn


def run_fill(handler, images, references, seed=7):
    folder = images[0]
    editor = {"background": upload(folder / "target.png"), "layers": [], "composite": None}
    gallery = [{"image": upload(folder / name), "caption": None} for name in references]
    results, _ = handler(gallery, editor, upload(folder / "mask.png"), 2, 2.5, 1.0, seed, 1, "ddim")
    return pixels(results[0])


def test_a_multiview_model_fills_from_its_references_and_says_how_many_it_needs(multiview_demo, images):
    from gradio.exceptions import Error

    _, target, mask = images
    handler = fill_handler(multiview_demo)
    result = run_fill(handler, images, ["reference.png"])
    assert result.shape == target.shape and np.array_equal(result[~mask], target[~mask])
    assert not np.array_equal(run_fill(handler, images, ["stroke.png"]), result)  # the reference counts
    for uploads in ([], ["reference.png", "reference.png"]):
        with pytest.raises(Error, match=re.escape(
                f"This model was trained for 2 views: add 1 reference image to the gallery (photos of the same "
                f"place from other viewpoints, the most overlapping first); got {len(uploads)}.")):
            run_fill(handler, images, uploads)
    page = [block.value for block in multiview_demo.blocks.values() if block.get_block_name() == "markdown"]
    assert any("This model was trained for 2 views: upload 1 reference photo of the same scene" in text
               for text in page)


def test_the_one_reference_model_keeps_using_the_first_of_several_references(pipe, images):
    handler = fill_handler(build_demo(pipe, "tiny random model", max_samples=2))
    first = run_fill(handler, images, ["reference.png"])
    with pytest.warns(UserWarning, match="The single-reference model uses the first reference image only."):
        both = run_fill(handler, images, ["reference.png", "stroke.png"])
    assert np.array_equal(both, first)


def test_a_multiview_model_path_gets_the_multiview_page_and_its_tiny_fallback(tmp_path):
    import ref_inpainting_gradio
    from leftrefill.multiview_pipeline import MultiViewPipeline

    args = ref_inpainting_gradio.parse_args(["--model_path", str(ROOT / "checkpoints" / "multiview_ref_inpainting"),
                                             "--base_ckpt", str(tmp_path / "absent.ckpt"), "--device", "cpu"])
    pipe, description = ref_inpainting_gradio.load_pipeline(args)
    assert isinstance(pipe, MultiViewPipeline) and pipe.random_weights
    assert description == f"tiny random model `{ROOT / 'checkpoints' / 'tiny_random_multiview'}`"


def test_a_multiview_page_offers_the_bundled_items_with_enough_references():
    from leftrefill.demo import SAMPLES_MULTIVIEW, sample_examples

    examples, labels = sample_examples(SAMPLES_MULTIVIEW, 3)  # the 4-view model's three references, in order
    assert labels == ["sacre_coeur_a"]
    assert [Path(path).name for path in examples[0][0]] == ["source.jpg", "source_1.jpg", "source_2.jpg"]
    assert sample_examples(SAMPLES_MULTIVIEW, 4) == ([], [])  # no item has four
