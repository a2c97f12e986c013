"""The procedural NVS renderer (leftrefill.prep.render), its CLI and the bundled data/samples_nvs: cameras
in the Blender / Zero123 convention that leftrefill.nvs_pose reads back, exact ray casting, the layout."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from leftrefill.nvs_pose import camera_center, relative_pose, spherical
from leftrefill.prep.objaverse import check_object
from leftrefill.prep.render import (CAMERAS_FILE, OBJECTS, Box, Cylinder, ProceduralObject, Sphere, Spherical,
                                    fill_mask, focal_length, look_at_world_to_camera, project, render_dataset,
                                    render_object, render_view, sample_cameras)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples_nvs"
SIZE = 48  # small renders keep the tests fast
DEG = math.pi / 180


def load_script():
    spec = importlib.util.spec_from_file_location("render_objects", ROOT / "scripts" / "render_objects.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def opencv_look_at_flipped(theta: float, phi: float, radius: float) -> np.ndarray:
    """An independent Blender world-to-camera: the OpenCV look-at (x right, y down, z forward) with its y
    and z rows negated (Blender: y up, looking down -z)."""
    center = radius * np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])
    forward = -center / radius
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, -down, -forward])
    return np.hstack([rotation, (-rotation @ center)[:, None]])


def wrap(angle: np.ndarray) -> np.ndarray:
    """Angles in (-pi, pi], so that azimuths compare across the +-pi seam."""
    return np.angle(np.exp(1j * np.asarray(angle)))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, list[Spherical]]:
    """The totem rendered from 12 sampled cameras into a views_release/<uid> folder."""
    cameras = sample_cameras(np.random.default_rng(7))
    folder = render_object(tmp_path_factory.mktemp("views") / "proc_totem", OBJECTS["totem"], cameras, SIZE)
    return folder, cameras


# ------------------------------------------------------------------------------------------------ cameras


def test_written_cameras_give_back_the_spherical_coordinates_they_were_rendered_from(rendered):
    folder, cameras = rendered
    w2c = np.stack([np.load(folder / f"{i:03d}.npy") for i in range(12)])
    theta, phi, radius = (t.numpy() for t in spherical(camera_center(w2c)))
    expected = np.array(cameras)
    np.testing.assert_allclose(theta, expected[:, 0], atol=1e-6)
    np.testing.assert_allclose(wrap(phi - expected[:, 1]), 0, atol=1e-6)
    np.testing.assert_allclose(radius, expected[:, 2], atol=1e-6)


def test_relative_pose_of_written_views_matches_the_rendered_angles(rendered):
    folder, cameras = rendered
    for target, cond in [(3, 0), (0, 3), (11, 5)]:
        pose = relative_pose(np.load(folder / f"{target:03d}.npy"), np.load(folder / f"{cond:03d}.npy")).numpy()
        (t_tgt, p_tgt, r_tgt), (t_cond, p_cond, r_cond) = cameras[target], cameras[cond]
        expected = [t_tgt - t_cond, math.sin(p_tgt - p_cond), math.cos(p_tgt - p_cond), r_tgt - r_cond]
        np.testing.assert_allclose(pose, expected, atol=1e-6)


def test_cameras_are_sampled_in_the_stated_ranges_and_seeded():
    cameras = np.array(sample_cameras(np.random.default_rng(0), 500))
    assert cameras[:, 0].min() >= 30 * DEG and cameras[:, 0].max() <= 120 * DEG
    assert cameras[:, 1].min() > -math.pi and cameras[:, 1].max() <= math.pi
    assert cameras[:, 2].min() >= 1.5 and cameras[:, 2].max() <= 2.2
    assert cameras[:, 1].std() > 1.5  # azimuth spread over the whole circle (uniform: std 1.81)
    assert sample_cameras(np.random.default_rng(3), 4) == sample_cameras(np.random.default_rng(3), 4)


def test_rotation_is_orthonormal_and_the_camera_looks_down_minus_z_at_the_origin():
    for theta, phi, radius in sample_cameras(np.random.default_rng(1), 50):
        w2c = look_at_world_to_camera(theta, phi, radius)
        rotation = w2c[:, :3]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-12)
        center = camera_center(w2c).numpy()
        looking = -rotation[2]  # the camera's -z axis in world coordinates
        np.testing.assert_allclose(looking, -center / np.linalg.norm(center), atol=1e-12)
        np.testing.assert_allclose(w2c[:, :3] @ np.zeros(3) + w2c[:, 3], [0, 0, -radius], atol=1e-12)
        assert rotation[0, 2] == pytest.approx(0.0, abs=1e-12) and rotation[1, 2] > 0  # horizon level, +z up


def test_world_to_camera_equals_the_flipped_opencv_look_at():
    for camera in sample_cameras(np.random.default_rng(2), 20):
        np.testing.assert_allclose(look_at_world_to_camera(*camera), opencv_look_at_flipped(*camera), atol=1e-12)


def test_blender_axes_camera_on_plus_x_sees_plus_y_right_and_plus_z_up():
    w2c = look_at_world_to_camera(90 * DEG, 0.0, 2.0)
    (x_right, y_right), (x_up, y_up) = project(np.array([[0, 0.3, 0], [0, 0, 0.3]]), w2c, 64)
    assert x_right > 32 and y_right == pytest.approx(32)
    assert x_up == pytest.approx(32) and y_up < 32


def test_pole_cameras_are_refused():
    with pytest.raises(ValueError, match="theta"):
        look_at_world_to_camera(0.0, 0.0, 2.0)


# -------------------------------------------------------------------------------------------- ray casting


def test_origin_projects_to_the_image_centre():
    for camera in sample_cameras(np.random.default_rng(4), 12):
        pixel = project(np.zeros((1, 3)), look_at_world_to_camera(*camera), 64)
        np.testing.assert_allclose(pixel, [[32, 32]], atol=1e-9)


def test_sphere_silhouette_is_the_analytic_disc_at_the_centre():
    """A sphere of radius rho seen from distance r fills a cone of half-angle asin(rho / r): on the image,
    a disc of radius f tan(asin(rho / r)) around the principal point."""
    size, radius = 128, 1.8
    alpha = render_view(OBJECTS["sphere_checker"], look_at_world_to_camera(70 * DEG, 1.0, radius), size)[..., 3]
    expected_radius = focal_length(size) * math.tan(math.asin(0.45 / radius))
    rows, cols = np.nonzero(alpha)
    assert len(rows) == pytest.approx(math.pi * expected_radius ** 2, rel=0.03)
    assert cols.mean() + 0.5 == pytest.approx(size / 2, abs=0.1)
    assert rows.mean() + 0.5 == pytest.approx(size / 2, abs=0.1)


@pytest.mark.parametrize("shape, origin, direction, t, normal", [
    (Sphere(0.5), (2, 0, 0), (-1, 0, 0), 1.5, (1, 0, 0)),
    (Sphere(0.5), (2, 0.6, 0), (-1, 0, 0), math.inf, None),
    (Box((0.2, 0.3, 0.1)), (2, 0.25, 0.05), (-1, 0, 0), 1.8, (1, 0, 0)),
    (Box((0.2, 0.3, 0.1)), (0, 0, -2), (0, 0, 1), 1.9, (0, 0, -1)),
    (Box((0.2, 0.3, 0.1)), (2, 0, 0.1 + 1e-9), (-1, 0, 0), math.inf, None),  # just above the top face
    (Cylinder(0.3, 0.4), (2, 0, 0), (-1, 0, 0), 1.7, (1, 0, 0)),
    (Cylinder(0.3, 0.4), (0, 0.1, 2), (0, 0, -1), 1.6, (0, 0, 1)),
    (Cylinder(0.3, 0.4), (2, 0, 0.5), (-1, 0, 0), math.inf, None),
    (Cylinder(0.3, 0.4), (0, 0.35, 2), (0, 0, -1), math.inf, None),
    (Cylinder(0.3, 0.4), (1.2, 0, 1.4), (-1 / math.sqrt(2), 0, -1 / math.sqrt(2)), math.sqrt(2),
     (0, 0, 1)),  # on the top cap at (0.2, 0, 0.4); the side's root there is above the cap
    (Cylinder(0.3, 0.4), (1.4, 0, 1.0), (-1 / math.sqrt(2), 0, -1 / math.sqrt(2)), 1.1 * math.sqrt(2),
     (1, 0, 0)),  # on the side at (0.3, 0, -0.1); the cap plane there is outside the radius
])
def test_primitive_entry_distance_and_normal(shape, origin, direction, t, normal):
    hit_t, hit_normal = shape.intersect(np.array([origin], float), np.array([direction], float))
    assert hit_t[0] == pytest.approx(t, abs=1e-9)
    if normal is not None:
        np.testing.assert_allclose(hit_normal[0], normal, atol=1e-9)


def test_nearest_part_hides_the_ones_behind():
    """The totem's red nose points to +x: in front of the head seen from +x, hidden behind it from -x."""
    nose_tip = np.array([[0.34, 0.0, 0.25]])
    for phi, red in [(0.0, True), (math.pi, False)]:
        w2c = look_at_world_to_camera(90 * DEG, phi, 2.0)
        image = render_view(OBJECTS["totem"], w2c, 64)
        x, y = project(nose_tip, w2c, 64)[0]
        r, g, b, a = image[int(y), int(x)].astype(int)
        assert a == 255
        assert (r > 2 * g and r > 2 * b and r > 60) == red


def test_render_does_not_depend_on_the_order_of_parts():
    totem = OBJECTS["totem"]
    reversed_totem = ProceduralObject("totem", totem.parts[::-1])
    for camera in sample_cameras(np.random.default_rng(6), 3):
        w2c = look_at_world_to_camera(*camera)
        np.testing.assert_array_equal(render_view(totem, w2c, SIZE), render_view(reversed_totem, w2c, SIZE))


@pytest.mark.parametrize("name", list(OBJECTS))
def test_views_are_binary_rgba_with_the_object_inside_the_frame(name):
    for camera in sample_cameras(np.random.default_rng(5), 6):
        image = render_view(OBJECTS[name], look_at_world_to_camera(*camera), SIZE)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 4)
        alpha = image[..., 3]
        assert set(np.unique(alpha)) == {0, 255}
        assert 0.03 < (alpha > 0).mean() < 0.6
        border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
        assert not border.any(), "the object touches the frame"
        assert not image[alpha == 0, :3].any(), "background RGB is not 0"


@pytest.mark.parametrize("name", list(OBJECTS))
def test_opposite_views_of_an_object_differ(name):
    front, back = (render_view(OBJECTS[name], look_at_world_to_camera(80 * DEG, phi, 1.8), SIZE)
                   for phi in (0.3, 0.3 + math.pi))
    on_both = (front[..., 3] > 0) & (back[..., 3] > 0)
    difference = np.abs(front[..., :3].astype(int) - back[..., :3].astype(int))[on_both].mean()
    assert difference > 20, f"front and back look alike (mean difference {difference:.1f} levels)"


def test_fill_mask_covers_the_silhouette_and_stays_within_the_dilation():
    image = render_view(OBJECTS["box_stripes"], look_at_world_to_camera(60 * DEG, 2.0, 1.6), 64)
    silhouette = image[..., 3] > 0
    mask = fill_mask(image, 8)
    assert mask[silhouette].all() and mask.sum() > silhouette.sum()
    distance = cv2.distanceTransform((~silhouette).astype(np.uint8), cv2.DIST_L2, 5)
    assert distance[mask].max() <= 8.5
    assert mask[distance <= 7.5].all()


# ------------------------------------------------------------------------------------------------- output


def test_written_layout_is_twelve_rgba_pngs_and_float32_cameras(rendered):
    folder, cameras = rendered
    names = {f"{i:03d}{suffix}" for i in range(12) for suffix in (".png", ".npy")}
    assert {p.name for p in folder.iterdir()} == names | {CAMERAS_FILE}
    for i in range(12):
        with Image.open(folder / f"{i:03d}.png") as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGBA", (SIZE, SIZE))
        camera = np.load(folder / f"{i:03d}.npy")
        assert camera.dtype == np.float32 and camera.shape == (3, 4)
    record = json.loads((folder / CAMERAS_FILE).read_text())
    assert [Spherical(v["theta"], v["phi"], v["radius"]) for v in record["views"]] == cameras
    assert check_object(folder).complete


def test_renders_are_deterministic_for_a_seed_and_per_object(tmp_path):
    runs = {name: render_dataset(tmp_path / name, objects, 3, 24, seed)
            for name, objects, seed in [("a", ["box_stripes"], 1), ("b", ["box_stripes"], 1),
                                        ("c", ["box_stripes"], 2), ("d", ["totem", "box_stripes"], 1)]}
    assert runs["d"] == ["proc_totem", "proc_box_stripes"]

    def files(run: str) -> dict[str, bytes]:
        folder = tmp_path / run / "views_release" / "proc_box_stripes"
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    assert files("a") == files("b")
    assert files("a") == files("d"), "an object's views changed when another object was added"
    assert files("a")["000.npy"] != files("c")["000.npy"]


def test_render_dataset_refuses_unknown_objects(tmp_path):
    with pytest.raises(ValueError, match="teapot"):
        render_dataset(tmp_path, ["teapot"])


def test_two_views_differ(rendered):
    folder, _ = rendered
    first, second = (np.asarray(Image.open(folder / f"{i:03d}.png")) for i in (0, 1))
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 5


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_renders_lists_and_masks_the_test_object(tmp_path):
    out = tmp_path / "out"
    assert load_script().main(["--out_dir", str(out), "--objects", "sphere_checker", "box_stripes",
                               "--size", "32", "--num_test", "1", "--seed", "3"]) == 0
    train = (out / "obj_train.txt").read_text().split()
    test = (out / "obj_test.txt").read_text().split()
    assert sorted(train + test) == ["proc_box_stripes", "proc_sphere_checker"] and len(test) == 1
    view = np.asarray(Image.open(out / "views_release" / test[0] / "000.png"))
    mask = np.asarray(Image.open(out / "masks" / test[0] / "000.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask > 0, fill_mask(view, 8))
    assert not (out / "masks" / train[0]).exists()


@pytest.mark.parametrize("argv, flag", [
    (["--size", "4"], "--size"),
    (["--num_views", "0"], "--num_views"),
    (["--num_test", "3", "--objects", "totem"], "--num_test"),
    (["--objects", "teapot"], "--objects"),
    (["--bogus_flag", "1"], "--bogus_flag"),
])
def test_cli_bad_input_exits_2_naming_the_flag(tmp_path, capsys, argv, flag):
    try:
        status = load_script().main(["--out_dir", str(tmp_path / "out"), *argv])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- bundled samples


def test_bundled_samples_are_complete_listed_and_consistent():
    train = (SAMPLES / "obj_train.txt").read_text().split()
    test = (SAMPLES / "obj_test.txt").read_text().split()
    assert len(train) == 2 and len(test) == 1 and not set(train) & set(test)
    for uid in train + test:
        folder = SAMPLES / "views_release" / uid
        assert check_object(folder).complete, uid
        record = json.loads((folder / CAMERAS_FILE).read_text())
        w2c = np.stack([np.load(folder / f"{view['view']}.npy") for view in record["views"]])
        theta, phi, radius = (t.numpy() for t in spherical(camera_center(w2c)))
        recorded = np.array([[v["theta"], v["phi"], v["radius"]] for v in record["views"]])
        np.testing.assert_allclose(theta, recorded[:, 0], atol=1e-6)
        np.testing.assert_allclose(wrap(phi - recorded[:, 1]), 0, atol=1e-6)
        np.testing.assert_allclose(radius, recorded[:, 2], atol=1e-6)
    for uid in test:
        view = np.asarray(Image.open(SAMPLES / "views_release" / uid / "000.png"))
        mask = np.asarray(Image.open(SAMPLES / "masks" / uid / "000.png"))
        assert mask.shape == view.shape[:2] and set(np.unique(mask)) == {0, 255}
        np.testing.assert_array_equal(mask > 0, fill_mask(view, 8))


def test_bundled_samples_are_what_the_renderer_draws():
    """Re-render view 000 of each bundled object from its recorded camera: the same image up to pixels
    whose ray grazes an edge (floating-point differences between machines)."""
    for uid in (SAMPLES / "obj_train.txt").read_text().split() + (SAMPLES / "obj_test.txt").read_text().split():
        folder = SAMPLES / "views_release" / uid
        record = json.loads((folder / CAMERAS_FILE).read_text())
        view = record["views"][0]
        camera = Spherical(view["theta"], view["phi"], view["radius"])
        now = render_view(OBJECTS[record["object"]], look_at_world_to_camera(*camera), record["size"],
                          record["fov_deg"])
        stored = np.asarray(Image.open(folder / "000.png"))
        assert (np.abs(now.astype(int) - stored.astype(int)).max(axis=-1) > 1).mean() < 0.002, uid
