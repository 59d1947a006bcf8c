"""The synthetic 3D world: procedural rooms, a ray-cast camera, and records of all three tasks.

This implements docs/DESIGN.md, "The synthetic world" (the embedded default). No model
weights or data sets can be downloaded at run time, so the project ships a tiny world in which
every part of 3D-RFT (SFT warm-up, GRPO with verifiable rewards, evaluation) runs and learns on a
laptop CPU:

* rooms: a floor rectangle of a few metres with walls and a ceiling, world frame z-up, and 2-4
  objects from a fixed set of categories (own colour, own size range), rotated about the vertical
  axis and placed on the floor without overlap;
* a camera moving along one side of the room with known intrinsics and poses (OpenCV convention:
  x right, y down, z forward); 112 x 112 frames ray cast in numpy (RGB, z-depth, instance ids);
* the records of the three tasks (detection, grounding, spatial QA) in exactly the format of the
  real VG LLM / 3D-RFT data (see the docstring of `data.py`), with exact ground truth;
* a geometry prior that stands in for VGGT features: per-patch mean 3D points (from depth and
  poses) in the camera frame of each record's first sampled frame.

Conventions (docs/DESIGN.md "Boxes"). A box is 9 numbers [x, y, z, dx, dy, dz, yaw, roll, pitch] with
rotation R = Rz(yaw) @ Rx(roll) @ Ry(pitch) and corners centre + R @ (+-dx/2, +-dy/2, +-dz/2).
* In a camera frame an object's local axes are "camera-like": dx = width (horizontal),
  dy = height (vertical, +y points down), dz = depth (horizontal). An upright object seen by a
  level camera therefore has the identity rotation. Our camera only tilts down (about its own x
  axis, no roll), so every box comes out as yaw = 0, roll = camera tilt, pitch = object heading
  relative to the camera: this is why the ZXY Euler order is used.
* In the axis-aligned scene frame (z up, `axis_align_matrix` = identity for this world, stored
  anyway) the ground-truth grounding box is [x, y, z, width, depth, height, heading, 0, 0]. Both
  forms describe the same 8 corners.
* Object headings lie in [-pi/4, pi/4]: a box turned by 90 degrees with width and depth swapped
  is the same box, so a wider range would give one box two different correct answers. The camera
  pans by at most +-CAMERA_PAN radians, so camera-frame pitches stay inside (-pi/2, pi/2), where
  the box symmetry under a half turn is no ambiguity either (`canonical_pitch` folds them anyway).

Layout on disk (per split, paths in records are relative to the split folder):

    <out>/<split>/detection.jsonl  grounding.jsonl  spatial.jsonl
    <out>/<split>/scenes/<scene>/frames/NNN.png     RGB, 112 x 112
    <out>/<split>/scenes/<scene>/depth/NNN.png      uint16 millimetres (the ScanNet convention)
    <out>/<split>/scenes/<scene>/scene.json         room, objects, intrinsics, all camera poses
    <out>/<split>/geometry/<record id>.npy          float32 (F, 8, 8, 4) per-patch points (x, y, z, 1)

Command line:

    python scenes.py --out data/toy --train-scenes 150 --val-scenes 600   # the defaults
    python scenes.py --out data/toy --quick
    python scenes.py preview --data data/toy --out docs/preview.png

Sections: constants -> rotations -> scene sampling -> rendering -> ground truth -> geometry prior
-> grounding descriptions -> task records -> writing a split -> preview -> command line.
This file holds no model code.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

import data  # prompts, answers and the frame sampler: the one place that knows the VG LLM format
from boxes import box_corners, box_rotation, rotation_to_euler_zxy  # the box convention

# =====================================================================================
# Constants: image, camera, room and the object categories
# =====================================================================================

IMAGE_SIZE = 112            # frames are IMAGE_SIZE x IMAGE_SIZE pixels
PATCH_SIZE = 14             # ViT patch size of Qwen2.5-VL / VGGT: 112 / 14 = an 8 x 8 patch grid
FOV_DEG = 80.0              # horizontal (= vertical) field of view of the pinhole camera
FOCAL = (IMAGE_SIZE / 2) / math.tan(math.radians(FOV_DEG / 2))   # ~66.7 pixels

ROOM_SIDE = (3.5, 6.0)      # floor rectangle side lengths (metres), sampled per scene
WALL_HEIGHT = 2.6           # walls go up to a flat ceiling at this height
WALL_GAP = 0.05             # objects keep this distance from the walls
OBJECT_GAP = 0.15           # and this distance from each other (footprints, metres)
KEEP_OUT = 1.3              # no object within this distance of the wall the camera moves along
NUM_OBJECTS = (2, 4)        # objects per room (inclusive): few, so CPU rollouts stay short
MAX_PER_CATEGORY = 2        # at most this many objects of one category in a room
MAX_HEADING = math.pi / 4   # object headings lie in [-MAX_HEADING, MAX_HEADING] (see docstring)

CAMERA_HEIGHT = (1.3, 1.6)  # metres above the floor, per scene
CAMERA_TILT = (0.35, 0.50)  # downward tilt about the camera's own x axis (radians, ~20-29 deg)
CAMERA_PAN = 0.30           # the heading swings over [-CAMERA_PAN, CAMERA_PAN] along the path
FRAMES_PER_SCENE = 24       # poses on the camera path (only frames used by records are written)

MIN_PIXELS = 30             # an object "is visible" in a frame with at least this many pixels...
                            # ...and its box centre projecting inside that frame (see visibility)
DETECTION_FRAMES = 4        # consecutive frames per detection record...
DETECTION_STRIDE = 3        # ...this many path steps apart
DETECTION_RECORDS = 3       # detection records per scene, at evenly spread path offsets
GROUNDING_FRAMES = DETECTION_FRAMES  # a grounding record's frames: the detection window that shows
                                     # its target largest (see grounding_records)
SPATIAL_FRAMES = 8          # uniformly sampled frames per spatial-QA record

SPLIT_SEED_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}   # disjoint seed ranges
# 150 training scenes (450 / 437 / 695 detection / grounding / spatial records): the demo's
# 3,000-step warm-up then passes each record ~30 times, and more SFT on the same records loses
# ground (overfits): the regime in which the paper compares SFT -> SFT with SFT -> RL. With 500
# (~9 passes) more SFT held its own and tied GRPO on detection and grounding
# (docs/EXPERIMENTS.md items 42 and 48).
DEFAULT_TRAIN_SCENES = 150
DEFAULT_VAL_SCENES = 600
QUICK_TRAIN_SCENES = 4
QUICK_VAL_SCENES = 2

# Light for Lambert shading (world frame, points towards the light: above, behind the camera).
LIGHT = np.array([0.35, -0.55, 0.75]) / np.linalg.norm([0.35, -0.55, 0.75])
AMBIENT = 0.35


@dataclass(frozen=True)
class Category:
    """An object category: its name, RGB colour and (min, max) sizes in metres."""
    name: str
    colour: tuple[int, int, int]
    width: tuple[float, float]    # horizontal extent along the object's own x axis
    height: tuple[float, float]   # vertical extent
    depth: tuple[float, float]    # horizontal extent along the object's own depth axis


# Distinct saturated colours; sizes within 0.4-2 m so the boxes are learnable.
CATEGORIES: tuple[Category, ...] = (
    Category("chair", (220, 40, 40), (0.45, 0.60), (0.80, 1.00), (0.45, 0.60)),
    Category("table", (240, 150, 20), (0.80, 1.60), (0.70, 0.80), (0.60, 1.00)),
    Category("sofa", (40, 80, 230), (1.40, 2.00), (0.70, 0.90), (0.80, 1.00)),
    Category("bed", (150, 60, 210), (1.00, 1.60), (0.45, 0.60), (1.80, 2.00)),
    Category("cabinet", (30, 170, 60), (0.60, 1.20), (1.00, 1.90), (0.40, 0.60)),
    Category("lamp", (245, 230, 30), (0.40, 0.50), (1.20, 1.70), (0.40, 0.50)),
    Category("plant", (20, 200, 200), (0.40, 0.60), (0.60, 1.20), (0.40, 0.60)),
    Category("tv", (230, 60, 180), (0.90, 1.40), (0.60, 0.90), (0.40, 0.50)),
)
CATEGORY_NAMES = tuple(c.name for c in CATEGORIES)
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}

# Room surfaces: base colours (the floor also gets a 0.5 m checker so depth is easy to see).
FLOOR_COLOUR = np.array([150.0, 128.0, 105.0])
WALL_COLOUR = np.array([205.0, 205.0, 198.0])
CEILING_COLOUR = np.array([238.0, 238.0, 238.0])
FLOOR_TILE = 0.5

# =====================================================================================
# Rotations (the docs/DESIGN.md "Boxes" convention)
# =====================================================================================
# The box maths (R = Rz(yaw) @ Rx(roll) @ Ry(pitch), corners, ZXY Euler angles) lives in
# boxes.py: the world uses the very functions the rewards score with.

# Columns: world directions of a "camera-like" object frame (x right, y down, z forward) that
# looks along world +y. An upright object with heading 0 has rotation CAMERA_LIKE (object to world).
CAMERA_LIKE = np.array([[1.0, 0.0, 0.0],
                        [0.0, 0.0, 1.0],
                        [0.0, -1.0, 0.0]])


def rot_x(a: float) -> np.ndarray:
    """Right-handed rotation by `a` radians about the x axis."""
    return box_rotation(0.0, a, 0.0)


def rot_z(a: float) -> np.ndarray:
    """Right-handed rotation by `a` radians about the z axis."""
    return box_rotation(a, 0.0, 0.0)


def canonical_pitch(pitch: float) -> float:
    """Fold a pitch into [-pi/2, pi/2): a box turned half a turn about its own y axis is unchanged."""
    return (pitch + math.pi / 2) % math.pi - math.pi / 2


def camera_rotation(heading: float, tilt: float) -> np.ndarray:
    """Camera-to-world rotation: a level camera looking along world +y, turned by `heading` about
    the world z axis and tilted down by `tilt` about its own x axis (no roll)."""
    # Rx(-tilt) turns the forward axis (0, 0, 1) towards +y, i.e. downwards in an OpenCV camera.
    return rot_z(heading) @ CAMERA_LIKE @ rot_x(-tilt)


def pose_matrix(rotation: np.ndarray, position: np.ndarray) -> np.ndarray:
    """4x4 rigid transform [[R, t], [0, 1]]."""
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = position
    return pose


def intrinsics_matrix() -> np.ndarray:
    """4x4 `cam2img` of the pinhole camera (pixel (u, v) covers [u, u+1) x [v, v+1))."""
    k = np.eye(4)
    k[0, 0] = k[1, 1] = FOCAL
    k[0, 2] = k[1, 2] = IMAGE_SIZE / 2
    return k

# =====================================================================================
# Scene sampling: room, objects, camera path
# =====================================================================================


@dataclass
class SceneObject:
    """One object standing on the floor: a box rotated about the vertical axis."""
    category: str
    center: np.ndarray          # world (x, y, z); z = height / 2 (it stands on the floor)
    size: np.ndarray            # (width, height, depth) in metres
    heading: float              # rotation about world z, in [-MAX_HEADING, MAX_HEADING]

    @property
    def rotation(self) -> np.ndarray:
        """Object-to-world rotation of its camera-like local frame (x width, y down, z depth)."""
        return rot_z(self.heading) @ CAMERA_LIKE

    def world_box(self) -> list[float]:
        """The box in the z-up scene frame: [x, y, z, width, depth, height, heading, 0, 0]."""
        w, h, d = (float(v) for v in self.size)
        return [*map(float, self.center), w, d, h, float(self.heading), 0.0, 0.0]

    def footprint(self, margin: float = 0.0) -> np.ndarray:
        """The 4 floor corners (x, y) of the box, grown by `margin` on every side."""
        w, _, d = self.size
        c, s = math.cos(self.heading), math.sin(self.heading)
        ex, ey = np.array([c, s]), np.array([-s, c])     # world directions of width and depth
        hw, hd = w / 2 + margin, d / 2 + margin
        return np.array([self.center[:2] + sx * hw * ex + sy * hd * ey
                         for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))])


@dataclass
class Scene:
    """A room, its objects and the camera path through it."""
    scene_id: str
    seed: int
    room: tuple[float, float]           # (width along x, length along y); floor centred at 0
    objects: list[SceneObject]
    poses: list[np.ndarray]             # cam2global (4x4) for every path step
    cam2img: np.ndarray = field(default_factory=intrinsics_matrix)
    axis_align: np.ndarray = field(default_factory=lambda: np.eye(4))

    @property
    def area(self) -> float:
        """Floor area in square metres."""
        return self.room[0] * self.room[1]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], decimals: int = 2) -> float:
    """A uniform sample in [lo, hi], rounded so the stored world is exactly the rendered one."""
    return round(float(rng.uniform(*bounds)), decimals)


def _footprints_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating axis test for two convex quadrilaterals given by their corners."""
    # Two convex polygons are disjoint iff some edge normal separates their projections.
    for poly in (a, b):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() < pb.min() or pb.max() < pa.min():
                return False          # found a separating axis
    return True


def _fits(obj: SceneObject, placed: list[SceneObject], room: tuple[float, float]) -> bool:
    """Inside the free floor area and at least OBJECT_GAP from every placed object."""
    w, l = room
    corners = obj.footprint()
    # Side walls and far wall: WALL_GAP; near wall: KEEP_OUT, so the camera path stays free.
    if (np.abs(corners[:, 0]) > w / 2 - WALL_GAP).any():
        return False
    if corners[:, 1].max() > l / 2 - WALL_GAP or corners[:, 1].min() < -l / 2 + KEEP_OUT:
        return False
    grown = obj.footprint(OBJECT_GAP / 2)
    return not any(_footprints_overlap(grown, o.footprint(OBJECT_GAP / 2)) for o in placed)


def sample_object(rng: np.random.Generator, category: Category, room: tuple[float, float]) -> SceneObject:
    """A random object of `category` somewhere in the room (not yet checked for collisions)."""
    size = np.array([_uniform(rng, category.width), _uniform(rng, category.height),
                     _uniform(rng, category.depth)])
    w, l = room
    x = _uniform(rng, (-w / 2, w / 2))
    y = _uniform(rng, (-l / 2 + KEEP_OUT, l / 2))
    heading = _uniform(rng, (-MAX_HEADING, MAX_HEADING), 3)
    return SceneObject(category.name, np.array([x, y, size[1] / 2]), size, heading)


def sample_objects(rng: np.random.Generator, room: tuple[float, float]) -> list[SceneObject]:
    """NUM_OBJECTS non-overlapping objects, at most MAX_PER_CATEGORY of one category."""
    target = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
    placed: list[SceneObject] = []
    for _ in range(8 * target):                     # category draws; big ones may not fit
        if len(placed) == target:
            break
        counts = {name: sum(o.category == name for o in placed) for name in CATEGORY_NAMES}
        allowed = [c for c in CATEGORIES if counts[c.name] < MAX_PER_CATEGORY]
        category = allowed[int(rng.integers(len(allowed)))]
        for _ in range(60):                         # position draws for this category
            obj = sample_object(rng, category, room)
            if _fits(obj, placed, room):
                placed.append(obj)
                break
    return placed


def camera_path(rng: np.random.Generator, room: tuple[float, float],
                num_frames: int = FRAMES_PER_SCENE) -> list[np.ndarray]:
    """cam2global poses of a camera dollying along the near (y = -L/2) wall on a shallow arc.

    The camera keeps a fixed height and downward tilt, and pans with its position, turned towards
    the side it is on: heading = -CAMERA_PAN * x / x_max (it looks left at the left end). The
    sweep thus reveals the room side by side, so objects first appear at different times
    (obj_appearance_order questions), while headings stay small (see the module docstring).
    """
    w, l = room
    height = _uniform(rng, CAMERA_HEIGHT)
    tilt = _uniform(rng, CAMERA_TILT, 3)
    x_max = w / 2 - 0.6
    direction = 1.0 if rng.random() < 0.5 else -1.0    # left-to-right or right-to-left
    poses = []
    for i in range(num_frames):
        s = i / (num_frames - 1)
        x = direction * x_max * (2 * s - 1)
        y = -l / 2 + 0.35 + 0.25 * math.sin(math.pi * s)  # a slight forward bulge mid-path
        heading = -CAMERA_PAN * x / x_max
        poses.append(pose_matrix(camera_rotation(heading, tilt), np.array([x, y, height])))
    return poses


def scene_id_for(seed: int) -> str:
    """Scene ids are the zero-padded seed, so splits (disjoint seed ranges) never share one."""
    return f"{seed:07d}"


def sample_scene(seed: int, attempt: int = 0, num_frames: int = FRAMES_PER_SCENE) -> Scene:
    """The scene of `seed` (attempt > 0 draws a fresh layout when one was rejected)."""
    rng = np.random.default_rng([seed, attempt])
    room = (_uniform(rng, ROOM_SIDE), _uniform(rng, ROOM_SIDE))
    objects = sample_objects(rng, room)
    poses = camera_path(rng, room, num_frames)
    return Scene(scene_id_for(seed), seed, room, objects, poses)

# =====================================================================================
# Rendering: numpy ray casting (RGB, z-depth, instance ids)
# =====================================================================================


@dataclass
class Frame:
    """One rendered view."""
    rgb: np.ndarray     # (H, W, 3) uint8
    depth: np.ndarray   # (H, W) float32, z-depth in metres (distance along the optical axis)
    inst: np.ndarray    # (H, W) int16, object index or -1 for room surfaces


def _pixel_rays() -> np.ndarray:
    """Camera-frame ray directions through pixel centres, scaled to z = 1: shape (H*W, 3).

    With z = 1 the ray parameter t of a hit is directly its z-depth.
    """
    v, u = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5
    x = (u - IMAGE_SIZE / 2) / FOCAL
    y = (v - IMAGE_SIZE / 2) / FOCAL
    return np.stack([x, y, np.ones_like(x)], -1).reshape(-1, 3)


PIXEL_RAYS = _pixel_rays()


def _reciprocal(d: np.ndarray) -> np.ndarray:
    """1 / d with d = 0 nudged to a tiny positive number: a ray parallel to a slab never crosses it
    (its two slab distances become -inf/+inf-like, so the slab never limits the interval)."""
    return 1.0 / np.where(d == 0.0, 1e-30, d)


def _lambert(normals: np.ndarray) -> np.ndarray:
    """Shading factor AMBIENT + (1 - AMBIENT) * max(0, n . light), so faces differ."""
    return AMBIENT + (1.0 - AMBIENT) * np.clip(normals @ LIGHT, 0.0, None)


def _room_hits(scene: Scene, origin: np.ndarray, dirs: np.ndarray):
    """Where each ray (dirs: (3, n)) leaves the room box: (t, inward normal (n, 3), colour (n, 3))."""
    w, l = scene.room
    lo, hi = (-w / 2, -l / 2, 0.0), (w / 2, l / 2, WALL_HEIGHT)
    n = dirs.shape[1]
    t, axis = np.full(n, np.inf), np.zeros(n, dtype=np.int64)
    for k in range(3):                                     # exit distance along each axis
        bound = np.where(dirs[k] > 0, hi[k], lo[k])        # the wall the ray runs towards
        t_k = (bound - origin[k]) * _reciprocal(dirs[k])
        t_k[t_k < 0] = np.inf                              # (only parallel rays can go negative)
        axis = np.where(t_k < t, k, axis)
        t = np.minimum(t, t_k)
    # Inward normal: opposite to the ray's direction along the exit axis.
    rows = np.arange(n)
    normal = np.zeros((n, 3))
    normal[rows, axis] = -np.sign(dirs[axis, rows])
    colour = np.tile(WALL_COLOUR, (n, 1))
    x, y = origin[0] + t * dirs[0], origin[1] + t * dirs[1]
    floor = (axis == 2) & (dirs[2] < 0)
    checker = (np.floor(x / FLOOR_TILE) + np.floor(y / FLOOR_TILE)) % 2
    colour[floor] = FLOOR_COLOUR * (0.9 + 0.2 * checker[floor, None])
    colour[(axis == 2) & (dirs[2] > 0)] = CEILING_COLOUR
    return t, normal, colour


def _box_hits(obj: SceneObject, origin: np.ndarray, dirs: np.ndarray):
    """Slab test in the object's frame for rays dirs (3, n).

    Returns (t_near, face, side): the entry distance (inf on a miss), the local axis of the face
    entered last, and -1/+1 for the side of that face the ray enters through.
    """
    rot = obj.rotation
    o_local = rot.T @ (origin - obj.center)               # camera centre in the object frame
    d_local = rot.T @ dirs                                 # ray directions in the object frame
    half = obj.size / 2
    n = dirs.shape[1]
    t_near, t_far = np.full(n, -np.inf), np.full(n, np.inf)
    face = np.zeros(n, dtype=np.int64)
    for k in range(3):                                     # the slab -half_k <= x_k <= half_k
        inv = _reciprocal(d_local[k])
        t1, t2 = (-half[k] - o_local[k]) * inv, (half[k] - o_local[k]) * inv
        enter, leave = np.minimum(t1, t2), np.maximum(t1, t2)
        face = np.where(enter > t_near, k, face)           # the face hit is the slab entered last
        t_near, t_far = np.maximum(t_near, enter), np.minimum(t_far, leave)
    hit = (t_near <= t_far) & (t_near > 1e-6)              # (the camera is never inside a box)
    side = -np.sign(d_local[face, np.arange(n)])           # entering against the ray direction
    return np.where(hit, t_near, np.inf), face, side


def render(scene: Scene, cam2global: np.ndarray) -> Frame:
    """Ray cast one IMAGE_SIZE x IMAGE_SIZE view of the scene from pose `cam2global`."""
    origin = cam2global[:3, 3]
    dirs = cam2global[:3, :3] @ PIXEL_RAYS.T               # (3, n) world directions, camera z = 1
    t, normal, colour = _room_hits(scene, origin, dirs)
    inst = np.full(dirs.shape[1], -1, dtype=np.int16)
    for index, obj in enumerate(scene.objects):            # nearest surface wins
        t_obj, face, side = _box_hits(obj, origin, dirs)
        closer = t_obj < t
        t = np.where(closer, t_obj, t)
        # World normal of the face: +-(column `face` of the object rotation).
        normal[closer] = side[closer, None] * obj.rotation.T[face[closer]]
        colour[closer] = CATEGORY_BY_NAME[obj.category].colour
        inst[closer] = index
    rgb = np.clip(colour * _lambert(normal)[:, None], 0, 255).round().astype(np.uint8)
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    return Frame(rgb.reshape(*shape, 3), t.reshape(shape).astype(np.float32), inst.reshape(shape))

# =====================================================================================
# Ground truth: boxes in camera frames, visibility, projected 2D boxes
# =====================================================================================


def camera_box(obj: SceneObject, cam2global: np.ndarray) -> list[float]:
    """The object's 9-number box in the camera frame of `cam2global` (unrounded).

    Centre: world-to-camera transform of the world centre. Rotation: R_cam = R_world2cam @ R_obj,
    converted to ZXY Euler angles; sizes stay (width, height, depth).
    """
    world2cam = np.linalg.inv(cam2global)
    center = world2cam[:3, :3] @ obj.center + world2cam[:3, 3]
    # With a camera that only tilts, this is Rx(tilt) @ Ry(camera heading - object heading):
    # yaw = 0, roll = tilt, pitch = relative heading (up to float noise).
    yaw, roll, pitch = rotation_to_euler_zxy(world2cam[:3, :3] @ obj.rotation)
    return [*map(float, center), *map(float, obj.size), yaw, roll, canonical_pitch(pitch)]


def rounded_box(box: Sequence[float]) -> list[float]:
    """Box values exactly as the answer text writes them (2 decimals, no "-0.00")."""
    return [float(data.format_number(v)) for v in box]


def project(points_cam: np.ndarray, cam2img: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, 2) of camera-frame points (N, 3) (z must be > 0)."""
    homog = points_cam @ cam2img[:3, :3].T                 # (fx x + cx z, fy y + cy z, z)
    return homog[:, :2] / homog[:, 2:3]


def center_in_view(obj: SceneObject, cam2global: np.ndarray, cam2img: np.ndarray) -> bool:
    """Whether the object's box centre lies in front of the camera and projects inside the image."""
    world2cam = np.linalg.inv(cam2global)
    c = world2cam[:3, :3] @ obj.center + world2cam[:3, 3]
    if c[2] <= 0.05:
        return False
    u, v = project(c[None], cam2img)[0]
    return 0.0 <= u < IMAGE_SIZE and 0.0 <= v < IMAGE_SIZE


def pixel_counts(frame: Frame, num_objects: int) -> np.ndarray:
    """Visible pixels per object in one frame."""
    ids = frame.inst[frame.inst >= 0].astype(np.int64)
    return np.bincount(ids, minlength=num_objects)[:num_objects]


def visible(scene: Scene, frame: Frame, index: int) -> list[bool]:
    """Visibility of every object in `frame` (rendered from scene.poses[index]).

    An object is visible when at least MIN_PIXELS of it are seen AND its box centre projects
    inside the image: a sliver at the image border does not count, so every ground-truth box
    has its centre in view in at least one of the record's frames.
    """
    counts = pixel_counts(frame, len(scene.objects))
    return [bool(counts[k] >= MIN_PIXELS and center_in_view(o, scene.poses[index], scene.cam2img))
            for k, o in enumerate(scene.objects)]


def box2d_area(frame: Frame, index: int) -> int:
    """Area in pixels of the axis-aligned 2D box around the object's visible pixels (0 if none)."""
    mask = frame.inst == index
    if not mask.any():
        return 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))

# =====================================================================================
# Frame sampling and the geometry prior (stands in for VGGT features)
# =====================================================================================


def uniform_indices(num_frames: int, k: int) -> list[int]:
    """The frame sampler of docs/DESIGN.md "Records and prompts": round(linspace(0, N - 1, k))."""
    return data.sample_frame_indices(num_frames, k, mode="uniform")


def strided_indices(num_frames: int, start: int, k: int, stride: int) -> list[int]:
    """k consecutive frames at a fixed stride (the detection sampler)."""
    return data.sample_frame_indices(num_frames, k, mode="stride", stride=stride, start=start)


def detection_offsets(num_frames: int) -> list[int]:
    """Start frames of the detection windows: DETECTION_RECORDS evenly spread along the path."""
    last = num_frames - 1 - DETECTION_STRIDE * (DETECTION_FRAMES - 1)
    return sorted(set(uniform_indices(last + 1, DETECTION_RECORDS)))


def detection_windows(num_frames: int) -> list[list[int]]:
    """The frames of each detection window (the grounding records use the same windows)."""
    return [strided_indices(num_frames, start, DETECTION_FRAMES, DETECTION_STRIDE)
            for start in detection_offsets(num_frames)]


def patch_points(depth: np.ndarray, cam2global: np.ndarray, cam2img: np.ndarray) -> np.ndarray:
    """Per-patch mean 3D point (Hp, Wp, 3) of one frame, in world coordinates.

    Back-project every pixel centre with its z-depth, move the points to the world and average over
    each PATCH_SIZE x PATCH_SIZE patch.
    """
    fx, fy, cx, cy = cam2img[0, 0], cam2img[1, 1], cam2img[0, 2], cam2img[1, 2]
    v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]].astype(np.float64) + 0.5
    z = depth.astype(np.float64)
    points = np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], -1)      # camera frame
    points = points @ cam2global[:3, :3].T + cam2global[:3, 3]              # world frame
    hp, wp = depth.shape[0] // PATCH_SIZE, depth.shape[1] // PATCH_SIZE
    return points.reshape(hp, PATCH_SIZE, wp, PATCH_SIZE, 3).mean(axis=(1, 3))


def geometry_prior(scene: Scene, world_patches: dict[int, np.ndarray],
                   indices: Sequence[int]) -> np.ndarray:
    """float32 (F, Hp, Wp, 4): per-patch points (x, y, z, 1) of each sampled frame in the first one's camera.

    `world_patches` holds patch_points() of every rendered frame: a rigid transform commutes with
    the patch mean, so each record only moves the 8 x 8 means into its reference camera.
    The points are written in homogeneous form (x, y, z, 1): the geometry merger starts with an
    RMSNorm, which divides each token's feature vector by its own scale; the constant 1 keeps the
    distance recoverable after that normalisation (x / 1), where bare (x, y, z) would lose it.
    """
    ref = np.linalg.inv(scene.poses[indices[0]])           # world -> first sampled camera
    points = np.stack([world_patches[i] @ ref[:3, :3].T + ref[:3, 3] for i in indices])
    return np.concatenate([points, np.ones_like(points[..., :1])], -1).astype(np.float32)

# =====================================================================================
# Grounding descriptions: always unique within the scene
# =====================================================================================
# A category that occurs once is "the chair". Two chairs are told apart by one of three schemes,
# tried in a per-scene random order, and used only when the difference is clear (margins below):
#   volume   "the larger chair" / "the smaller chair"
#   height   "the taller chair" / "the shorter chair"
#   anchor   "the chair closest to the sofa" / "the chair farthest from the sofa"
#            (the sofa must be unique; distances between centres on the floor plane)
# `resolve_description` reads a description back and returns every object it could mean, with the
# same margins; generation keeps a description only when that is exactly its target.

VOLUME_RATIO = 1.2          # "larger": at least 1.2x the volume of the other one
HEIGHT_GAP = 0.1            # "taller": at least 10 cm taller
DISTANCE_GAP = 0.4          # "closest to": at least 40 cm nearer than the other one


def _volume(obj: SceneObject) -> float:
    return float(np.prod(obj.size))


def _floor_distance(a: SceneObject, b: SceneObject) -> float:
    return float(np.linalg.norm(a.center[:2] - b.center[:2]))


def _unique_categories(objects: Sequence[SceneObject]) -> list[str]:
    """Categories that occur exactly once, in object order."""
    names = [o.category for o in objects]
    return [n for n in dict.fromkeys(names) if names.count(n) == 1]


def resolve_description(description: str, objects: Sequence[SceneObject]) -> list[int]:
    """Indices of every object that `description` could refer to (unique when it has one entry)."""
    words = description.removeprefix("the ").split(" ")
    by_cat = lambda name: [k for k, o in enumerate(objects) if o.category == name]
    if len(words) == 1:                                    # "the chair"
        return by_cat(words[0])
    if len(words) == 2:                                    # "the larger chair", ...
        adjective, cands = words[0], by_cat(words[1])
        if not cands:
            return []
        vol = {k: _volume(objects[k]) for k in cands}
        hgt = {k: float(objects[k].size[1]) for k in cands}
        if adjective == "larger":
            return [k for k in cands if vol[k] * VOLUME_RATIO > max(vol.values())]
        if adjective == "smaller":
            return [k for k in cands if vol[k] < min(vol.values()) * VOLUME_RATIO]
        if adjective == "taller":
            return [k for k in cands if hgt[k] + HEIGHT_GAP > max(hgt.values())]
        if adjective == "shorter":
            return [k for k in cands if hgt[k] < min(hgt.values()) + HEIGHT_GAP]
        return []
    # "<cat> closest to the <anchor>" / "<cat> farthest from the <anchor>"
    if len(words) == 5 and words[1] in ("closest", "farthest") and words[3] == "the":
        cands, anchors = by_cat(words[0]), by_cat(words[4])
        if len(anchors) != 1 or not cands:
            return []
        dist = {k: _floor_distance(objects[k], objects[anchors[0]]) for k in cands}
        if words[1] == "closest":
            return [k for k in cands if dist[k] < min(dist.values()) + DISTANCE_GAP]
        return [k for k in cands if dist[k] + DISTANCE_GAP > max(dist.values())]
    return []


def _pair_descriptions(objects: Sequence[SceneObject], pair: tuple[int, int],
                       rng: np.random.Generator) -> dict[int, str]:
    """Descriptions for the two objects of a category, or {} when no scheme separates them."""
    cat = objects[pair[0]].category
    anchors = [a for a in _unique_categories(objects)]
    schemes: list[tuple[str, str]] = [(f"the larger {cat}", f"the smaller {cat}"),
                                      (f"the taller {cat}", f"the shorter {cat}")]
    schemes += [(f"the {cat} closest to the {a}", f"the {cat} farthest from the {a}") for a in anchors]
    for k in rng.permutation(len(schemes)):
        first, second = schemes[int(k)]
        hits_first = resolve_description(first, objects)
        hits_second = resolve_description(second, objects)
        if len(hits_first) == 1 and len(hits_second) == 1 and hits_first != hits_second:
            return {hits_first[0]: first, hits_second[0]: second}
    return {}


def describe_objects(objects: Sequence[SceneObject], rng: np.random.Generator) -> dict[int, str]:
    """A unique description for every object that can get one: {object index: description}."""
    out: dict[int, str] = {}
    for cat in dict.fromkeys(o.category for o in objects):
        members = [k for k, o in enumerate(objects) if o.category == cat]
        if len(members) == 1:
            out[members[0]] = f"the {cat}"
        else:
            out.update(_pair_descriptions(objects, (members[0], members[1]), rng))
    # Double check: each description means exactly its own object.
    for k, desc in out.items():
        assert resolve_description(desc, objects) == [k], (desc, k)
    return dict(sorted(out.items()))

# =====================================================================================
# Task records: detection, grounding, spatial QA
# =====================================================================================


def _matrix(m: np.ndarray) -> list[list[float]]:
    """A 4x4 matrix as JSON-friendly nested lists (6 decimals keeps the files byte-stable)."""
    return [[round(float(v), 6) + 0.0 for v in row] for row in m]


def _frame_path(scene: Scene, index: int, kind: str = "frames") -> str:
    """Path of a written frame, relative to the split folder."""
    return f"scenes/{scene.scene_id}/{kind}/{index:03d}.png"


def _record(scene: Scene, rid: str, task: str, indices: Sequence[int], prompt: str,
            answer: str) -> dict[str, Any]:
    """The fields every record shares (see the docstring of data.py)."""
    return {
        "id": rid, "task": task, "scene_id": scene.scene_id,
        "images": [_frame_path(scene, i) for i in indices],
        "geometry": f"geometry/{rid}.npy",
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
        "cam2img": _matrix(scene.cam2img),
        "cam2global": [_matrix(scene.poses[i]) for i in indices],
        "axis_align_matrix": _matrix(scene.axis_align),
    }


def detection_record(scene: Scene, frames: dict[int, Frame], start: int, k: int) -> dict[str, Any]:
    """4 consecutive frames; every object visible in any of them, boxed in the first camera.

    Boxes are listed by category name, then nearest first (distance of the box centre from the
    first camera): a deterministic order. Category order was chosen over a pure nearest-first
    order because a tiny model learns it much faster: the next label only asks "which category,
    after the ones listed, is in view?", not a comparison of depths.
    """
    indices = strided_indices(len(scene.poses), start, DETECTION_FRAMES, DETECTION_STRIDE)
    # Objects visible in at least one of the 4 frames (union over the window).
    seen = set()
    for i in indices:
        seen |= {n for n, v in enumerate(visible(scene, frames[i], i)) if v}
    # Their boxes in the FIRST frame's camera, by label then distance; the record's boxes carry exactly the
    # rounded numbers the answer text shows, so rewards and evaluation see the same ground truth.
    first = scene.poses[indices[0]]
    boxes = [(camera_box(scene.objects[n], first), scene.objects[n].category) for n in sorted(seen)]
    boxes.sort(key=lambda b: (b[1], float(np.linalg.norm(b[0][:3]))))
    items = [{"label": label, "bbox_3d": rounded_box(box)} for box, label in boxes]
    record = _record(scene, f"det-{scene.scene_id}-{k}", "detection", indices,
                     data.detection_prompt(len(indices)), data.detection_answer(items))
    record["boxes"] = items
    return record


def grounding_records(scene: Scene, frames: dict[int, Frame],
                      rng: np.random.Generator) -> list[dict[str, Any]]:
    """One record per describable object visible in one of the scene's detection windows.

    Frames: the 4 consecutive frames (DETECTION_STRIDE apart) of the detection window in which
    the target's 2D box is largest, rather than 6 frames spread over the whole path (the first
    version): the answer box lives in the chosen frame's camera, and with frames close together
    the cameras differ by little, so what detection teaches (boxes in a nearby camera) carries
    over. With 6 frames from the whole path, a 0.7 M model never learned it (docs/EXPERIMENTS.md
    item 14: Acc@0.25 2.8%); the choice is a data lever of the toy world, not of the metric.
    gt_frame: the frame of that window where the target's 2D box (around its visible pixels) is
    largest (the first such frame on ties). The answer box is in that frame's camera
    coordinates; gt_bbox is the target in the axis-aligned scene frame.
    """
    windows = detection_windows(len(scene.poses))
    records = []
    for n, desc in describe_objects(scene.objects, rng).items():
        # The window, and its frame, where the target is largest among those where it is visible.
        shown = [(box2d_area(frames[i], n), w, position) for w, indices in enumerate(windows)
                 for position, i in enumerate(indices) if visible(scene, frames[i], i)[n]]
        if not shown:
            continue                                       # never clearly in view: no record
        best_area = max(area for area, _, _ in shown)
        _, window, gt_frame = next(item for item in shown if item[0] == best_area)
        indices = windows[window]
        obj = scene.objects[n]
        # gt_frame indexes the record's frames (the "Frame-i" of the prompt), not the path. The
        # answer box lives in gt_frame's camera; the reward maps it back with
        # axis_align_matrix @ cam2global[gt_frame] and compares with gt_bbox by 3D IoU.
        box = camera_box(obj, scene.poses[indices[gt_frame]])
        record = _record(scene, f"grd-{scene.scene_id}-{len(records)}", "grounding", indices,
                         data.grounding_prompt(len(indices), desc),
                         data.grounding_answer(gt_frame, box))
        record.update(target=obj.category, description=desc, gt_frame=gt_frame,
                      gt_bbox=[round(v, 4) + 0.0 for v in obj.world_box()])
        records.append(record)
    return records


# --- spatial questions (VSI-Bench wording, adapted to centre-to-centre distances) ---------------
# Each builder returns {"question", "options", "answer"} or None. Questions only name objects of
# categories that occur once in the room, so "the sofa" is never ambiguous; counting may name any
# category. Multiple-choice questions are kept only when the right option wins by a clear margin
# (0.3 m for distances, 10-15 degrees for directions, distinct first frames for the order).
# Numeric answers: counts and centimetres as integers, metres and square metres with 2 decimals.

LETTERS = "ABCDEFGH"


def _options(choices: Sequence[str]) -> list[str]:
    """["A. sofa", "B. table", ...]."""
    return [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]


def _center_distance(a: SceneObject, b: SceneObject) -> float:
    return float(np.linalg.norm(a.center - b.center))


def q_object_counting(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """How many objects of one category (categories that occur twice are asked half the time)."""
    names = [o.category for o in scene.objects]
    present = list(dict.fromkeys(names))
    doubles = [c for c in present if names.count(c) > 1]
    pool = doubles if doubles and rng.random() < 0.5 else present
    cat = pool[int(rng.integers(len(pool)))]
    return {"question": f"How many {cat}(s) are in this room?", "options": [],
            "answer": str(names.count(cat))}


def q_object_abs_distance(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """Distance between the centres of two objects of unique categories, in metres."""
    unique = _unique_categories(scene.objects)
    if len(unique) < 2:
        return None
    a, b = (unique[int(i)] for i in rng.choice(len(unique), 2, replace=False))
    oa, ob = (next(o for o in scene.objects if o.category == c) for c in (a, b))
    question = (f"Measuring from the centre of each object, what is the direct distance between "
                f"the {a} and the {b} (in meters)?")
    return {"question": question, "options": [],
            "answer": data.format_number(_center_distance(oa, ob))}


def q_object_size_estimation(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """Longest dimension of an object of a unique category, in centimetres."""
    unique = _unique_categories(scene.objects)
    if not unique:
        return None
    cat = unique[int(rng.integers(len(unique)))]
    obj = next(o for o in scene.objects if o.category == cat)
    question = (f"What is the length of the longest dimension (length, width, or height) of the "
                f"{cat}, measured in centimeters?")
    return {"question": question, "options": [], "answer": str(int(round(obj.size.max() * 100)))}


def q_room_size_estimation(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """Floor area in square metres."""
    return {"question": "What is the size of this room (in square meters)?", "options": [],
            "answer": data.format_number(scene.area)}


def q_object_rel_distance(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """Which of 2-4 objects is closest to a target (all of unique categories; clear margin)."""
    unique = _unique_categories(scene.objects)
    by_cat = {o.category: o for o in scene.objects if o.category in unique}
    for t in rng.permutation(len(unique)):
        target = unique[int(t)]
        others = [c for c in unique if c != target]
        if len(others) < 2:
            return None
        choices = [others[int(i)] for i in rng.permutation(len(others))[:4]]
        dist = sorted((_center_distance(by_cat[c], by_cat[target]), c) for c in choices)
        if dist[1][0] - dist[0][0] < 0.3:                  # too close to call: try another target
            continue
        question = (f"Measuring from the centre of each object, which of these objects "
                    f"({', '.join(choices)}) is the closest to the {target}?")
        return {"question": question, "options": _options(choices),
                "answer": LETTERS[choices.index(dist[0][1])]}
    return None


def q_object_rel_direction(scene: Scene, rng: np.random.Generator) -> dict[str, Any] | None:
    """Standing by A and facing B, is C to the left, right or back (floor plane, clear margins)."""
    unique = _unique_categories(scene.objects)
    by_cat = {o.category: o for o in scene.objects if o.category in unique}
    triples = list(itertools.permutations(unique, 3))
    for t in rng.permutation(len(triples)):
        a, b, c = triples[int(t)]
        forward = by_cat[b].center[:2] - by_cat[a].center[:2]
        to_c = by_cat[c].center[:2] - by_cat[a].center[:2]
        cross = forward[0] * to_c[1] - forward[1] * to_c[0]   # > 0: c is counter-clockwise (left)
        angle = math.degrees(math.atan2(cross, float(forward @ to_c)))
        if abs(angle) < 15 or abs(abs(angle) - 135) < 10:   # ambiguous: straight ahead / borderline
            continue
        answer = "back" if abs(angle) >= 135 else ("left" if angle > 0 else "right")
        question = (f"If I am standing by the {a} and facing the {b}, is the {c} to my left, right, "
                    f"or back? An object is to my back if I would have to turn at least 135 degrees "
                    f"in order to face it.")
        choices = ["left", "right", "back"]
        return {"question": question, "options": _options(choices),
                "answer": LETTERS[choices.index(answer)]}
    return None


def q_obj_appearance_order(scene: Scene, rng: np.random.Generator,
                           first_seen: dict[str, int]) -> dict[str, Any] | None:
    """Order in which 3-4 categories first appear in the sampled frames (distinct first frames)."""
    by_frame: dict[int, list[str]] = {}
    for cat, f in first_seen.items():
        by_frame.setdefault(f, []).append(cat)
    # One category per distinct first-appearance frame, so the order is never a tie.
    pool = [cats[int(rng.integers(len(cats)))] for _, cats in sorted(by_frame.items())]
    if len(pool) < 3:
        return None
    count = min(len(pool), 4)
    chosen = [pool[int(i)] for i in sorted(rng.choice(len(pool), count, replace=False))]
    correct = ", ".join(chosen)                               # pool is sorted by first frame
    wrong = [", ".join(p) for p in itertools.permutations(chosen) if ", ".join(p) != correct]
    choices = [correct] + [wrong[int(i)] for i in rng.choice(len(wrong), 3, replace=False)]
    choices = [choices[int(i)] for i in rng.permutation(len(choices))]
    asked = [chosen[int(i)] for i in rng.permutation(count)]
    question = ("What will be the first-time appearance order of the following categories in the "
                f"video: {', '.join(asked)}?")
    return {"question": question, "options": _options(choices),
            "answer": LETTERS[choices.index(correct)]}


QUESTION_BUILDERS = {
    "object_counting": q_object_counting,
    "object_abs_distance": q_object_abs_distance,
    "object_size_estimation": q_object_size_estimation,
    "room_size_estimation": q_room_size_estimation,
    "object_rel_distance": q_object_rel_distance,
    "object_rel_direction": q_object_rel_direction,
    "obj_appearance_order": q_obj_appearance_order,
}


def spatial_records(scene: Scene, frames: dict[int, Frame], rng: np.random.Generator,
                    questions_per_type: int = 1) -> list[dict[str, Any]]:
    """At most `questions_per_type` questions of each type per scene, on 8 uniformly sampled frames.

    Round r asks each type once more; a question worded as one already asked in this scene is
    dropped (a room has one size), so a scene may hold fewer; the same objects in another order
    count as another question. Round 1 draws what a 1-question run draws.
    """
    indices = uniform_indices(len(scene.poses), SPATIAL_FRAMES)
    # First sampled frame (0..7) in which each category is visible, for obj_appearance_order.
    first_seen: dict[str, int] = {}
    for position, i in enumerate(indices):
        for n, is_visible in enumerate(visible(scene, frames[i], i)):
            if is_visible:
                first_seen.setdefault(scene.objects[n].category, position)
    records, asked = [], set()
    # Builders run in a fixed order and all draw from the same rng, so the output is reproducible;
    # a builder returns None when the scene cannot support its question (e.g. too few objects).
    for qtype, builder in [item for _ in range(questions_per_type) for item in QUESTION_BUILDERS.items()]:
        if qtype == "obj_appearance_order":
            qa = builder(scene, rng, first_seen)
        else:
            qa = builder(scene, rng)
        if qa is None or qa["question"] in asked:
            continue
        asked.add(qa["question"])
        prompt = data.spatial_prompt(len(indices), qa["question"], qa["options"] or None)
        record = _record(scene, f"spa-{scene.scene_id}-{len(records)}", "spatial", indices,
                         prompt, qa["answer"])
        record.update(question_type=qtype, question=qa["question"], options=qa["options"],
                      answer=qa["answer"])
        records.append(record)
    return records

# =====================================================================================
# Writing a split
# =====================================================================================


def used_frames(num_frames: int) -> list[int]:
    """Path steps that some record uses (only these are rendered and written)."""
    used = set(uniform_indices(num_frames, SPATIAL_FRAMES))
    for window in detection_windows(num_frames):  # the grounding records use these windows too
        used |= set(window)
    return sorted(used)


def _all_objects_seen(scene: Scene, frames: dict[int, Frame]) -> bool:
    """Every object visible in some detection (= grounding) window and in some spatial frame (so
    every count, order and description can be answered from the frames of the record)."""
    windows = detection_windows(len(scene.poses))
    for indices in ([i for w in windows for i in w], uniform_indices(len(scene.poses), SPATIAL_FRAMES)):
        seen = np.zeros(len(scene.objects), dtype=bool)
        for i in indices:
            seen |= np.array(visible(scene, frames[i], i))
        if not seen.all():
            return False
    return True


def build_scene(seed: int, num_frames: int = FRAMES_PER_SCENE,
                max_attempts: int = 50) -> tuple[Scene, dict[int, Frame]]:
    """Sample a scene for `seed`, redrawing the layout until every object can be seen."""
    for attempt in range(max_attempts):
        scene = sample_scene(seed, attempt, num_frames)
        if len(scene.objects) < NUM_OBJECTS[0]:
            continue
        frames = {i: render(scene, scene.poses[i]) for i in used_frames(num_frames)}
        if _all_objects_seen(scene, frames):
            return scene, frames
    raise RuntimeError(f"scene seed {seed}: no valid layout in {max_attempts} attempts")


def scene_records(scene: Scene, frames: dict[int, Frame],
                  questions_per_type: int = 1) -> dict[str, list[dict[str, Any]]]:
    """All records of one scene, per task."""
    rng = np.random.default_rng([scene.seed, 7919])          # task sampling: its own stream
    detection = [detection_record(scene, frames, start, k)
                 for k, start in enumerate(detection_offsets(len(scene.poses)))]
    return {"detection": detection,
            "grounding": grounding_records(scene, frames, rng),
            "spatial": spatial_records(scene, frames, rng, questions_per_type)}


def scene_summary(scene: Scene, frames: dict[int, Frame]) -> dict[str, Any]:
    """scene.json: everything needed to check or re-render the scene."""
    return {
        "scene_id": scene.scene_id, "seed": scene.seed,
        "room": {"width": scene.room[0], "length": scene.room[1], "height": WALL_HEIGHT,
                 "floor": "x in [-width/2, width/2], y in [-length/2, length/2], z = 0"},
        "objects": [{"index": k, "category": o.category,
                     "center": [round(float(v), 4) + 0.0 for v in o.center],
                     "size_whd": [float(v) for v in o.size], "heading": o.heading,
                     "bbox_3d": [round(v, 4) + 0.0 for v in o.world_box()]}
                    for k, o in enumerate(scene.objects)],
        "cam2img": _matrix(scene.cam2img),
        "axis_align_matrix": _matrix(scene.axis_align),
        "poses": [_matrix(p) for p in scene.poses],
        "frames": sorted(frames),
    }


def _save_png(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def write_scene(split_dir: str, seed: int, num_frames: int = FRAMES_PER_SCENE,
                questions_per_type: int = 1) -> dict[str, list]:
    """Render one scene, write its frames, depth maps, scene.json and geometry; return records."""
    scene, frames = build_scene(seed, num_frames)
    # Frames as RGB PNGs and depth as uint16 millimetre PNGs (the ScanNet convention).
    for i, frame in frames.items():
        _save_png(frame.rgb, os.path.join(split_dir, _frame_path(scene, i)))
        depth_mm = np.clip(frame.depth * 1000.0, 0, 65535).round().astype(np.uint16)
        _save_png(depth_mm, os.path.join(split_dir, _frame_path(scene, i, "depth")))
    with open(os.path.join(split_dir, "scenes", scene.scene_id, "scene.json"), "w") as f:
        json.dump(scene_summary(scene, frames), f)
    records = scene_records(scene, frames, questions_per_type)
    os.makedirs(os.path.join(split_dir, "geometry"), exist_ok=True)
    world_patches = {i: patch_points(f.depth, scene.poses[i], scene.cam2img) for i, f in frames.items()}
    for task_records in records.values():
        for record in task_records:
            indices = [int(p.rsplit("/", 1)[1][:-4]) for p in record["images"]]   # ".../NNN.png"
            np.save(os.path.join(split_dir, record["geometry"]),
                    geometry_prior(scene, world_patches, indices))
    return records


def _write_scene_job(job: tuple[str, int, int, int]) -> dict[str, list]:
    return write_scene(*job)


def generate(out_dir: str, split: str, num_scenes: int, seed_offset: int | None = None,
             num_frames: int = FRAMES_PER_SCENE, workers: int = 1,
             progress: bool = False, questions_per_type: int = 1) -> dict[str, int]:
    """Write `num_scenes` scenes of `split` under out_dir/split; return record counts per task.

    Scene seeds are seed_offset + 0 .. num_scenes - 1 (default offset: SPLIT_SEED_OFFSETS[split]),
    so train and val never share a scene. The same arguments give byte-identical files, whatever
    `workers` is (scenes are independent and records are written in seed order).
    """
    if seed_offset is None:
        seed_offset = SPLIT_SEED_OFFSETS.get(split, 0)
    if num_frames < DETECTION_STRIDE * (DETECTION_FRAMES - 1) + 1 or num_frames < SPATIAL_FRAMES:
        raise ValueError(f"num_frames={num_frames} is too short for the frame samplers")
    split_dir = os.path.join(out_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    # Files of an earlier, larger run are not deleted: the jsonl files list what this run wrote.
    jobs = [(split_dir, seed_offset + i, num_frames, questions_per_type) for i in range(num_scenes)]
    if workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results: Iterable[dict[str, list]] = pool.imap(_write_scene_job, jobs)
    else:
        pool, results = None, map(_write_scene_job, jobs)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=len(jobs), desc=f"{split} scenes", unit="scene")
    # imap keeps the job order, so the jsonl files list scenes in seed order for any `workers`.
    all_records: dict[str, list] = {task: [] for task in data.TASKS}
    try:
        for records in results:
            for task in data.TASKS:
                all_records[task].extend(records[task])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for task, records in all_records.items():
        with open(os.path.join(split_dir, f"{task}.jsonl"), "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return {task: len(records) for task, records in all_records.items()}

# =====================================================================================
# Preview: frames of one detection record with the projected ground-truth boxes
# =====================================================================================

# The 12 edges of a box, as pairs of corner indices: boxes.box_corners gives corner k the
# signs of its bits (x: 4, y: 2, z: 1), so edges join corners that differ in one bit.
BOX_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def draw_box(draw: ImageDraw.ImageDraw, corners_cam: np.ndarray, cam2img: np.ndarray,
             colour: tuple[int, int, int], scale: float) -> None:
    """Draw the 12 edges of a camera-frame box (edges reaching behind the camera are clipped)."""
    near = 0.05
    for a, b in BOX_EDGES:
        pa, pb = corners_cam[a].copy(), corners_cam[b].copy()
        if pa[2] < near and pb[2] < near:
            continue
        if pa[2] < near or pb[2] < near:                   # clip the edge at the near plane
            front, back = (pa, pb) if pa[2] >= near else (pb, pa)
            s = (front[2] - near) / (front[2] - back[2])
            back = front + s * (back - front)
            pa, pb = front, back
        (ua, va), (ub, vb) = project(np.stack([pa, pb]), cam2img) * scale
        draw.line([(ua, va), (ub, vb)], fill=colour, width=2)


def _colourise_depth(depth_m: np.ndarray, near_m: float, far_m: float) -> np.ndarray:
    """Depth in metres -> RGB, linear from near (warm yellow) to far (dark blue)."""
    t = np.clip((depth_m - near_m) / max(far_m - near_m, 1e-6), 0, 1)[..., None]
    near, far = np.array([255.0, 220.0, 80.0]), np.array([20.0, 30.0, 110.0])
    return (near * (1 - t) + far * t).astype(np.uint8)


def preview(data_dir: str, out_path: str, split: str = "train", index: int = 0,
            scale: int = 3) -> str:
    """Write a PNG: the frames of one detection record with its GT boxes, and a depth strip."""
    split_dir = os.path.join(data_dir, split)
    path = os.path.join(split_dir, "detection.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no {path}; generate the data first: python scenes.py --out {data_dir}")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not 0 <= index < len(records):
        raise SystemExit(f"error: --index {index} out of range (0..{len(records) - 1})")
    record = records[index]
    cam2img = np.asarray(record["cam2img"])
    poses = [np.asarray(p) for p in record["cam2global"]]
    size = IMAGE_SIZE * scale
    strip = Image.new("RGB", (size * len(poses), size * 2), (255, 255, 255))
    for f_idx, (image_rel, pose) in enumerate(zip(record["images"], poses)):
        image = Image.open(os.path.join(split_dir, image_rel)).convert("RGB")
        image = image.resize((size, size), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        first_to_this = np.linalg.inv(pose) @ poses[0]         # first camera -> this camera
        for item in record["boxes"]:
            corners = box_corners(item["bbox_3d"]) @ first_to_this[:3, :3].T + first_to_this[:3, 3]
            colour = CATEGORY_BY_NAME[item["label"]].colour if item["label"] in CATEGORY_BY_NAME \
                else (255, 255, 255)
            outline = tuple(int(c * 0.45) for c in colour)
            draw_box(draw, corners, cam2img, outline, scale)
        draw.text((4, 2), f"frame {f_idx}", fill=(0, 0, 0))
        strip.paste(image, (f_idx * size, 0))
    # Depth strip: one colour scale for all frames of the record (ScanNet-style mm PNGs).
    depth_paths = [os.path.join(split_dir, p.replace("/frames/", "/depth/")) for p in record["images"]]
    if all(os.path.isfile(p) for p in depth_paths):
        depths = [np.asarray(Image.open(p), dtype=np.float64) / 1000.0 for p in depth_paths]
        near_m, far_m = min(d.min() for d in depths), max(d.max() for d in depths)
        for f_idx, depth in enumerate(depths):
            image = Image.fromarray(_colourise_depth(depth, near_m, far_m))
            strip.paste(image.resize((size, size), Image.NEAREST), (f_idx * size, size))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    strip.save(out_path)
    return out_path

# =====================================================================================
# Command line
# =====================================================================================


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scenes.py",
        description="Generate the synthetic 3D world: train and val splits of detection, grounding "
                    "and spatial-QA records (JSON lines, PNG frames, depth, geometry priors).",
        epilog="Preview a record: python scenes.py preview --data DIR --out PNG "
               "(see python scenes.py preview --help).")
    parser.add_argument("--out", default="data/toy",
                        help="output folder; splits go to OUT/train and OUT/val (default: data/toy)")
    parser.add_argument("--train-scenes", type=int, default=None,
                        help=f"number of training scenes (default: {DEFAULT_TRAIN_SCENES})")
    parser.add_argument("--val-scenes", type=int, default=None,
                        help=f"number of held-out scenes (default: {DEFAULT_VAL_SCENES})")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny set for smoke tests: {QUICK_TRAIN_SCENES} train and "
                             f"{QUICK_VAL_SCENES} val scenes (explicit counts still win)")
    parser.add_argument("--seed", type=int, default=0,
                        help="added to every scene seed; train uses seeds SEED+0.., val "
                             f"SEED+{SPLIT_SEED_OFFSETS['val']}.. (default: 0)")
    parser.add_argument("--frames", type=int, default=FRAMES_PER_SCENE,
                        help=f"camera poses per scene path (default: {FRAMES_PER_SCENE})")
    parser.add_argument("--questions-per-type", type=int, default=1,
                        help="spatial questions of each type per scene, at most, in both splits (default: 1; "
                             "the README's tables use 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes rendering scenes in parallel; output is identical (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _preview_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scenes.py preview",
        description="Draw the frames of one detection record with its ground-truth 3D boxes "
                    "projected through cam2img, plus a strip of the depth maps, into one PNG.")
    parser.add_argument("--data", default="data/toy", help="data folder written by scenes.py")
    parser.add_argument("--out", default="docs/preview.png", help="PNG to write")
    parser.add_argument("--split", default="train", help="split folder to read (default: train)")
    parser.add_argument("--index", type=int, default=0, help="detection record index (default: 0)")
    parser.add_argument("--scale", type=int, default=3, help="pixel upscaling factor (default: 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "preview":
        args = _preview_parser().parse_args(argv[1:])
        print(preview(args.data, args.out, args.split, args.index, args.scale))
        return
    if argv and argv[0] == "generate":                     # optional explicit sub-command
        argv = argv[1:]
    args = _generate_parser().parse_args(argv)
    train = args.train_scenes if args.train_scenes is not None else (
        QUICK_TRAIN_SCENES if args.quick else DEFAULT_TRAIN_SCENES)
    val = args.val_scenes if args.val_scenes is not None else (
        QUICK_VAL_SCENES if args.quick else DEFAULT_VAL_SCENES)
    if train < 0 or val < 0 or args.workers < 1 or args.questions_per_type < 1:
        raise SystemExit("error: scene counts must be >= 0; --workers and --questions-per-type must be >= 1")
    for split, count in (("train", train), ("val", val)):
        try:
            counts = generate(args.out, split, count, args.seed + SPLIT_SEED_OFFSETS[split],
                              args.frames, args.workers, progress=not args.no_progress,
                              questions_per_type=args.questions_per_type)
        except (ValueError, OSError) as error:             # bad --frames, unwritable --out, ...
            raise SystemExit(f"error: {error}") from None
        print(f"{split}: {count} scenes -> " + ", ".join(f"{n} {t}" for t, n in counts.items())
              + f" records in {os.path.join(args.out, split)}")


if __name__ == "__main__":
    main()
