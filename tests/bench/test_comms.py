# ruff: noqa: E501  (the hand-written HLO module keeps its long lines)
"""Tests of the comms benchmark section (oanet_jax/bench/comms.py).

Fast: the HLO scan on a hand-written module (bytes, ring traffic, replica groups in both
notations, ops inside while loops). Slow: the section's measurement of the tiny config's train
step, data parallel on the 8 fake devices of this process (one compile).
"""

from __future__ import annotations

import pytest

from configs import tiny
from oanet_jax.bench import comms

_HLO = """HloModule jit_train_step, entry_computation_layout={()->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body.1 (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %g = f32[16]{0} get-tuple-element(%p), index=1
  %ar.2 = f32[16]{0} all-reduce(%g), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %ar.2)
}

%br.1 (q: f32[4]) -> f32[8] {
  %q = f32[4]{0} parameter(0)
  ROOT %ag.2 = f32[8]{0} all-gather(%q), channel_id=6, replica_groups=[4,2]<=[8], dimensions={0}
}

%cond.1 (p: (s32[], f32[16])) -> pred[] {
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.9 (a: f32[1000], b: bf16[8,4]) -> f32[] {
  %a = f32[1000]{0} parameter(0)
  %b = bf16[8,4]{1,0} parameter(1)
  %ar.1 = (f32[1000]{0}, bf16[8,4]{1,0}) all-reduce(%a, %b), channel_id=1, replica_groups={}, to_apply=%add
  %ag.1 = f32[64,8]{1,0} all-gather(%c), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %rs.1 = f32[10]{0} reduce-scatter(%d), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
  %ar.3 = f32[5]{0} all-reduce(%e), channel_id=5, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add, metadata={op_name="jit(f)/psum"}
  %w = (s32[], f32[16]{0}) while(%init), condition=%cond.1, body=%body.1
  %sw = f32[8]{0} conditional(%i, %q, %q), branch_computations={%br.1, %br.1}
  ROOT %r = f32[] constant(0)
}
"""


def test_collective_bytes_of_handwritten_hlo():
    assert comms.shape_bytes("(f32[1000]{0}, bf16[8,4]{1,0})") == 4000 + 64
    assert comms.loop_computations(_HLO) == {"body.1", "cond.1", "add"}
    out = comms.collective_bytes(_HLO, num_devices=8)
    ar = out["all-reduce"]
    assert ar["ops"] == 3 and ar["ops_in_loops"] == 1
    assert ar["result_bytes"] == 4064 + 64 + 20
    # ring all-reduce: 2 (n - 1) / n x size; all 8 devices for {}, groups of 4 for [2,4]<=[8]
    # and for mesh[...] {'axis_1'}
    assert ar["ring_bytes_per_device"] == pytest.approx(
        2 * 7 / 8 * 4064 + 2 * 3 / 4 * 64 + 2 * 3 / 4 * 20
    )
    assert comms.branch_computations(_HLO) == {"br.1"}
    ag = out["all-gather"]
    assert ag["ops"] == 2 and ag["result_bytes"] == 64 * 8 * 4 + 32
    assert ag["ops_in_branches"] == 1 and ar["ops_in_branches"] == 0
    assert ag["ring_bytes_per_device"] == pytest.approx(0.5 * 2048 + 0.5 * 32)  # groups of 2
    rs = out["reduce-scatter"]
    assert rs["result_bytes"] == 40 and rs["ring_bytes_per_device"] == 7 * 40
    assert out["all-to-all"]["ops"] == 0
    assert out["total"]["ops"] == 6 and out["total"]["result_bytes"] == 4148 + 2080 + 40
    assert out["largest"][0][:4] == ["all-reduce", 4064, 8, False]
    assert ["all-reduce", 20, 4, False, "jit(f)/psum"] in out["largest"]


@pytest.mark.slow
def test_measure_tiny_data_parallel():
    config = tiny.get_config()
    result = comms.measure(config, mesh_shape=(8, 1), shard_params=False)
    assert result["mesh"] == {"data": 8, "model": 1}
    ar = result["collectives"]["all-reduce"]
    # Data parallel: every gradient is all-reduced over the 8 'data' shards (the tiny config
    # trains every parameter), besides the losses and metrics.
    assert ar["result_bytes"] >= result["param_bytes"] > 0
    assert ar["ring_bytes_per_device"] == pytest.approx(2 * 7 / 8 * ar["result_bytes"], rel=0.01)
    assert result["flops_per_device"] > 0
