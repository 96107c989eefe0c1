"""Reference implementations shared by several test files (numpy / torch oracles, generators).

Imported as ``from oracles import ...`` (pytest puts tests/ on sys.path: it holds the root
conftest.py).
"""

from __future__ import annotations

import numpy as np


def grid_sample_crop(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Oracle: torch grid_sample (bilinear, zeros, align_corners=False) at box-frame points."""
    import torch
    import torch.nn.functional as F

    n, h, w = masks.shape
    frac = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    b = torch.as_tensor(boxes, dtype=torch.float64)
    xs = b[:, 0:1] + frac[None] * (b[:, 2:3] - b[:, 0:1])  # [N, S] image x coordinates
    ys = b[:, 1:2] + frac[None] * (b[:, 3:4] - b[:, 1:2])
    gx = xs / w * 2 - 1
    gy = ys / h * 2 - 1
    grid = torch.stack(
        [gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1
    )
    src = torch.as_tensor(np.ascontiguousarray(masks), dtype=torch.float64)[:, None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].numpy()


def blocky_ids(rng, shape, num_ids, block=4):
    """int64 [H, W] map of piecewise-constant ids (blocks of `block` pixels), 0 included."""
    ids = np.concatenate([[0], rng.choice(np.arange(1, 1 << 24), num_ids - 1, replace=False)])
    h, w = shape
    small = rng.choice(ids, ((h + block - 1) // block, (w + block - 1) // block))
    return np.kron(small, np.ones((block, block), np.int64))[:h, :w]


def loop_areas_boxes(id_map):
    out = {}
    for i in np.unique(id_map):
        if i == 0:
            continue
        ys, xs = np.nonzero(id_map == i)
        box = [
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        ]
        out[int(i)] = (len(ys), box)
    return out
