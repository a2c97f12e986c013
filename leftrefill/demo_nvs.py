"""The demo's "Novel view synthesis" tab: upload an object image, pick a camera change, generate one view or a
turntable. ``nvs_ui`` adds it to the current Blocks (leftrefill.demo.build_demo); NVSHandler is the function
behind its buttons, decoding the raw payloads with leftrefill.demo_inputs.
"""

from __future__ import annotations


import gradio as gr
import numpy as np
from PIL import Image

from leftrefill.arguments import MAX_SEED
from leftrefill.data.objaverse_nvs import NEAR_WHITE, read_rgba
from leftrefill.demo_banner import banner
from leftrefill.demo_inputs import checked, checked_sampling, filled_in, refused
from leftrefill.nvs_pipeline import NVSPipeline
from leftrefill.paths import sample_folder

NVS_SAMPLES = sample_folder("samples_nvs")  # None without the project folder (an installed wheel)
TURNTABLE_VIEWS = 8
# The NVS tab's camera-change ranges: (low, high, unit) per pose delta, as NVSPipeline takes them.
POSE_RANGES = {"azimuth change": (-180.0, 180.0, "degrees"), "polar change": (-90.0, 90.0, "degrees"),
               "radius change": (-0.5, 0.5, "world units")}


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
    renders = sorted(NVS_SAMPLES.glob("views_release/*/002.png")) if NVS_SAMPLES is not None else []
    if renders:
        gr.Examples(examples=[[str(path)] for path in renders], inputs=[image],
                    example_labels=[path.parent.name for path in renders])
        image.keep_in_cache.update(image.temp_files)


def nvs_weights_banner(pipe: NVSPipeline, description: str) -> str:
    """The NVS tab's line under its title: which weights answer, or a loud warning that they are random."""
    return banner(pipe, description, "No trained novel-view-synthesis weights were found (none were released), "
                  "so this tab runs a tiny model with random weights to show the interface. Train them with "
                  "`configs/nvs_training_config.yaml` (see `docs/nvs.md`), then restart with `--nvs_model_path "
                  "<run directory>`.")


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
