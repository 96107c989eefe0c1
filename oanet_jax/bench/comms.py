"""Comms section: collective bytes per train step of a large mesh, from the compiled HLO.

The ResNet-50 OANet train step (`configs/base.py`, paper defaults) is compiled -- not run -- for
a mesh of fake CPU devices (a subprocess with ``--xla_force_host_platform_device_count=N``; the
SPMD partitioner's collectives are the ones a TPU / GPU mesh of that shape gets, only their
scheduling and fusion into async pairs is backend-specific). For each mesh layout the optimized
HLO is scanned for all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute
ops; per kind the section reports the number of ops, the bytes of their (per-device) results and
the bytes each device sends in a ring implementation over its replica group of n devices
(all-reduce 2 (n - 1) / n x size, all-gather (n - 1) / n x gathered size, reduce-scatter (n - 1)
x scattered size, all-to-all (n - 1) / n x size, collective-permute its size), with XLA's
``cost_analysis`` FLOPs of the per-device program beside them.

Layouts: ``dp`` (mesh (N, 1): batch on 'data', every parameter replicated; the gradients are
all-reduced) and ``fsdp`` (mesh (N / M, M) with ``sharding.shard_params``: parameters and
optimizer state sharded on the M-way 'model' axis). With data parallelism the gradient bytes do
not depend on the image size or the batch, so a small image (256x256 by default, one image per
'data' shard) is enough; with parameters sharded the activations' collectives do depend on them
(stated with the result). Op counts are static (an op inside a loop body counts once; ops in
loop bodies and in the branches of conditionals -- the mask head's ``lax.switch`` over its
RoI-count buckets, of which one runs per step -- are reported separately).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_OP_RE = re.compile(
    r"=\s*(?P<shape>.*?)\s+(?P<kind>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_SHAPE_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_IOTA_GROUPS_RE = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_MESH_GROUPS_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_LIST_GROUPS_RE = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_PAIRS_RE = re.compile(r"source_target_pairs=\{")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string (a tuple counts all its elements).

    Args:
      text: e.g. ``'(f32[64,3]{1,0}, bf16[7]{0})'``.

    Returns:
      The summed byte size.
    """
    total = 0
    for dtype, dims in _SHAPE_RE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _group_size(line: str, num_devices: int) -> int:
    m = _MESH_GROUPS_RE.search(line)
    if m:  # replica_groups=mesh['axis_0'=8,'axis_1'=8] {'axis_1'}: groups along the named axes
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        n = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            n *= int(sizes[axis])
        return n
    m = _IOTA_GROUPS_RE.search(line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = _LIST_GROUPS_RE.search(line)
    if m and m.group(1):
        return len(m.group(1).split(","))
    return num_devices  # replica_groups={} : all devices


def _ring_bytes(kind: str, size: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n * size
    if kind == "reduce-scatter":
        return float((n - 1) * size)  # size is the scattered (per-device) result
    if kind == "collective-permute":
        return float(size)
    return (n - 1) / n * size  # all-gather (gathered result), all-to-all


_HEADER_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALL_RE = re.compile(
    r"\b(condition|body|to_apply|calls|branch_computations|true_computation|false_computation)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)


def loop_computations(hlo_text: str) -> set[str]:
    """Names of the computations that run inside a ``while`` loop (bodies, conditions, and
    everything they call), i.e. whose ops may execute more than once per step."""
    return _called_from(hlo_text, ("body", "condition"), " while(")


def branch_computations(hlo_text: str) -> set[str]:
    """Names of the computations that are branches of a ``conditional`` (``lax.switch`` /
    ``lax.cond``) and everything they call: only one branch of each runs per execution."""
    return _called_from(
        hlo_text, ("branch_computations", "true_computation", "false_computation"), " conditional("
    )


def _called_from(hlo_text: str, root_attrs: tuple[str, ...], root_op: str) -> set[str]:
    calls: dict[str, set[str]] = {}
    roots: set[str] = set()
    current = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _HEADER_RE.match(line)
            if m:
                current = m.group(1)
                calls.setdefault(current, set())
            continue
        for attr, target in _CALL_RE.findall(line):
            names = {n.strip().lstrip("%") for n in target.strip("{}").split(",") if n.strip()}
            calls.setdefault(current, set()).update(names)
            if attr in root_attrs and root_op in line:
                roots.update(names)
    inside, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in inside:
            inside.add(name)
            todo.extend(calls.get(name, ()))
    return inside


def collective_bytes(hlo_text: str, num_devices: int, top: int = 8) -> dict[str, Any]:
    """Collectives of a compiled (SPMD-partitioned) HLO module, by kind.

    Args:
      hlo_text: ``compiled.as_text()`` of a jitted function.
      num_devices: devices of the mesh (the group of ``replica_groups={}``).
      top: how many of the largest ops to list.

    Returns:
      ``{kind: {'ops': count, 'result_bytes': bytes of the per-device results,
      'ring_bytes_per_device': bytes sent per device by a ring implementation, 'ops_in_loops':
      how many of the ops sit inside a while loop (counted once here), 'ops_in_branches': how
      many sit in a branch of a conditional (every branch is counted here, one runs)}}`` for
      every kind of
      :data:`COLLECTIVES` (zeros when absent), plus ``'total'`` and ``'largest'``: the
      ``top`` largest ops as ``[kind, result bytes, group size, in a loop, op_name tail]``.
    """
    keys = ("ops", "result_bytes", "ring_bytes_per_device", "ops_in_loops", "ops_in_branches")
    out = {k: {key: 0 for key in keys} for k in COLLECTIVES}
    in_loops = loop_computations(hlo_text)
    in_branches = branch_computations(hlo_text)
    largest: list[list[Any]] = []
    current = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            header = _HEADER_RE.match(line)
            current = header.group(1) if header else current
            continue
        m = _OP_RE.search(line)
        if not m:
            continue
        kind = m.group("kind")
        size = shape_bytes(m.group("shape"))
        if m.group("start"):
            # An async start's result is (operands..., results...): count the results only.
            size //= 2
        n = 2 if kind == "collective-permute" else _group_size(line, num_devices)
        entry = out[kind]
        entry["ops"] += 1
        entry["result_bytes"] += size
        entry["ring_bytes_per_device"] += _ring_bytes(kind, size, n)
        entry["ops_in_loops"] += int(current in in_loops)
        entry["ops_in_branches"] += int(current in in_branches)
        name = _OP_NAME_RE.search(line)
        largest.append(
            [kind, size, n, current in in_loops, name.group(1)[-160:] if name else current]
        )
    out["total"] = {key: sum(out[k][key] for k in COLLECTIVES) for key in keys}
    out["largest"] = sorted(largest, key=lambda r: -r[1])[:top]
    return out


def measure(
    config: Any, *, mesh_shape: Sequence[int], shard_params: bool, hlo_path: str = ""
) -> dict[str, Any]:
    """Compiles the train step of ``config`` on a mesh of this process's devices; its collectives.

    Args:
      config: full config (``train.batch_size`` is the global batch, ``data.image_size`` the
        padded image).
      mesh_shape: ('data', 'model') sizes (a -1 takes the remaining devices).
      shard_params: ``sharding.shard_params`` (parameters on 'model').
      hlo_path: if set, the compiled HLO text is written there.

    Returns:
      Dict: mesh, shard_params, parameter bytes, :func:`collective_bytes`, ``flops_per_device``
      (cost analysis of the per-device program), ``while_ops``.
    """
    import jax
    import numpy as np

    from oanet_jax.data import spec as data_spec
    from oanet_jax.modeling.build import build_model
    from oanet_jax.train import sharding, state, step

    config = config.copy_and_resolve_references()
    config.sharding.mesh_shape = tuple(int(v) for v in mesh_shape)
    config.sharding.shard_params = bool(shard_params)
    mesh = sharding.make_mesh(config.sharding)
    model = build_model(config)
    global_batch = int(config.train.batch_size)
    zeros = data_spec.zeros_batch(config.data, global_batch)
    shapes, state_sharding = state.train_state_shapes(config, model, mesh, zeros)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(
            v.shape, jax.dtypes.canonicalize_dtype(v.dtype), sharding=batch_sharding
        )
        for k, v in zeros.items()
        if k in data_spec.TRAIN_KEYS
    }
    options = state.CPU_FAST_COMPILE if jax.default_backend() == "cpu" else None
    fn = step.jit_train_step(model, config, mesh, state_sharding, compiler_options=options)
    compiled = fn.lower(shapes, batch).compile()
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    param_bytes = sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes.params)
    )
    return {
        "mesh": dict(mesh.shape),
        "shard_params": bool(shard_params),
        "global_batch": global_batch,
        "image_size": list(config.data.image_size),
        "param_bytes": param_bytes,
        "collectives": collective_bytes(text, mesh.size),
        "flops_per_device": float((cost or {}).get("flops", float("nan"))),
        "while_ops": len(re.findall(r"\swhile\(", text)),
    }


LAYOUTS = {"dp": ((-1, 1), False), "fsdp": ("model", True)}


def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """In the subprocess: the config of ``spec`` measured for each named layout."""
    import importlib

    config = importlib.import_module(f"configs.{spec['config']}").get_config()
    config.data.image_size = (int(spec["size"]), int(spec["size"]))
    config.train.batch_size = int(spec["batch"])
    results = []
    for name in spec["layouts"]:
        mesh_shape, shard_params = LAYOUTS[name]
        if mesh_shape == "model":
            mesh_shape = (-1, int(spec["model_axis"]))
        result = measure(
            config,
            mesh_shape=mesh_shape,
            shard_params=shard_params,
            hlo_path=os.path.join(spec["hlo_dir"], f"{name}.hlo.txt") if spec["hlo_dir"] else "",
        )
        results.append({"layout": name, **result})
        print(f"COMMS {json.dumps(results[-1])}", flush=True)
    return results


def run(
    devices: int = 64,
    size: int = 256,
    batch: int = 64,
    model_axis: int = 8,
    config: str = "base",
    layouts: Sequence[str] = ("dp", "fsdp"),
    timeout: float = 3600.0,
    hlo_dir: str = "",
) -> dict[str, Any]:
    """Collective bytes and FLOPs per train step for each layout, on ``devices`` fake devices.

    Args:
      devices: mesh size (fake CPU devices of a subprocess).
      size: padded square image size.
      batch: global batch.
      model_axis: size of the 'model' axis of the ``fsdp`` layout.
      config: module under ``configs/`` (``base``: ResNet-50 paper defaults).
      layouts: names of :data:`LAYOUTS`.
      timeout: seconds allowed for the subprocess.
      hlo_dir: if set, the compiled HLO of each layout is written there (``<layout>.hlo.txt``).

    Returns:
      Dict: the settings and ``layouts``, one :func:`measure` result per layout.
    """
    spec = {
        "config": config,
        "size": size,
        "batch": batch,
        "model_axis": model_axis,
        "layouts": list(layouts),
        "hlo_dir": os.path.abspath(hlo_dir) if hlo_dir else "",
    }
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(devices)}"
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "oanet_jax.bench.comms", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = [
        json.loads(line[len("COMMS ") :])
        for line in proc.stdout.splitlines()
        if line.startswith("COMMS ")
    ]
    if proc.returncode != 0 or len(results) != len(layouts):
        raise RuntimeError(
            f"the comms subprocess ({devices} fake devices) failed with status "
            f"{proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return {"devices": int(devices), **spec, "layouts": results}


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
