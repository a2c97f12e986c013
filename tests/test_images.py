"""Reading user images and masks: orientation, conversions, resizing, and clear errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from leftrefill.images import (ImageInputError, image_file_problem, load_mask, load_rgb, resize_mask, rgb_to_tensor,
                               tensor_to_rgb)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def left_red_right_blue(width: int = 40, height: int = 20) -> Image.Image:
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(Image.new("RGB", (width // 2, height), RED), (0, 0))
    return image


def test_exif_orientation_is_honoured(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    left_red_right_blue().save(path, exif=exif, quality=95)
    image = load_rgb(path)
    assert image.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 tall
    assert image[2, 10, 0] > 200 and image[2, 10, 2] < 60  # the left (red) half is now on top
    assert image[-3, 10, 2] > 200 and image[-3, 10, 0] < 60


def test_rgba_grayscale_and_palette_images_become_rgb(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[..., 3] = np.arange(8) * 30  # alpha is dropped, colour kept
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert (load_rgb(tmp_path / "rgba.png") == [10, 20, 30]).all()
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert np.array_equal(load_rgb(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(load_rgb(Image.fromarray(gray).convert("P")), np.repeat(gray[..., None], 3, axis=2))


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    assert load_rgb(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 1, 255, 128]
    assert load_rgb(np.stack([values] * 3, axis=-1))[0, :, 1].tolist() == [0, 1, 255, 128]
    assert load_mask(tmp_path / "deep.png")[0].tolist() == [False, False, True, True]


def test_numpy_arrays_of_every_supported_kind(tmp_path):
    floats = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert load_rgb(floats)[..., 0].tolist() == np.round(floats * 255).astype(np.uint8).tolist()
    assert load_rgb(np.ones((3, 4, 1), dtype=bool)).max() == 255
    with pytest.raises(ImageInputError, match="reference: float arrays must hold values in \\[0, 1\\]"):
        load_rgb(floats * 3, "reference")
    with pytest.raises(ImageInputError, match="target: expected an array of shape"):
        load_rgb(np.zeros((3, 4, 2), np.uint8), "target")
    with pytest.raises(ImageInputError, match="mask: unsupported array dtype int32"):
        load_mask(np.full((3, 4), 1000, np.int32), "mask")


def test_unreadable_truncated_and_missing_files_name_the_file(tmp_path):
    good = tmp_path / "photo.jpg"
    left_red_right_blue(256, 256).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ImageInputError, match=f"target: {truncated} cannot be decoded"):
        load_rgb(truncated, "target")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageInputError, match=f"source: {text} is not an image file"):
        load_rgb(text, "source")
    with pytest.raises(ImageInputError, match="mask: file not found"):
        load_mask(tmp_path / "nothing.png", "mask")


def test_mask_threshold_colour_and_alpha(tmp_path):
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert load_mask(gray).tolist() == [[False, False, True, True]]
    strokes = np.zeros((1, 3, 4), np.uint8)
    strokes[..., :3] = 255
    strokes[..., 3] = [0, 255, 100]  # white paint: transparent, opaque, faint
    Image.fromarray(strokes, "RGBA").save(tmp_path / "strokes.png")
    assert load_mask(tmp_path / "strokes.png").tolist() == [[False, True, False]]
    assert load_mask(np.array([[[255, 255, 255], [255, 0, 0]]], np.uint8)).tolist() == [[True, False]]


def test_cover_resize_keeps_every_hole_pixel():
    mask = np.zeros((300, 500), dtype=bool)
    mask[151, 333] = True  # one pixel: nearest almost surely loses it
    small = resize_mask(mask, (64, 64), rule="cover")
    assert small.sum() >= 1 and small[int(151 * 64 / 300), int(333 * 64 / 500)]
    assert not resize_mask(mask, (64, 64), rule="nearest").any()
    with pytest.raises(ValueError, match="unknown mask resize rule"):
        resize_mask(mask, (64, 64), rule="bilinear")


def test_tensor_round_trip_is_exact():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = rgb_to_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(tensor_to_rgb(tensor), image)


def test_a_sixteen_bit_mask_holding_eight_bit_values_is_read_on_the_eight_bit_scale(tmp_path):
    values = np.array([[0, 255, 128, 127]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "wide.png")
    assert load_mask(tmp_path / "wide.png").tolist() == [[False, True, True, False]]
    assert load_mask(values).tolist() == [[False, True, True, False]]


def test_views_are_resized_with_inter_area_also_when_enlarging():
    import cv2

    from leftrefill.images import resize_rgb

    small = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    assert np.array_equal(resize_rgb(small, (64, 64)), cv2.resize(small, (64, 64), interpolation=cv2.INTER_AREA))


def test_a_zero_one_mask_file_is_read_as_binary_with_a_warning_naming_it(tmp_path, caplog):
    values = np.array([[0, 1, 1, 0]], dtype=np.uint8)
    Image.fromarray(values, "L").save(tmp_path / "zero_one.png")
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "zero_one_16.png")  # mode I;16
    Image.fromarray(np.repeat(values[..., None], 3, axis=2), "RGB").save(tmp_path / "zero_one_rgb.png")
    with caplog.at_level(logging.WARNING, logger="leftrefill.images"):
        for name in ("zero_one.png", "zero_one_16.png", "zero_one_rgb.png"):
            assert load_mask(tmp_path / name, "mask").tolist() == [[False, True, True, False]]
    assert [record.getMessage() for record in caplog.records] == [
        f"mask {tmp_path / name} holds only the values 0 and 1: read as a 0/1 mask with 1 = hole (save masks as "
        f"0 / 255 to silence this warning)" for name in ("zero_one.png", "zero_one_16.png", "zero_one_rgb.png")]


def test_zero_one_integer_arrays_are_binary_but_other_masks_keep_the_threshold(caplog):
    with caplog.at_level(logging.WARNING, logger="leftrefill.images"):
        assert load_mask(np.array([[0, 1]], np.uint8), "user mask").tolist() == [[False, True]]
        assert load_mask(np.array([[1, 0]], np.int64), "another mask").tolist() == [[True, False]]
        assert [m.split(" holds")[0] for m in caplog.messages] == ["user mask", "another mask"]
        caplog.clear()
        stray = np.zeros((100, 100), np.uint8)
        stray[0, :5] = 1  # 0.05 % ones: the noise of a near-black JPEG, not a 0/1 mask
        assert not load_mask(stray, "dark mask").any()
        assert load_mask(np.array([[0, 1, 255]], np.uint8)).tolist() == [[False, False, True]]  # 1 is dark here
        assert load_mask(np.zeros((2, 2), np.uint8)).tolist() == [[False, False], [False, False]]
        assert load_mask(np.array([[True, False]])).tolist() == [[True, False]]
        assert caplog.messages == []
    with pytest.raises(ImageInputError, match="mask: unsupported array dtype int64"):
        load_mask(np.array([[-1, 0, 1]], np.int64), "mask")


def test_image_file_problem_names_each_kind_of_bad_file(tmp_path):
    photo, mask = tmp_path / "photo.jpg", tmp_path / "mask.png"
    left_red_right_blue(256, 256).save(photo, quality=95)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(mask)
    assert image_file_problem(photo) is None and image_file_problem(mask) is None
    for good, cut in ((photo, photo.stat().st_size // 2), (mask, mask.stat().st_size - 30)):
        bad = tmp_path / f"cut_{good.name}"
        bad.write_bytes(good.read_bytes()[:cut])
        assert image_file_problem(bad).startswith("cannot be decoded (truncated or corrupt?): ")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    assert image_file_problem(tmp_path / "empty.png") == "empty file (0 bytes)"
    assert image_file_problem(tmp_path / "notes.png") == "not an image file Pillow can read"
    assert image_file_problem(tmp_path / "missing.png") == "file not found"
    assert image_file_problem(tmp_path) == "not a file"
