"""The PQ benchmark section runs at a tiny size and every path equals panopticapi's result."""

import pytest

pytest.importorskip("panopticapi")

from oanet_jax.bench import pq as bench_pq  # noqa: E402


@pytest.mark.slow
def test_pq_section_tiny_all_paths_equal_panopticapi(tmp_path):
    r = bench_pq.run(num_images=6, size=(48, 64), seed=3, data_dir=str(tmp_path), batch_size=4)
    assert r["num_images"] == 6 and r["identical"]
    for path in ("file", "in_memory", "device"):
        assert r[f"{path}_max_abs_difference"] < 1e-9, path
        assert r[f"{path}_s"] > 0
