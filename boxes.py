"""Oriented 3D boxes: the 9-number convention, corners, rigid transforms and the exact 3D IoU.

Every 3D-RFT reward and metric that compares boxes (R_IoU, R_F1, detection F1, grounding
Acc@k) needs the IoU of two *oriented* boxes, so this is the geometric ground floor the rest
stands on. Read top to bottom:

  1. Box maths        9-number boxes, ZXY Euler angles, corners, rigid transforms.
  2. Exact 3D IoU     volume of the intersection of two oriented boxes (convex polyhedra).

Only numpy; nothing here knows about models, records or the synthetic world.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple, Sequence

import numpy as np

# =============================================================================================
# 1. Box maths
# =============================================================================================
# A box is 9 numbers [x, y, z, dx, dy, dz, yaw, roll, pitch] (docs/DESIGN.md "Boxes", the VG LLM
# format that 3D-RFT inherits): the centre, the *full* extents in metres, and intrinsic Euler
# angles in ZXY order, all in an OpenCV camera frame (x right, y down, z forward). So
#     R = Rz(yaw) @ Rx(roll) @ Ry(pitch),   corner = centre + R @ (+-dx/2, +-dy/2, +-dz/2).

BOX_SIZE = 9

# Corner i of a box has the local signs _SIGNS[i]; the order is itertools.product's, so bit 4
# of i is the x sign, bit 2 the y sign and bit 1 the z sign (0 -> minus, 1 -> plus).
# `box_corners` and `corners_iou` both rely on this order.
_SIGNS = np.array(list(itertools.product((-1.0, 1.0), repeat=3)))


def _rot_x(a: float) -> np.ndarray:
    """Right-handed rotation by `a` radians about the x axis."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    """Right-handed rotation by `a` radians about the y axis."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(a: float) -> np.ndarray:
    """Right-handed rotation by `a` radians about the z axis."""
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def box_rotation(yaw: float, roll: float, pitch: float) -> np.ndarray:
    """The (3, 3) rotation of a box: R = Rz(yaw) @ Rx(roll) @ Ry(pitch) (intrinsic ZXY)."""
    return _rot_z(float(yaw)) @ _rot_x(float(roll)) @ _rot_y(float(pitch))


def rotation_to_euler_zxy(R: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `box_rotation`: (yaw, roll, pitch) with box_rotation(yaw, roll, pitch) == R.

    Written out, R = Rz(a) Rx(b) Ry(g) has R[2,1] = sin b, R[2,0] = -cos b sin g,
    R[2,2] = cos b cos g, R[0,1] = -sin a cos b, R[1,1] = cos a cos b. Returned ranges:
    roll in [-pi/2, pi/2], yaw and pitch in [-pi, pi].
    Gimbal lock (cos roll ~ 0): only yaw +- pitch is defined, so pitch is set to 0 and the
    whole in-plane angle goes to yaw, which still reproduces R exactly.
    """
    R = np.asarray(R, dtype=float).reshape(3, 3)
    cos_roll = math.hypot(R[2, 0], R[2, 2])
    roll = math.atan2(R[2, 1], cos_roll)
    if cos_roll > 1e-9:
        yaw = math.atan2(-R[0, 1], R[1, 1])
        pitch = math.atan2(-R[2, 0], R[2, 2])
    else:
        # With cos(roll) = 0, R[0,0] = cos(yaw +- pitch) and R[1,0] = sin(yaw +- pitch).
        pitch = 0.0
        yaw = math.atan2(R[1, 0], R[0, 0])
    return yaw, roll, pitch


def _as_box(box: Sequence[float]) -> np.ndarray:
    """A box as a float array of shape (9,); ValueError for any other shape."""
    b = np.asarray(box, dtype=float).reshape(-1)
    if b.shape != (BOX_SIZE,):
        raise ValueError(f"a box has {BOX_SIZE} numbers, got shape {np.shape(box)}")
    return b


def box_corners(box: Sequence[float]) -> np.ndarray:
    """The (8, 3) corners of a 9-number box, in the corner order of `_SIGNS`."""
    b = _as_box(box)
    local = _SIGNS * (b[3:6] / 2.0)          # corners of the box at the origin, unrotated
    return b[:3] + local @ box_rotation(*b[6:9]).T


def transform_box(box: Sequence[float], T: np.ndarray) -> list[float]:
    """Apply a rigid 4x4 transform T to a box; returns the new 9 numbers.

    The centre maps as a point, the rotation becomes T[:3, :3] @ R and goes back to ZXY Euler
    angles; the extents are unchanged. T must be rigid (rotation + translation, no scale or
    reflection), as camera poses and ScanNet's axis_align_matrix are. Used by the grounding
    data (scene frame <-> camera frame) and by the synthetic world generator.
    """
    b = _as_box(box)
    T = np.asarray(T, dtype=float).reshape(4, 4)
    centre = T[:3, :3] @ b[:3] + T[:3, 3]
    yaw, roll, pitch = rotation_to_euler_zxy(T[:3, :3] @ box_rotation(*b[6:9]))
    return [float(v) for v in (*centre, *b[3:6], yaw, roll, pitch)]


# =============================================================================================
# 2. Exact 3D IoU of two oriented boxes
# =============================================================================================
# The paper's IoU reward (and every published detection / grounding number) uses the exact
# 3D IoU of oriented boxes, so an axis-aligned shortcut would reward the wrong thing. Both
# boxes are convex polyhedra and so is their intersection; we compute its volume by
# Sutherland-Hodgman clipping in 3D:
#   * express box A in the local frame of box B, where B is the axis-aligned [-h, h];
#   * cut A's six face polygons by each of B's six planes in turn; every cut that removes
#     something closes the hole with a "cap" polygon lying in the cutting plane;
#   * the volume of the closed polyhedron left is sum over faces (1/3) * height * area
#     (divergence theorem, heights measured from a point inside).
# Coplanar faces (identical or touching boxes) are handled by a tolerance `eps`: a plane that
# nothing sticks out of by more than eps cuts nothing, and one that nothing lies strictly
# inside of leaves an empty (zero-volume) intersection.


class _Prepared(NamedTuple):
    """What the IoU needs to know about one box, computed once per box."""

    corners: np.ndarray   # (8, 3) in `_SIGNS` order
    centre: np.ndarray    # (3,)
    axes: np.ndarray      # (3, 3); row k = the box's local axis k as a unit vector
    half: np.ndarray      # (3,) half extents along those axes
    volume: float
    radius: float         # bounding-sphere radius (half the diagonal)
    lo: np.ndarray        # (3,) axis-aligned bounding box, min corner
    hi: np.ndarray        # (3,) max corner


def _face_table() -> list[tuple[int, float, list[int]]]:
    """The 6 faces of a box as (axis k, side +-1, 4 corner indices in cyclic order)."""
    faces = []
    for k in range(3):
        i, j = [a for a in range(3) if a != k]
        for side in (-1.0, 1.0):
            ring = []
            for si, sj in ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)):
                want = np.zeros(3)
                want[k], want[i], want[j] = side, si, sj
                ring.append(int(np.flatnonzero((_SIGNS == want).all(axis=1))[0]))
            faces.append((k, side, ring))
    return faces


_FACES = _face_table()


def _prepare(corners: np.ndarray, centre: np.ndarray, axes: np.ndarray,
             size: np.ndarray) -> _Prepared | None:
    """Pack a box for the IoU; None when it is degenerate (non-finite, or a size <= ~0)."""
    arrays = (corners, centre, axes, size)
    if not all(np.isfinite(a).all() for a in arrays):
        return None
    scale = max(1.0, float(np.abs(corners).max()))
    if (size <= 1e-9 * scale).any():
        return None
    volume = math.prod(float(s) for s in size)      # python floats: overflow -> inf, no warning
    if not math.isfinite(volume) or volume <= 0.0:
        return None
    return _Prepared(corners, centre, axes, size / 2.0, volume,
                     float(np.linalg.norm(size)) / 2.0, corners.min(0), corners.max(0))


def _prepare_box(box: Any) -> _Prepared | None:
    """Prepare a 9-number box (or a {"bbox_3d": ...} dict); None if invalid, never raises."""
    try:
        if isinstance(box, dict):
            box = box["bbox_3d"]
        b = _as_box(box)
        if not np.isfinite(b).all() or (b[3:6] <= 0).any():
            return None
        R = box_rotation(*b[6:9])
        # The columns of R are the box's local axes in the parent frame.
        return _prepare(box_corners(b), b[:3].copy(), R.T.copy(), b[3:6].copy())
    except Exception:
        return None


def _prepare_corners(corners: Any) -> _Prepared | None:
    """Prepare a box given by its (8, 3) corners (in `box_corners` order); None if invalid.

    The corners must be those of a rectangular box (any rigid motion of `box_corners`);
    the axes are taken as mean(+ side) - mean(- side) along each local axis.
    """
    try:
        c = np.asarray(corners, dtype=float)
        if c.shape != (8, 3) or not np.isfinite(c).all():
            return None
        edges = _SIGNS.T @ c / 4.0                # row k: mean of + corners - mean of - corners
        size = np.linalg.norm(edges, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            axes = edges / size[:, None]
        return _prepare(c, c.mean(axis=0), axes, size)
    except Exception:
        return None


def _clip_polygon(poly: np.ndarray, dist: np.ndarray, k: int, plane: float,
                  eps: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of a convex polygon with dist <= eps.

    `dist` is the signed distance of each vertex beyond the plane x_k = plane. New vertices
    where an edge crosses the plane are snapped exactly onto it.
    """
    inside = dist <= eps
    out = []
    n = len(poly)
    for i in range(n):
        j = (i + 1) % n
        if inside[i]:
            out.append(poly[i])
        if inside[i] != inside[j]:
            t = min(1.0, max(0.0, dist[i] / (dist[i] - dist[j])))
            p = poly[i] + t * (poly[j] - poly[i])
            p[k] = plane
            out.append(p)
    return np.array(out) if out else np.zeros((0, 3))


def _cap_polygon(points: np.ndarray, k: int, plane: float, eps: float) -> np.ndarray | None:
    """The polygon closing a cut in the plane x_k = plane, from its vertices in any order.

    The cut of a convex polyhedron is convex, so sorting the points by angle around their
    mean gives its boundary. Near-duplicate neighbours are dropped.
    """
    if len(points) < 3:
        return None
    i, j = [a for a in range(3) if a != k]
    centre = points.mean(axis=0)
    angle = np.arctan2(points[:, j] - centre[j], points[:, i] - centre[i])
    poly = points[np.argsort(angle, kind="stable")].copy()
    poly[:, k] = plane
    step = np.linalg.norm(poly - np.roll(poly, 1, axis=0), axis=1)
    poly = poly[step > eps]
    return poly if len(poly) >= 3 else None


def _cut(faces: list[tuple[np.ndarray, np.ndarray]], k: int, side: float, half: float,
         eps: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a closed convex polyhedron (list of (outward normal, polygon)) by side * x_k <= half."""
    plane = side * half
    kept, on_plane = [], []
    for normal, poly in faces:
        dist = side * poly[:, k] - half
        if (dist > eps).all():                    # face entirely beyond the plane: gone
            continue
        if (dist <= eps).all():                   # face entirely kept
            on = np.abs(dist) <= eps
            on_plane.append(poly[on])
            if not on.all():                      # (a face lying in the plane is replaced
                kept.append((normal, poly))       #  by the cap, so it is not kept twice)
            continue
        clipped = _clip_polygon(poly, dist, k, plane, eps)
        on_plane.append(clipped[np.abs(side * clipped[:, k] - half) <= eps])
        if len(clipped) >= 3:
            kept.append((normal, clipped))
    cap = _cap_polygon(np.concatenate(on_plane), k, plane, eps) if on_plane else None
    if cap is not None:
        normal = np.zeros(3)
        normal[k] = side
        kept.append((normal, cap))
    return kept


def _polygon_area(poly: np.ndarray, normal: np.ndarray) -> float:
    """Area of a planar polygon with unit normal n: |n . (1/2) sum_i p_i x p_(i+1)| (shoelace).

    The vertices are taken relative to p_0 for precision; the cross products are written out
    because np.cross costs more than the arithmetic for such small arrays.
    """
    p = poly - poly[0]
    q = np.roll(p, -1, axis=0)
    cross = np.stack([p[:, 1] * q[:, 2] - p[:, 2] * q[:, 1],
                      p[:, 2] * q[:, 0] - p[:, 0] * q[:, 2],
                      p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]], axis=1)
    return abs(float(normal @ cross.sum(axis=0))) / 2.0


def _polyhedron_volume(faces: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Volume of a closed convex polyhedron: sum over faces of (1/3) * height * area.

    Heights are measured from the mean of all vertices (a point inside); face areas do not
    depend on the winding of the polygons, only on their order around the face.
    """
    centre = np.concatenate([poly for _, poly in faces]).mean(axis=0)
    volume = 0.0
    for normal, poly in faces:
        height = float(normal @ (poly[0] - centre))
        volume += height * _polygon_area(poly, normal) / 3.0
    return max(0.0, volume)


def _intersection_volume(a: _Prepared, b: _Prepared) -> float:
    """Exact volume of A intersect B: clip A, written in B's frame, by B's six planes."""
    pts = (a.corners - b.centre) @ b.axes.T        # A's corners in B's local frame
    normals = a.axes @ b.axes.T                    # A's axes in B's local frame
    scale = max(1.0, float(np.abs(pts).max()), float(b.half.max()))
    eps = 1e-10 * scale
    faces = [(side * normals[k], pts[ring]) for k, side, ring in _FACES]
    cut_any = False
    for k in range(3):
        for side in (-1.0, 1.0):
            coord = side * np.concatenate([poly[:, k] for _, poly in faces])
            if coord.max() - b.half[k] <= eps:     # nothing sticks out: no cut
                continue
            if coord.min() - b.half[k] >= -eps:    # nothing strictly inside: empty
                return 0.0
            faces = _cut(faces, k, side, b.half[k], eps)
            cut_any = True
            if len(faces) < 4:
                return 0.0
    if not cut_any:                                # A lies inside B
        return a.volume
    return _polyhedron_volume(faces)


def _inside(points: np.ndarray, box: _Prepared) -> bool:
    """True when every point lies in the (closed) box, up to a relative 1e-12."""
    local = np.abs((points - box.centre) @ box.axes.T)
    return bool((local <= box.half * (1.0 + 1e-12)).all())


def _iou_prepared(a: _Prepared, b: _Prepared) -> float:
    """IoU of two prepared boxes, with cheap exits for disjoint and nested boxes."""
    # Early exits: bounding spheres apart, or axis-aligned bounding boxes apart -> 0.
    if float(np.linalg.norm(a.centre - b.centre)) >= a.radius + b.radius:
        return 0.0
    if (a.hi <= b.lo).any() or (b.hi <= a.lo).any():
        return 0.0
    # One box inside the other: the intersection is the smaller box.
    if _inside(b.corners, a):
        inter = b.volume
    else:
        inter = _intersection_volume(a, b)
    if inter <= 1e-12 * min(a.volume, b.volume):  # touching faces: zero up to rounding
        return 0.0
    iou = inter / (a.volume + b.volume - inter)
    return min(1.0, max(0.0, iou)) if math.isfinite(iou) else 0.0


def box3d_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact 3D IoU in [0, 1] of two 9-number oriented boxes.

    Degenerate input (wrong length, non-finite numbers, a size <= 0) gives 0; never raises.
    """
    pa, pb = _prepare_box(a), _prepare_box(b)
    if pa is None or pb is None:
        return 0.0
    return _iou_prepared(pa, pb)


def corners_iou(ca: np.ndarray, cb: np.ndarray) -> float:
    """Exact 3D IoU in [0, 1] of two boxes given by (8, 3) corners in `box_corners` order.

    Lets callers IoU boxes after mapping their corners by a rigid transform (grounding).
    Invalid or degenerate input gives 0; never raises.
    """
    pa, pb = _prepare_corners(ca), _prepare_corners(cb)
    if pa is None or pb is None:
        return 0.0
    return _iou_prepared(pa, pb)


def iou_matrix(preds: Sequence[Any], gts: Sequence[Any]) -> np.ndarray:
    """(P, G) array of 3D IoUs; items are 9-number boxes or {"bbox_3d": ...} dicts."""
    pp = [_prepare_box(p) for p in preds]
    gg = [_prepare_box(g) for g in gts]
    out = np.zeros((len(pp), len(gg)))
    for i, p in enumerate(pp):
        for j, g in enumerate(gg):
            if p is not None and g is not None:
                out[i, j] = _iou_prepared(p, g)
    return out
