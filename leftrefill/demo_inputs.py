"""Decoding and checking the demo's Gradio payloads, shared by every tab of the page (leftrefill.demo).

Every event takes Gradio's raw payloads (``preprocess=False``) and its handler decodes them itself, with these
helpers, through ``leftrefill.images`` and ``leftrefill.arguments`` as the command line does, so every bad
upload or option becomes one message naming the input, never Gradio's generic "upstream Gradio app has raised
an exception". Gradio still checks that every file named in a payload is one it uploaded into its own cache, so
user input never names a file on the server. Here: the painted target and its mask (PaintedTargetHandler), the
sampling options, image uploads checked against MAX_PIXELS, and ``refused``, the error every check raises.
"""

from __future__ import annotations

import os
from pathlib import Path

# The page must not call out to the internet. Gradio reads this when a page is built (gradio.analytics), and
# every tab's module imports this one.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from gradio.components.image_editor import EditorData  # noqa: E402
from PIL import Image  # noqa: E402

from leftrefill.arguments import check_sampling_options  # noqa: E402
from leftrefill.images import ImageInputError, load_mask, load_rgb  # noqa: E402

MAX_PIXELS = 25_000_000  # per image; larger uploads are refused with a message (5000 x 5000)
# What Pillow raises on a file it cannot decode (DecompressionBombError is not an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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
