"""Drawing panoptic predictions (numpy + PIL ImageDraw; no JAX).

A panel is the RGB image blended with one colour per segment (stuff: its category colour from the
`CategoryTable`; thing instances: the category colour, nudged per instance so that two instances of
one class never share a colour), void pixels dimmed, instance outlines in white, stuff borders in
dark grey, and a text label per segment (category name, plus the detection score for things).
`side_by_side` puts panels next to each other (e.g. score order vs SRM order, with
`difference_panel` showing the pixels whose segment changed).

Segments are COCO ``segments_info`` dicts: ``id``, ``category_id`` (DATASET id), optional
``score``. Colours are keyed by segment id, so one `segment_colors` dict shared by several panels
of the same image gives each instance the same colour in every panel (the merge gives detection
slot d the id d + 1 whatever the ordering).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from oanet_jax.data.coco_panoptic import CategoryTable

__all__ = [
    "add_title",
    "boundaries",
    "difference_panel",
    "display_scale",
    "render_panoptic",
    "segment_colors",
    "side_by_side",
    "upscale",
]

Color = tuple[int, int, int]

VOID_DIM = 0.45  # void pixels: the image times this
THING_OUTLINE: Color = (255, 255, 255)
STUFF_OUTLINE: Color = (40, 40, 40)
CHANGED: Color = (255, 0, 255)
_MIN_COLOR_DISTANCE = 48  # L1 distance between two segments' colours in one image


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def segment_colors(segments: Iterable[Mapping[str, Any]], table: CategoryTable) -> dict[int, Color]:
    """A distinct colour for every segment id.

    Segments are visited by ascending id. Each gets its category colour when no segment visited
    before has a colour within L1 distance 48 of it; otherwise a deterministic random nudge of the
    category colour (seeded by the segment id and the attempt) that is far enough from all colours
    taken so far (after 64 attempts the last candidate is kept).

    Args:
      segments: segments_info dicts ('id', 'category_id' DATASET id); duplicates by id are
        allowed (e.g. the union of two panels' segments), the first one counts.
      table: the category table.

    Returns:
      {segment id: (r, g, b)}.
    """
    by_id: dict[int, Mapping[str, Any]] = {}
    for seg in segments:
        by_id.setdefault(int(seg["id"]), seg)
    colors: dict[int, Color] = {}
    taken: list[np.ndarray] = []
    for sid in sorted(by_id):
        base = np.asarray(table.colors[table.to_contiguous(by_id[sid]["category_id"])], np.int64)
        candidate = base
        for attempt in range(64):
            if attempt:
                rng = np.random.default_rng([sid, attempt])
                candidate = np.clip(base + rng.integers(-90, 91, size=3), 0, 255)
            if all(np.abs(candidate - t).sum() >= _MIN_COLOR_DISTANCE for t in taken):
                break
        taken.append(candidate)
        colors[sid] = (int(candidate[0]), int(candidate[1]), int(candidate[2]))
    return colors


def boundaries(id_map: np.ndarray) -> np.ndarray:
    """Pixels on a segment border (4-neighbourhood: a right or lower neighbour differs).

    Both pixels of a differing pair are marked.

    Args:
      id_map: [H, W] integer ids.

    Returns:
      bool [H, W].
    """
    id_map = np.asarray(id_map)
    edge = np.zeros(id_map.shape, bool)
    dx = id_map[:, 1:] != id_map[:, :-1]
    dy = id_map[1:, :] != id_map[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of the first two axes by an integer factor."""
    if factor == 1:
        return np.asarray(array)
    return np.repeat(np.repeat(np.asarray(array), factor, axis=0), factor, axis=1)


def display_scale(shape: Sequence[int], min_side: int = 384) -> int:
    """Integer upscaling factor that brings the shorter side of ``shape`` (H, W) to min_side."""
    return max(1, -(-int(min_side) // max(1, min(int(shape[0]), int(shape[1])))))


def _anchor(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel nearest to the mask's centroid."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[k]), int(ys[k])


def render_panoptic(
    image: np.ndarray,
    id_map: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    table: CategoryTable,
    *,
    colors: Mapping[int, Color] | None = None,
    alpha: float = 0.55,
    labels: bool = True,
    outlines: bool = True,
    scale: int = 1,
    title: str | None = None,
    font_size: int = 12,
) -> np.ndarray:
    """Draws a panoptic segmentation over its image.

    Args:
      image: uint8 [H, W, 3] RGB.
      id_map: [H, W] integer segment ids (0 = void; ids without a segment are drawn as void).
      segments_info: segments ('id', 'category_id' DATASET id, optional 'score').
      table: the category table (names and colours).
      colors: {segment id: colour} (default `segment_colors(segments_info, table)`).
      alpha: weight of the segment colour in the blend.
      labels: draw a text label per segment ("name" or "name 0.87").
      outlines: draw segment borders (instances white, stuff dark grey).
      scale: integer upscaling before drawing (small images stay legible).
      title: optional title bar (see `add_title`).
      font_size: label font size in pixels.

    Returns:
      uint8 [H * scale (+ title bar), W * scale, 3].
    """
    image = np.asarray(image, np.uint8)
    id_map = np.asarray(id_map)
    if image.shape[:2] != id_map.shape:
        raise ValueError(f"image {image.shape[:2]} and id map {id_map.shape} differ in size")
    if colors is None:
        colors = segment_colors(segments_info, table)
    image = upscale(image, scale)
    id_map = upscale(id_map, scale)
    out = image.astype(np.float32) * VOID_DIM
    thing_ids = []
    for seg in segments_info:
        sid = int(seg["id"])
        mask = id_map == sid
        color = np.asarray(colors[sid], np.float32)
        out[mask] = image[mask].astype(np.float32) * (1.0 - alpha) + color * alpha
        if table.isthing[table.to_contiguous(seg["category_id"])]:
            thing_ids.append(sid)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if outlines:
        edge = boundaries(id_map)
        on_thing = np.isin(id_map, np.asarray(thing_ids, id_map.dtype))
        # A border pixel belongs to an instance outline when it or a neighbour is a thing pixel.
        near_thing = on_thing.copy()
        near_thing[:, 1:] |= on_thing[:, :-1]
        near_thing[:, :-1] |= on_thing[:, 1:]
        near_thing[1:, :] |= on_thing[:-1, :]
        near_thing[:-1, :] |= on_thing[1:, :]
        out[edge & ~near_thing] = STUFF_OUTLINE
        out[edge & near_thing] = THING_OUTLINE
    if labels and segments_info:
        pil = Image.fromarray(out)
        draw = ImageDraw.Draw(pil)
        font = _font(font_size)
        for seg in segments_info:
            mask = id_map == int(seg["id"])
            if not mask.any():
                continue
            name = table.names[table.to_contiguous(seg["category_id"])]
            text = f"{name} {float(seg['score']):.2f}" if "score" in seg else name
            x, y = _anchor(mask)
            left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
            shade = tuple(int(0.45 * c) for c in colors[int(seg["id"])])
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=shade)
            draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")
        out = np.asarray(pil)
    if title is not None:
        out = add_title(out, title, font_size=font_size + 2)
    return out


def add_title(panel: np.ndarray, title: str, font_size: int = 14) -> np.ndarray:
    """Puts a white title bar with black text above a panel.

    Args:
      panel: uint8 [H, W, 3].
      title: the text.
      font_size: pixels.

    Returns:
      uint8 [H + font_size + 8, W, 3].
    """
    panel = np.asarray(panel, np.uint8)
    bar_h = font_size + 8
    bar = Image.new("RGB", (panel.shape[1], bar_h), (255, 255, 255))
    ImageDraw.Draw(bar).text(
        (4, bar_h // 2), title, fill=(0, 0, 0), font=_font(font_size), anchor="lm"
    )
    return np.concatenate([np.asarray(bar), panel], axis=0)


def difference_panel(
    image: np.ndarray,
    id_map_a: np.ndarray,
    id_map_b: np.ndarray,
    *,
    scale: int = 1,
    title: str | None = None,
    font_size: int = 12,
) -> np.ndarray:
    """The dimmed image with the pixels whose segment id differs between two maps in magenta.

    Args:
      image: uint8 [H, W, 3].
      id_map_a: [H, W] ids (e.g. score order).
      id_map_b: [H, W] ids (e.g. SRM order); ids of one detection slot agree between orderings.
      scale: integer upscaling.
      title: optional title bar.
      font_size: title font size minus 2.

    Returns:
      uint8 [H * scale (+ title bar), W * scale, 3].
    """
    changed = upscale(np.asarray(id_map_a) != np.asarray(id_map_b), scale)
    out = upscale(np.asarray(image, np.uint8), scale).astype(np.float32) * VOID_DIM
    out[changed] = out[changed] * 0.3 + np.asarray(CHANGED, np.float32) * 0.7
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if title is not None:
        out = add_title(out, title, font_size=font_size + 2)
    return out


def side_by_side(
    panels: Sequence[np.ndarray], gap: int = 6, background: Color = (255, 255, 255)
) -> np.ndarray:
    """Concatenates panels horizontally (top-aligned, shorter ones padded with the background).

    Args:
      panels: uint8 [Hi, Wi, 3] arrays.
      gap: pixels between panels.
      background: padding colour.

    Returns:
      uint8 [max Hi, sum Wi + gap * (n - 1), 3].
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.empty((height, width, 3), np.uint8)
    out[...] = np.asarray(background, np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out
