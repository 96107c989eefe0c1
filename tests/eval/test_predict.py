"""scripts/predict.py (oanet_jax.predict.main) on one image from a saved checkpoint; the console
shows the result, not the orbax / absl INFO lines."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from eval_setup import SIZE, save_variables_checkpoint
from PIL import Image

from oanet_jax.data import synthetic
from oanet_jax.panoptic import visualize as vis

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_predict_script(tiny_setup, tmp_path):
    """The CLI end to end: two inputs with the same file name (before the fix the second result
    overwrote the first), a folder argument holding an image, a truncated image and a non-image
    (before the fix: IsADirectoryError, then a bare OSError); the console shows the written PNGs
    on stdout and the summary on stderr, not the orbax / absl INFO lines; exit status 1 for the
    skipped bad file."""
    config, _, variables, root = tiny_setup
    checkpoint = save_variables_checkpoint(variables, tmp_path / "run")
    val = sorted((root / "val" / "images").iterdir())
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    shutil.copy(val[0], inputs / "a" / "img.png")
    shutil.copy(val[1], inputs / "b" / "img.png")  # same name, another image
    bad = _truncated_png(inputs / "b" / "bad.png")
    (inputs / "b" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "predict.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            f"--config.data.root={root}",
            f"--checkpoint={checkpoint}",
            f"--out={out}",
            str(inputs / "a" / "img.png"),
            str(inputs / "b"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # the bad file was skipped
    pngs = [out / "a" / "img_panoptic.png", out / "b" / "img_panoptic.png"]
    assert proc.stdout.strip().splitlines() == [str(p) for p in pngs]
    assert pngs[0].read_bytes() != pngs[1].read_bytes()  # two images' results, both kept
    with Image.open(pngs[0]) as im:
        width, height = im.size
    scale = vis.display_scale(SIZE)
    assert width == 3 * SIZE[1] * scale + 2 * 6  # score | srm | changed pixels
    assert height > SIZE[0] * scale
    segments = json.loads((out / "a" / "img_segments.json").read_text())
    assert set(segments) == {"score", "srm"}
    assert all(s["category_id"] in {c["id"] for c in synthetic.CATEGORIES} for s in segments["srm"])
    assert (out / "b" / "img_segments.json").is_file()
    # The summary: what was written, what was not and why.
    assert f"Predicted 2 of 3 images into {out}." in proc.stderr
    assert f"  {inputs / 'b' / 'img.png'} -> {pngs[1]}" in proc.stderr
    assert f"  {bad}: cannot read the image (OSError: image file is truncated" in proc.stderr
    assert f"  {inputs / 'b' / 'notes.txt'}: not an image file (extension '.txt')" in proc.stderr
    # Quiet console: no absl-formatted INFO line (orbax's restore logs ~50 of them at INFO).
    assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[-3000:]


# ------------------------------------------------------------------ inputs and output names


def _png(path: pathlib.Path, value: int = 0, size: tuple[int, int] = SIZE) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def test_collect_images_expands_folders_and_reports_the_rest(tmp_path):
    """Folders give their images in sorted order; non-images and sub-folders are skipped with a
    reason, a missing path is a failure; each file is taken once (issue 14, item 3)."""
    from oanet_jax.predict import collect_images

    folder = tmp_path / "dir"
    for name in ("b.png", "a.JPG", "notes.json"):
        _png(folder / name) if name != "notes.json" else (folder / name).write_text("{}")
    (folder / "sub").mkdir()
    single = _png(tmp_path / "one.png")
    images, report = collect_images(
        [str(single), str(folder), str(folder / "b.png"), str(tmp_path / "gone.png")]
    )
    assert images == [str(single), str(folder / "a.JPG"), str(folder / "b.png")]
    assert report.failed == [(str(tmp_path / "gone.png"), "no such file or folder")]
    skipped = dict(report.skipped)
    assert skipped[str(folder / "notes.json")] == "not an image file (extension '.json')"
    assert "not searched" in skipped[str(folder / "sub")]
    assert skipped[str(folder / "b.png")] == "given twice; predicted once"
    assert report.written == []


def test_output_names_never_collide():
    """The rule: the path relative to the inputs' common folder without the extension, then the
    first free _2, _3 suffix (case-insensitively) (issue 14, item 2)."""
    from oanet_jax.predict import output_names

    assert output_names(["/d/x.png"]) == ["x"]
    assert output_names(["/d/a/good.jpg", "/d/b/good.png"]) == ["a/good", "b/good"]
    names = output_names(["/d/x.jpg", "/d/x.png", "/d/X.tif", "/d/x_2.png"])
    assert names == ["x", "x_2", "X_3", "x_2_2"]
    assert len({n.casefold() for n in names}) == len(names)


def _truncated_png(path: pathlib.Path) -> pathlib.Path:
    _png(path, 50)
    path.write_bytes(path.read_bytes()[:60])  # cut inside the image data
    return path


def test_predict_images_fails_on_a_bad_file_with_fail(tiny_setup, tmp_path):
    """on_bad_image='fail': the run stops at the unreadable file, naming it (before the fix:
    a bare `OSError: image file is truncated`). The file comes first: nothing is compiled."""
    from oanet_jax.predict import BadImageError, load_category_table, predict_images

    config, model, variables, _ = tiny_setup
    table = load_category_table(config.data)
    bad = _truncated_png(tmp_path / "bad.png")
    with pytest.raises(BadImageError, match=r"bad\.png: cannot read the image .*truncated") as err:
        predict_images(
            config,
            model,
            variables,
            [str(bad)],
            str(tmp_path / "o"),
            table=table,
            on_bad_image="fail",
        )
    assert err.value.report.written == [] and err.value.path == str(bad)
    assert err.value.report.failed[0][0] == str(bad)
