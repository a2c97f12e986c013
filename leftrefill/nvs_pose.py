"""Relative camera pose of a novel-view-synthesis pair, in the Zero-1-to-3 convention (METHOD 2.2).

The Objaverse renders (``views_release/<uid>/000.npy ... 011.npy``) store each camera as a 3x4
world-to-camera matrix [R | t]. A pair (condition view, target view) is described to the model by

    rel_pose = [theta_tgt - theta_cond, sin(dphi), cos(dphi), r_tgt - r_cond],
    dphi = (phi_tgt - phi_cond) mod 2 pi,

where (theta, phi, r) are the spherical coordinates of the camera centre C = -R^T t: polar angle
theta = atan2(sqrt(x^2 + y^2), z) measured from +z, azimuth phi = atan2(y, x), radius r = ||C||.

Every function accepts numpy arrays or torch tensors with any leading batch dimensions. The arithmetic
runs in float64 (atan2 of nearly equal angles loses digits in float32); only ``relative_pose`` casts its
result to float32, the dtype the model's pose embedding takes.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def camera_center(world_to_camera: ArrayLike) -> torch.Tensor:
    """Camera centre C = -R^T t of world-to-camera matrices [R | t] (METHOD 2.2).

    world_to_camera: (..., 3, 4) real numbers, numpy or torch. Returns float64 (..., 3), world units,
    on the input's device (CPU for numpy input).
    """
    matrix = _as_float64(world_to_camera, "camera_center", "world_to_camera", (3, 4))
    rotation, translation = matrix[..., :3], matrix[..., 3]
    # C solves R C + t = 0; R is orthonormal in the renders, so R^-1 = R^T (as in the Zero123 code).
    return -(rotation.transpose(-1, -2) @ translation.unsqueeze(-1)).squeeze(-1)


def spherical(center: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical coordinates (theta, phi, r) of points (..., 3), each float64 (...) (METHOD 2.2).

    theta = atan2(sqrt(x^2 + y^2), z) in [0, pi] (polar angle from +z), phi = atan2(y, x) in (-pi, pi],
    r = ||(x, y, z)|| >= 0. At the origin all three are 0.
    """
    point = _as_float64(center, "spherical", "center", (3,))
    x, y, z = point.unbind(-1)
    radial_xy = torch.sqrt(x * x + y * y)
    theta = torch.atan2(radial_xy, z)
    phi = torch.atan2(y, x)
    radius = torch.sqrt(x * x + y * y + z * z)
    return theta, phi, radius


def relative_pose(target_w2c: ArrayLike, cond_w2c: ArrayLike) -> torch.Tensor:
    """The Zero123 relative pose of a target camera seen from a condition camera (METHOD 2.2).

    target_w2c, cond_w2c: world-to-camera [R | t], (..., 3, 4) each; leading dimensions broadcast.
    Returns float32 (..., 4): [d_theta (radians), sin(d_phi), cos(d_phi), d_r (world units)] with
    d_phi = (phi_tgt - phi_cond) mod 2 pi in [0, 2 pi). Identical cameras give [0, 0, 1, 0].
    """
    target = _as_float64(target_w2c, "relative_pose", "target_w2c", (3, 4))
    cond = _as_float64(cond_w2c, "relative_pose", "cond_w2c", (3, 4))
    if target.device != cond.device:
        raise ValueError(f"relative_pose: target_w2c is on {target.device}, cond_w2c on {cond.device}")
    try:
        torch.broadcast_shapes(target.shape[:-2], cond.shape[:-2])
    except RuntimeError:
        raise ValueError(f"relative_pose: batch shapes {tuple(target.shape[:-2])} (target_w2c) and "
                         f"{tuple(cond.shape[:-2])} (cond_w2c) do not broadcast") from None
    theta_tgt, phi_tgt, r_tgt = spherical(camera_center(target))
    theta_cond, phi_cond, r_cond = spherical(camera_center(cond))
    # The mod does not change sin/cos, but it is what the Zero123 code computes; kept for parity.
    d_phi = torch.remainder(phi_tgt - phi_cond, 2 * math.pi)
    pose = torch.stack(torch.broadcast_tensors(theta_tgt - theta_cond, torch.sin(d_phi), torch.cos(d_phi),
                                               r_tgt - r_cond), dim=-1)
    return pose.to(torch.float32)


def _as_float64(value: ArrayLike, func: str, name: str, trailing: tuple[int, ...]) -> torch.Tensor:
    """``value`` as a float64 tensor whose last dimensions are ``trailing``; a ValueError otherwise."""
    if not isinstance(value, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{func}: {name} must be a numpy array or torch tensor, got {type(value).__name__}")
    if not _is_real(value):
        raise ValueError(f"{func}: {name} must hold real numbers, got dtype {value.dtype}")
    shape = tuple(value.shape)
    if len(shape) < len(trailing) or shape[len(shape) - len(trailing):] != trailing:
        wanted = ", ".join(["..."] + [str(n) for n in trailing])
        raise ValueError(f"{func}: {name} must have shape ({wanted}), got {shape}")
    if isinstance(value, np.ndarray):
        # float64 in native byte order first: torch.from_numpy refuses big-endian arrays ('>f4' from a file).
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
    return value.to(torch.float64)


def _is_real(value: ArrayLike) -> bool:
    """Whether ``value`` holds integers or floats (not booleans, complex numbers, strings or objects)."""
    if isinstance(value, torch.Tensor):
        return value.dtype != torch.bool and not value.is_complex()
    return value.dtype.kind in "iuf"


def pose_from_deltas(d_polar: float, d_azimuth: float, d_radius: float = 0.0, *, degrees: bool = True) -> torch.Tensor:
    """The pose vector (4,) float32 for a camera moved by (d_polar, d_azimuth, d_radius) from the reference
    camera: [d_polar, sin d_azimuth, cos d_azimuth, d_radius] (angles in degrees unless ``degrees`` is False;
    d_polar > 0 moves the camera down from +z, d_azimuth > 0 turns it counter-clockwise seen from +z; the
    radius in world units, the renders' cameras sit at 1.5 to 2.2)."""
    values = [d_polar, d_azimuth, d_radius]
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.number)) or not math.isfinite(v)
           for v in values):
        raise ValueError(f"pose deltas must be finite numbers (d_polar, d_azimuth, d_radius), got {values}")
    d_polar, d_azimuth, d_radius = (float(v) for v in values)
    scale = math.pi / 180 if degrees else 1.0
    d_theta, d_phi = d_polar * scale, d_azimuth * scale
    return torch.tensor([d_theta, math.sin(d_phi), math.cos(d_phi), d_radius], dtype=torch.float32)
