"""Panoptic visualisation: sizes, distinct colours, labels, outlines, difference panel."""

from __future__ import annotations

import numpy as np

from oanet_jax.data import synthetic
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.panoptic import visualize as vis


def test_render_panoptic_sizes_colours_labels_and_outlines():
    table = CategoryTable.from_categories(synthetic.CATEGORIES)
    image = np.full((40, 60, 3), 128, np.uint8)
    id_map = np.zeros((40, 60), np.int32)
    id_map[:, :] = 9  # sky
    id_map[5:20, 5:25] = 1  # person
    id_map[22:38, 30:55] = 2  # person
    id_map[0:4, 0:60] = 0  # void
    segments = [
        {"id": 1, "category_id": synthetic.PERSON, "score": 0.9},
        {"id": 2, "category_id": synthetic.PERSON, "score": 0.6},
        {"id": 9, "category_id": synthetic.SKY},
    ]
    colors = vis.segment_colors(segments, table)
    assert len(set(colors.values())) == 3
    assert colors[1] == tuple(table.colors[0])  # the first person keeps the category colour
    assert colors[9] == tuple(table.colors[table.to_contiguous(synthetic.SKY)])

    plain = vis.render_panoptic(image, id_map, segments, table, labels=False, outlines=False)
    assert plain.shape == (40, 60, 3) and plain.dtype == np.uint8
    interior = {
        sid: tuple(plain[y, x]) for sid, (y, x) in {1: (12, 15), 2: (30, 42), 9: (30, 10)}.items()
    }
    assert len(set(interior.values())) == 3
    assert tuple(plain[1, 1]) == (58, 58, 58)  # void: the image dimmed
    expected = np.round(128 * 0.45 + np.asarray(colors[1]) * 0.55)
    np.testing.assert_allclose(plain[12, 15], expected, atol=1)

    full = vis.render_panoptic(image, id_map, segments, table, scale=3, title="score order")
    assert full.shape[1:] == (180, 3) and full.shape[0] > 120
    body = full[full.shape[0] - 120 :]
    assert tuple(body[3 * 5, 3 * 10]) == vis.THING_OUTLINE  # top edge of person 1
    labelled = vis.render_panoptic(image, id_map, segments, table, scale=3, outlines=False)
    unlabelled = vis.render_panoptic(
        image, id_map, segments, table, scale=3, outlines=False, labels=False
    )
    assert np.any(labelled != unlabelled)

    diff = vis.difference_panel(image, id_map, np.where(id_map == 2, 9, id_map))
    assert tuple(diff[30, 42]) != tuple(diff[12, 15])
    both = vis.side_by_side([full, diff], gap=5)
    assert both.shape == (full.shape[0], 180 + 5 + 60, 3)
