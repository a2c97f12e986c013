"""The Gradio page for reference-guided inpainting: upload a reference and a target, paint, run; and, given
an NVS pipeline, a "Novel view synthesis" tab: upload an object image, pick a camera change, generate one
view or a turntable.

``build_demo(pipe, ..., nvs=...)`` returns the Blocks app; ``ref_inpainting_gradio.py`` builds the
pipelines (each once) and launches it. Every event takes Gradio's raw payloads (``preprocess=False``) and
its handler decodes them itself, through ``leftrefill.images`` and ``leftrefill.arguments`` as the command
line does, so every bad upload or option becomes one message naming the input, never Gradio's generic
"upstream Gradio app has raised an exception". Gradio still checks that every file named in a payload is
one it uploaded into its own cache, so user input never names a file on the server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page must not call out to the internet

import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from gradio.components.image_editor import EditorData  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.sampling import SAMPLERS  # noqa: E402
from leftrefill.arguments import MAX_SEED, check_sampling_options, takes_eta  # noqa: E402
from leftrefill.data.objaverse_nvs import NEAR_WHITE, read_rgba  # noqa: E402
from leftrefill.images import ImageInputError, load_mask, load_rgb  # noqa: E402
from leftrefill.nvs_pipeline import NVSPipeline  # noqa: E402
from leftrefill.pipeline import LeftRefillPipeline  # noqa: E402

log = logging.getLogger(__name__)

MAX_PIXELS = 25_000_000  # per image; larger uploads are refused with a message (5000 x 5000)
# Gradio's delete_cache (every, older than), in seconds: uploads and results are kept an hour, long enough
# to download a result, and swept every 10 minutes, so the cache stays bounded under load.
CACHE_CLEANUP = (600, 3600)
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
NVS_SAMPLES = SAMPLES.parent / "samples_nvs" / "views_release"
TURNTABLE_VIEWS = 8
# The NVS tab's camera-change ranges: (low, high, unit) per pose delta, as NVSPipeline takes them.
POSE_RANGES = {"azimuth change": (-180.0, 180.0, "degrees"), "polar change": (-90.0, 90.0, "degrees"),
               "radius change": (-0.5, 0.5, "world units")}
# What Pillow raises on a file it cannot decode (DecompressionBombError is not an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class InpaintingHandler:
    """The function behind the Run button: raw Gradio payloads in, (results, outline) out; every input
    problem becomes a gr.Error with a readable text."""

    def __init__(self, pipe: LeftRefillPipeline, editor: gr.ImageEditor, max_samples: int):
        self.pipe = pipe
        self.editor = editor  # decodes the painted layers and the browser's canvas blobs
        self.max_samples = max_samples

    def __call__(self, references, target, mask, steps, cfg, eta, seed, num_samples, sampler="ddim",
                 progress=gr.Progress(track_tqdm=True)):
        options = self.options(steps=steps, cfg=cfg, eta=eta, seed=seed, num_samples=num_samples)
        try:
            check_sampling_options(sampler=sampler)
        except ValueError as err:
            raise refused(str(err)) from None
        options["sampler"] = sampler
        if not takes_eta(sampler):
            options.pop("eta")  # the eta slider is DDIM's
        reference = self.reference(references)
        target, hole = self.target_and_mask(target, mask)
        if not hole.any():
            raise refused("The mask is empty: paint over the part of the target to fill (or upload a mask).")
        results = self.pipe(reference, target, hole, **options, progress=True)
        return results, Image.fromarray(outline(target, hole))

    def options(self, **values) -> dict:
        """The sampling options as the pipeline takes them; a gr.Error with the shared check's message
        (leftrefill.arguments, the command line's too) for the first bad one."""
        values = filled_in(values)
        samples = values["num_samples"]
        if isinstance(samples, bool) or not (isinstance(samples, int) and 1 <= samples <= self.max_samples):
            raise refused(f"num_samples must be an integer in [1, {self.max_samples}], got {samples!r}")
        return checked_sampling(values, num_seeds=samples)

    def reference(self, references: list[dict] | None) -> np.ndarray:
        """The first gallery image (GalleryData items: {"image": FileData, "caption"}) as RGB."""
        if not references:
            raise refused("Add a reference image: a photo of the same place from another viewpoint.")
        if len(references) > 1:
            gr.Warning("The single-reference model uses the first reference image only.")
        upload = references[0].get("image") if isinstance(references[0], dict) else None
        if not upload:
            raise refused("The reference must be an image (a photo of the same place), not a video.")
        return checked(upload["path"], "reference", load_rgb)

    def target_and_mask(self, editor: dict | None, mask: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """RGB target (H, W, 3) and bool mask (H, W): the painted strokes, plus the uploaded mask if any."""
        target, layers = self.editor_images(editor or {})
        painted = painted_mask(layers, target.shape[:2])
        if mask is None:
            return target, painted
        uploaded = checked(mask["path"], "mask", load_mask)
        if uploaded.shape != target.shape[:2]:
            gr.Warning(f"The mask is {uploaded.shape[1]}x{uploaded.shape[0]} but the target is "
                       f"{target.shape[1]}x{target.shape[0]}; it was resized to the target.")
        uploaded = cv2.resize(uploaded.astype(np.uint8), target.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
        return target, uploaded | painted  # an uploaded mask and painted strokes both count

    def editor_images(self, payload: dict) -> tuple[np.ndarray, list]:
        """The editor's target (RGB) and painted layers (RGBA arrays) from its raw EditorData payload.

        A background file (what API clients upload) is decoded by leftrefill.images, exactly like the
        reference, so it gets the same messages. The layers and the browser's canvas export (sent as
        blobs under ``id``) are PNGs the editor made; the editor itself decodes them.
        """
        upload = payload.get("background")
        target = checked(upload["path"], "target", load_rgb) if upload else None
        try:  # the background is taken from the blobs when there are some, else it was read above
            value = self.editor.preprocess(EditorData.model_validate({**payload, "background": None,
                                                                      "composite": None}))
        except DECODE_ERRORS:  # Pillow's text names the cache path on the server: not shown
            raise refused("The painted layers of the target could not be read: each must be an image file "
                          "Pillow can read.") from None
        if target is None and value["background"] is not None:
            target = checked(value["background"], "target", load_rgb)
        if target is None:
            raise refused("Add a target image: the photo with the region to fill.")
        return target, value["layers"]


class NVSHandler:
    """The functions behind the novel-view buttons: the raw Gradio payload of the object image and the
    slider values in, images out; every input problem becomes a gr.Error with a readable text."""

    def __init__(self, pipe: NVSPipeline):
        self.pipe = pipe

    def view(self, image, d_azimuth, d_polar, d_radius, steps, cfg, seed,
             progress=gr.Progress(track_tqdm=True)) -> Image.Image:
        """One new view of the object, the camera moved by (d_polar, d_azimuth, d_radius)."""
        reference = self.object_image(image)
        pose = camera_change(azimuth=d_azimuth, polar=d_polar, radius=d_radius)
        options = checked_sampling(filled_in({"steps": steps, "cfg": cfg, "seed": seed}))
        [view] = self.pipe(reference, pose=(pose["polar"], pose["azimuth"], pose["radius"]), **options,
                           progress=True)
        return view

    def turntable(self, image, d_polar, d_radius, steps, cfg, seed,
                  progress=gr.Progress(track_tqdm=True)) -> list[tuple[Image.Image, str]]:
        """TURNTABLE_VIEWS views at azimuth changes 0, 45, ... 315 degrees (view k: seed + k), captioned."""
        reference = self.object_image(image)
        pose = camera_change(polar=d_polar, radius=d_radius)
        options = checked_sampling(filled_in({"steps": steps, "cfg": cfg, "seed": seed}), TURNTABLE_VIEWS)
        views = self.pipe.turntable(reference, TURNTABLE_VIEWS, d_polar=pose["polar"], d_radius=pose["radius"],
                                    **options, progress=True)
        return [(view, f"azimuth {360 * k / TURNTABLE_VIEWS:+g}°") for k, view in enumerate(views)]

    def object_image(self, upload: dict | None) -> np.ndarray:
        """The uploaded image as uint8 (H, W, 4) with its alpha, or (H, W, 3) (a white background is assumed)."""
        if not isinstance(upload, dict) or not upload.get("path"):
            raise refused("Add an object image: one object, on a transparent or white background.")
        return checked(upload["path"], "object image", load_object_image)


def load_object_image(source, name: str) -> np.ndarray:
    """An image with its alpha channel when it has one, as leftrefill.data.objaverse_nvs.load_view takes it;
    a gr.Error when it shows no object (all transparent, or all white without alpha)."""
    rgb, alpha = read_rgba(source, name)
    silhouette = (rgb < NEAR_WHITE).any(axis=2) if alpha is None else alpha > 0
    if not silhouette.any():
        raise refused(f"The {name} shows no object: it is all transparent or all white. Upload one object on a "
                      f"transparent or white background.")
    return rgb if alpha is None else np.dstack([rgb, alpha])


def camera_change(**values) -> dict[str, float]:
    """The pose deltas by short name (azimuth, polar, radius), each checked against POSE_RANGES."""
    checked_values = {}
    for short, value in filled_in({f"{name} change": v for name, v in values.items()}).items():
        low, high, unit = POSE_RANGES[short]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise refused(f"{short} must be a number in [{low:g}, {high:g}] {unit}, got {value!r}")
        checked_values[short.removesuffix(" change")] = float(value)
    return checked_values


def filled_in(values: dict) -> dict:
    """``values`` with integral floats as ints (:func:`whole`); a gr.Error for the first one left empty."""
    for name, value in values.items():
        if value is None:
            raise refused(f"{name} is empty: enter a number.")
    return {name: whole(value) for name, value in values.items()}


def checked_sampling(values: dict, num_seeds: int = 1) -> dict:
    """``values`` (steps, cfg, seed, and eta when given) checked by the shared check (leftrefill.arguments,
    the command line's too), cfg and eta as floats; a gr.Error with its message for the first bad one."""
    try:
        check_sampling_options(steps=values["steps"], cfg=values["cfg"], eta=values.get("eta"), seed=values["seed"],
                               num_seeds=num_seeds)
    except ValueError as err:
        raise refused(str(err)) from None
    return {**values, **{name: float(values[name]) for name in ("cfg", "eta") if name in values}}


def refused(message: str) -> gr.Error:
    """The error for a bad input: shown on the page and to API clients, no traceback in the server log."""
    return gr.Error(message, print_exception=False)


def whole(value):
    """An integral float (how JSON clients may send 50) as an int; anything else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def painted_mask(layers: list, shape: tuple[int, int]) -> np.ndarray:
    """Bool (H, W): True where any RGBA layer of the target's size has a painted (alpha > 0) pixel,
    whatever the brush colour."""
    mask = np.zeros(shape, dtype=bool)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4 and layer.shape[:2] == shape:
            mask |= layer[..., 3] > 0
    return mask


def outline(target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The target (H, W, 3) with the mask's outline drawn in red, 2 px wide."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    drawn = target.copy()
    cv2.drawContours(drawn, contours, -1, (255, 0, 0), max(2, round(max(mask.shape) / 400)))
    return drawn


def checked(value, name: str, loader) -> np.ndarray:
    """Load an uploaded image with ``loader``; a bad or huge image becomes a gr.Error naming ``name``
    (and the uploaded file by its own name, never by its path on the server)."""
    if isinstance(value, (str, Path)):
        refuse_oversized(header_size(value), name)  # before decoding: a small PNG can hold a huge image
    try:
        array = loader(value, name)
    except ImageInputError as err:
        reason = str(err).split(": ", 1)[-1]
        if isinstance(value, (str, Path)):
            reason = reason.replace(str(value), f"'{Path(value).name}'")
        raise refused(f"The {name} could not be read: {reason}") from None
    refuse_oversized((array.shape[1], array.shape[0]), name)
    return array


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, nothing decoded; None when Pillow cannot tell (the loader
    then says why)."""
    try:
        with Image.open(path) as image:
            return image.size
    except DECODE_ERRORS:
        return None


def refuse_oversized(size: tuple[int, int] | None, name: str) -> None:
    """A gr.Error when ``size`` (width, height) has more than MAX_PIXELS pixels."""
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise refused(f"The {name} is {size[0]}x{size[1]} pixels; the limit is "
                       f"{MAX_PIXELS // 1_000_000} megapixels. Please upload a smaller image.")


def nvs_weights_banner(pipe: NVSPipeline, description: str) -> str:
    """The NVS tab's line under its title: which weights answer, or a loud warning that they are random."""
    if pipe.random_weights:
        return ("### ⚠️ Random weights: results are noise\n"
                "No trained novel-view-synthesis weights were found (none were released), so this tab runs a tiny "
                "model with random weights to show the interface. Train them with "
                "`configs/nvs_training_config.yaml` (see `docs/nvs.md`), then restart with `--nvs_model_path "
                "<run directory>`.")
    return f"Weights: {description} · {pipe.device}, {str(pipe.dtype).removeprefix('torch.')}"


def weights_banner(pipe: LeftRefillPipeline, description: str) -> str:
    """The line under the title: which weights answer, or a loud warning that they are random."""
    if pipe.random_weights:
        return ("### ⚠️ Random weights: results are noise\n"
                "The SD2 inpainting checkpoint was not found, so this page runs a tiny model with random "
                "weights to show the interface. Put `512-inpainting-ema.ckpt` in `pretrained_models/` (see "
                "`pretrained_models/README.md`) and restart for real results.")
    return f"Weights: {description} · {pipe.device}, {str(pipe.dtype).removeprefix('torch.')}"


def build_demo(pipe: LeftRefillPipeline, description: str, *, max_samples: int = 4,
               delete_cache: tuple[int, int] = CACHE_CLEANUP,
               nvs: tuple[NVSPipeline, str] | None = None) -> gr.Blocks:
    """The page. ``max_samples`` caps the samples per request; ``delete_cache`` is Gradio's (every,
    older than) sweep of this app's uploads and results, in seconds. ``nvs``: (pipeline, description of its
    weights) adds the "Novel view synthesis" tab beside the inpainting one."""
    title = "LeftRefill" if nvs else "LeftRefill: reference-guided inpainting"
    with gr.Blocks(title=title, delete_cache=delete_cache) as demo:
        if nvs is None:
            inpainting_ui(pipe, description, max_samples)
        else:
            with gr.Tabs():
                with gr.Tab("Reference-guided inpainting", id="inpainting", elem_id="inpainting_tab"):
                    inpainting_ui(pipe, description, max_samples)
                with gr.Tab("Novel view synthesis", id="nvs", elem_id="nvs_tab"):
                    nvs_ui(*nvs)
    return demo


def inpainting_ui(pipe: LeftRefillPipeline, description: str, max_samples: int) -> None:
    """The inpainting page's components and its Run event (api_name "fill"), in the current Blocks."""
    gr.Markdown("## LeftRefill: reference-guided inpainting\nUpload a reference photo of the same scene "
                "and a target photo, paint over what to replace on the target, and press **Run**.")
    gr.Markdown(weights_banner(pipe, description), elem_id="weights")
    with gr.Row():
        with gr.Column():
            references = gr.Gallery(label="Reference view(s)", type="filepath", interactive=True,
                                    file_types=["image"], height=300, elem_id="reference")
            target = gr.ImageEditor(label="Target: paint the region to fill", type="numpy",
                                    image_mode="RGBA", sources=("upload", "clipboard"), format="png",
                                    transforms=(), layers=False, elem_id="target",
                                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"))
            mask = gr.File(label="Mask (optional; white = fill)", file_types=["image"], type="filepath",
                           elem_id="mask")
        with gr.Column():  # the ranges people need; the API takes what the command line takes
            sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler",
                                  info="ddim: the paper's; dpmpp_2m: at 20 steps it erred less than ddim at "
                                       "50 (docs/benchmarks.md)")
            steps = gr.Slider(1, 100, value=50, step=1, label="Steps")
            cfg = gr.Slider(1.0, 10.0, value=2.5, step=0.1, label="Guidance scale")
            eta = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="DDIM eta (ddim only)")
            seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            num_samples = gr.Slider(1, max_samples, value=1, step=1, label="Number of samples")
            run = gr.Button("Run", variant="primary", elem_id="run")
            results = gr.Gallery(label="Results (target size)", format="png", elem_id="results")
            overlay = gr.Image(label="Target with the mask outline", format="png", elem_id="outline")
    handler = InpaintingHandler(pipe, target, max_samples)
    inputs = [references, target, mask, steps, cfg, eta, seed, num_samples, sampler]
    run.click(handler, inputs, [results, overlay], api_name="fill", concurrency_limit=1, concurrency_id="model",
              preprocess=False)
    examples, labels = sample_examples()
    gr.Examples(examples=examples, inputs=[references, target, mask], example_labels=labels or None)
    # Gradio marks the examples' cached copies of images as kept, but not the mask's (a gr.File), so
    # delete_cache would remove it and the example would break an hour later. So far these components
    # hold only example files: keep them all.
    for component in (references, target, mask):
        component.keep_in_cache.update(component.temp_files)


def nvs_ui(pipe: NVSPipeline, description: str) -> None:
    """The novel-view tab's components and its events (api_names "novel_view" and "turntable"). Both share
    the inpainting event's queue (one model call at a time on the device)."""
    gr.Markdown("## LeftRefill: novel view synthesis\nUpload an image of one object (RGBA, or RGB on a white "
                "background), choose how the camera moves around it and press **Generate view**, or "
                f"**Turntable** for {TURNTABLE_VIEWS} views around it.")
    gr.Markdown(nvs_weights_banner(pipe, description), elem_id="nvs_weights")
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Object image", type="filepath", image_mode="RGBA", format="png", height=300,
                             sources=("upload", "clipboard"), elem_id="nvs_image")
            azimuth = gr.Slider(*POSE_RANGES["azimuth change"][:2], value=90, step=1, label="Azimuth change "
                                "(degrees, counter-clockwise seen from above)", elem_id="nvs_azimuth")
            polar = gr.Slider(*POSE_RANGES["polar change"][:2], value=0, step=1, label="Elevation change: polar "
                              "angle (degrees; + moves the camera down)", elem_id="nvs_polar")
            radius = gr.Slider(*POSE_RANGES["radius change"][:2], value=0.0, step=0.05, label="Radius change "
                               "(world units; the training cameras sit 1.5 to 2.2 from the object)",
                               elem_id="nvs_radius")
            steps = gr.Slider(1, 100, value=50, step=1, label="Steps")
            cfg = gr.Slider(1.0, 10.0, value=2.5, step=0.1, label="Guidance scale")
            seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
        with gr.Column():
            generate = gr.Button("Generate view", variant="primary", elem_id="nvs_run")
            view = gr.Image(label="New view", format="png", elem_id="nvs_view")
            turntable = gr.Button(f"Turntable ({TURNTABLE_VIEWS} azimuths)", elem_id="nvs_turntable")
            gallery = gr.Gallery(label="Turntable (azimuth change from the object image)", format="png", columns=4,
                                 elem_id="nvs_gallery")
    handler = NVSHandler(pipe)
    options = [steps, cfg, seed]
    generate.click(handler.view, [image, azimuth, polar, radius, *options], view, api_name="novel_view",
                   concurrency_limit=1, concurrency_id="model", preprocess=False)
    turntable.click(handler.turntable, [image, polar, radius, *options], gallery, api_name="turntable",
                    concurrency_limit=1, concurrency_id="model", preprocess=False)
    renders = sorted(NVS_SAMPLES.glob("*/002.png")) if NVS_SAMPLES.is_dir() else []
    if renders:
        gr.Examples(examples=[[str(path)] for path in renders], inputs=[image],
                    example_labels=[path.parent.name for path in renders])
        image.keep_in_cache.update(image.temp_files)


def sample_examples() -> tuple[list[list], list[str]]:
    """The bundled pairs as example rows (reference, target with nothing painted, mask file), and their
    labels: the pair folders' names."""
    folders = sorted(p for p in SAMPLES.iterdir() if p.is_dir()) if SAMPLES.is_dir() else []
    examples = []
    for folder in folders:
        target = str(folder / "target.jpg")
        examples.append([[str(folder / "source.jpg")], {"background": target, "layers": [], "composite": target},
                         str(folder / "mask.png")])
    return examples, [folder.name for folder in folders]
