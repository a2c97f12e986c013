"""The Gradio page for reference-guided inpainting: upload a reference and a target, paint, run; given an
NVS pipeline, a "Novel view synthesis" tab: upload an object image, pick a camera change, generate one view
or a turntable; given RealFill settings, a "RealFill" tab: upload references and a target, paint, fine-tune
adapters on them (or load a saved model), fill with samples ranked by matches.

``build_demo(pipe, ..., nvs=..., realfill=...)`` returns the Blocks app; ``ref_inpainting_gradio.py`` builds
the pipelines (each once) and launches it. Every event takes Gradio's raw payloads (``preprocess=False``) and
its handler decodes them itself, through ``leftrefill.images`` and ``leftrefill.arguments`` as the command
line does, so every bad upload or option becomes one message naming the input, never Gradio's generic
"upstream Gradio app has raised an exception". Gradio still checks that every file named in a payload is
one it uploaded into its own cache, so user input never names a file on the server.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page must not call out to the internet

import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gradio.components.image_editor import EditorData  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.sampling import SAMPLERS  # noqa: E402
from ldm.util import ConfigError  # noqa: E402
from leftrefill.arguments import MAX_SEED, check_sampling_options, takes_eta  # noqa: E402
from leftrefill.data.objaverse_nvs import NEAR_WHITE, read_rgba  # noqa: E402
from leftrefill.data.realfill import MAX_REFERENCES, SceneError, read_scene  # noqa: E402
from leftrefill.images import ImageInputError, load_mask, load_rgb  # noqa: E402
from leftrefill.model_dir import CONFIG_NAME, METADATA_KEY  # noqa: E402
from leftrefill.nvs_pipeline import NVSPipeline  # noqa: E402
from leftrefill.pipeline import (DEFAULT_BASE_CKPT, LeftRefillPipeline, WrongTaskError,  # noqa: E402
                                 resolve_device_and_dtype)
from leftrefill.prep.matching import DEFAULT_METHOD as DEFAULT_MATCH_METHOD  # noqa: E402
from leftrefill.realfill_pipeline import ADAPTER_NAME, RealFillPipeline  # noqa: E402
from leftrefill.realfill_pipeline import DEFAULT_CFG as REALFILL_CFG  # noqa: E402
from leftrefill.realfill_pipeline import DEFAULT_SAMPLER as REALFILL_SAMPLER  # noqa: E402
from leftrefill.realfill_pipeline import DEFAULT_STEPS as REALFILL_STEPS  # noqa: E402
from leftrefill.realfill_training import train_realfill  # noqa: E402
from leftrefill.selection import CandidateScore, rank_by_matches  # noqa: E402

log = logging.getLogger(__name__)

MAX_PIXELS = 25_000_000  # per image; larger uploads are refused with a message (5000 x 5000)
# Gradio's delete_cache (every, older than), in seconds: uploads and results are kept an hour, long enough
# to download a result, and swept every 10 minutes, so the cache stays bounded under load.
CACHE_CLEANUP = (600, 3600)
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
NVS_SAMPLES = SAMPLES.parent / "samples_nvs" / "views_release"
REALFILL_SAMPLES = SAMPLES.parent / "samples_realfill"
TURNTABLE_VIEWS = 8
# The NVS tab's camera-change ranges: (low, high, unit) per pose delta, as NVSPipeline takes them.
POSE_RANGES = {"azimuth change": (-180.0, 180.0, "degrees"), "polar change": (-90.0, 90.0, "degrees"),
               "radius change": (-0.5, 0.5, "world units")}
# What Pillow raises on a file it cannot decode (DecompressionBombError is not an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
MIXED_PRECISION = {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}  # fine-tuning, by the weights' dtype


class PaintedTargetHandler:
    """What the tabs with a painted target share: the target and its mask from the editor's raw payload (and
    an uploaded mask), and the sample count checked against the page's cap."""

    def __init__(self, editor: gr.ImageEditor, max_samples: int):
        self.editor = editor  # decodes the painted layers and the browser's canvas blobs
        self.max_samples = max_samples

    def options(self, **values) -> dict:
        """The sampling options as the pipeline takes them; a gr.Error with the shared check's message
        (leftrefill.arguments, the command line's too) for the first bad one."""
        values = filled_in(values)
        samples = values["num_samples"]
        if isinstance(samples, bool) or not (isinstance(samples, int) and 1 <= samples <= self.max_samples):
            raise refused(f"num_samples must be an integer in [1, {self.max_samples}], got {samples!r}")
        return checked_sampling(values, num_seeds=samples)

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
        reference = self.reference(references)
        target, hole = self.target_and_mask(target, mask)
        if not hole.any():
            raise refused("The mask is empty: paint over the part of the target to fill (or upload a mask).")
        results = self.pipe(reference, target, hole, **options, progress=True)
        return results, Image.fromarray(outline(target, hole))

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


@dataclass(frozen=True)
class RealFillSettings:
    """What the RealFill tab fine-tunes and may load, set by whoever runs the server (ref_inpainting_gradio.py).

    ``base_ckpt`` None: random weights (a tiny config), announced on the tab. ``model_root``: the folder whose
    RealFill model directories (train_realfill.py's output) the tab offers by name; the page can name nothing
    else on the server, and it takes no weight files from the browser (docs/inference.md says why).
    """

    config: Path  # the training config: configs/realfill.yaml, or configs/tiny_realfill.yaml
    base_ckpt: Path | None  # SD2 512-inpainting-ema.ckpt; None: random weights
    model_root: Path | None = None
    device: str | None = None  # None: cuda when available
    precision: str = "auto"  # the weights' dtype; fine-tuning runs in the matching mixed precision
    max_train_steps: int = 2000  # the slider's cap: the recipe's 2,000 steps
    train_steps: int = 200  # the slider's start: a first look in minutes, not the recipe's full run
    match_method: str = DEFAULT_MATCH_METHOD  # leftrefill.selection's matcher for the ranking
    work_dir: Path | None = None  # the sessions' scenes and runs; None: a temporary folder, removed at exit
    overrides: tuple[str, ...] = ()  # training config overrides (dotlist), e.g. model.config as an absolute path

    @property
    def random_weights(self) -> bool:
        return self.base_ckpt is None

    def training_target(self) -> tuple[str, str]:
        """(Lightning accelerator, Lightning precision) for fine-tuning where the pipelines run: the CPU or
        the first visible GPU (a ValueError for another one: train_realfill takes a device count)."""
        device, dtype = resolve_device_and_dtype(self.device, self.precision)
        if device.type == "cuda" and (device.index or 0) != 0:
            raise ValueError(f"device {device}: the RealFill tab fine-tunes on the first visible GPU; choose the GPU "
                             f"with CUDA_VISIBLE_DEVICES instead")
        return ("gpu" if device.type == "cuda" else "cpu"), MIXED_PRECISION.get(dtype, "32")


@dataclass(frozen=True)
class SessionModel:
    """The model one page session fills with: a run it fine-tuned (``owned``: its folder goes with the
    session) or a saved model directory under RealFillSettings.model_root."""

    model_dir: Path
    label: str
    owned: bool


class PipelineCache:
    """The RealFill pipelines in memory by model directory, at most ``capacity`` (each holds an SD2 model);
    the least recently used goes first, and is loaded again when a session needs it."""

    def __init__(self, load: Callable[[Path], RealFillPipeline], capacity: int = 1):
        self.load, self.capacity = load, capacity
        self.pipes: OrderedDict[Path, RealFillPipeline] = OrderedDict()

    def __call__(self, model_dir: Path) -> RealFillPipeline:
        if model_dir in self.pipes:
            self.pipes.move_to_end(model_dir)
            return self.pipes[model_dir]
        self.clear(keep=self.capacity - 1)  # room first: two SD2 models need not fit beside each other
        self.pipes[model_dir] = pipe = self.load(model_dir)
        return pipe

    def drop(self, model_dir: Path) -> None:
        if self.pipes.pop(model_dir, None) is not None:
            free_device_memory()

    def clear(self, keep: int = 0) -> None:
        while len(self.pipes) > keep:
            self.pipes.popitem(last=False)
        free_device_memory()


class TrainingProgress(L.Callback):
    """Reports each optimiser step as ``report(step, max_steps)`` (the page's progress bar)."""

    def __init__(self, report: Callable[[int, int], None]):
        self.report = report

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.report(trainer.global_step, trainer.max_steps)


class RealFillHandler(PaintedTargetHandler):
    """The functions behind the RealFill buttons (Fine-tune, Load, Fill): raw Gradio payloads in; every
    input problem becomes a gr.Error with a readable text. A session's model is a SessionModel in a gr.State
    (held on the server, never sent to the page); the pipelines are in a PipelineCache all sessions share."""

    def __init__(self, settings: RealFillSettings, editor: gr.ImageEditor, max_samples: int):
        super().__init__(editor, max_samples)
        self.settings = settings
        self.accelerator, self.train_precision = settings.training_target()
        self.work_dir = settings.work_dir or Path(tempfile.mkdtemp(prefix="leftrefill_realfill_"))
        if settings.work_dir is None:
            atexit.register(shutil.rmtree, self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.pipes = PipelineCache(self.load_pipeline)

    def train(self, references, target, mask, steps, model: SessionModel | None, progress=gr.Progress()):
        """Fine-tune adapters on the uploaded scene for ``steps`` steps: (status, adapter file, session model)."""
        references = self.references(references)
        if not references:
            raise refused(f"Add 1 to {MAX_REFERENCES} reference images: photos of the same scene as the target, "
                          f"from other viewpoints or times.")
        target, hole = self.target_and_mask(target, mask)
        check_hole(hole, training=True)
        steps = self.train_steps(steps)
        run = Path(tempfile.mkdtemp(prefix="run_", dir=self.work_dir))
        try:
            scene = write_scene(run / "scene", references, target, hole)
            self.pipes.clear()  # the device memory goes to training
            report = TrainingProgress(reporter(progress, "Fine-tuning", "steps"))
            started = time.monotonic()
            adapter = train_realfill(
                scene, run / "model", config=self.settings.config, max_steps=steps, precision=self.train_precision,
                random_init=self.settings.random_weights, base_ckpt=self.settings.base_ckpt,
                accelerator=self.accelerator, overrides=[*self.settings.overrides, *training_overrides(steps)],
                callbacks=[report])
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise
        finally:
            free_device_memory()  # the run's model and optimiser are gone; their cached blocks too
        for folder in (run / "scene", run / "model" / "ckpts", run / "model" / "logs"):  # fill needs the adapters
            shutil.rmtree(folder, ignore_errors=True)
        self.forget(model)
        status = (f"Fine-tuned {steps} steps on {len(references)} reference(s) and the target in "
                  f"{time.monotonic() - started:.0f} s. Press **Fill**; the adapters can be downloaded below.")
        return status, str(adapter), SessionModel(run / "model", f"fine-tuned here ({steps} steps)", owned=True)

    def load(self, name: str | None, model: SessionModel | None, progress=gr.Progress()):
        """Load the saved model directory ``name`` (one of :meth:`saved_models`): (status, None, session model)."""
        if not name:
            raise refused("Choose a saved model from the list (or fine-tune one on your scene).")
        if name not in self.saved_models():  # a name, never a path: nothing else on the server can be chosen
            raise refused(f"There is no saved model {name!r} on this server; press ↻ to list them again.")
        chosen = SessionModel(self.settings.model_root / name, f"saved model `{name}`", owned=False)
        progress(None, desc="Loading the model")
        self.pipeline(chosen)  # now, so that a broken directory is named here and not at Fill
        if model != chosen:
            self.forget(model)
        return f"Loaded the saved model `{name}`. Press **Fill**.", None, chosen

    def fill(self, references, target, mask, sampler, steps, seed, num_samples, model: SessionModel | None,
             progress=gr.Progress()):
        """``num_samples`` fills of the painted region, ranked by verified matches with the references (seed
        order without references): (gallery of (image, caption), session model)."""
        options = self.options(steps=steps, cfg=REALFILL_CFG, seed=seed, num_samples=num_samples)
        try:
            check_sampling_options(sampler=sampler)
        except ValueError as err:
            raise refused(str(err)) from None
        if model is None or not model.model_dir.is_dir():
            raise refused("There is no model to fill with yet: press Fine-tune (or load a saved model) first.")
        references = self.references(references)
        target, hole = self.target_and_mask(target, mask)
        check_hole(hole)
        pipe = self.pipeline(model)
        samples = pipe(target, hole, sampler=sampler, **options, on_batch=reporter(progress, "Sampling", "samples"))
        if not references:
            gr.Warning("No reference images: the samples are in seed order, not ranked by matches.")
            return [(sample, f"seed {options['seed'] + k}") for k, sample in enumerate(samples)], model
        scores = rank_by_matches(samples, references, hole, method=self.settings.match_method,
                                 device=str(pipe.device),
                                 on_candidate=reporter(progress, "Ranking by matches", "samples"))
        return [(samples[score.index], ranked_caption(rank, score, options["seed"]))
                for rank, score in enumerate(scores, 1)], model

    def refresh(self) -> dict:
        return gr.update(choices=self.saved_models())

    def saved_models(self) -> list[str]:
        return saved_models(self.settings)

    def references(self, payload: list[dict] | None) -> list[np.ndarray]:
        """The gallery's images (GalleryData items: {"image": FileData, "caption"}) as RGB, at most
        MAX_REFERENCES."""
        items = payload or []
        if len(items) > MAX_REFERENCES:
            raise refused(f"RealFill takes 1 to {MAX_REFERENCES} reference images, got {len(items)}: remove "
                          f"{len(items) - MAX_REFERENCES}.")
        images = []
        for k, item in enumerate(items, 1):
            upload = item.get("image") if isinstance(item, dict) else None
            if not upload:
                raise refused(f"Reference {k} must be an image (a photo of the scene), not a video.")
            images.append(checked(upload["path"], f"reference {k}", load_rgb))
        return images

    def train_steps(self, steps) -> int:
        steps, cap = filled_in({"fine-tuning steps": steps})["fine-tuning steps"], self.settings.max_train_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= cap:
            raise refused(f"fine-tuning steps must be an integer in [1, {cap}], got {steps!r}")
        return steps

    def pipeline(self, model: SessionModel) -> RealFillPipeline:
        """The session's pipeline, from the cache or loaded; a gr.Error naming the model when it cannot load."""
        try:
            return self.pipes(model.model_dir)
        except (CheckpointError, ConfigError, FileNotFoundError, ValueError, WrongTaskError) as err:
            root = self.settings.model_root
            reason = str(err).replace(f"{root}{os.sep}", "") if root is not None else str(err)  # names, not paths
            raise refused(f"The {model.label} could not be loaded: {reason}") from None

    def load_pipeline(self, model_dir: Path) -> RealFillPipeline:
        settings = self.settings
        return RealFillPipeline.from_model_dir(model_dir, settings.base_ckpt or DEFAULT_BASE_CKPT,
                                               device=settings.device, precision=settings.precision,
                                               random_init=settings.random_weights)

    def forget(self, model: SessionModel | None) -> None:
        """Drop a session's model from memory, and its folder when the session fine-tuned it (gr.State's
        delete_callback: the session was closed or its model is an hour old)."""
        if model is None:
            return
        self.pipes.drop(model.model_dir)
        if model.owned:
            shutil.rmtree(model.model_dir.parent, ignore_errors=True)


def saved_models(settings: RealFillSettings) -> list[str]:
    """The model directories under ``settings.model_root`` that the tab can load, by name: train_realfill.py's
    output (model_config.yaml + adapters.safetensors) trained on a base checkpoint, or on random weights when
    the server has none."""
    root = settings.model_root
    folders = sorted(root.iterdir()) if root is not None and root.is_dir() else []
    return [folder.name for folder in folders
            if (folder / CONFIG_NAME).is_file() and (folder / ADAPTER_NAME).is_file()
            and trained_on_base(folder / ADAPTER_NAME) is (not settings.random_weights)]


def check_hole(hole: np.ndarray, training: bool = False) -> None:
    """A gr.Error for a mask that marks nothing, or (``training``) everything: the target's known pixels are
    part of what RealFill fine-tunes on."""
    if not hole.any():
        raise refused("The mask is empty: paint over the part of the target to fill (or upload a mask).")
    if training and hole.all():
        raise refused("The mask covers the whole target: RealFill also fine-tunes on the target's known pixels, "
                      "so leave part of it unpainted.")


def write_scene(folder: Path, references: list[np.ndarray], target: np.ndarray, hole: np.ndarray) -> Path:
    """The uploads as a RealBench scene folder (leftrefill.data.realfill): ref/<k>.png, target/target.png and
    target/mask.png (white = fill), checked by read_scene as train_realfill will."""
    for name in ("ref", "target"):
        (folder / name).mkdir(parents=True)
    for k, image in enumerate(references):
        Image.fromarray(image).save(folder / "ref" / f"{k:02d}.png")
    Image.fromarray(target).save(folder / "target" / "target.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(folder / "target" / "mask.png")
    try:
        read_scene(folder)
    except SceneError as err:  # the checks above should leave nothing; the text names server paths
        raise refused(f"The scene could not be used: {str(err).replace(f'{folder}{os.sep}', '')}") from None
    return folder


def training_overrides(steps: int) -> list[str]:
    """The demo's changes to the training config: no loader processes forked from the server (a scene is
    decoded once, and is at most six images), no TensorBoard previews (nobody sees them), and ckpts/last.ckpt
    written only at the end."""
    return ["data.num_workers=0", f"trainer.logger_freq={steps + 1}", "trainer.save_last_every_n_steps=0"]


def trained_on_base(adapter: Path) -> bool | None:
    """Whether an adapter file records the base checkpoint it was trained on (False: random-weight training);
    None when its header cannot be read (the folder is then not offered)."""
    try:
        with safe_open(str(adapter), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})[METADATA_KEY])
    except (OSError, SafetensorError, KeyError, ValueError, RecursionError):
        log.warning("%s: no readable training metadata; not offered on the RealFill tab", adapter)
        return None
    return isinstance(metadata, dict) and metadata.get("base_checkpoint") is not None


def ranked_caption(rank: int, score: CandidateScore, seed: int) -> str:
    """'#1 · 35 matches (14 + 8 + 13) · seed 7': the rank, the verified matches (per reference when there
    are several) and the sample's seed."""
    per_reference = f" ({' + '.join(map(str, score.per_reference))})" if len(score.per_reference) > 1 else ""
    noun = "match" if score.matches == 1 else "matches"
    return f"#{rank} · {score.matches} {noun}{per_reference} · seed {seed + score.index}"


def reporter(progress: gr.Progress, desc: str, unit: str) -> Callable[[int, int], None]:
    """``report(done, total)`` that moves the event's progress bar."""
    return lambda done, total: progress((done, total), desc=desc, unit=unit)


def free_device_memory() -> None:
    """Return the freed pipelines' memory to the device (a training run or the next model needs it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def realfill_banner(settings: RealFillSettings) -> str:
    """The RealFill tab's line under its title: what it fine-tunes, or a loud warning that the weights are random."""
    if settings.random_weights:
        return ("### ⚠️ Random weights: results are noise\n"
                "The SD2 inpainting checkpoint was not found, so this tab fine-tunes a tiny model with random "
                f"weights (`{settings.config.name}`) to show the interface. Put `512-inpainting-ema.ckpt` in "
                "`pretrained_models/` (see `pretrained_models/README.md`) and restart for real results.")
    accelerator, precision = settings.training_target()
    return (f"Fine-tunes LoRA adapters of `{settings.base_ckpt}` with `{settings.config}` · {accelerator}, "
            f"precision {precision}")


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


def realfill_ui(settings: RealFillSettings, max_samples: int, keep_s: int) -> None:
    """The RealFill tab's components and its events (api_names "realfill_train", "realfill_load" and
    "realfill_fill"; the model ones share the other tabs' queue). A session's model folder is deleted
    ``keep_s`` seconds after its last use, or soon after its page is closed."""
    gr.Markdown("## RealFill: fill a photo with what references of the same scene show\nUpload 1 to "
                f"{MAX_REFERENCES} reference photos and a target, paint over what to fill on the target, press "
                "**Fine-tune** (or load a saved model), then **Fill**: the samples come ranked by how many "
                "verified matches their filled region has with the references.")
    gr.Markdown(realfill_banner(settings), elem_id="realfill_weights")
    with gr.Row():
        with gr.Column():
            references = gr.Gallery(label=f"Reference views (1 to {MAX_REFERENCES})", type="filepath",
                                    interactive=True, file_types=["image"], height=300, elem_id="realfill_references")
            target = gr.ImageEditor(label="Target: paint the region to fill", type="numpy", image_mode="RGBA",
                                    sources=("upload", "clipboard"), format="png", transforms=(), layers=False,
                                    elem_id="realfill_target", brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"))
            mask = gr.File(label="Mask (optional; white = fill)", file_types=["image"], type="filepath",
                           elem_id="realfill_mask")
            realfill_examples(references, target, mask)
        with gr.Column():
            gr.Markdown("**1. Model**: fine-tune on this scene, or load one saved on the server")
            cap = settings.max_train_steps
            train_steps = gr.Slider(1, cap, value=min(settings.train_steps, cap), step=1, label="Fine-tuning steps",
                                    info=f"the recipe's: 2,000; at most {cap} here", elem_id="realfill_train_steps")
            train = gr.Button("Fine-tune", variant="primary", elem_id="realfill_train")
            with gr.Row():
                saved = gr.Dropdown(saved_models(settings), value=None, label="Saved model", scale=4,
                                    info="model folders in the server's RealFill models folder",
                                    elem_id="realfill_saved")
                refresh = gr.Button("↻", scale=0, min_width=40, elem_id="realfill_refresh")
                load = gr.Button("Load", scale=1, elem_id="realfill_load")
            status = gr.Markdown("No model yet.", elem_id="realfill_status")
            adapters = gr.File(label="Fine-tuned adapters (download)", interactive=False, elem_id="realfill_adapters")
            gr.Markdown("**2. Fill**")
            sampler = gr.Dropdown(list(SAMPLERS), value=REALFILL_SAMPLER, label="Sampler",
                                  info=f"RealFill's: {REALFILL_SAMPLER}, {REALFILL_STEPS} steps")
            steps = gr.Slider(1, REALFILL_STEPS, value=REALFILL_STEPS, step=1, label="Steps")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed (sample k: seed + k)")
            num_samples = gr.Slider(1, max_samples, value=max_samples, step=1, label="Number of samples")
            fill = gr.Button("Fill", variant="primary", elem_id="realfill_fill")
    results = gr.Gallery(label="Samples, best first: rank · verified matches (per reference) · seed", format="png",
                         columns=4, elem_id="realfill_results")
    handler = RealFillHandler(settings, target, max_samples)
    model = gr.State(None, time_to_live=keep_s, delete_callback=handler.forget)
    queue = {"concurrency_limit": 1, "concurrency_id": "model", "preprocess": False}
    train.click(handler.train, [references, target, mask, train_steps, model], [status, adapters, model],
                api_name="realfill_train", **queue)
    load.click(handler.load, [saved, model], [status, adapters, model], api_name="realfill_load", **queue)
    fill.click(handler.fill, [references, target, mask, sampler, steps, seed, num_samples, model], [results, model],
               api_name="realfill_fill", **queue)
    refresh.click(handler.refresh, None, saved, api_name="realfill_saved_models", preprocess=False)


def realfill_examples(references: gr.Gallery, target: gr.ImageEditor, mask: gr.File) -> None:
    """The bundled scenes (data/samples_realfill) as example rows: references, target with nothing painted,
    mask file; labelled by scene folder."""
    scenes = sorted(p for p in REALFILL_SAMPLES.iterdir() if p.is_dir()) if REALFILL_SAMPLES.is_dir() else []
    if not scenes:
        return
    rows = []
    for scene in scenes:
        image = str(scene / "target" / "target.png")
        rows.append([[str(path) for path in sorted((scene / "ref").iterdir())],
                     {"background": image, "layers": [], "composite": image}, str(scene / "target" / "mask.png")])
    gr.Examples(examples=rows, inputs=[references, target, mask], example_labels=[scene.name for scene in scenes])
    for component in (references, target, mask):  # as the inpainting tab's: the cache sweep must not take them
        component.keep_in_cache.update(component.temp_files)


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
