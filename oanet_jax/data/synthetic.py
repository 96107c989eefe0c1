"""Synthetic occlusion dataset: a miniature of the problem OANet's spatial ranking module attacks.

The paper (section 3.2) motivates the spatial ranking module with a person wearing a tie: the person
is a large, frequent class and is detected with a high score, the tie is small and rare and scores
lower, so ordering instances by detection score pastes the person over the tie. This module draws
images with the same structure, small enough to train on a CPU:

* Stuff (3 classes, dataset ids 101 "sky", 102 "grass", 103 "wall"): textured background regions
  (sky: gradient + clouds; grass: stripes + noise; wall: bricks with random phase) separated by
  random smooth curves (argmax of smooth random fields). The 2-pixel-wide borders between stuff
  regions are void (segment id 0 in the panoptic PNG).
* Things (4 classes, NON-contiguous dataset ids 1 "person", 2 "car", 3 "ball", 5 "tie"):
  "person" is a large frequent blob (rotated ellipse body + head disc), "car" a medium rounded
  rectangle with windows and wheels, "ball" a small shaded disc, and "tie" a small RARE striped
  diamond that is always placed inside a person's area.
* Occlusion: a tie is always on top of everything (ties never overlap each other), so it covers
  its person and any other person it overlaps: the occlusion order contradicts the class
  frequency, and ordering instances by detection score is often wrong. The other things follow a
  consistent depth rule: the instance whose full mask reaches lower in the image is nearer the
  camera and on top (equal lowest rows: the later placed one on top).
* Two knobs set the benchmark's difficulty (`Knobs`): `near_prob`, the chance that a person, car
  or ball is placed next to an instance of another class (how many instances overlap another
  class), and `depth_consistency`, the chance that a person, car or ball follows the depth rule
  above; otherwise its depth is drawn at random, so its class and position no longer say whether
  it lies on top. Ties stay on top of their person. The defaults (0.18, 1.0) draw exactly the
  dataset of earlier versions.
* Every thing instance keeps at least 30% of its full mask visible and at least
  `max(8, H*W/1000)` visible pixels; placements that would break this (for any instance) are
  redrawn, and dropped after a few tries. Stuff classes with fewer visible pixels become void.

Files written by `generate` (COCO formats):

* `categories.json`: the 7 COCO panoptic category dicts (id, name, supercategory, isthing, color).
* `{train,val}/images/<image_id:012d>.{png,jpg}`: RGB images.
* `{train,val}/panoptic/<image_id:012d>.png`: panoptic PNG, segment id = R + 256 G + 256^2 B of
  the visible (non-overlapping) segments, 0 = void.
* `{train,val}/panoptic.json`: COCO panoptic JSON; each segment's `area` and `bbox` (x, y, w, h)
  are computed from the PNG; `iscrowd` is always 0.
* `{train,val}/instances.json`: COCO instances JSON with the FULL (amodal, overlapping) masks of
  the things as compressed RLE, `area` = mask pixel count, `bbox` = tight xywh box of the full mask,
  `iscrowd` 0; categories = the 4 thing categories.

The annotation `id` of each instance in `instances.json` equals the `id` of its visible segment in
the panoptic PNG/JSON of the same image (these ids are also unique within a split), so the full
mask of an instance and its visible panoptic segment can be matched by id. Segment ids are
`32 * (index + 1) + k` where `index` is the image's position in its split and `k` in 1..31 numbers
the segments of the image (things first). Image ids are `index + 1` for train and
`1_000_000 + index + 1` for val.

Determinism: image `index` of split `split` is drawn from
`numpy.random.default_rng([seed, split_code, index])` (split_code 0 = train, 1 = val), so it does
not depend on the number of images generated, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from oanet_jax.common.files import write_json
from oanet_jax.panoptic.io import id_map_to_rgb

PERSON, CAR, BALL, TIE = 1, 2, 3, 5
SKY, GRASS, WALL = 101, 102, 103
THING_IDS = (PERSON, CAR, BALL, TIE)
STUFF_IDS = (SKY, GRASS, WALL)

CATEGORIES: list[dict[str, Any]] = [
    {"id": PERSON, "name": "person", "supercategory": "person", "isthing": 1,
     "color": [220, 20, 60]},
    {"id": CAR, "name": "car", "supercategory": "vehicle", "isthing": 1, "color": [0, 0, 142]},
    {"id": BALL, "name": "ball", "supercategory": "sports", "isthing": 1,
     "color": [255, 179, 0]},
    {"id": TIE, "name": "tie", "supercategory": "accessory", "isthing": 1,
     "color": [119, 11, 32]},
    {"id": SKY, "name": "sky", "supercategory": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": GRASS, "name": "grass", "supercategory": "plant", "isthing": 0,
     "color": [107, 142, 35]},
    {"id": WALL, "name": "wall", "supercategory": "wall", "isthing": 0,
     "color": [102, 102, 156]},
]  # fmt: skip
CATEGORY_NAMES = {c["id"]: c["name"] for c in CATEGORIES}

SPLIT_CODES = {"train": 0, "val": 1}
VAL_IMAGE_ID_OFFSET = 1_000_000
SEGMENTS_PER_IMAGE = 32  # segment id = SEGMENTS_PER_IMAGE * (index + 1) + k, k in 1..31
MAX_INDEX = (1 << 24) // SEGMENTS_PER_IMAGE - 2  # segment ids must fit in 24 bits (RGB)

MIN_VISIBLE_FRACTION = 0.3
# Per-image instance count distributions (values 0..len-1) and the chance a person wears a tie.
_COUNT_PROBS = {
    PERSON: (0.10, 0.40, 0.35, 0.15),
    CAR: (0.35, 0.45, 0.20),
    BALL: (0.30, 0.40, 0.20, 0.10),
}
_TIE_PROB = 0.2
# Chance that a person/car/ball is placed next to an existing instance of another class (so that
# they overlap); otherwise it is placed where it overlaps nothing, when such a place is found.
_MAX_TRIES = 12


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The benchmark's difficulty (see the module docstring).

    Attributes:
      near_prob: chance that a person/car/ball is placed next to an existing instance of another
        class (so that they overlap); otherwise it is placed where it overlaps nothing, when such a
        place is found. In [0, 1].
      depth_consistency: chance that a person/car/ball follows the depth rule (lower in the image
        = on top); otherwise its depth is a random row. In [0, 1]; 1 draws no extra random number
        (the default dataset is unchanged).
    """

    near_prob: float = 0.18
    depth_consistency: float = 1.0

    def __post_init__(self):
        for name in ("near_prob", "depth_consistency"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"synthetic knob {name} must be in [0, 1], got {value}")

    @classmethod
    def from_config(cls, data: Any) -> Knobs:
        """The knobs of ``config.data`` (``synthetic_near_prob``, ``synthetic_depth_consistency``;
        the defaults where a config has none)."""
        return cls(
            near_prob=float(data.get("synthetic_near_prob", cls.near_prob)),
            depth_consistency=float(data.get("synthetic_depth_consistency", cls.depth_consistency)),
        )


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
    """One generated image with its ground truth (host numpy arrays, full resolution).

    Attributes:
      image: uint8 [H, W, 3] RGB image.
      panoptic: int32 [H, W] visible segment id per pixel, 0 = void.
      segments: COCO panoptic `segments_info` dicts (id, category_id, iscrowd, bbox xywh, area),
        things first (in instance order), then stuff; area and bbox computed from `panoptic`.
      masks: bool [N, H, W] full (amodal, overlapping) masks of the N thing instances.
      instance_ids: int64 [N] segment id of each instance (its visible segment in `panoptic`).
      instance_categories: int32 [N] dataset category id of each instance.
      dropped: number of planned instances dropped because no valid placement was found.
    """

    image: np.ndarray
    panoptic: np.ndarray
    segments: list[dict[str, Any]]
    masks: np.ndarray
    instance_ids: np.ndarray
    instance_categories: np.ndarray
    dropped: int


@dataclasses.dataclass
class _Instance:
    category: int
    mask: np.ndarray  # bool [H, W]
    params: dict[str, Any]
    order: int  # placement order
    host: int = -1  # index of the person a tie sits on
    depth: int = -1  # random depth row (Knobs.depth_consistency); -1: the lowest mask row

    @property
    def zkey(self) -> tuple[int, int, int]:
        """Painter's order (ascending = drawn first): ties last, then by lowest mask row (or the
        instance's random depth row)."""
        if self.depth >= 0:
            return (int(self.category == TIE), self.depth, self.order)
        rows = np.flatnonzero(self.mask.any(axis=1))
        return (int(self.category == TIE), int(rows[-1]), self.order)


# ----------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Smooth value noise, float32 [h, w], roughly unit variance, `cells` cells per side."""
    cy = max(1, int(math.ceil(cells * h / max(h, w))))
    cx = max(1, int(math.ceil(cells * w / max(h, w))))
    grid = rng.standard_normal((cy + 2, cx + 2)).astype(np.float32)
    y = (np.arange(h, dtype=np.float32) + 0.5) * (cy / h) + rng.uniform(0.0, 1.0)
    x = (np.arange(w, dtype=np.float32) + 0.5) * (cx / w) + rng.uniform(0.0, 1.0)
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    fy = y - y0
    fx = x - x0
    fy = (fy * fy * (3 - 2 * fy))[:, None]  # smoothstep
    fx = fx * fx * (3 - 2 * fx)
    rows = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx  # separable bilinear: x, then y
    return (rows[y0] * (1 - fy) + rows[y0 + 1] * fy) * 1.6


def _jitter(rng: np.random.Generator, base: Sequence[float], amount: float) -> np.ndarray:
    return np.asarray(base, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    return yy, xx


def _stripes(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, angle: float, period: float
) -> np.ndarray:
    phase = rng.uniform(0.0, 2 * math.pi)
    return np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)


def _sky_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, _ = _pixel_grid(h, w)
    base = _jitter(rng, (115, 165, 230), 20)
    grad = (1.0 - yy / h)[..., None] * np.asarray([25, 25, 15], np.float32)
    cloud = np.clip(_smooth_noise(rng, h, w, 4) * 0.7 - 0.3, 0, 1)[..., None]
    tex = (base + grad) * (1 - 0.7 * cloud) + 240 * 0.7 * cloud
    return tex + 2.0 * rng.standard_normal((h, w, 1), np.float32)


def _grass_texture(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    yy, xx = _pixel_grid(h, w)
    base = _jitter(rng, (70, 140, 55), 25)
    angle = math.pi / 2 + rng.uniform(-0.6, 0.6)
    stripes = _stripes(rng, yy, xx, angle + math.pi / 2, max(2.5, rng.uniform(0.03, 0.05) * scale))
    tex = base + stripes[..., None] * np.asarray([12, 22, 8], np.float32)
    tex = tex + (_smooth_noise(rng, h, w, 6) * 10)[..., None]
    return tex + 8.0 * rng.standard_normal((h, w, 3), np.float32)


def _wall_texture(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    yy, xx = _pixel_grid(h, w)
    cell_w = max(4.0, rng.uniform(0.07, 0.11) * scale)
    cell_h = cell_w * rng.uniform(0.4, 0.6)
    oy, ox = rng.uniform(0, cell_h), rng.uniform(0, 2 * cell_w)
    row = np.floor((yy + oy) / cell_h)
    col = np.floor((xx + ox + (row % 2) * cell_w / 2) / cell_w)
    tone = ((row + col) % 2)[..., None]
    c1 = _jitter(rng, (150, 95, 75), 30)
    c2 = c1 * rng.uniform(0.7, 0.85)
    tex = c1 * (1 - tone) + c2 * tone
    mortar = (((yy + oy) % cell_h) < 1.0)[..., None]
    tex = np.where(mortar, np.float32(205), tex)
    return tex + 5.0 * rng.standard_normal((h, w, 3), np.float32)


def _stuff_layout(
    rng: np.random.Generator, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Stuff regions: int32 [H, W] index into STUFF_IDS, bool [H, W] void borders, present ids."""
    num = int(rng.choice([1, 2, 3], p=[0.1, 0.4, 0.5]))
    present = sorted(rng.choice(3, size=num, replace=False).tolist())
    yy, _ = _pixel_grid(h, w)
    yn = np.broadcast_to(yy / h, (h, w))
    bias = {0: 2.4 * (0.45 - yn), 1: 2.4 * (yn - 0.55), 2: np.zeros((h, w), np.float32)}
    fields = {c: _smooth_noise(rng, h, w, 2.5) + bias[c] for c in present}
    while True:
        stack = np.stack([fields[c] for c in present])
        label = np.asarray(present, np.int32)[np.argmax(stack, axis=0)]
        if len(present) == 1:
            break
        areas = {c: int((label == c).sum()) for c in present}
        smallest = min(present, key=lambda c: areas[c])
        if areas[smallest] >= 0.06 * h * w:
            break
        present.remove(smallest)
    void = np.zeros((h, w), bool)
    dx = label[:, 1:] != label[:, :-1]
    dy = label[1:, :] != label[:-1, :]
    void[:, 1:] |= dx
    void[:, :-1] |= dx
    void[1:, :] |= dy
    void[:-1, :] |= dy
    return label, void, tuple(STUFF_IDS[c] for c in present)


# ------------------------------------------------------------------------------- shapes


def _local(
    h: int, w: int, cy: float, cx: float, extent: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Window around (cy, cx) clipped to the image, with pixel-centre offsets dy [h', 1], dx."""
    y0 = max(0, int(math.floor(cy - extent)))
    y1 = min(h, int(math.ceil(cy + extent)) + 1)
    x0 = max(0, int(math.floor(cx - extent)))
    x1 = min(w, int(math.ceil(cx + extent)) + 1)
    y1, x1 = max(y1, y0), max(x1, x0)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    return (slice(y0, y1), slice(x0, x1)), dy, dx


def _rotate(dy: np.ndarray, dx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u across, v along) in a frame rotated by `angle` (v = down when angle=0)."""
    c, s = math.cos(angle), math.sin(angle)
    return dx * c - dy * s, dy * c + dx * s


def _person_parts(p: dict[str, Any], h: int, w: int) -> tuple[Any, ...]:
    extent = p["ry"] + 2.2 * p["rh"] + 2
    sl, dy, dx = _local(h, w, p["cy"], p["cx"], extent)
    u, v = _rotate(dy, dx, p["angle"])
    body = (u / p["rx"]) ** 2 + (v / p["ry"]) ** 2 <= 1.0
    head = u**2 + (v + p["ry"] + 0.7 * p["rh"]) ** 2 <= p["rh"] ** 2
    return sl, body, head, u, v


def _car_parts(p: dict[str, Any], h: int, w: int) -> tuple[Any, ...]:
    hw, hh, r = p["w"] / 2, p["h"] / 2, p["r"]
    extent = max(hw, hh + p["rw"]) + 2
    sl, dy, dx = _local(h, w, p["cy"], p["cx"], extent)
    qx = np.maximum(np.abs(dx) - (hw - r), 0)
    qy = np.maximum(np.abs(dy) - (hh - r), 0)
    body = (qx**2 + qy**2 <= r * r) & (np.abs(dx) <= hw) & (np.abs(dy) <= hh)
    wy = hh
    wheels = ((dx + 0.55 * hw) ** 2 + (dy - wy) ** 2 <= p["rw"] ** 2) | (
        (dx - 0.55 * hw) ** 2 + (dy - wy) ** 2 <= p["rw"] ** 2
    )
    window = (dy < -0.15 * hh) & (dy > -0.8 * hh) & (np.abs(dx) < 0.75 * hw)
    return sl, body, wheels, window, dy, dx


def _ball_parts(p: dict[str, Any], h: int, w: int) -> tuple[Any, ...]:
    sl, dy, dx = _local(h, w, p["cy"], p["cx"], p["r"] + 1)
    d2 = dy**2 + dx**2
    return sl, d2 <= p["r"] ** 2, dy, dx


def _tie_parts(p: dict[str, Any], h: int, w: int) -> tuple[Any, ...]:
    sl, dy, dx = _local(h, w, p["cy"], p["cx"], max(p["a"], p["b"]) + 1)
    u, v = _rotate(dy, dx, p["angle"])
    inside = np.abs(u) / p["a"] + np.abs(v) / p["b"] <= 1.0
    return sl, inside, u, v


def _instance_mask(category: int, p: dict[str, Any], h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    if category == PERSON:
        sl, body, head, _, _ = _person_parts(p, h, w)
        mask[sl] = body | head
    elif category == CAR:
        sl, body, wheels, _, _, _ = _car_parts(p, h, w)
        mask[sl] = body | wheels
    elif category == BALL:
        sl, disc, _, _ = _ball_parts(p, h, w)
        mask[sl] = disc
    else:
        sl, inside, _, _ = _tie_parts(p, h, w)
        mask[sl] = inside
    return mask


def _instance_texture(
    rng: np.random.Generator, inst: _Instance, h: int, w: int
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Colours float32 [h', w', 3] of an instance over its drawing window."""
    p, cat = inst.params, inst.category
    if cat == PERSON:
        sl, body, head, u, v = _person_parts(p, h, w)
        cloth = p["color"] + (_smooth_noise(rng, *u.shape, 3) * 12)[..., None]
        if p["striped"]:
            cloth = cloth + (np.sign(np.sin(v * (2 * math.pi / p["period"]))) * 18)[..., None]
        tex = np.where(head[..., None], p["skin"], cloth)
    elif cat == CAR:
        sl, body, wheels, window, dy, dx = _car_parts(p, h, w)
        shade = (1.0 - 0.25 * (dy / p["h"] + 0.5))[..., None]
        tex = p["color"] * shade
        tex = np.where(window[..., None], np.asarray([55, 70, 95], np.float32), tex)
        tex = np.where(wheels[..., None] & ~body[..., None], np.float32(28), tex)
    elif cat == BALL:
        sl, _, dy, dx = _ball_parts(p, h, w)
        d = np.sqrt((dy + 0.35 * p["r"]) ** 2 + (dx + 0.35 * p["r"]) ** 2) / (1.6 * p["r"])
        tex = p["color"] * (1.15 - 0.6 * np.clip(d, 0, 1))[..., None]
    else:
        sl, _, u, v = _tie_parts(p, h, w)
        stripe = (np.sin((u + v) * (2 * math.pi / p["period"])) > 0)[..., None]
        tex = np.where(stripe, p["color"], p["color2"])
    return sl, tex


# ----------------------------------------------------------------------------- placement


def _sample_params(
    rng: np.random.Generator,
    category: int,
    h: int,
    w: int,
    center: tuple[float, float] | None,
) -> dict[str, Any]:
    """Shape, colour and position of a person, car or ball (position from `center` if given)."""
    s = float(min(h, w))
    if category == PERSON:
        ry = rng.uniform(0.16, 0.27) * s
        rx = ry * rng.uniform(0.38, 0.55)
        p = {
            "ry": ry,
            "rx": rx,
            "rh": rx * rng.uniform(0.55, 0.75),
            "angle": rng.uniform(-0.25, 0.25),
            "color": _jitter(rng, (190, 100, 80), 60),
            "skin": _jitter(rng, (225, 185, 150), 20),
            "striped": bool(rng.random() < 0.5),
            "period": max(3.0, rng.uniform(0.05, 0.08) * s),
        }
        lo_y, hi_y = ry + 1.2 * p["rh"], h - ry * 0.5
        lo_x, hi_x = rx, w - rx
    elif category == CAR:
        cw = rng.uniform(0.24, 0.38) * s
        ch = cw * rng.uniform(0.4, 0.55)
        p = {
            "w": cw,
            "h": ch,
            "r": 0.3 * ch,
            "rw": 0.22 * ch,
            "color": rng.uniform(30, 230, 3).astype(np.float32),
        }
        lo_y, hi_y = ch / 2, h - ch / 2 - p["rw"]
        lo_x, hi_x = cw * 0.3, w - cw * 0.3
    else:
        r = rng.uniform(0.035, 0.06) * s
        palette = ((235, 215, 60), (240, 240, 235), (240, 140, 40), (200, 60, 50))
        p = {"r": r, "color": _jitter(rng, palette[int(rng.integers(4))], 20)}
        lo_y, hi_y, lo_x, hi_x = r, h - r, r, w - r
    if center is None:
        p["cy"] = rng.uniform(lo_y, max(lo_y, hi_y))
        p["cx"] = rng.uniform(lo_x, max(lo_x, hi_x))
    else:
        p["cy"] = float(np.clip(center[0], lo_y, max(lo_y, hi_y)))
        p["cx"] = float(np.clip(center[1], lo_x, max(lo_x, hi_x)))
    return p


def _sample_tie(rng: np.random.Generator, person: dict[str, Any], shrink: float) -> dict[str, Any]:
    """A tie hanging in the upper-middle part of a person's body."""
    a = rng.uniform(0.3, 0.45) * person["rx"] * shrink
    b = a * rng.uniform(2.0, 2.8)
    u = rng.uniform(-0.15, 0.15) * person["rx"]
    v = rng.uniform(-0.5, 0.1) * person["ry"]
    c, s = math.cos(person["angle"]), math.sin(person["angle"])
    color = rng.uniform(20, 235, 3).astype(np.float32)
    return {
        "a": max(a, 1.6),
        "b": max(b, 3.5),
        "angle": person["angle"] + rng.uniform(-0.15, 0.15),
        "cy": person["cy"] + (-u * s + v * c),
        "cx": person["cx"] + (u * c + v * s),
        "color": color,
        "color2": np.clip(color * rng.uniform(0.3, 0.6) + rng.uniform(0, 80), 0, 255),
        "period": rng.uniform(2.5, 4.0),
    }


def _compose(instances: list[_Instance], h: int, w: int) -> np.ndarray:
    """Index of the visible instance per pixel, int32 [H, W], -1 where no instance."""
    owner = np.full((h, w), -1, np.int32)
    for i in sorted(range(len(instances)), key=lambda k: instances[k].zkey):
        owner[instances[i].mask] = i
    return owner


def _all_visible(instances: list[_Instance], h: int, w: int, min_pixels: int) -> bool:
    owner = _compose(instances, h, w)
    counts = np.bincount(owner.ravel() + 1, minlength=len(instances) + 1)[1:]
    for inst, count in zip(instances, counts, strict=True):
        if count < min_pixels or count < MIN_VISIBLE_FRACTION * inst.mask.sum():
            return False
    return True


def _overlaps(mask: np.ndarray, others: list[_Instance]) -> bool:
    return any((mask & o.mask).any() for o in others)


def _place_instances(
    rng: np.random.Generator, h: int, w: int, min_pixels: int, knobs: Knobs
) -> tuple[list[_Instance], int]:
    plan = []
    for cat, probs in _COUNT_PROBS.items():
        plan += [cat] * int(rng.choice(len(probs), p=probs))
    plan = [plan[i] for i in rng.permutation(len(plan))]
    instances: list[_Instance] = []
    dropped = 0
    for cat in plan:
        wants_tie = cat == PERSON and rng.random() < _TIE_PROB
        others = [o for o in instances if o.category != cat]
        near = bool(others) and rng.random() < knobs.near_prob
        depth = -1
        if knobs.depth_consistency < 1.0 and rng.random() >= knobs.depth_consistency:
            depth = int(rng.integers(h))
        placed = None
        for attempt in range(_MAX_TRIES):
            center = None
            if near:
                target = others[int(rng.integers(len(others)))]
                ys, xs = np.nonzero(target.mask)
                k = int(rng.integers(len(ys)))
                center = (float(ys[k]), float(xs[k]))
            p = _sample_params(rng, cat, h, w, center)
            mask = _instance_mask(cat, p, h, w)
            if mask.sum() < min_pixels:
                continue
            # 'far' placements avoid every instance while tries remain (the last try is free).
            if not near and attempt < _MAX_TRIES - 1 and _overlaps(mask, instances):
                continue
            cand = _Instance(cat, mask, p, len(instances), depth=depth)
            if _all_visible([*instances, cand], h, w, min_pixels):
                placed = cand
                break
        if placed is None:
            dropped += 1 + int(wants_tie)
            continue
        instances.append(placed)
        if wants_tie:
            host = len(instances) - 1
            tie = None
            for attempt in range(_MAX_TRIES):
                p = _sample_tie(rng, placed.params, 0.85 ** (attempt // 3))
                mask = _instance_mask(TIE, p, h, w)
                if mask.sum() < min_pixels or (mask & ~placed.mask).any():
                    continue  # a tie lies inside its person
                if _overlaps(mask, [o for o in instances if o.category == TIE]):
                    continue  # ties never overlap each other, so they are on top of every person
                cand = _Instance(TIE, mask, p, len(instances), host=host)
                if _all_visible([*instances, cand], h, w, min_pixels):
                    tie = cand
                    break
            if tie is None:
                dropped += 1
            else:
                instances.append(tie)
    return instances, dropped


# ---------------------------------------------------------------------------------- images


def _bbox_xywh(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] + 1 - cols[0]), int(rows[-1] + 1 - rows[0])]


def segment_id(index: int, k: int) -> int:
    """Panoptic segment id (= instance annotation id) of segment `k` (1..31) of image `index`."""
    if not 1 <= k < SEGMENTS_PER_IMAGE:
        raise ValueError(f"segment number {k} out of range 1..{SEGMENTS_PER_IMAGE - 1}")
    return SEGMENTS_PER_IMAGE * (index + 1) + k


def image_id(split: str, index: int) -> int:
    """COCO image id of image `index` of `split` ('train' or 'val')."""
    return index + 1 + (VAL_IMAGE_ID_OFFSET if split == "val" else 0)


def generate_example(
    seed: int,
    split: str,
    index: int,
    size: tuple[int, int] = (128, 128),
    knobs: Knobs = Knobs(),
) -> SyntheticExample:
    """Draws image `index` of `split` (deterministic in (seed, split, index, size, knobs)).

    Args:
      seed: non-negative integer seed of the dataset.
      split: 'train' or 'val'.
      index: position of the image in its split (0-based, < MAX_INDEX).
      size: (H, W) of the image.
      knobs: the benchmark's difficulty.

    Returns:
      A `SyntheticExample` (see its docstring for shapes and dtypes).
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"image index {index} out of range 0..{MAX_INDEX}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    h, w = int(size[0]), int(size[1])
    if min(h, w) < 32:
        raise ValueError(f"image size must be at least 32x32, got {size}")
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    scale = float(min(h, w))
    min_pixels = max(8, (h * w) // 1000)

    label, void, present = _stuff_layout(rng, h, w)
    textures = {SKY: _sky_texture, GRASS: _grass_texture, WALL: _wall_texture}
    image = np.zeros((h, w, 3), np.float32)
    for c, sid in enumerate(STUFF_IDS):
        if sid in present:
            fn: Callable[..., np.ndarray] = textures[sid]
            tex = fn(rng, h, w) if sid == SKY else fn(rng, h, w, scale)
            image = np.where((label == c)[..., None], tex, image)

    instances, dropped = _place_instances(rng, h, w, min_pixels, knobs)
    order = sorted(range(len(instances)), key=lambda k: instances[k].zkey)
    for i in order:
        sl, tex = _instance_texture(rng, instances[i], h, w)
        local = instances[i].mask[sl][..., None]
        image[sl] = np.where(local, tex, image[sl])
    image = image + 2.0 * rng.standard_normal(image.shape, np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    owner = _compose(instances, h, w)
    panoptic = np.zeros((h, w), np.int32)
    segments = []
    k = 0
    for i, inst in enumerate(instances):
        k += 1
        sid = segment_id(index, k)
        visible = owner == i
        panoptic[visible] = sid
        segments.append({"id": sid, "category_id": inst.category, "iscrowd": 0, "visible": visible})
    free = (owner < 0) & ~void
    for c, cat in enumerate(STUFF_IDS):
        region = free & (label == c)
        if cat not in present or region.sum() < min_pixels:
            continue
        k += 1
        sid = segment_id(index, k)
        panoptic[region] = sid
        segments.append({"id": sid, "category_id": cat, "iscrowd": 0, "visible": region})
    for seg in segments:
        visible = seg.pop("visible")
        seg["bbox"] = _bbox_xywh(visible)
        seg["area"] = int(visible.sum())

    masks = np.stack([inst.mask for inst in instances]) if instances else np.zeros((0, h, w), bool)
    return SyntheticExample(
        image=image,
        panoptic=panoptic,
        segments=segments,
        masks=masks,
        instance_ids=np.asarray([s["id"] for s in segments[: len(instances)]], np.int64),
        instance_categories=np.asarray([inst.category for inst in instances], np.int32),
        dropped=dropped,
    )


def overlap_flags(masks: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Whether each instance's full mask overlaps the full mask of an instance of another class.

    Args:
      masks: bool [N, H, W] full (amodal) instance masks.
      categories: int [N] category ids.

    Returns:
      bool [N].
    """
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0,), bool)
    flat = masks.reshape(n, -1).astype(np.float32)
    inter = flat @ flat.T > 0
    cats = np.asarray(categories)
    return (inter & (cats[:, None] != cats[None, :])).any(axis=1)


def _write_split(
    out_dir: str,
    split: str,
    num: int,
    seed: int,
    size: tuple[int, int],
    image_format: str,
    knobs: Knobs,
) -> dict[str, Any]:
    split_dir = os.path.join(out_dir, split)
    image_dir = os.path.join(split_dir, "images")
    pan_dir = os.path.join(split_dir, "panoptic")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(pan_dir, exist_ok=True)
    ext = "jpg" if image_format == "jpg" else "png"
    images, pan_anns, inst_anns = [], [], []
    counts = dict.fromkeys((CATEGORY_NAMES[t] for t in THING_IDS), 0)
    stuff_segments = dict.fromkeys((CATEGORY_NAMES[s] for s in STUFF_IDS), 0)
    num_overlapping = num_instances = dropped = void_pixels = 0
    for index in range(num):
        ex = generate_example(seed, split, index, size, knobs)
        iid = image_id(split, index)
        name = f"{iid:012d}"
        h, w = ex.panoptic.shape
        if ext == "jpg":
            Image.fromarray(ex.image).save(os.path.join(image_dir, f"{name}.jpg"), quality=92)
        else:
            Image.fromarray(ex.image).save(os.path.join(image_dir, f"{name}.png"))
        Image.fromarray(id_map_to_rgb(ex.panoptic)).save(os.path.join(pan_dir, f"{name}.png"))
        images.append({"id": iid, "file_name": f"{name}.{ext}", "height": h, "width": w})
        pan_anns.append({"image_id": iid, "file_name": f"{name}.png", "segments_info": ex.segments})
        for sid, cat, mask in zip(ex.instance_ids, ex.instance_categories, ex.masks, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            inst_anns.append(
                {
                    "id": int(sid),
                    "image_id": iid,
                    "category_id": int(cat),
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask.sum()),
                    "bbox": _bbox_xywh(mask),
                    "iscrowd": 0,
                }
            )
        for seg in ex.segments:
            name_ = CATEGORY_NAMES[seg["category_id"]]
            if seg["category_id"] in STUFF_IDS:
                stuff_segments[name_] += 1
            else:
                counts[name_] += 1
        flags = overlap_flags(ex.masks, ex.instance_categories)
        num_overlapping += int(flags.sum())
        num_instances += len(flags)
        dropped += ex.dropped
        void_pixels += int((ex.panoptic == 0).sum())
    info = {"description": "oanet_jax synthetic occlusion dataset", "version": "1.0",
            "seed": seed, "split": split, **dataclasses.asdict(knobs)}  # fmt: skip
    write_json(
        os.path.join(split_dir, "panoptic.json"),
        {"info": info, "licenses": [], "images": images, "annotations": pan_anns,
         "categories": CATEGORIES},
    )  # fmt: skip
    thing_cats = [
        {k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES if c["isthing"]
    ]
    write_json(
        os.path.join(split_dir, "instances.json"),
        {"info": info, "licenses": [], "images": images, "annotations": inst_anns,
         "categories": thing_cats},
    )  # fmt: skip
    return {
        "num_images": num,
        "num_instances": num_instances,
        "num_overlapping": num_overlapping,
        "instances_per_class": counts,
        "stuff_segments_per_class": stuff_segments,
        "dropped_instances": dropped,
        "void_fraction": void_pixels / max(1, num * size[0] * size[1]),
    }


def generate(
    out_dir: str,
    num_images: int,
    num_val_images: int,
    seed: int,
    size: tuple[int, int] = (128, 128),
    image_format: str = "png",
    knobs: Knobs = Knobs(),
) -> dict[str, Any]:
    """Writes the synthetic dataset (train and val splits) under `out_dir`.

    See the module docstring for the layout. Instance annotation ids in `instances.json` equal the
    panoptic segment ids of the instances' visible segments.

    Args:
      out_dir: output folder (created if needed; existing files are overwritten).
      num_images: number of training images.
      num_val_images: number of validation images.
      seed: non-negative integer seed; the same arguments give byte-identical files.
      size: (H, W) of the images, each at least 32.
      image_format: 'png' or 'jpg' for the RGB images (panoptic PNGs are always PNG).
      knobs: the benchmark's difficulty (recorded in the JSONs' ``info``).

    Returns:
      Statistics: `train`/`val` per-split dicts (num_images, num_instances, num_overlapping,
      instances_per_class, stuff_segments_per_class, dropped_instances, void_fraction) and the
      totals `overlap_fraction` (fraction of thing instances whose full mask overlaps an instance
      of a different class), `instances_per_class` and `seconds` (wall time).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    for name, n in (("num_images", num_images), ("num_val_images", num_val_images)):
        if not 0 <= n <= MAX_INDEX + 1:
            raise ValueError(f"{name} must be in 0..{MAX_INDEX + 1}, got {n}")
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "categories.json"), CATEGORIES)
    size = (int(size[0]), int(size[1]))
    stats: dict[str, Any] = {
        "train": _write_split(out_dir, "train", num_images, seed, size, image_format, knobs),
        "val": _write_split(out_dir, "val", num_val_images, seed, size, image_format, knobs),
    }
    total = stats["train"]["num_instances"] + stats["val"]["num_instances"]
    overlapping = stats["train"]["num_overlapping"] + stats["val"]["num_overlapping"]
    stats["overlap_fraction"] = overlapping / max(1, total)
    stats["instances_per_class"] = {
        k: stats["train"]["instances_per_class"][k] + stats["val"]["instances_per_class"][k]
        for k in stats["train"]["instances_per_class"]
    }
    stats["seconds"] = time.perf_counter() - start
    return stats


# ------------------------------------------------------------------------------ command line


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(
        description="Writes the synthetic occlusion dataset in COCO panoptic format."
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, required=True, help="number of training images")
    p.add_argument(
        "--num-val-images", type=int, default=None, help="validation images (default max(1, N//10))"
    )
    p.add_argument("--seed", type=int, default=0, help="non-negative dataset seed")
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="RGB image format")
    p.add_argument("--near-prob", type=float, default=Knobs.near_prob, help="see synthetic.Knobs")
    p.add_argument(
        "--depth-consistency",
        type=float,
        default=Knobs.depth_consistency,
        help="see synthetic.Knobs",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """`oanet-make-synthetic`: generates the dataset and prints a summary; returns the statistics.

    Example (the layout `configs/synthetic.py` expects)::

        oanet-make-synthetic --out data/synthetic --num-images 1000 --seed 0 --size 128 128
    """
    args = _parse_args(argv)
    num_val = (
        args.num_val_images if args.num_val_images is not None else max(1, args.num_images // 10)
    )
    knobs = Knobs(near_prob=args.near_prob, depth_consistency=args.depth_consistency)
    stats = generate(
        args.out, args.num_images, num_val, args.seed, tuple(args.size), args.format, knobs
    )
    h, w = args.size
    print(f"wrote {args.out}: {args.num_images} train + {num_val} val images of {h}x{w}")
    for split in ("train", "val"):
        s = stats[split]
        per_class = ", ".join(f"{k} {v}" for k, v in s["instances_per_class"].items())
        stuff = ", ".join(f"{k} {v}" for k, v in s["stuff_segments_per_class"].items())
        print(
            f"  {split}: {s['num_instances']} thing instances ({per_class}); "
            f"stuff segments ({stuff}); dropped placements {s['dropped_instances']}; "
            f"void pixels {100 * s['void_fraction']:.1f}%"
        )
    total = sum(stats["instances_per_class"].values())
    print(
        "  instances per class: "
        + ", ".join(
            f"{k} {v} ({100 * v / max(1, total):.1f}%)"
            for k, v in stats["instances_per_class"].items()
        )
    )
    print(
        f"  instances overlapping another class: {100 * stats['overlap_fraction']:.1f}% "
        f"(target 20-40%)"
    )
    print(f"  time: {stats['seconds']:.1f} s")
    return stats
