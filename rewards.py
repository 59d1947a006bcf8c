"""The verifiable rewards of 3D-RFT, and the box maths and metrics they are built from.

3D-RFT (arXiv 2603.04976) fine-tunes a video 3D-aware MLLM with GRPO, and its key idea is that
the reward *is* the evaluation metric: 3D IoU and detection F1 for 3D detection, frame distance
and 3D IoU for visual grounding, option accuracy and Mean Relative Accuracy (MRA) for VSI-Bench
style spatial questions, plus a format reward for the `<think>...</think><answer>...</answer>`
template. This file implements that reward design (DESIGN.md section 1, "Rewards", "Boxes",
"Evaluation"), read top to bottom:

  1. Box maths        9-number boxes, ZXY Euler angles, corners, rigid transforms.
  2. Exact 3D IoU     volume of the intersection of two oriented boxes (convex polyhedra).
  3. Safe parsing     model text -> Python values, with json / ast.literal_eval, never eval.
  4. Metrics          greedy detection matching (TP/FP/FN) and MRA, shared with eval.py.
  5. Rewards          one function per reward, each `f(completion, record) -> float`,
                      guarded so that malformed or hostile text scores 0 and never raises.
  6. Reward tables    name -> function, default per-task weights, weight parsing, the total.

Only numpy is needed; nothing here knows about models or the synthetic world, so the same code
scores the real ScanNet / ScanRefer / VSI-Bench records.
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
import math
import re
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

# =============================================================================================
# 1. Box maths
# =============================================================================================
# A box is 9 numbers [x, y, z, dx, dy, dz, yaw, roll, pitch] (DESIGN.md "Boxes", the VG LLM
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


# =============================================================================================
# 3. Safe parsing of model text
# =============================================================================================
# Rewards are computed on text sampled from the policy, which during RL can be anything. So
# parsing never evaluates code (json.loads, then ast.literal_eval, which only builds
# literals), caps lengths and nesting before parsing, validates every number, and signals
# failure with None rather than an exception.

MAX_COMPLETION_CHARS = 100_000   # longer completions are malformed
MAX_ANSWER_CHARS = 20_000        # longer answers are not parsed at all
MAX_SHORT_ANSWER_CHARS = 200     # option letters and numbers are short
MAX_NESTING = 20                 # deeper bracket nesting is rejected before parsing
MAX_BOXES = 200                  # more predicted boxes than this is not a valid answer
MAX_ABS_BOX_VALUE = 1e4          # |box number| must be below this (metres / radians)

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def parse_completion(text: str) -> tuple[str | None, str | None]:
    """Split `<think>T</think><answer>A</answer>` into (T, A), each stripped of whitespace.

    Accepted, exactly: optional whitespace, `<think>`, any text T (may be empty), `</think>`,
    optional whitespace, `<answer>`, any text A, `</answer>`, optional whitespace. Each of the
    four tags must occur exactly once (so T and A contain no tags); nothing else may appear
    outside them. Anything else (or a completion over MAX_COMPLETION_CHARS) gives (None, None).
    """
    if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
        return None, None
    s = text.strip()
    if any(s.count(tag) != 1 for tag in _TAGS):
        return None, None
    t_open, t_close, a_open, a_close = (s.find(tag) for tag in _TAGS)
    if t_open != 0 or a_close != len(s) - len("</answer>"):
        return None, None
    if not (t_close < a_open) or s[t_close + len("</think>"):a_open].strip():
        return None, None
    think = s[len("<think>"):t_close].strip()
    answer = s[a_open + len("<answer>"):a_close].strip()
    return think, answer


def _nesting_depth(text: str) -> int:
    """Maximum bracket depth of ([{ in `text` (string contents are not special-cased)."""
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            best = max(best, depth)
        elif ch in ")]}":
            depth -= 1
    return best


def _strip_fence(text: str) -> str:
    """Remove one surrounding Markdown code fence ("```json\n...\n```"), if present."""
    if len(text) >= 6 and text.startswith("```") and text.endswith("```"):
        inner = text[3:-3]
        first, newline, rest = inner.partition("\n")
        if newline and (not first.strip() or first.strip().isalpha()):
            inner = rest                      # drop the language tag line ("json")
        return inner.strip()
    return text


def parse_json(answer_text: str) -> Any:
    """Parse an answer as JSON, falling back to a Python literal; None when it is neither.

    A surrounding Markdown code fence (```json ... ```) is removed first. Input over
    MAX_ANSWER_CHARS or nested deeper than MAX_NESTING brackets is rejected unparsed.
    `ast.literal_eval` only builds literals (it cannot call, import or index), so text such as
    `__import__('os').system(...)` is just a parse failure. The result is *not* validated:
    NaN, Infinity, sets, bytes... can come back; the `parse_*` functions below validate.
    """
    if not isinstance(answer_text, str) or len(answer_text) > MAX_ANSWER_CHARS:
        return None
    text = answer_text.strip()
    text = _strip_fence(text)
    if not text or _nesting_depth(text) > MAX_NESTING:
        return None
    try:
        return json.loads(text)
    except Exception:
        pass
    try:
        # Python warns (SyntaxWarning, DeprecationWarning) about some text as it parses it, e.g.
        # "[1.2or 3]" (then fails) or '["\d"]' (then parses): during RL, a line per such sample.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.literal_eval(text)
    except Exception:
        return None


def _finite_number(value: Any, max_abs: float = math.inf) -> float | None:
    """`value` as a float if it is a real int/float (not bool), finite and |value| < max_abs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) >= min(max_abs, 1e300):
        return None                                # also avoids int -> float overflow
    number = float(value)
    if not math.isfinite(number) or abs(number) >= max_abs:
        return None
    return number


def valid_bbox(value: Any) -> list[float] | None:
    """9 finite numbers with |v| < MAX_ABS_BOX_VALUE and sizes > 0, as floats; else None."""
    if not isinstance(value, (list, tuple)) or len(value) != BOX_SIZE:
        return None
    numbers = [_finite_number(v, MAX_ABS_BOX_VALUE) for v in value]
    if any(n is None for n in numbers) or any(n <= 0.0 for n in numbers[3:6]):
        return None
    return numbers  # type: ignore[return-value]


def parse_boxes(answer: str) -> list[dict[str, Any]] | None:
    """Detection answer -> [{"label": str, "bbox_3d": [9 floats]}], or None if invalid.

    Valid: a JSON (or Python literal) list, possibly empty, of at most MAX_BOXES dicts, each
    with a non-empty str "label" and a valid "bbox_3d" (9 finite numbers, |v| < 1e4, the three
    sizes > 0). Extra keys are ignored. One invalid entry makes the whole answer invalid.
    """
    data = parse_json(answer)
    if not isinstance(data, list) or len(data) > MAX_BOXES:
        return None
    boxes = []
    for item in data:
        if not isinstance(item, dict):
            return None
        label, bbox = item.get("label"), valid_bbox(item.get("bbox_3d"))
        if not isinstance(label, str) or not label.strip() or bbox is None:
            return None
        boxes.append({"label": label, "bbox_3d": bbox})
    return boxes


def parse_grounding(answer: str) -> tuple[int, list[float]] | None:
    """Grounding answer {"frame": int, "bbox_3d": [9 numbers]} -> (frame, box), or None.

    "frame" must be an int (not a bool, not a float); its range is checked by the rewards,
    which know how many frames were sampled. "bbox_3d" is validated as in `parse_boxes`.
    """
    data = parse_json(answer)
    if not isinstance(data, dict):
        return None
    frame, bbox = data.get("frame"), valid_bbox(data.get("bbox_3d"))
    if isinstance(frame, bool) or not isinstance(frame, int) or bbox is None:
        return None
    if abs(frame) > 10**9:
        return None
    return frame, bbox


# A letter, optionally in parentheses, optionally followed by ".", ")" or ":" and then
# (after whitespace) any text: "A", "a", "A.", "(A)", "A)", "A. the chair", "(B) left".
_CHOICE = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.):]?)(?:\s+.*)?$", re.DOTALL)


def parse_choice(answer: str) -> str | None:
    """Multiple-choice answer -> the option letter in upper case, or None.

    Accepted (after stripping whitespace and one pair of surrounding quotes): a single
    letter, optionally in parentheses or followed by ".", ")" or ":", and then optionally
    whitespace plus any text: "A", "b", "A.", "(A)", "C)", "A. the chair", "(B) left".
    Not accepted: "Apple", "A chair"-like words glued to the letter ("Ab"), empty text.
    """
    if not isinstance(answer, str) or len(answer) > MAX_SHORT_ANSWER_CHARS:
        return None
    text = answer.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    m = _CHOICE.match(text)
    if not m:
        return None
    letter = m.group(1) or m.group(2)
    # "A chair" (letter, space, word) reads as an article, not an option: demand punctuation
    # before free text unless the letter is in parentheses.
    if m.group(2) and len(text) > 1 and text[1].isspace():
        return None
    return letter.upper()


# A decimal number, then optionally a unit made of letters: "3", "-2.5", "1e-3", "3.5 m",
# "12 square meters", "4.", "7 chairs". (No nested quantifiers: no catastrophic backtracking.)
_NUMBER = re.compile(
    r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?:\s*[A-Za-z][A-Za-z0-9 ^²³.]{0,40})?$")


def parse_number(answer: str) -> float | None:
    """Numeric answer -> a finite float, or None.

    Accepted (at most MAX_SHORT_ANSWER_CHARS): a JSON / Python int or float ("3", "2.5",
    "1e-3"), a JSON string holding one ("\\"2.5\\""), or a decimal number followed by a unit
    word ("3.5 m", "12 square meters"). Booleans, NaN and infinities (e.g. "1e999") are not.
    """
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        return None
    if not isinstance(answer, str):
        return _finite_number(answer)
    if len(answer) > MAX_SHORT_ANSWER_CHARS:
        return None
    value = parse_json(answer)
    if isinstance(value, str):
        text = value.strip()                  # a JSON string: read the number inside it
    else:
        number = _finite_number(value)
        if number is not None:
            return number
        text = answer.strip()
    m = _NUMBER.match(text)
    if m is None:
        return None
    try:
        return _finite_number(float(m.group(1)))
    except (ValueError, OverflowError):
        return None


# =============================================================================================
# 4. Metrics shared by the rewards and by evaluation
# =============================================================================================
# The paper's point is that the RL reward and the benchmark metric are the same computation;
# eval.py calls these two functions, so the two cannot drift apart.

MC_TYPES = frozenset({"object_rel_distance", "object_rel_direction", "obj_appearance_order",
                      "route_planning"})
NUMERIC_TYPES = frozenset({"object_counting", "object_abs_distance", "object_size_estimation",
                           "room_size_estimation"})

# VSI-Bench's MRA thresholds theta = 0.50, 0.55, ..., 0.95, kept as exact percentages so that
# the tolerances 1 - theta are the decimals 0.50, 0.45, ..., 0.05.
_MRA_PERCENT = tuple(range(50, 100, 5))


def norm_label(label: Any) -> str:
    """Labels compare after stripping whitespace and lower-casing ("Chair " == "chair")."""
    return str(label).strip().lower()


def match_detections(pred: Sequence[dict], gt: Sequence[dict],
                     iou_threshold: float = 0.25) -> tuple[int, int, int]:
    """Greedy one-to-one matching of predicted to ground-truth boxes -> (TP, FP, FN).

    Predictions are taken in output order; each takes, among the not-yet-matched ground-truth
    boxes with the same label, the one with the highest IoU (first in list order on ties), and
    is a true positive if that IoU is > iou_threshold (strictly); otherwise it is a false
    positive and matches nothing. FN = ground-truth boxes left unmatched. So a duplicate
    prediction of an already matched box is a false positive. Items are {"label", "bbox_3d"}.
    """
    gt_prep = [_prepare_box(g.get("bbox_3d")) for g in gt]
    gt_label = [norm_label(g.get("label")) for g in gt]
    used = [False] * len(gt)
    tp = fp = 0
    for p in pred:
        p_prep, p_label = _prepare_box(p.get("bbox_3d")), norm_label(p.get("label"))
        best_iou, best_j = -1.0, -1
        for j, g_prep in enumerate(gt_prep):
            if used[j] or gt_label[j] != p_label:
                continue
            iou = 0.0 if p_prep is None or g_prep is None else _iou_prepared(p_prep, g_prep)
            if iou > best_iou:
                best_iou, best_j = iou, j
        if best_j >= 0 and best_iou > iou_threshold:
            used[best_j] = True
            tp += 1
        else:
            fp += 1
    return tp, fp, len(gt) - tp


def mra(pred: float, gt: float) -> float:
    """Mean Relative Accuracy in [0, 1] (VSI-Bench): mean over theta in {0.50, ..., 0.95} of
    1[ |pred - gt| / |gt| <= 1 - theta ].

    A relative error exactly on a threshold counts as inside it (1e-9 slack for float
    rounding). gt == 0 has no relative error: we score exact match, 1 if pred == 0 else 0.
    Non-finite input scores 0.
    """
    pred, gt = float(pred), float(gt)
    if not (math.isfinite(pred) and math.isfinite(gt)):
        return 0.0
    if gt == 0.0:
        return 1.0 if pred == 0.0 else 0.0
    rel = abs(pred - gt) / abs(gt)
    hits = sum(rel <= (100 - p) / 100 + 1e-9 for p in _MRA_PERCENT)
    return hits / len(_MRA_PERCENT)


# =============================================================================================
# 5. Rewards
# =============================================================================================
# Each reward is `f(completion: str, record: dict) -> float`, where `record` is one JSON-lines
# data record (the VG LLM format; DESIGN.md "Prompts and answers"). The `_reward` guard makes
# every one of them total: any exception -> 0.0, NaN -> 0.0, and the value is clamped to the
# documented range (also stored as `f.reward_range` for tests). A reward that does not apply
# to the record's task returns 0.
#
# Record keys used: `task` in {"detection", "grounding", "spatial"};
#   detection: `boxes` (ground truth, list of {"label", "bbox_3d"}, first-frame camera coords);
#   grounding: `gt_bbox` (9 numbers, axis-aligned scene frame), `gt_frame` (index into the
#              sampled frames), `cam2global` (one 4x4 per sampled frame), `axis_align_matrix`
#              (4x4; identity if missing);
#   spatial:   `question_type`, `answer` (option letter, or a number / numeric string).

RewardFn = Callable[[str, dict], float]


def _reward(lo: float = 0.0, hi: float = 1.0) -> Callable[[Callable[..., float]], RewardFn]:
    """Decorator: never raise, never return NaN / inf, always land in [lo, hi]."""
    def wrap(fn: Callable[..., float]) -> RewardFn:
        @functools.wraps(fn)
        def safe(completion: str, record: dict) -> float:
            try:
                value = float(fn(completion, record))
            except Exception:
                return 0.0
            if not math.isfinite(value):
                return 0.0
            return min(hi, max(lo, value))
        safe.reward_range = (lo, hi)  # type: ignore[attr-defined]
        return safe
    return wrap


def _answer(completion: str) -> str | None:
    """The answer text of a well-formed completion, else None."""
    return parse_completion(completion)[1]


def _task(record: dict) -> str:
    return str(record.get("task", ""))


def _gt_boxes(record: dict) -> list[dict]:
    """Ground-truth detection boxes of a record (trusted data, no validation)."""
    return [{"label": b["label"], "bbox_3d": b["bbox_3d"]} for b in record.get("boxes") or []]


def _is_mc(record: dict) -> bool:
    """Is this spatial question multiple choice? By `question_type`; for an unknown type, by
    `options` being present or the answer being a letter rather than a number."""
    qtype = record.get("question_type")
    if qtype in MC_TYPES:
        return True
    if qtype in NUMERIC_TYPES:
        return False
    answer = record.get("answer")
    return bool(record.get("options")) or (isinstance(answer, str)
                                           and parse_choice(answer) is not None
                                           and parse_number(answer) is None)


# --- format ---------------------------------------------------------------------------------

@_reward(0.0, 1.0)
def format_reward(completion: str, record: dict) -> float:
    """R_format in {0, 1}: 1 iff the completion has the `<think>..</think><answer>..</answer>`
    form (see `parse_completion`) and the answer parses as the task's answer:
    detection: a list of boxes (`parse_boxes`; empty list allowed); grounding: a dict with an
    int "frame" and a 9-number "bbox_3d" (`parse_grounding`; frame range not checked here);
    spatial: an option letter (`parse_choice`) for multiple choice, else a finite number
    (`parse_number`). Unknown task: 0.
    """
    answer = _answer(completion)
    if answer is None:
        return 0.0
    task = _task(record)
    if task == "detection":
        ok = parse_boxes(answer) is not None
    elif task == "grounding":
        ok = parse_grounding(answer) is not None
    elif task == "spatial":
        ok = (parse_choice(answer) if _is_mc(record) else parse_number(answer)) is not None
    else:
        ok = False
    return 1.0 if ok else 0.0


# --- detection ------------------------------------------------------------------------------

def _detection(completion: str, record: dict) -> tuple[list[dict], list[dict]] | None:
    """(predicted boxes, ground-truth boxes) for a detection record, None if not applicable."""
    if _task(record) != "detection":
        return None
    answer = _answer(completion)
    pred = parse_boxes(answer) if answer is not None else None
    return None if pred is None else (pred, _gt_boxes(record))


@_reward(0.0, 1.0)
def iou_reward(completion: str, record: dict) -> float:
    """R_IoU in [0, 1]: mean over predicted boxes of the best 3D IoU with any ground-truth box
    (labels ignored). Empty prediction and empty ground truth: 1 (a perfect answer); exactly
    one of them empty: 0. Malformed answer or non-detection record: 0.
    """
    return _score_boxes(completion, record, lambda pred, gt: float(iou_matrix(pred, gt).max(axis=1).mean()))


def _score_boxes(completion: str, record: dict, score: Callable[[list[dict], list[dict]], float]) -> float:
    """The box rewards' shared frame: `score(pred, gt)` when both lists are non-empty; empty
    prediction and empty truth: 1 (a perfect answer); exactly one empty: 0; not a detection
    answer (malformed, or another task): 0."""
    both = _detection(completion, record)
    if both is None:
        return 0.0
    pred, gt = both
    if not pred or not gt:
        return 1.0 if not pred and not gt else 0.0
    return score(pred, gt)


def _both_ways(matrix: np.ndarray) -> float:
    """Mean of a (pred x truth) score matrix's two chamfer halves: each prediction's best truth
    (precision-like) and each truth's best prediction (recall-like)."""
    return 0.5 * float(matrix.max(axis=1).mean()) + 0.5 * float(matrix.max(axis=0).mean())


@_reward(0.0, 1.0)
def iou_both_ways_reward(completion: str, record: dict) -> float:
    """R_IoU made recall-aware (an ablation, not the paper's R_IoU): the mean of R_IoU's
    precision-like half (each predicted box's best IoU with any true box) and a recall-like half
    (each true box's best IoU with any prediction), labels ignored as in R_IoU.

    Why: R_IoU alone rises when a doubtful box is left out (the mean over predictions loses its
    lowest term), and GRPO runs with it answered fewer boxes than the SFT model (README item 19).
    Here a missed object costs its share of the second half. Empty cases as R_IoU.
    Example: truth [chair, table], prediction [chair exactly] -> 0.5 * 1 + 0.5 * (1 + 0) / 2 = 0.75.
    """
    return _score_boxes(completion, record, lambda pred, gt: _both_ways(iou_matrix(pred, gt)))


@_reward(0.0, 1.0)
def f1_reward(completion: str, record: dict) -> float:
    """R_F1 in [0, 1]: 2TP / (2TP + FP + FN) with `match_detections` at IoU > 0.25.
    Empty prediction and empty ground truth: 1 (nothing to find, nothing claimed); exactly
    one of them empty: 0. Malformed answer or non-detection record: 0.
    """
    both = _detection(completion, record)
    if both is None:
        return 0.0
    tp, fp, fn = match_detections(both[0], both[1], 0.25)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


CENTRE_SCALE_M = 0.5  # distance (metres) at which R_centre's closeness has fallen to 1/e


@_reward(0.0, 1.0)
def centre_reward(completion: str, record: dict) -> float:
    """R_centre in [0, 1]: a dense shaping term, not one of the paper's rewards (an ablation).

    R_IoU is 0 for every box that misses its object entirely, which is most boxes of a model whose
    centres are ~0.7 m off, so it says nothing about *which* miss was closer. Here each pair of
    same-label boxes scores closeness = exp(-|c_pred - c_gt| / CENTRE_SCALE_M), and the reward is
    the mean of two chamfer halves: each predicted box's closest same-label truth (precision-like)
    and each true box's closest same-label prediction (recall-like), so neither one big box nor
    one safe box can win it. Empty prediction and empty truth: 1; exactly one empty: 0.
    Example: truth [chair at (0, 0, 2)], prediction [chair at (0, 0, 2.5)] -> exp(-1) = 0.37.
    """
    return _score_boxes(completion, record, lambda pred, gt: _both_ways(centre_closeness(pred, gt)))


def centre_closeness(pred: list[dict], gt: list[dict]) -> np.ndarray:
    """(num_pred, num_gt): exp(-centre distance / CENTRE_SCALE_M) for same-label pairs, else 0."""
    centres_p = np.array([b["bbox_3d"][:3] for b in pred], dtype=np.float64)
    centres_g = np.array([b["bbox_3d"][:3] for b in gt], dtype=np.float64)
    same = np.array([[norm_label(p["label"]) == norm_label(g["label"]) for g in gt] for p in pred])
    distance = np.linalg.norm(centres_p[:, None, :] - centres_g[None, :, :], axis=-1)
    return np.where(same, np.exp(-distance / CENTRE_SCALE_M), 0.0)


# --- grounding ------------------------------------------------------------------------------

def _grounding(completion: str, record: dict) -> tuple[int, list[float]] | None:
    """(frame, box) of a grounding answer whose frame indexes the record's sampled frames."""
    if _task(record) != "grounding":
        return None
    answer = _answer(completion)
    parsed = parse_grounding(answer) if answer is not None else None
    if parsed is None or not 0 <= parsed[0] < len(record["cam2global"]):
        return None  # a frame outside the sampled frames invalidates the whole answer
    return parsed


@_reward(0.0, 1.0)
def frame_reward(completion: str, record: dict) -> float:
    """R_frame in [0, 1] = max(0, 1 - |f_pred - f_gt| / 5). A frame outside 0..len(cam2global)-1
    (or not an int), a malformed answer or a non-grounding record: 0.
    """
    parsed = _grounding(completion, record)
    if parsed is None:
        return 0.0
    return max(0.0, 1.0 - abs(parsed[0] - int(record["gt_frame"])) / 5.0)


@_reward(0.0, 1.0)
def grounding_iou_reward(completion: str, record: dict) -> float:
    """R_IoU for grounding, in [0, 1]: the predicted box is in the camera frame of the predicted
    frame f; its corners are mapped to the scene by axis_align_matrix @ cam2global[f] and IoU'd
    exactly with the ground-truth box (`gt_bbox`, axis-aligned scene frame). Invalid frame,
    malformed answer or non-grounding record: 0.
    """
    parsed = _grounding(completion, record)
    if parsed is None:
        return 0.0
    frame, box = parsed
    align = np.asarray(record.get("axis_align_matrix", np.eye(4)), dtype=float).reshape(4, 4)
    to_scene = align @ np.asarray(record["cam2global"][frame], dtype=float).reshape(4, 4)
    corners = box_corners(box) @ to_scene[:3, :3].T + to_scene[:3, 3]
    return corners_iou(corners, box_corners(record["gt_bbox"]))


# --- spatial question answering (VSI-Bench) -------------------------------------------------

@_reward(0.0, 1.0)
def accuracy_reward(completion: str, record: dict) -> float:
    """Multiple-choice accuracy in {0, 1}: the answer's option letter equals the record's
    (case-insensitive; letter variants as in `parse_choice`). Numeric or non-spatial
    records, or malformed answers: 0.
    """
    if _task(record) != "spatial" or not _is_mc(record):
        return 0.0
    answer = _answer(completion)
    pred = parse_choice(answer) if answer is not None else None
    gt = parse_choice(str(record["answer"]))
    return 1.0 if pred is not None and pred == gt else 0.0


@_reward(0.0, 1.0)
def mra_reward(completion: str, record: dict) -> float:
    """Numeric answer score in [0, 1]: `mra(pred, gt)` (gt == 0 -> exact match). Multiple-choice
    or non-spatial records, or malformed answers: 0.
    """
    if _task(record) != "spatial" or _is_mc(record):
        return 0.0
    answer = _answer(completion)
    pred = parse_number(answer) if answer is not None else None
    gt = parse_number(record["answer"])
    return 0.0 if pred is None or gt is None else mra(pred, gt)


@_reward(0.0, 1.0)
def spatial_reward(completion: str, record: dict) -> float:
    """The spatial-QA task reward in [0, 1]: accuracy for multiple-choice question types, MRA
    for numeric ones (dispatch on `question_type`, see `_is_mc`). Non-spatial records: 0.
    """
    if _is_mc(record):
        return accuracy_reward(completion, record)
    return mra_reward(completion, record)


# =============================================================================================
# 6. Reward tables, weights and the total
# =============================================================================================
# The paper's total is R = R_format + R_task; the weights are configurable for ablations
# (e.g. `--rewards iou=1,f1=0,format=1` to drop the F1 term).

REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "iou": iou_reward,
    "f1": f1_reward,
    "iou_both": iou_both_ways_reward,
    "centre": centre_reward,
    "frame": frame_reward,
    "grounding_iou": grounding_iou_reward,
    "accuracy": accuracy_reward,
    "mra": mra_reward,
    "spatial": spatial_reward,
}

# Default weights per task: R_det = R_IoU + R_F1, R_grd = R_frame + R_IoU, R_spatial, each
# plus R_format.
TASK_REWARDS: dict[str, dict[str, float]] = {
    "detection": {"format": 1.0, "iou": 1.0, "f1": 1.0},
    "grounding": {"format": 1.0, "frame": 1.0, "grounding_iou": 1.0},
    "spatial": {"format": 1.0, "spatial": 1.0},
}


def parse_weights(spec: str) -> dict[str, float]:
    """Parse "iou=1,f1=0.5,format=1" into {"iou": 1.0, "f1": 0.5, "format": 1.0}.

    Whitespace and empty items are ignored; an unknown name, a missing "=", a repeated name or
    a weight that is not a finite number raises ValueError saying which item is wrong.
    """
    weights: dict[str, float] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"reward weight {item.strip()!r} is not of the form name=number")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
        if name in weights:
            raise ValueError(f"reward {name!r} is given twice in {spec!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"weight of reward {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"weight of reward {name!r} is not finite: {value!r}")
        weights[name] = weight
    return weights


def total_reward(completion: str, record: dict,
                 weights: dict[str, Any] | None = None) -> tuple[float, dict[str, float]]:
    """The GRPO reward of one completion: (sum_k w_k * R_k, {k: R_k unweighted}).

    `weights` is a flat {name: weight} applied to every task, or per task like TASK_REWARDS
    ({task: {name: weight}}); None means TASK_REWARDS. Unknown reward names raise ValueError
    (a configuration error); the rewards themselves never raise.
    """
    if weights is None:
        weights = TASK_REWARDS
    if weights and all(isinstance(w, dict) for w in weights.values()):
        weights = weights.get(_task(record), {})
    unknown = [name for name in weights if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown rewards {unknown}; known rewards: {', '.join(REWARDS)}")
    components = {name: REWARDS[name](completion, record) for name in weights}
    total = sum(float(w) * components[name] for name, w in weights.items())
    return total, components
