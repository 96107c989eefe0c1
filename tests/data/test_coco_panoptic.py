"""Tests of the COCO panoptic reader against panopticapi / pycocotools on the real COCO sample,
and of its handling of bad records on corrupted copies of the sample."""

from __future__ import annotations

import collections
import copy
import json
import logging
import pathlib
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from oanet_jax.data import coco_panoptic as cp
from oanet_jax.data.coco_panoptic import CategoryTable, CocoPanopticReader, DataError
from oanet_jax.data.transforms import TransformConfig

rgb2id = pytest.importorskip("panopticapi.utils").rgb2id
COCO = pytest.importorskip("pycocotools.coco").COCO

PAN_JSON = "panoptic_examples.json"
DET_JSON = "panoptic_coco_detection_format.json"
CATS_JSON = "panoptic_coco_categories.json"


def _load(path: pathlib.Path):
    with open(path) as f:
        return json.load(f)


def _contiguous_map(categories: list[dict]) -> tuple[dict[int, int], set[int]]:
    """Independent reference of the id convention: things first, each sorted by dataset id."""
    things = sorted(c["id"] for c in categories if c["isthing"])
    stuff = sorted(c["id"] for c in categories if not c["isthing"])
    return {d: i for i, d in enumerate(things + stuff)}, set(things)


def _reader(sample: pathlib.Path, instances: bool, **kw) -> CocoPanopticReader:
    return CocoPanopticReader(
        sample / "input_images",
        sample / PAN_JSON,
        sample / "panoptic_examples",
        instances_json=sample / DET_JSON if instances else None,
        **kw,
    )


# ---------------------------------------------------------------------------- CategoryTable


def test_category_table_coco(coco_sample_dir):
    cats = _load(coco_sample_dir / CATS_JSON)
    table = CategoryTable.from_categories(cats)
    ref, things = _contiguous_map(cats)
    assert (table.num_classes, table.num_things, table.num_stuff) == (133, 80, 53)
    assert table.isthing == tuple([True] * 80 + [False] * 53)
    by_id = {c["id"]: c for c in cats}
    for d, c in ref.items():
        assert table.to_contiguous(d) == c
        assert table.to_dataset(c) == d
        assert table.names[c] == by_id[d]["name"]
        assert table.colors[c] == tuple(by_id[d]["color"])
        assert table.isthing[c] == (d in things)
    lut = table.lookup_array()
    assert lut.dtype == np.int32 and lut.shape == (max(ref) + 1,)
    for d in range(lut.shape[0]):
        assert lut[d] == ref.get(d, -1)
    with pytest.raises(KeyError, match="unknown dataset category id 12"):
        table.to_contiguous(12)  # 12 is not a COCO panoptic category
    with pytest.raises(IndexError):
        table.to_dataset(133)


def test_category_table_noncontiguous_shuffled():
    cats = [
        {"id": 102, "name": "b", "isthing": 0, "color": [1, 2, 3]},
        {"id": 5, "name": "e", "isthing": 1, "color": [4, 5, 6]},
        {"id": 101, "name": "a", "isthing": 0, "color": [7, 8, 9]},
        {"id": 1, "name": "x", "isthing": 1, "color": [0, 0, 1]},
        {"id": 3, "name": "y", "isthing": 1, "color": [0, 1, 0]},
    ]
    table = CategoryTable.from_categories(cats)
    assert table.dataset_ids == (1, 3, 5, 101, 102)
    assert table.names == ("x", "y", "e", "a", "b")
    assert (table.num_things, table.num_stuff) == (3, 2)
    np.testing.assert_array_equal(table.lookup_array(), [-1, 0, -1, 1, -1, 2] + [-1] * 95 + [3, 4])
    with pytest.raises(ValueError, match="duplicate"):
        CategoryTable.from_categories(cats + [{"id": 5, "isthing": 1}])
    with pytest.raises(ValueError, match="thing categories first"):
        CategoryTable(
            dataset_ids=(1, 2), names=("a", "b"), colors=((0, 0, 0),) * 2, isthing=(False, True)
        )


# ------------------------------------------------------------------------ real COCO sample


def _check_record_against_references(rec, sample: pathlib.Path, instances: bool):
    """Semantic map vs a per-segment loop over panopticapi's rgb2id; instances vs pycocotools."""
    pan = _load(sample / PAN_JSON)
    ref, things = _contiguous_map(_load(sample / CATS_JSON))
    iid = int(rec["image_id"])
    img_rec = next(i for i in pan["images"] if i["id"] == iid)
    ann = next(a for a in pan["annotations"] if a["image_id"] == iid)
    h, w = img_rec["height"], img_rec["width"]

    # Image: exactly what PIL decodes.
    assert rec["file_name"] == img_rec["file_name"]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (h, w, 3)
    np.testing.assert_array_equal(
        rec["image"], np.asarray(Image.open(sample / "input_images" / img_rec["file_name"]))
    )

    # Semantic map: panopticapi's panoptic -> semantic conversion (crowd included), then the
    # contiguous ids; void (id 0) -> 255.
    pan_ids = rgb2id(np.array(Image.open(sample / "panoptic_examples" / ann["file_name"])))
    sem_ref = np.full((h, w), 255, np.uint8)
    for seg in ann["segments_info"]:
        sem_ref[pan_ids == seg["id"]] = ref[seg["category_id"]]
    assert rec["semantic"].dtype == np.uint8
    np.testing.assert_array_equal(rec["semantic"], sem_ref)
    assert (rec["semantic"] == 255).sum() == (pan_ids == 0).sum() > 0
    # Pixel counts per class equal the JSON areas summed per category.
    area_ref = collections.Counter()
    for seg in ann["segments_info"]:
        area_ref[ref[seg["category_id"]]] += seg["area"]
    vals, counts = np.unique(rec["semantic"][rec["semantic"] != 255], return_counts=True)
    assert dict(zip(vals.tolist(), counts.tolist(), strict=True)) == dict(area_ref)

    # Thing instances: pycocotools on the detection-format JSON (the same segments as RLE).
    coco = _COCO_CACHE.setdefault(sample, COCO(str(sample / DET_JSON)))
    det = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[iid])) if a["category_id"] in things]
    segs = [s for s in ann["segments_info"] if s["category_id"] in things]
    n = len(segs)
    assert len(det) == n > 0
    assert rec["masks"].shape == (n, h, w) and rec["masks"].dtype == np.uint8
    assert rec["boxes"].shape == (n, 4) and rec["boxes"].dtype == np.float32
    assert rec["classes"].dtype == np.int32 and rec["is_crowd"].dtype == bool
    assert rec["segment_ids"].dtype == np.int32 and rec["ann_ids"].dtype == np.int64
    assert set(np.unique(rec["masks"]).tolist()) <= {0, 1}
    # Counts of instances per category.
    assert collections.Counter(rec["classes"].tolist()) == collections.Counter(
        ref[s["category_id"]] for s in segs
    )
    assert rec["is_crowd"].sum() == sum(s["iscrowd"] for s in segs) > 0
    if instances:
        np.testing.assert_array_equal(rec["segment_ids"], -1)
        by_id = {a["id"]: a for a in det}
        assert sorted(rec["ann_ids"].tolist()) == sorted(by_id)
        records = [by_id[int(a)] for a in rec["ann_ids"]]
    else:
        np.testing.assert_array_equal(rec["ann_ids"], -1)
        by_seg = {s["id"]: s for s in segs}
        assert sorted(rec["segment_ids"].tolist()) == sorted(by_seg)
        records = [by_seg[int(s)] for s in rec["segment_ids"]]
        # Segment -> detection annotation: same bbox and area (panopticapi's converter).
        pairs = {(tuple(a["bbox"]), a["area"]): a for a in det}
        det_of = [pairs[(tuple(s["bbox"]), s["area"])] for s in records]
        for k, s in enumerate(records):
            np.testing.assert_array_equal(rec["masks"][k], pan_ids == s["id"])
        records = det_of
    for k, a in enumerate(records):
        np.testing.assert_array_equal(rec["masks"][k], coco.annToMask(a))
        assert rec["masks"][k].sum() == a["area"]
        x, y, bw, bh = a["bbox"]
        np.testing.assert_array_equal(rec["boxes"][k], [x, y, x + bw, y + bh])
        assert rec["classes"][k] == ref[a["category_id"]]
        assert rec["is_crowd"][k] == bool(a["iscrowd"])


_COCO_CACHE: dict = {}


@pytest.mark.parametrize("instances", [False, True], ids=["from_png", "from_instances_json"])
def test_real_sample_matches_panopticapi_and_pycocotools(coco_sample_dir, instances, caplog):
    with caplog.at_level(logging.WARNING, logger=cp.__name__):
        reader = _reader(coco_sample_dir, instances, categories=coco_sample_dir / CATS_JSON)
    warned = [r.getMessage() for r in caplog.records if "no instances JSON" in r.getMessage()]
    assert len(warned) == (0 if instances else 1)
    if instances:  # the detection-format JSON also holds the 7 stuff segments: ignored, said so
        assert any("ignoring 7 annotation(s) of stuff" in r.getMessage() for r in caplog.records)
    assert reader.image_ids == [142238, 439180] and len(reader) == 2
    assert reader.categories.num_things == 80
    records = list(reader)
    assert [int(r["image_id"]) for r in records] == [142238, 439180]
    for rec in records:
        _check_record_against_references(rec, coco_sample_dir, instances)
    assert reader.num_skipped == 0 and not reader.summary


def test_both_modes_agree_on_sample(coco_sample_dir):
    """The detection JSON was made from the panoptic PNGs, so both sources give equal instances."""
    a, b = _reader(coco_sample_dir, False), _reader(coco_sample_dir, True)
    for i in range(len(a)):
        ra, rb = a.read(i), b.read(i)
        np.testing.assert_array_equal(ra["semantic"], rb["semantic"])
        np.testing.assert_array_equal(ra["image"], rb["image"])
        # Instances in JSON order in both: segments_info order == detection JSON order here.
        for key in ("masks", "boxes", "classes", "is_crowd"):
            np.testing.assert_array_equal(ra[key], rb[key])


# --------------------------------------------------------------------- a writable dataset


class _DS:
    """A copy of one sample image repeated under ids 1..n, with its JSONs held as dicts."""

    def __init__(self, tmp_path: pathlib.Path, sample: pathlib.Path, n: int, base=142238):
        self.root = tmp_path / "ds"
        for sub in ("images", "panoptic"):
            (self.root / sub).mkdir(parents=True)
        pan = _load(sample / PAN_JSON)
        det = _load(sample / DET_JSON)
        img0 = next(i for i in pan["images"] if i["id"] == base)
        ann0 = next(a for a in pan["annotations"] if a["image_id"] == base)
        det0 = [a for a in det["annotations"] if a["image_id"] == base]
        self.pan = {"images": [], "annotations": [], "categories": pan["categories"]}
        self.inst = {"images": [], "annotations": [], "categories": det["categories"]}
        for k in range(1, n + 1):
            img = dict(img0, id=k, file_name=f"{k:012d}.jpg")
            ann = copy.deepcopy(ann0)
            ann.update(image_id=k, file_name=f"{k:012d}.png")
            shutil.copyfile(sample / "input_images" / img0["file_name"], self.image(k))
            shutil.copyfile(sample / "panoptic_examples" / ann0["file_name"], self.png(k))
            self.pan["images"].append(img)
            self.pan["annotations"].append(ann)
            self.inst["images"].append(dict(img))
            for j, a in enumerate(det0):
                self.inst["annotations"].append(dict(a, image_id=k, id=1000 * k + j))
        things = {c["id"] for c in pan["categories"] if c["isthing"]}
        self.num_things = sum(s["category_id"] in things for s in ann0["segments_info"])

    def image(self, k: int) -> pathlib.Path:
        rec = next((i for i in self.pan["images"] if i["id"] == k), None)
        return self.root / "images" / (rec["file_name"] if rec else f"{k:012d}.jpg")

    def png(self, k: int) -> pathlib.Path:
        return self.root / "panoptic" / f"{k:012d}.png"

    def ann(self, k: int) -> dict:
        return next(a for a in self.pan["annotations"] if a["image_id"] == k)

    def reader(self, instances: bool = False, **kw) -> CocoPanopticReader:
        (self.root / "panoptic.json").write_text(json.dumps(self.pan))
        (self.root / "instances.json").write_text(json.dumps(self.inst))
        return CocoPanopticReader(
            self.root / "images",
            self.root / "panoptic.json",
            self.root / "panoptic",
            instances_json=self.root / "instances.json" if instances else None,
            **kw,
        )


# Corruptions: (name, function(ds, k) -> (file name the error must name, segment/ann id or
# None), reason, needs instances mode).


def _truncate_jpeg(ds, k):
    data = ds.image(k).read_bytes()
    ds.image(k).write_bytes(data[: len(data) // 3])
    return ds.image(k).name, None


def _delete_image(ds, k):
    ds.image(k).unlink()
    return ds.image(k).name, None


def _delete_png(ds, k):
    ds.png(k).unlink()
    return ds.png(k).name, None


def _garbage_png(ds, k):
    ds.png(k).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 50)
    return ds.png(k).name, None


def _edit_segment_id_in_json(ds, k):
    seg = ds.ann(k)["segments_info"][2]
    seg["id"] = 123  # not in the PNG; the old id is now in the PNG but not in the JSON
    return ds.png(k).name, None


def _extra_segment_in_png(ds, k):
    rgb = np.array(Image.open(ds.png(k)))
    rgb[:5, :5] = (7, 1, 0)  # id 263, in no segments_info
    Image.fromarray(rgb).save(ds.png(k))
    return ds.png(k).name, 263


def _unknown_category(ds, k):
    seg = ds.ann(k)["segments_info"][3]
    seg["category_id"] = 9999
    return "panoptic.json", seg["id"]


def _no_annotation(ds, k):
    ds.pan["annotations"].remove(ds.ann(k))
    return "panoptic.json", None


def _json_size_mismatch(ds, k):
    next(i for i in ds.pan["images"] if i["id"] == k)["height"] += 1
    return ds.image(k).name, None


def _png_size_mismatch(ds, k):
    Image.open(ds.png(k)).crop((0, 0, 600, 400)).save(ds.png(k))
    return ds.png(k).name, None


def _instances_unknown_category(ds, k):
    a = next(a for a in ds.inst["annotations"] if a["image_id"] == k)
    a["category_id"] = 9999
    return "instances.json", a["id"]


def _instances_rle_size(ds, k):
    a = next(a for a in ds.inst["annotations"] if a["image_id"] == k)
    a["segmentation"] = dict(a["segmentation"], size=[100, 100])
    return "instances.json", a["id"]


def _instances_missing_image(ds, k):
    ds.inst["images"] = [i for i in ds.inst["images"] if i["id"] != k]
    return "instances.json", None


CORRUPTIONS = [
    (_truncate_jpeg, cp.BAD_IMAGE, False),
    (_delete_image, cp.MISSING_IMAGE, False),
    (_delete_png, cp.MISSING_PNG, False),
    (_garbage_png, cp.BAD_PNG, False),
    (_edit_segment_id_in_json, cp.SEGMENT_MISMATCH, False),
    (_extra_segment_in_png, cp.SEGMENT_MISMATCH, False),
    (_unknown_category, cp.UNKNOWN_CATEGORY, False),
    (_no_annotation, cp.MISSING_ANNOTATION, False),
    (_json_size_mismatch, cp.SIZE_MISMATCH, False),
    (_png_size_mismatch, cp.SIZE_MISMATCH, False),
    (_instances_unknown_category, cp.UNKNOWN_CATEGORY, True),
    (_instances_rle_size, cp.SIZE_MISMATCH, True),
    (_instances_missing_image, cp.MISSING_INSTANCES_RECORD, True),
]


@pytest.mark.parametrize(
    "corrupt,reason,instances", CORRUPTIONS, ids=[c[0].__name__[1:] for c in CORRUPTIONS]
)
def test_bad_record_raises_naming_file_and_record(
    coco_sample_dir, tmp_path, corrupt, reason, instances
):
    ds = _DS(tmp_path, coco_sample_dir, 2)
    fname, rec_id = corrupt(ds, 2)
    reader = ds.reader(instances=instances)
    assert int(reader.read(0)["image_id"]) == 1  # the intact copy reads
    with pytest.raises(DataError) as info:
        reader.read(1)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.reason == reason and err.image_id == 2
    msg = str(err)
    assert fname in msg and "image_id=2" in msg and reason in msg
    if rec_id is not None:
        key = "ann_id" if instances else "segment_id"
        assert f"{key}={rec_id}" in msg
    if corrupt is _edit_segment_id_in_json:
        assert "123" in msg and "segment_id=" in msg  # both sides of the mismatch are named
    with pytest.raises(DataError):
        list(reader)  # iteration raises too when not skipping
    # Skip mode: read still raises, iteration skips and counts.
    skipping = ds.reader(instances=instances, skip_bad_records=True)
    with pytest.raises(DataError):
        skipping.read(1)
    assert [int(r["image_id"]) for r in skipping] == [1]
    assert skipping.summary == collections.Counter({reason: 1})
    assert reason in skipping.summary_line()


def test_error_survives_pickling():
    err = DataError("x", reason=cp.BAD_PNG, path="a/b.png", image_id=3, segment_id=7)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.reason == err.reason and back.segment_id == 7


def test_skip_and_count_every_reason(coco_sample_dir, tmp_path, caplog):
    png_mode = [c for c in CORRUPTIONS if not c[2]]
    n_bad = len(png_mode)
    ds = _DS(tmp_path, coco_sample_dir, n_bad + 4)
    for k, (corrupt, _, _) in enumerate(png_mode, start=1):
        corrupt(ds, k)
    gray, rgba, good = n_bad + 1, n_bad + 2, n_bad + 3
    original = np.asarray(Image.open(ds.image(good)))
    Image.open(ds.image(gray)).convert("L").save(ds.image(gray), quality=95)
    next(i for i in ds.pan["images"] if i["id"] == rgba)["file_name"] = f"{rgba:012d}.png"
    Image.fromarray(np.dstack([original, np.full(original.shape[:2], 77, np.uint8)])).save(
        ds.image(rgba)
    )
    # An annotation with zero segments and an all-void PNG: a valid empty image.
    empty = n_bad + 4
    ds.ann(empty)["segments_info"] = []
    Image.fromarray(np.zeros(original.shape, np.uint8)).save(ds.png(empty))

    reader = ds.reader(skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger=cp.__name__):
        out = {int(r["image_id"]): r for r in reader}
    assert sorted(out) == [gray, rgba, good, empty]
    expected = collections.Counter(r for _, r, _ in png_mode)
    expected.update({"converted_grayscale": 1, "converted_rgba": 1})
    assert reader.summary == expected
    assert reader.num_skipped == n_bad
    skipped_logs = [r for r in caplog.records if "Skipping bad record" in r.getMessage()]
    assert len(skipped_logs) == n_bad  # one line per skipped record
    line = reader.summary_line()
    assert "\n" not in line and f"skipped {n_bad}" in line and "converted 2" in line
    for reason in expected:
        assert reason.replace("converted_", "") in line
    # A second pass counts nothing twice.
    assert len(list(reader)) == 4 and reader.summary == expected

    # Conversions: grayscale replicated to 3 channels; RGBA drops alpha (lossless PNG: exact).
    g = out[gray]["image"]
    assert g.shape == original.shape and g.dtype == np.uint8
    np.testing.assert_array_equal(g[..., 0], np.asarray(Image.open(ds.image(gray))))
    np.testing.assert_array_equal(g[..., 1], g[..., 2])
    np.testing.assert_array_equal(out[rgba]["image"], original)
    for k in (gray, rgba):
        np.testing.assert_array_equal(out[k]["semantic"], out[good]["semantic"])
        np.testing.assert_array_equal(out[k]["masks"], out[good]["masks"])
    # Empty image: all void, zero instances with the right shapes and dtypes.
    e = out[empty]
    h, w = original.shape[:2]
    assert (e["semantic"] == 255).all() and e["semantic"].shape == (h, w)
    assert e["masks"].shape == (0, h, w) and e["masks"].dtype == np.uint8
    assert e["boxes"].shape == (0, 4) and e["boxes"].dtype == np.float32
    assert e["classes"].shape == (0,) and e["classes"].dtype == np.int32
    assert e["is_crowd"].shape == (0,) and e["segment_ids"].shape == (0,)


def test_keep_empty_images_false(coco_sample_dir, tmp_path):
    ds = _DS(tmp_path, coco_sample_dir, 2)
    ds.ann(2)["segments_info"] = []
    Image.fromarray(np.zeros((427, 640, 3), np.uint8)).save(ds.png(2))
    assert ds.reader().image_ids == [1, 2]
    reader = ds.reader(keep_empty_images=False)
    assert reader.image_ids == [1]
    assert reader.summary == collections.Counter({cp.EMPTY_IMAGE_DROPPED: 1})
    assert "empty_image_dropped=1" in reader.summary_line()


@pytest.mark.parametrize("instances", [False, True])
def test_max_instances(coco_sample_dir, tmp_path, instances):
    ds = _DS(tmp_path, coco_sample_dir, 2)
    n = ds.num_things
    assert ds.reader(instances=instances, max_instances=n).read(0)["masks"].shape[0] == n
    reader = ds.reader(instances=instances, max_instances=1)
    with pytest.raises(DataError, match=rf"image_id=1\].*{n} instances.*max_instances=1"):
        reader.read(0)
    skipping = ds.reader(instances=instances, max_instances=1, skip_bad_records=True)
    assert list(skipping) == []
    assert skipping.summary == collections.Counter({cp.TOO_MANY_INSTANCES: 2})


def test_annotation_without_image(coco_sample_dir, tmp_path):
    ds = _DS(tmp_path, coco_sample_dir, 2)
    ds.pan["images"] = ds.pan["images"][:1]  # image 2 keeps its annotation, loses its record
    with pytest.raises(DataError, match=r"panoptic.json \[image_id=2\]"):
        ds.reader()
    reader = ds.reader(skip_bad_records=True)
    assert reader.image_ids == [1] and len(list(reader)) == 1
    assert reader.summary == collections.Counter({cp.ANNOTATION_WITHOUT_IMAGE: 1})


def _encode_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"counts": runs, "size": list(mask.shape)}


def test_instances_json_polygons_and_uncompressed_rle(coco_sample_dir, tmp_path):
    """Polygons, uncompressed crowd RLE and overlapping masks from an instances JSON."""
    ds = _DS(tmp_path, coco_sample_dir, 1)
    reference = ds.reader().read(0)  # masks from the PNG
    anns = ds.inst["annotations"]
    # The crowd person as uncompressed RLE (as COCO stores crowd regions).
    crowd = next(a for a in anns if a["iscrowd"])
    k_crowd = int(np.flatnonzero(reference["is_crowd"])[0])
    crowd["segmentation"] = _encode_uncompressed_rle(reference["masks"][k_crowd])
    # A thing as two polygons that overlap the first person: instance masks overlap.
    poly = {
        "id": 77,
        "image_id": 1,
        "category_id": 3,  # car
        "iscrowd": 0,
        "segmentation": [
            [270.0, 200.0, 340.0, 200.0, 340.0, 260.5, 270.0, 260.5],
            [10.5, 10.5, 60.0, 12.0, 30.0, 50.0],
        ],
        "bbox": [10.5, 10.5, 329.5, 250.0],
        "area": 0,
    }
    anns.append(poly)
    reader = ds.reader(instances=True)
    rec = reader.read(0)
    n = reference["masks"].shape[0]
    assert rec["masks"].shape[0] == n + 1
    np.testing.assert_array_equal(rec["masks"][:n], reference["masks"])
    np.testing.assert_array_equal(rec["boxes"][:n], reference["boxes"])
    assert rec["is_crowd"][k_crowd] and rec["ann_ids"][n] == 77
    (ds.root / "instances.json").write_text(json.dumps(ds.inst))
    coco = COCO(str(ds.root / "instances.json"))
    ref_poly = coco.annToMask(coco.loadAnns([77])[0])
    np.testing.assert_array_equal(rec["masks"][n], ref_poly)
    ys, xs = np.nonzero(ref_poly)
    np.testing.assert_array_equal(rec["boxes"][n], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert rec["classes"][n] == reader.categories.to_contiguous(3)
    assert (rec["masks"].sum(0) > 1).any()  # overlapping instances are kept as they are
    # The semantic map still comes from the non-overlapping panoptic PNG.
    np.testing.assert_array_equal(rec["semantic"], reference["semantic"])


def test_instances_json_degenerate_polygons(coco_sample_dir, tmp_path):
    """As detectron2: polygons of < 3 points removed, an annotation left without one dropped
    (counted and logged); a polygon that covers no pixel keeps its JSON bbox (counted)."""
    ds = _DS(tmp_path, coco_sample_dir, 1)
    n = ds.num_things
    base = {"image_id": 1, "category_id": 3, "iscrowd": 0, "area": 0}
    ds.inst["annotations"] += [
        dict(base, id=90, segmentation=[[5.0, 5.0, 9.0, 9.0]], bbox=[5, 5, 4, 4]),
        dict(
            base,
            id=91,
            segmentation=[[1.0, 1.0], [100.0, 100.0, 140.0, 100.0, 140.0, 130.0]],
            bbox=[100, 100, 40, 30],
        ),
        # A sliver inside one pixel row: rasterises to no pixel.
        dict(base, id=92, segmentation=[[50.1, 50.1, 50.2, 50.1, 50.2, 50.2]], bbox=[50, 50, 1, 1]),
    ]
    reader = ds.reader(instances=True)
    assert reader.summary[cp.INVALID_POLYGON_DROPPED] == 1
    rec = reader.read(0)
    assert rec["ann_ids"][n:].tolist() == [91, 92]
    assert rec["masks"][n + 1].sum() == 0
    np.testing.assert_array_equal(rec["boxes"][n + 1], [50, 50, 51, 51])
    tri = rec["masks"][n]
    assert tri.sum() > 500 and tri[:50, :50].sum() == 0  # the 1-point part contributes nothing
    assert reader.summary[cp.EMPTY_INSTANCE_MASK] == 1
    assert "invalid_polygon_dropped=1" in reader.summary_line()


# ------------------------------------------------- the TF pipeline: same errors, same counts


_EVAL_CFG = TransformConfig(image_size=(128, 128), max_instances=40, mask_size=8, max_size=128)


def _eval_pipeline(reader, batch_size):
    """The eval stream of the TF transform over ``reader`` (imports tensorflow after torch)."""
    pytest.importorskip("torch")
    from oanet_jax.data import pipeline

    return pipeline.dataset_from_reader(
        reader,
        _EVAL_CFG,
        training=False,
        batch_size=batch_size,
        seed=0,
        test_size=96,
        skip_bad_records=reader.skip_bad_records,
    )


@pytest.mark.parametrize("instances", [False, True], ids=["from_png", "from_instances_json"])
def test_pipeline_skips_and_counts_every_reason(coco_sample_dir, tmp_path, instances):
    """Every corruption, in the TF pipeline (metadata on the host, pixels in TF): the same
    reasons counted as the reader's, the bad records padded, the good ones intact."""
    cases = [c for c in CORRUPTIONS if c[2] == instances or not c[2]]
    ds = _DS(tmp_path, coco_sample_dir, len(cases) + 1)
    for k, (corrupt, _, _) in enumerate(cases, start=1):
        corrupt(ds, k)
    good = len(cases) + 1
    reader = ds.reader(instances=instances, skip_bad_records=True)
    from oanet_jax.data import device_transform

    batches = list(_eval_pipeline(reader, len(cases) + 1).as_numpy_iterator())
    assert len(batches) == 1
    batch = device_transform.finish_numpy(batches[0], _EVAL_CFG)
    valid = batch["example_valid"].tolist()
    by_id = dict(zip(reader.image_ids, valid, strict=False))
    assert by_id.pop(good) and not any(by_id.values()), by_id
    expected = collections.Counter(r for _, r, _ in cases)
    assert reader.summary == expected
    # The good record is a real example: instances, a resized image, a semantic map.
    i = valid.index(True)
    assert batch["valid"][i].sum() == ds.num_things and batch["image"][i].any()
    assert (batch["semantic"][i] != 255).any() and batch["image_shape"][i].tolist() == [
        85,
        128,
    ]  # max_size


@pytest.mark.parametrize(
    "corrupt", [_extra_segment_in_png, _edit_segment_id_in_json, _truncate_jpeg, _garbage_png]
)
def test_pipeline_error_names_file_and_record(coco_sample_dir, tmp_path, corrupt):
    import tensorflow as tf

    ds = _DS(tmp_path, coco_sample_dir, 2)
    fname, _ = corrupt(ds, 2)
    with pytest.raises(tf.errors.OpError) as info:
        list(_eval_pipeline(ds.reader(), 2).as_numpy_iterator())
    msg = str(info.value)
    assert fname in msg and "image_id=2" in msg, msg


def test_rle_strings_and_boxes_batched_against_pycocotools():
    """The vectorised decoders of many compressed RLE strings at once: every mask equals
    pycocotools' encoding of it, every box the mask's tight box; empty and full masks included."""
    from pycocotools import mask as mask_utils

    from oanet_jax.data.coco_panoptic import (
        rle_string_to_counts,
        rle_strings_to_counts,
        runs_to_box,
        runs_to_boxes,
    )

    rng = np.random.default_rng(0)
    h, w = 37, 53
    masks = []
    for t in range(60):
        m = np.zeros((h, w), np.uint8)
        if t % 5 == 1:
            m[:] = 1
        elif t % 5 != 2:
            for _ in range(int(rng.integers(1, 4))):
                y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
                m[y0 : y0 + int(rng.integers(1, 30)), x0 : x0 + int(rng.integers(1, 30))] = 1
        masks.append(m)
    strings = [mask_utils.encode(np.asfortranarray(m))["counts"] for m in masks]
    counts = rle_strings_to_counts(strings)
    boxes, nonempty = runs_to_boxes(counts, h)
    for m, s, c, box, full in zip(masks, strings, counts, boxes, nonempty, strict=True):
        flat = np.repeat(np.arange(len(c)) % 2, c).astype(np.uint8)
        np.testing.assert_array_equal(flat.reshape(w, h).T, m)
        np.testing.assert_array_equal(c, rle_string_to_counts(s.decode("ascii")))
        ys, xs = np.nonzero(m)
        if ys.size == 0:
            assert not full and runs_to_box(c, h) is None
        else:
            expected = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert full and tuple(box) == expected == runs_to_box(c, h)
    with pytest.raises(ValueError, match="string 1 ends inside a value"):
        rle_strings_to_counts([strings[0], strings[3][:-1] + b"o"])
    assert rle_strings_to_counts([]) == []
