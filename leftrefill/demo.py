"""The Gradio page: ``build_demo`` and its reference-guided inpainting tab (upload a reference and a target,
paint, run; with a multi-view model, as many references as it was trained for, all used at once). Given an
NVS pipeline the page adds the "Novel view synthesis" tab (leftrefill.demo_nvs), given RealFill settings
the "RealFill" tab (leftrefill.demo_realfill); every tab decodes and checks Gradio's raw payloads with
leftrefill.demo_inputs.

``build_demo(pipe, ..., nvs=..., realfill=...)`` returns the Blocks app; ``ref_inpainting_gradio.py`` builds
the pipelines (each once) and launches it.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls out

import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.sampling import SAMPLERS  # noqa: E402
from leftrefill.arguments import MAX_SEED, check_sampling_options, takes_eta  # noqa: E402
from leftrefill.demo_banner import banner  # noqa: E402
from leftrefill.demo_inputs import PaintedTargetHandler, checked, refused  # noqa: E402
from leftrefill.demo_nvs import nvs_ui  # noqa: E402
from leftrefill.demo_realfill import RealFillSettings, realfill_ui  # noqa: E402
from leftrefill.data.multiview import reference_stem  # noqa: E402
from leftrefill.images import load_rgb  # noqa: E402
from leftrefill.multiview_pipeline import MultiViewPipeline  # noqa: E402
from leftrefill.nvs_pipeline import NVSPipeline  # noqa: E402
from leftrefill.paths import sample_folder  # noqa: E402
from leftrefill.pipeline import LeftRefillPipeline  # noqa: E402

# Gradio's delete_cache (every, older than), in seconds: uploads and results are kept an hour, long enough
# to download a result, and swept every 10 minutes, so the cache stays bounded under load.
CACHE_CLEANUP = (600, 3600)
SAMPLES = sample_folder("samples")  # None without the project folder (an installed wheel): no examples
SAMPLES_MULTIVIEW = sample_folder("samples_multiview")  # <id>/source.jpg, source_1.jpg, ..., as the release


def build_demo(pipe: LeftRefillPipeline, description: str, *, max_samples: int = 4,
               delete_cache: tuple[int, int] = CACHE_CLEANUP,
               nvs: tuple[NVSPipeline, str] | None = None, realfill: RealFillSettings | None = None) -> gr.Blocks:
    """The page. ``max_samples`` caps the samples per request; ``delete_cache`` is Gradio's (every,
    older than) sweep of this app's uploads and results, in seconds. ``nvs``: (pipeline, description of its
    weights) adds the "Novel view synthesis" tab beside the inpainting one; ``realfill`` the "RealFill" tab."""
    title = "LeftRefill" if nvs or realfill else "LeftRefill: reference-guided inpainting"
    with gr.Blocks(title=title, delete_cache=delete_cache) as demo:
        if nvs is None and realfill is None:
            inpainting_ui(pipe, description, max_samples)
        else:
            with gr.Tabs():
                with gr.Tab("Reference-guided inpainting", id="inpainting", elem_id="inpainting_tab"):
                    inpainting_ui(pipe, description, max_samples)
                if nvs is not None:
                    with gr.Tab("Novel view synthesis", id="nvs", elem_id="nvs_tab"):
                        nvs_ui(*nvs)
                if realfill is not None:
                    with gr.Tab("RealFill", id="realfill", elem_id="realfill_tab"):
                        realfill_ui(realfill, max_samples, delete_cache[1])
    return demo


class InpaintingHandler(PaintedTargetHandler):
    """The function behind the Run button: raw Gradio payloads in, (results, outline) out; every input
    problem becomes a gr.Error with a readable text."""

    def __init__(self, pipe: LeftRefillPipeline, editor: gr.ImageEditor, max_samples: int):
        super().__init__(editor, max_samples)
        self.pipe = pipe

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
        reference = self.references(references) if self.multiview else self.reference(references)
        target, hole = self.target_and_mask(target, mask)
        if not hole.any():
            raise refused("The mask is empty: paint over the part of the target to fill (or upload a mask).")
        results = self.pipe(reference, target, hole, **options, progress=True)
        return results, Image.fromarray(outline(target, hole))

    @property
    def multiview(self) -> bool:
        return isinstance(self.pipe, MultiViewPipeline)

    def reference(self, references: list[dict] | None) -> np.ndarray:
        """The one-reference model's reference: the first gallery image (GalleryData items: {"image": FileData,
        "caption"}) as RGB; a warning when there are more."""
        if not references:
            raise refused("Add a reference image: a photo of the same place from another viewpoint.")
        if len(references) > 1:
            gr.Warning("The single-reference model uses the first reference image only.")
        return gallery_image(references[0], "reference")

    def references(self, references: list[dict] | None) -> list[np.ndarray]:
        """A multi-view model's references: every gallery image as RGB, in gallery order, exactly as many as
        the model was trained for (a gr.Error saying how many otherwise)."""
        expected, views = self.pipe.num_references, self.pipe.num_views
        if len(references or []) != expected:
            raise refused(f"This model was trained for {views} views: add {expected} reference image"
                          f"{'s' if expected != 1 else ''} to the gallery (photos of the same place from other "
                          f"viewpoints, the most overlapping first); got {len(references or [])}.")
        name = "reference" if expected == 1 else "reference {}"
        return [gallery_image(item, name.format(k)) for k, item in enumerate(references, start=1)]


def gallery_image(item, name: str) -> np.ndarray:
    """One gallery item ({"image": FileData, "caption"}) as RGB; a gr.Error naming ``name`` for a video or a
    bad image."""
    upload = item.get("image") if isinstance(item, dict) else None
    if not upload:
        raise refused(f"The {name} must be an image (a photo of the same place), not a video.")
    return checked(upload["path"], name, load_rgb)


def inpainting_ui(pipe: LeftRefillPipeline, description: str, max_samples: int) -> None:
    """The inpainting page's components and its Run event (api_name "fill"), in the current Blocks."""
    num_references = pipe.num_references if isinstance(pipe, MultiViewPipeline) else 1
    gr.Markdown(f"## LeftRefill: reference-guided inpainting\n{upload_instructions(pipe)}, paint over what to "
                f"replace on the target, and press **Run**.")
    gr.Markdown(weights_banner(pipe, description), elem_id="weights")
    with gr.Row():
        with gr.Column():
            label = "Reference view(s)" if num_references == 1 else f"Reference views ({num_references}, in order)"
            references = gr.Gallery(label=label, type="filepath", interactive=True,
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
    examples, labels = (sample_examples(SAMPLES_MULTIVIEW, num_references) if isinstance(pipe, MultiViewPipeline)
                        else sample_examples())
    if examples:
        gr.Examples(examples=examples, inputs=[references, target, mask], example_labels=labels or None)
    # Gradio marks the examples' cached copies of images as kept, but not the mask's (a gr.File), so
    # delete_cache would remove it and the example would break an hour later. So far these components
    # hold only example files: keep them all.
    for component in (references, target, mask):
        component.keep_in_cache.update(component.temp_files)


def weights_banner(pipe: LeftRefillPipeline, description: str) -> str:
    """The line under the title: which weights answer, or a loud warning that they are random."""
    return banner(pipe, description, "The SD2 inpainting checkpoint was not found, so this page runs a tiny model "
                  "with random weights to show the interface. Put `512-inpainting-ema.ckpt` in `pretrained_models/` "
                  "(see `pretrained_models/README.md`) and restart for real results.")


def upload_instructions(pipe: LeftRefillPipeline) -> str:
    """What to upload: one reference, or a multi-view model's count of them, and a target."""
    if not isinstance(pipe, MultiViewPipeline):
        return "Upload a reference photo of the same scene and a target photo"
    return (f"This model was trained for {pipe.num_views} views: upload {pipe.num_references} reference photo"
            f"{'s' if pipe.num_references != 1 else ''} of the same scene (the most overlapping first; all are "
            f"used at once) and a target photo")


def sample_examples(root: Path | None = SAMPLES, num_references: int = 1) -> tuple[list[list], list[str]]:
    """The bundled items under ``root`` with at least ``num_references`` references (source.jpg,
    source_1.jpg, ...) as example rows (the first ``num_references``, the target with nothing painted, the
    mask file), and their labels: the folders' names."""
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root is not None and root.is_dir() else []
    examples, labels = [], []
    for folder in folders:
        sources = [folder / f"{reference_stem(k)}.jpg" for k in range(num_references)]
        if not all(source.is_file() for source in sources):
            continue
        target = str(folder / "target.jpg")
        examples.append([[str(source) for source in sources], {"background": target, "layers": [], "composite": target},
                         str(folder / "mask.png")])
        labels.append(folder.name)
    return examples, labels


def outline(target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The target (H, W, 3) with the mask's outline drawn in red, 2 px wide."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    drawn = target.copy()
    cv2.drawContours(drawn, contours, -1, (255, 0, 0), max(2, round(max(mask.shape) / 400)))
    return drawn
