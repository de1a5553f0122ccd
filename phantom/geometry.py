"""Image grids in DICOM patient coordinates (LPS) and the rigid poses that place a head in them.

Arrays are (z, y, x); a grid's ``direction`` holds the LPS directions of the x, y and z index axes as
columns (the ITK/SimpleITK convention), so SimpleITK, DICOM and NIfTI writers all derive from one
object and cannot disagree about where a voxel is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: NIfTI stores RAS; DICOM and ITK use LPS. Flip x and y to go between them.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation_matrix(angles_deg: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z (angles in degrees), as R = Rz @ Ry @ Rx.

    Same composition as SimpleITK's ``Euler3DTransform`` after ``SetComputeZYX(True)`` (ITK's default
    is Z-X-Y), so a registration helper can compare recovered angles directly; the 3x3 matrix is
    recorded too, which is convention-free.
    """
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape and spacing in (z, y, x) order, LPS direction columns (x, y, z), origin.

    ``origin`` is the LPS position (mm) of the centre of voxel (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: np.ndarray
    origin: np.ndarray

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive ints (z, y, x), got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive mm values (z, y, x), got {self.spacing}")
        d = np.asarray(self.direction, dtype=float)
        if d.shape != (3, 3) or not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
            raise ValueError("direction must be an orthonormal 3x3 matrix (columns: x, y, z axes)")
        if np.asarray(self.origin).shape != (3,):
            raise ValueError("origin must be an LPS point of three floats")

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def affine_lps(self) -> np.ndarray:
        """4x4 mapping (i, j, k) = (x, y, z) voxel indices to LPS mm."""
        sz, sy, sx = self.spacing
        a = np.eye(4)
        a[:3, :3] = np.asarray(self.direction) @ np.diag([sx, sy, sz])
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """The NIfTI affine (indices (i, j, k) to RAS mm) for the array transposed to (x, y, z)."""
        return LPS_TO_RAS @ self.affine_lps()

    def slice_positions(self) -> np.ndarray:
        """LPS position of the first voxel of each z slice, shape (nz, 3) (DICOM ImagePositionPatient)."""
        k = np.arange(self.shape[0])
        return np.asarray(self.origin)[None, :] + k[:, None] * self.spacing[0] * np.asarray(self.direction)[:, 2]

    def world_points(self, z_offsets_mm: float = 0.0) -> np.ndarray:
        """LPS coordinates of every voxel centre, shape (nz, ny, nx, 3).

        ``z_offsets_mm`` shifts along the slice normal (used for through-slice partial volume).
        """
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        d = np.asarray(self.direction, dtype=np.float32)
        i = (np.arange(nx, dtype=np.float32) * sx)[None, None, :, None] * d[:, 0]
        j = (np.arange(ny, dtype=np.float32) * sy)[None, :, None, None] * d[:, 1]
        k = (np.arange(nz, dtype=np.float32) * sz + z_offsets_mm)[:, None, None, None] * d[:, 2]
        return (np.asarray(self.origin, dtype=np.float32) + i + j + k).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "shape_zyx": list(self.shape),
            "spacing_zyx": [float(s) for s in self.spacing],
            "direction": np.asarray(self.direction).round(9).tolist(),
            "origin_lps": np.asarray(self.origin).round(6).tolist(),
        }


def centred_grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: np.ndarray | None = None,
    centre: np.ndarray | None = None,
) -> Grid:
    """A grid whose centre lies at ``centre`` (LPS, default the isocentre)."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    c = np.zeros(3) if centre is None else np.asarray(centre, dtype=float)
    nz, ny, nx = shape
    sz, sy, sx = spacing
    half = d @ np.array([(nx - 1) * sx / 2, (ny - 1) * sy / 2, (nz - 1) * sz / 2])
    return Grid(tuple(int(v) for v in shape), tuple(float(v) for v in spacing), d, c - half)


@dataclass(frozen=True)
class RigidPose:
    """Maps head-frame points q (mm, anatomical model) to LPS world: p = R q + t."""

    rotation: np.ndarray
    translation: np.ndarray

    def to_head(self, p: np.ndarray) -> np.ndarray:
        """World (..., 3) to head frame (..., 3)."""
        r = np.asarray(self.rotation, dtype=np.float32)
        return ((p - np.asarray(self.translation, dtype=np.float32)) @ r).astype(np.float32)

    def then(self, rotation: np.ndarray, translation: np.ndarray) -> RigidPose:
        """This pose followed by the world motion x -> rotation x + translation."""
        return RigidPose(rotation @ self.rotation, rotation @ self.translation + translation)
