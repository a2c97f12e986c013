"""A small procedural renderer for novel-view-synthesis test data in the Zero-1-to-3 layout (METHOD 2.2).

No Objaverse download is needed: a few textured objects made of exactly ray-cast primitives (spheres,
boxes, capped cylinders) are rendered from random cameras into

    <out_root>/views_release/<uid>/000.png ... 011.png   RGBA uint8, alpha 255 on the object, 0 elsewhere
    <out_root>/views_release/<uid>/000.npy ... 011.npy   float32 (3, 4) world-to-camera [R | t]
    <out_root>/views_release/<uid>/cameras.json          the (theta, phi, radius) each view was rendered from

Conventions (those of the Zero-1-to-3 Blender renders and of ``leftrefill.nvs_pose``):
* World: +z is up; every object lies within radius ~0.55 of the origin; every camera looks at the origin.
* Camera (Blender): it looks down its own -z axis, +y is up in the image, +x is right. The rows of R are
  the camera's right, up and backward axes in world coordinates, and t = -R C for the camera centre C.
* Spherical coordinates of C, as ``leftrefill.nvs_pose.spherical(camera_center(w2c))`` returns them:
  C = r (sin theta cos phi, sin theta sin phi, cos theta), theta the polar angle from +z in [0, pi],
  phi = atan2(y, x) in (-pi, pi], r = ||C||.
* Projection: pinhole, square image, vertical (= horizontal) field of view FOV_DEG, principal point at the
  image centre. Pixel coordinates (x right, y down) put the top-left corner of the image at (0, 0), so
  the centre of pixel (row i, column j) is (j + 0.5, i + 0.5) and the origin projects to (size/2, size/2).
* Shading: albedo from a per-part texture of the surface point and normal (in the part's own frame),
  Lambert with one fixed world light plus ambient. No antialiasing: alpha is exactly 0 or 255, and the
  RGB of background pixels is 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from leftrefill.atomic import atomic_path, write_text_atomic
from leftrefill.prep.objaverse import NUM_VIEWS
from leftrefill.prep.test_set import save_mask

log = logging.getLogger(__name__)

VIEWS_DIR = "views_release"
MASKS_DIR = "masks"
CAMERAS_FILE = "cameras.json"
UID_PREFIX = "proc_"
DEFAULT_SIZE = 256  # Zero-1-to-3 trains on 256 x 256 renders
FOV_DEG = math.degrees(2 * math.atan(16 / 35))  # 49.13: Zero123's Blender camera, 35 mm lens, 32 mm sensor
POLAR_RANGE_DEG = (30.0, 120.0)  # random views stay away from the poles, mostly above the equator
RADIUS_RANGE = (1.5, 2.2)  # Zero123's camera distances; objects (radius <= 0.55) stay fully in view
MASK_DILATION = 8  # px the target silhouette grows by to make the fill mask (covers the new view's outline)
AMBIENT, DIFFUSE = 0.35, 0.65  # shade = AMBIENT + DIFFUSE * max(0, n . light), at most 1
LIGHT = np.array([0.5, -0.4, 0.77]) / np.linalg.norm([0.5, -0.4, 0.77])  # fixed world direction to the light

Texture = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (points, normals) (N, 3) local -> RGB (N, 3), [0, 1]


class Spherical(NamedTuple):
    """A camera centre in spherical coordinates: theta (polar from +z) and phi (azimuth) in radians, radius
    in world units; the camera looks at the origin."""

    theta: float
    phi: float
    radius: float


# ------------------------------------------------------------------------------------------------ cameras


def look_at_world_to_camera(theta: float, phi: float, radius: float) -> np.ndarray:
    """World-to-camera [R | t], (3, 4) float64, of a Blender camera at spherical (theta, phi, radius)
    looking at the origin with world +z up in the image. theta must be in (0, pi) (not at a pole, where
    "up" is undefined) and radius > 0."""
    if not 1e-6 < theta < math.pi - 1e-6 or not radius > 0:
        raise ValueError(f"look_at_world_to_camera: need 0 < theta < pi and radius > 0, got theta {theta}, "
                         f"radius {radius}")
    center = radius * np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi),
                                math.cos(theta)])
    backward = center / radius  # the camera looks down -z, i.e. towards the origin
    right = np.cross([0.0, 0.0, 1.0], backward)
    right /= np.linalg.norm(right)
    up = np.cross(backward, right)
    rotation = np.stack([right, up, backward])  # rows: camera axes in world coordinates
    return np.concatenate([rotation, (-rotation @ center)[:, None]], axis=1)


def sample_cameras(rng: np.random.Generator, num_views: int = NUM_VIEWS,
                   polar_range_deg: tuple[float, float] = POLAR_RANGE_DEG,
                   radius_range: tuple[float, float] = RADIUS_RANGE) -> list[Spherical]:
    """``num_views`` random viewpoints, as Zero-1-to-3 renders each object: uniform on the sphere's zone
    between the two polar angles (uniform in cos theta), azimuth uniform in (-pi, pi] (the range of
    atan2, so that spherical() gives phi back unchanged), radius uniform in ``radius_range``."""
    polar_lo, polar_hi = (math.radians(a) for a in polar_range_deg)
    cos_theta = rng.uniform(math.cos(polar_hi), math.cos(polar_lo), num_views)
    phi = math.pi - rng.uniform(0.0, 2 * math.pi, num_views)  # uniform in [0, 2 pi) mapped to (-pi, pi]
    radius = rng.uniform(*radius_range, num_views)
    return [Spherical(float(math.acos(c)), float(p), float(r)) for c, p, r in zip(cos_theta, phi, radius)]


def focal_length(size: int, fov_deg: float = FOV_DEG) -> float:
    """Focal length in pixels of a ``size`` x ``size`` pinhole camera with field of view ``fov_deg``."""
    return (size / 2) / math.tan(math.radians(fov_deg) / 2)


def camera_rays(w2c: np.ndarray, size: int, fov_deg: float = FOV_DEG) -> tuple[np.ndarray, np.ndarray]:
    """One ray per pixel centre, row-major: (origins (size*size, 3), unit directions (size*size, 3)),
    float64 world coordinates, for the world-to-camera [R | t] ``w2c`` (3, 4)."""
    rotation, translation = w2c[:, :3], w2c[:, 3]
    coords = (np.arange(size) + 0.5 - size / 2) / focal_length(size, fov_deg)
    y, x = np.meshgrid(-coords, coords, indexing="ij")  # rows go down the image, camera +y goes up
    directions = np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3) @ rotation  # R^T d per row
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    origins = np.broadcast_to(-rotation.T @ translation, directions.shape)
    return origins, directions


def project(points: np.ndarray, w2c: np.ndarray, size: int, fov_deg: float = FOV_DEG) -> np.ndarray:
    """Pixel coordinates (N, 2) as (x right, y down), (0, 0) = the image's top-left corner, of world
    points (N, 3) in front of the camera ``w2c`` (3, 4)."""
    camera = points @ w2c[:, :3].T + w2c[:, 3]  # (N, 3), the points in front have z < 0
    depth = -camera[:, 2:]
    return np.concatenate([camera[:, :1], -camera[:, 1:2]], axis=1) / depth * focal_length(size, fov_deg) + size / 2


# --------------------------------------------------------------------------------------------- primitives
# Each shape is centred on its own origin; intersect(origins, directions) takes rays (N, 3) in the shape's
# frame (unit directions, origins outside the shape) and returns (t (N,), normals (N, 3)): the distance to
# the entry point, inf where the ray misses, and the outward unit normal there.


@dataclass(frozen=True)
class Sphere:
    radius: float

    def intersect(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = np.einsum("ij,ij->i", origins, directions)
        disc = b * b - (np.einsum("ij,ij->i", origins, origins) - self.radius ** 2)
        t = -b - np.sqrt(np.maximum(disc, 0.0))  # the nearer root: the entry point
        t = np.where((disc >= 0) & (t > 0), t, np.inf)
        normals = (origins + np.nan_to_num(t, posinf=0.0)[:, None] * directions) / self.radius
        return t, normals


@dataclass(frozen=True)
class Box:
    half_size: tuple[float, float, float]

    def intersect(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = np.asarray(self.half_size)
        with np.errstate(divide="ignore", invalid="ignore"):  # rays parallel to a slab give +-inf
            t1, t2 = (-half - origins) / directions, (half - origins) / directions
        t_enter = np.fmin(t1, t2)  # (N, 3), per slab; fmin/fmax skip the NaN of a ray lying in a face plane
        near, far = np.fmax.reduce(t_enter, axis=1), np.fmin.reduce(np.fmax(t1, t2), axis=1)
        t = np.where((near <= far) & (near > 0), near, np.inf)
        axis = np.argmax(t_enter, axis=1)  # the slab entered last is the face hit
        normals = np.zeros_like(origins)
        rows = np.arange(len(origins))
        normals[rows, axis] = -np.sign(directions[rows, axis])
        return t, normals


@dataclass(frozen=True)
class Cylinder:
    """A capped cylinder around the local z axis, z in [-half_height, half_height]."""

    radius: float
    half_height: float

    def intersect(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # 1. Side: the nearer root of |o_xy + t d_xy|^2 = radius^2, kept where |z| <= half_height.
        o_xy, d_xy = origins[:, :2], directions[:, :2]
        a = np.einsum("ij,ij->i", d_xy, d_xy)
        b = np.einsum("ij,ij->i", o_xy, d_xy)
        disc = b * b - a * (np.einsum("ij,ij->i", o_xy, o_xy) - self.radius ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):  # a = 0: ray along the axis, no side hit
            t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        z_side = origins[:, 2] + np.nan_to_num(t_side, posinf=0.0, neginf=0.0) * directions[:, 2]
        side = (disc >= 0) & (a > 0) & (t_side > 0) & (np.abs(z_side) <= self.half_height)
        # 2. Caps: the planes z = +-half_height, kept inside the radius.
        candidates = [np.where(side, t_side, np.inf)]
        for sign in (1.0, -1.0):
            with np.errstate(divide="ignore", invalid="ignore"):  # d_z = 0: ray parallel to the caps
                t_cap = (sign * self.half_height - origins[:, 2]) / directions[:, 2]
            xy = o_xy + np.nan_to_num(t_cap, posinf=0.0, neginf=0.0)[:, None] * d_xy
            inside = np.einsum("ij,ij->i", xy, xy) <= self.radius ** 2
            candidates.append(np.where(inside & (t_cap > 0), t_cap, np.inf))
        # 3. From outside a convex solid the nearest candidate is the entry point. Normals: the side's
        #    (x, y, 0) / radius, the caps' (0, 0, +-1).
        which = np.argmin(candidates, axis=0)
        t = np.min(candidates, axis=0)
        normals = np.zeros_like(origins)
        on_side = (which == 0) & np.isfinite(t)
        normals[on_side, :2] = (o_xy[on_side] + t[on_side, None] * d_xy[on_side]) / self.radius
        normals[:, 2] = np.select([which == 1, which == 2], [1.0, -1.0], 0.0)
        return t, normals


@dataclass(frozen=True, eq=False)
class Part:
    """A shape placed in the world: local point p maps to ``rotation @ p + center``; ``texture`` colours it
    from the local surface point and normal."""

    shape: Sphere | Box | Cylinder
    texture: Texture
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def to_local(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World rays (N, 3) expressed in the part's frame (row vectors, so x @ R is R^T x)."""
        return (origins - np.asarray(self.center)) @ self.rotation, directions @ self.rotation


@dataclass(frozen=True)
class ProceduralObject:
    name: str
    parts: tuple[Part, ...]

    @property
    def uid(self) -> str:
        return UID_PREFIX + self.name


def _rotation(axis: str, degrees: float) -> np.ndarray:
    """(3, 3) rotation by ``degrees`` about the world axis "x", "y" or "z" (right-handed)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


# ----------------------------------------------------------------------------------------------- textures
# Every texture is asymmetric, so that opposite views of an object look clearly different.


def _hue(hue: np.ndarray, saturation: float = 0.8, value: float = 0.95) -> np.ndarray:
    """RGB (N, 3) in [0, 1] of hues (N,) in [0, 1) (HSV with fixed saturation and value)."""
    pure = np.clip(np.abs((hue[:, None] * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return value * (1 - saturation + saturation * pure)


def _parity(*coords: np.ndarray) -> np.ndarray:
    """Bool (N,): whether the sum of the floors of ``coords`` is odd (a checkerboard)."""
    return np.sum([np.floor(c) for c in coords], axis=0) % 2 == 1


def _checker_sphere_texture(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """12 x 8 checkerboard in (azimuth, polar): red / cream on the +x half, navy / teal on the -x half,
    a yellow cap above 60 degrees latitude."""
    polar = np.arccos(np.clip(normals[:, 2], -1, 1))
    azimuth = np.arctan2(normals[:, 1], normals[:, 0])
    odd = _parity(azimuth / (2 * np.pi / 12), polar / (np.pi / 8))
    front = np.where(odd[:, None], [0.85, 0.15, 0.1], [0.95, 0.9, 0.75])
    back = np.where(odd[:, None], [0.1, 0.2, 0.6], [0.2, 0.75, 0.7])
    colour = np.where(normals[:, :1] > 0, front, back)
    return np.where(normals[:, 2:] > math.sin(math.radians(60)), [0.95, 0.8, 0.1], colour)


_FACE_COLOURS = np.array([[0.85, 0.2, 0.15], [0.2, 0.75, 0.8],    # +x red, -x cyan
                          [0.25, 0.7, 0.25], [0.75, 0.25, 0.7],   # +y green, -y magenta
                          [0.95, 0.85, 0.2], [0.2, 0.3, 0.8]])    # +z yellow, -z blue


def _striped_box_texture(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """A different colour on each of the six faces, with darker diagonal stripes 1/12 unit wide."""
    axis = np.argmax(np.abs(normals), axis=1)
    face = 2 * axis + (normals[np.arange(len(normals)), axis] < 0)
    shade = np.where(_parity(points.sum(axis=1) * 6), 0.6, 1.0)
    return _FACE_COLOURS[face] * shade[:, None]


def _banded_cylinder_texture(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Side: a colour wheel around the axis with horizontal bands 0.1 high; top cap: black and white
    rings; bottom cap: dark grey."""
    hue = (np.arctan2(points[:, 1], points[:, 0]) / (2 * np.pi)) % 1.0
    side = _hue(hue) * np.where(_parity(points[:, 2] * 10), 0.7, 1.0)[:, None]
    rings = np.where(_parity(np.hypot(points[:, 0], points[:, 1]) * 20)[:, None], 0.1, 0.95) * np.ones(3)
    caps = np.where(normals[:, 2:] > 0, rings, [0.25, 0.25, 0.25])
    return np.where(np.abs(normals[:, 2:]) > 0.5, caps, side)


def _wood_checker_texture(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Light and dark brown 0.1-unit checkerboard."""
    odd = _parity(points[:, 0] * 10, points[:, 1] * 10, points[:, 2] * 10)
    return np.where(odd[:, None], [0.45, 0.28, 0.12], [0.8, 0.6, 0.35])


def _fluted_column_texture(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Green with 8 light vertical flutes."""
    flute = _parity(np.arctan2(points[:, 1], points[:, 0]) / (2 * np.pi / 8))
    return np.where(flute[:, None], [0.6, 0.9, 0.6], [0.1, 0.5, 0.2])


def _two_tone_head_texture(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Orange at the front (+x) fading to purple at the back."""
    weight = (normals[:, :1] + 1) / 2
    return weight * np.array([1.0, 0.55, 0.1]) + (1 - weight) * np.array([0.45, 0.15, 0.6])


def _red_texture(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    return np.broadcast_to([0.9, 0.1, 0.1], points.shape)


# ------------------------------------------------------------------------------------------------ objects


def _make_objects() -> dict[str, ProceduralObject]:
    """The registry: four objects, each within radius 0.55 of the origin."""
    objects = [
        ProceduralObject("sphere_checker", (Part(Sphere(0.45), _checker_sphere_texture),)),
        ProceduralObject("box_stripes", (Part(Box((0.36, 0.24, 0.28)), _striped_box_texture,
                                              rotation=_rotation("z", 30) @ _rotation("x", 15)),)),
        ProceduralObject("cylinder_bands", (Part(Cylinder(0.28, 0.38), _banded_cylinder_texture,
                                                 rotation=_rotation("x", 25)),)),
        ProceduralObject("totem", (  # a base, a column, a head and a nose pointing to +x
            Part(Box((0.22, 0.22, 0.08)), _wood_checker_texture, center=(0.0, 0.0, -0.32)),
            Part(Cylinder(0.1, 0.18), _fluted_column_texture, center=(0.0, 0.0, -0.06)),
            Part(Sphere(0.2), _two_tone_head_texture, center=(0.0, 0.0, 0.25)),
            Part(Box((0.1, 0.04, 0.04)), _red_texture, center=(0.24, 0.0, 0.25)),
        )),
    ]
    return {obj.name: obj for obj in objects}


OBJECTS = _make_objects()


# ---------------------------------------------------------------------------------------------- rendering


def trace(obj: ProceduralObject, origins: np.ndarray,
          directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cast world rays (N, 3) at ``obj``: (hit (N,) bool, albedo (N, 3) in [0, 1], world normals (N, 3)),
    from the nearest part each ray enters; albedo and normals are 0 where it misses."""
    # 1. Distance to every part; the nearest one wins.
    local_rays = [part.to_local(origins, directions) for part in obj.parts]
    hits = [part.shape.intersect(o, d) for part, (o, d) in zip(obj.parts, local_rays)]
    distances = np.stack([t for t, _ in hits])  # (P, N)
    winner = np.argmin(distances, axis=0)
    hit = np.isfinite(distances.min(axis=0))
    # 2. Texture and normal of each part, only on the rays it wins.
    albedo, normals = np.zeros_like(origins), np.zeros_like(origins)
    for index, (part, (o, d), (t, n)) in enumerate(zip(obj.parts, local_rays, hits)):
        rays = hit & (winner == index)
        points = o[rays] + t[rays, None] * d[rays]
        albedo[rays] = part.texture(points, n[rays])
        normals[rays] = n[rays] @ part.rotation.T  # local to world
    return hit, albedo, normals


def render_view(obj: ProceduralObject, w2c: np.ndarray, size: int = DEFAULT_SIZE,
                fov_deg: float = FOV_DEG) -> np.ndarray:
    """RGBA uint8 (size, size, 4) of ``obj`` seen by the world-to-camera [R | t] ``w2c`` (3, 4): Lambert
    shading, alpha 255 on the object and 0 (with RGB 0) on the background."""
    origins, directions = camera_rays(np.asarray(w2c, dtype=np.float64), size, fov_deg)
    hit, albedo, normals = trace(obj, origins, directions)
    shade = AMBIENT + DIFFUSE * np.clip(normals @ LIGHT, 0.0, None)
    rgb = np.where(hit[:, None], albedo * shade[:, None], 0.0)
    rgba = np.concatenate([np.round(np.clip(rgb, 0, 1) * 255), 255.0 * hit[:, None]], axis=1)
    return rgba.astype(np.uint8).reshape(size, size, 4)


def fill_mask(rgba: np.ndarray, dilation: int = MASK_DILATION) -> np.ndarray:
    """Bool (H, W), True = fill: the silhouette (alpha > 0) of an RGBA view (H, W, 4) grown by a disc of
    radius ``dilation`` px."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
    return cv2.dilate((rgba[..., 3] > 0).astype(np.uint8), kernel) > 0


# -------------------------------------------------------------------------------------------------- output


def render_object(folder: str | Path, obj: ProceduralObject, cameras: Sequence[Spherical],
                  size: int = DEFAULT_SIZE, fov_deg: float = FOV_DEG) -> Path:
    """Render ``obj`` from each camera into ``folder`` (``views_release/<uid>``): ``NNN.png`` (RGBA) and
    ``NNN.npy`` (float32 (3, 4) world-to-camera) per view, then ``cameras.json``; every file atomic, so an
    interrupted run leaves an object that the Objaverse list step reports incomplete. Returns ``folder``."""
    folder = Path(folder)
    for index, camera in enumerate(cameras):
        w2c = look_at_world_to_camera(*camera)
        with atomic_path(folder / f"{index:03d}.png") as tmp:
            Image.fromarray(render_view(obj, w2c, size, fov_deg), mode="RGBA").save(tmp)
        with atomic_path(folder / f"{index:03d}.npy") as tmp:
            with open(tmp, "wb") as file:
                np.save(file, w2c.astype(np.float32))
    record = {"object": obj.name, "size": size, "fov_deg": fov_deg,
              "views": [{"view": f"{i:03d}", **camera._asdict()} for i, camera in enumerate(cameras)]}
    write_text_atomic(folder / CAMERAS_FILE, json.dumps(record, indent=1) + "\n")
    return folder


def object_rng(seed: int, uid: str) -> np.random.Generator:
    """The camera generator of one object: seeded by (seed, sha256 of the uid), so an object's cameras do
    not change when other objects are added or left out."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big")])


def render_dataset(out_root: str | Path, objects: Iterable[str] | None = None, num_views: int = NUM_VIEWS,
                   size: int = DEFAULT_SIZE, seed: int = 0) -> list[str]:
    """Render the named objects (registry OBJECTS; None: all) into ``out_root/views_release/<uid>/``,
    each from ``num_views`` cameras of sample_cameras(object_rng(seed, uid)); returns the uids."""
    names = list(OBJECTS) if objects is None else list(objects)
    unknown = [name for name in names if name not in OBJECTS]
    if unknown:
        raise ValueError(f"unknown objects {unknown}; known: {', '.join(OBJECTS)}")
    uids = []
    for name in names:
        obj = OBJECTS[name]
        cameras = sample_cameras(object_rng(seed, obj.uid), num_views)
        folder = render_object(Path(out_root) / VIEWS_DIR / obj.uid, obj, cameras, size)
        log.info("rendered %s: %d views of %dx%d in %s", obj.uid, num_views, size, size, folder)
        uids.append(obj.uid)
    return uids


def write_fill_masks(out_root: str | Path, uids: Iterable[str], view: int = 0,
                     dilation: int = MASK_DILATION) -> list[Path]:
    """For each uid, ``out_root/masks/<uid>/NNN.png`` (8-bit, 255 = fill): fill_mask of the rendered view
    ``view`` read back from ``out_root/views_release/<uid>/NNN.png``. Returns the paths written."""
    paths = []
    for uid in uids:
        name = f"{view:03d}.png"
        with Image.open(Path(out_root) / VIEWS_DIR / uid / name) as image:
            rgba = np.asarray(image.convert("RGBA"))
        path = Path(out_root) / MASKS_DIR / uid / name
        save_mask(fill_mask(rgba, dilation), path)
        paths.append(path)
    return paths
