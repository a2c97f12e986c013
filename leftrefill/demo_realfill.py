"""The demo's "RealFill" tab: upload references and a target, paint, fine-tune adapters on them (or load a saved
model), fill with samples ranked by matches.

``realfill_ui`` adds it to the current Blocks (leftrefill.demo.build_demo) from the server's RealFillSettings;
RealFillHandler is the function behind its buttons, decoding the raw payloads with leftrefill.demo_inputs. A
page session's model is a SessionModel; the loaded pipelines are in a PipelineCache all sessions share.
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

import gradio as gr
import lightning as L
import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from ldm.checkpoint import CheckpointError
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError
from leftrefill.arguments import MAX_SEED, check_sampling_options
from leftrefill.data.realfill import MAX_REFERENCES, SceneError, read_scene
from leftrefill.demo_banner import RANDOM_WEIGHTS
from leftrefill.demo_inputs import PaintedTargetHandler, checked, filled_in, refused
from leftrefill.images import ImageInputError, load_rgb
from leftrefill.model_dir import CONFIG_NAME, METADATA_KEY
from leftrefill.paths import sample_folder
from leftrefill.pipeline import DEFAULT_BASE_CKPT, WrongTaskError, resolve_device_and_dtype
from leftrefill.prep.matching import DEFAULT_METHOD as DEFAULT_MATCH_METHOD
from leftrefill.realfill_pipeline import ADAPTER_NAME, RealFillPipeline
from leftrefill.realfill_pipeline import DEFAULT_CFG as REALFILL_CFG
from leftrefill.realfill_pipeline import DEFAULT_SAMPLER as REALFILL_SAMPLER
from leftrefill.realfill_pipeline import DEFAULT_STEPS as REALFILL_STEPS
from leftrefill.realfill_training import train_realfill
from leftrefill.selection import CandidateScore, rank_by_matches

log = logging.getLogger(__name__)

REALFILL_SAMPLES = sample_folder("samples_realfill")  # None without the project folder (an installed wheel)
MIXED_PRECISION = {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}  # fine-tuning, by the weights' dtype


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
        except (SceneError, ConfigError, CheckpointError, ImageInputError, ValueError, RuntimeError) as err:
            shutil.rmtree(run, ignore_errors=True)  # a message on the page, not Gradio's bare "Error"
            raise refused(f"Fine-tuning failed: {str(err).splitlines()[0]}") from err
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
    scenes = sorted(p for p in REALFILL_SAMPLES.iterdir() if p.is_dir()) if REALFILL_SAMPLES is not None else []
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


def realfill_banner(settings: RealFillSettings) -> str:
    """The RealFill tab's line under its title: what it fine-tunes, or a loud warning that the weights are random."""
    if settings.random_weights:
        return (RANDOM_WEIGHTS +
                "The SD2 inpainting checkpoint was not found, so this tab fine-tunes a tiny model with random "
                f"weights (`{settings.config.name}`) to show the interface. Put `512-inpainting-ema.ckpt` in "
                "`pretrained_models/` (see `pretrained_models/README.md`) and restart for real results.")
    accelerator, precision = settings.training_target()
    return (f"Fine-tunes LoRA adapters of `{settings.base_ckpt}` with `{settings.config}` · {accelerator}, "
            f"precision {precision}")


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
