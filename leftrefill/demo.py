"""The Gradio page for reference-guided inpainting: upload a reference and a target, paint, run.

``build_demo(pipe, ...)`` returns the Blocks app; ``ref_inpainting_gradio.py`` builds the pipeline and
launches it. The handler only ever sees what Gradio itself uploaded (its own cache files and arrays), so
user input never names a file on the server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page must not call out to the internet

import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from leftrefill.images import ImageInputError, load_mask, load_rgb  # noqa: E402
from leftrefill.pipeline import LeftRefillPipeline  # noqa: E402

log = logging.getLogger(__name__)

MAX_PIXELS = 25_000_000  # per image; larger uploads are refused with a message (5000 x 5000)
MAX_SEED = 2**32 - 1  # a 32-bit seed; torch.manual_seed raises a bare ValueError outside [-2**63, 2**64)
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def editor_mask(editor: dict | None) -> np.ndarray | None:
    """Painted layers of a gr.ImageEditor value -> bool (H, W) at the background's size, or None."""
    if not editor or editor.get("background") is None:
        return None
    background = np.asarray(editor["background"])
    mask = np.zeros(background.shape[:2], dtype=bool)
    for layer in editor.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4 and layer.shape[:2] == mask.shape:
            mask |= layer[..., 3] > 0  # any painted pixel, whatever the brush colour
    return mask


def outline(target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The target (H, W, 3) with the mask's outline drawn in red, 2 px wide."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    drawn = target.copy()
    cv2.drawContours(drawn, contours, -1, (255, 0, 0), max(2, round(max(mask.shape) / 400)))
    return drawn


class InpaintingHandler:
    """The function behind the Run button; every input problem becomes a gr.Error with a readable text."""

    def __init__(self, pipe: LeftRefillPipeline):
        self.pipe = pipe

    def __call__(self, references, target_editor, mask_upload, steps, cfg, eta, seed, num_samples,
                 progress=gr.Progress(track_tqdm=True)):
        seed = checked_seed(seed)
        reference = self.reference(references)
        target, mask = self.target_and_mask(target_editor, mask_upload)
        if not mask.any():
            raise gr.Error("The mask is empty: paint over the part of the target to fill (or upload a mask).")
        results = self.pipe(reference, target, mask, steps=int(steps), cfg=float(cfg), eta=float(eta),
                            seed=seed, num_samples=int(num_samples), progress=True)
        return results, Image.fromarray(outline(target, mask))

    def reference(self, references) -> np.ndarray:
        if not references:
            raise gr.Error("Add a reference image: a photo of the same place from another viewpoint.")
        if len(references) > 1:
            gr.Warning("The single-reference model uses the first reference image only.")
        first = references[0][0] if isinstance(references[0], (tuple, list)) else references[0]
        return checked(first, "reference", load_rgb)

    def target_and_mask(self, editor, mask_upload) -> tuple[np.ndarray, np.ndarray]:
        if not editor or editor.get("background") is None:
            raise gr.Error("Add a target image: the photo with the region to fill.")
        target = checked(np.asarray(editor["background"]), "target", load_rgb)
        if mask_upload is not None:
            mask = checked(mask_upload, "mask", load_mask)
            if mask.shape != target.shape[:2]:
                gr.Warning(f"The mask is {mask.shape[1]}x{mask.shape[0]} but the target is "
                           f"{target.shape[1]}x{target.shape[0]}; it was resized to the target.")
            mask = cv2.resize(mask.astype(np.uint8), target.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
            return target, mask | editor_mask(editor)  # an uploaded mask and painted strokes both count
        return target, editor_mask(editor)


def checked_seed(seed: float | None) -> int:
    """The Seed field's value as an int in [0, MAX_SEED]; a gr.Error for an empty field, a fraction or a
    number out of range (the field's own bounds catch most of these before the handler runs)."""
    try:
        value = int(seed)
    except (TypeError, ValueError, OverflowError):  # None (empty field), NaN, infinity
        value = None
    if value is None or value != seed or not 0 <= value <= MAX_SEED:
        raise gr.Error(f"The seed must be a whole number from 0 to {MAX_SEED}; got {seed!r}.")
    return value


def checked(value, name: str, loader) -> np.ndarray:
    """Load an uploaded image with ``loader``; a bad or huge image becomes a gr.Error naming ``name``
    (and the uploaded file by its own name, never by its path on the server)."""
    try:
        array = loader(value, name)
    except ImageInputError as err:
        reason = str(err).split(": ", 1)[-1]
        if isinstance(value, (str, Path)):
            reason = reason.replace(str(value), f"'{Path(value).name}'")
        raise gr.Error(f"The {name} could not be read: {reason}") from None
    if array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise gr.Error(f"The {name} is {array.shape[1]}x{array.shape[0]} pixels; the limit is "
                       f"{MAX_PIXELS // 1_000_000} megapixels. Please upload a smaller image.")
    return array


def weights_banner(pipe: LeftRefillPipeline, description: str) -> str:
    if pipe.random_weights:
        return ("### ⚠️ Random weights: results are noise\n"
                "The SD2 inpainting checkpoint was not found, so this page runs a tiny model with random "
                "weights to show the interface. Put `512-inpainting-ema.ckpt` in `pretrained_models/` (see "
                "`pretrained_models/README.md`) and restart for real results.")
    return f"Weights: {description} · {pipe.device}, {str(pipe.dtype).removeprefix('torch.')}"


def build_demo(pipe: LeftRefillPipeline, description: str, *, max_samples: int = 4) -> gr.Blocks:
    handler = InpaintingHandler(pipe)  # the number-of-samples slider caps requests at max_samples
    with gr.Blocks(title="LeftRefill: reference-guided inpainting") as demo:
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
            with gr.Column():
                steps = gr.Slider(1, 100, value=50, step=1, label="DDIM steps")
                cfg = gr.Slider(1.0, 10.0, value=2.5, step=0.1, label="Guidance scale")
                eta = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="DDIM eta")
                seed = gr.Number(value=42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                num_samples = gr.Slider(1, max_samples, value=1, step=1, label="Number of samples")
                run = gr.Button("Run", variant="primary", elem_id="run")
                results = gr.Gallery(label="Results (target size)", format="png", elem_id="results")
                overlay = gr.Image(label="Target with the mask outline", format="png", elem_id="outline")
        inputs = [references, target, mask, steps, cfg, eta, seed, num_samples]
        run.click(handler, inputs, [results, overlay], api_name="fill", concurrency_limit=1)
        gr.Examples(examples=sample_examples(), inputs=[references, target, mask])
    return demo


def sample_examples() -> list[list]:
    """The bundled pairs: reference, target (nothing painted), mask file."""
    examples = []
    for folder in sorted(p for p in SAMPLES.iterdir() if p.is_dir()) if SAMPLES.is_dir() else []:
        target = str(folder / "target.jpg")
        examples.append([[str(folder / "source.jpg")], {"background": target, "layers": [], "composite": target},
                         str(folder / "mask.png")])
    return examples
