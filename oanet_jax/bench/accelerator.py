"""Accelerator benchmark: the ResNet-50 config at 1024x1024 in bfloat16 and float32, one command.

What it measures, for each compute dtype (parameters are float32 in both):

* training: images/s of the full jitted train step (forward, on-device targets, the losses of
  Eq. 1, backward, SGD update) at each batch size, on a synthetic batch with `--instances`
  ground-truth boxes and masks per image; lowering and compile seconds; XLA's FLOPs per image;
  the compiled program's memory (``compiled.memory_analysis()``) and the device's running peak
  (``device.memory_stats()['peak_bytes_in_use']``, where the backend has it; JAX cannot reset it,
  so it is the peak of everything run so far in the process: configurations run in order of
  growing batch, bfloat16 first);
* inference: ms per image at batch 1 of `oanet_jax.eval.inference` (forward, detections, masks,
  stuff argmax and the panoptic merge), host-to-device copy of the image included;
* one `jax.profiler` trace of a few training steps (`--profile-dtype`, `--profile-batch`): the
  trace folder, and the top HLO ops by device time, each with the JAX source path XLA recorded
  (flax module, forward or backward), plus the time per model part.

Nothing here imports TensorFlow, pycocotools, panopticapi or torch: the GPU machine it is meant
for has none of the first three. ml_collections (the configs) is installed there from a wheel
shipped beside the checkout::

    pip install --no-index --no-deps device_wheels/*.whl   # once: ml_collections
    python -m oanet_jax.bench.accelerator --out docs/benchmarks/accelerator.json

Compiles with the defaults: one initialiser, one train step per (dtype, batch) = 6 and one
inference per dtype = 2, 9 in all; the profile reuses a compiled step. The JSON is rewritten
after every measurement, so a run stopped early keeps what it measured. A configuration that
fails (e.g. out of memory) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import importlib
import json
import os
import pathlib
import platform
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from oanet_jax.bench import timing
from oanet_jax.data import spec as data_spec
from oanet_jax.eval.inference import make_inference_fn
from oanet_jax.modeling.build import build_model
from oanet_jax.train import sharding, state, step

__all__ = ["main", "make_config", "make_train_batch", "top_ops", "hlo_sources"]

# ``lowered.compile`` options on CPU with --cpu-fast-compile (tests): same program, no LLVM passes.
_CPU_FAST_COMPILE = state.CPU_FAST_COMPILE


def machine() -> dict[str, Any]:
    """The machine the figures come from: accelerator, host CPU, library versions."""
    devices = jax.devices()
    cpu = timing.cpu_name()
    versions = {}
    for name in ("jaxlib", "flax", "optax", "numpy"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "devices": [str(d) for d in devices],
        "device_memory_limit_bytes": (_memory_stats(devices[0]) or {}).get("bytes_limit"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        **versions,
        "date": datetime.date.today().isoformat(),
    }


def make_config(name: str, size: int, dtype: str, batch: int) -> Any:
    """The config `configs/NAME.py` at a square padded size, compute dtype and batch size."""
    config = importlib.import_module(f"configs.{name}").get_config()
    config.data.image_size = (size, size)
    config.data.max_size = size
    config.data.min_size_test = size
    config.model.compute_dtype = dtype
    config.train.batch_size = batch
    config.eval.batch_size = 1
    return config


def make_train_batch(config: Any, batch: int, num_instances: int, seed: int = 0) -> dict:
    """A synthetic training batch of the batch spec (numpy), `num_instances` boxes per image.

    Random pixels, boxes of 1/16 to 1/2.5 of the image side, each with a mask filling the middle
    of its box, random thing classes and random semantic labels over every class.
    """
    out = data_spec.zeros_batch(config.data, batch, train=True)
    size = int(config.data.image_size[0])
    mask_size = int(config.data.mask_size)
    n = min(int(num_instances), out["boxes"].shape[1])
    rng = np.random.default_rng(seed)
    out["image"] = rng.uniform(0, 255, out["image"].shape).astype(out["image"].dtype)
    xy = rng.uniform(0, size * 0.6, (batch, n, 2))
    wh = rng.uniform(size / 16, size * 0.4, (batch, n, 2))
    out["boxes"][:, :n] = np.concatenate([xy, np.minimum(xy + wh, size - 1)], -1)
    out["classes"][:, :n] = rng.integers(0, int(config.model.num_thing_classes), (batch, n))
    out["valid"][:, :n] = True
    q = max(mask_size // 4, 1)
    out["masks"][:, :n, q:-q, q:-q] = 1
    num_classes = int(config.model.num_thing_classes) + int(config.model.num_stuff_classes)
    out["semantic"][:] = rng.integers(0, num_classes, out["semantic"].shape)
    return out


def _memory_stats(device: jax.Device) -> dict[str, int] | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        return None
    return dict(stats) if stats else None


def _compiled_memory(compiled: Any) -> dict[str, int] | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes", 0) or 0) for f in fields}
    # What the executable needs at once: inputs + outputs (less the donated ones) + scratch.
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def _flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:500]}"


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX source path XLA kept in its metadata (``op_name``)."""
    pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name="([^"]*)"')
    out = {}
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def model_part(source: str) -> str:
    """'backbone fwd', 'mask_head bwd', 'proposals fwd', ...: where in the model an op comes from.

    The part is the flax submodule right after the last ``OANet.<method>`` of the JAX op path
    (``.../OANet._trunk/backbone/res2/...`` -> 'backbone'); when a transform (``jit(...)``,
    ``vmap(...)``) comes first, the method itself (``OANet._proposals/vmap(jit(batched_nms))``
    -> 'proposals'; ``OANet._mask_branch/OANet._pool/jit(...)`` -> 'mask_branch.pool'; the
    outermost method, e.g. ``train_forward``, is dropped). Ops outside the model (losses,
    targets, the optimizer) are named after their first named path component, or 'other'. An
    op under ``transpose(`` is backward.
    """
    if not source:
        return "unknown"
    direction = "bwd" if "transpose(" in source else "fwd"
    parts = [p for p in source.split("/") if p]
    methods = [i for i, p in enumerate(parts) if p.startswith("OANet.")]
    if methods:
        rest = parts[methods[-1] + 1 :]
        if len(rest) > 1 and "(" not in rest[0]:
            name = rest[0]
        else:
            names = [parts[i].removeprefix("OANet.").lstrip("_") for i in methods]
            name = ".".join(names[1:] if len(names) > 1 else names)
    else:
        named = [p for p in parts if "(" not in p]
        name = named[0] if len(named) > 1 else "other"
    return f"{name} {direction}"


def top_ops(trace_dir: str, sources: Mapping[str, str], n: int = 25) -> dict[str, Any]:
    """Device time per HLO op from the ``.xplane.pb`` that `jax.profiler.trace` wrote.

    Events are read with ``jax.profiler.ProfileData``. Only events named after an instruction
    of the profiled program are counted (with an accelerator, the device planes only, and their
    'XLA Ops' lines when there are; on the CPU, the XLA worker threads). Each op gets the
    source path of `sources` (from `hlo_sources`) and its model part (`model_part`). An op
    nested in another (the body of a while loop) counts in both. When no event matches, the
    device events are listed by their own names ('device_events').

    Args:
      trace_dir: the folder given to ``jax.profiler.trace``.
      sources: HLO instruction name -> JAX source path, of the profiled executable.
      n: how many ops to list.

    Returns:
      {'trace_files', 'total_ms' (summed op time), 'ops' (top n: name, source, part, ms, count,
      percent), 'parts' (ms and percent per model part)}; or {'trace_files', 'error'}.
    """
    files = sorted(str(p) for p in pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    result: dict[str, Any] = {"trace_files": files}
    if not files:
        result["error"] = "no .xplane.pb written"
        return result
    try:
        data = jax.profiler.ProfileData.from_file(files[-1])
        ms: collections.Counter = collections.Counter()
        count: collections.Counter = collections.Counter()
        raw: collections.Counter = collections.Counter()  # device events of any name
        planes = list(data.planes)
        # With an accelerator, its planes only (host-side launch events may share op names).
        devices = [p for p in planes if p.name.startswith("/device:")]
        for plane in devices or planes:
            lines = list(plane.lines)
            xla_ops = [ln for ln in lines if ln.name == "XLA Ops"]
            on_device = plane.name.startswith("/device:")
            for line in xla_ops or lines:
                for event in line.events:
                    # 'fusion.12', or '%fusion.12 = f32[..] fusion(..)' in some profiler builds.
                    name = event.name.split(" = ", 1)[0].strip().lstrip("%")
                    if name in sources:
                        ms[name] += event.duration_ns / 1e6
                        count[name] += 1
                    elif on_device and line.name not in ("XLA Modules", "Steps"):
                        raw[event.name] += event.duration_ns / 1e6
    except Exception as e:  # noqa: BLE001 - a profiler build without ProfileData
        result["error"] = _error(e)
        return result
    total = sum(ms.values())
    result["total_ms"] = total
    if not total:
        result["error"] = "no event of the trace names an op of the profiled program"
        result["device_events"] = [{"name": k[:200], "ms": t} for k, t in raw.most_common(n)]
        return result
    result["ops"] = [
        {
            "name": name,
            "source": sources[name],
            "part": model_part(sources[name]),
            "ms": t,
            "count": count[name],
            "percent": 100.0 * t / total,
        }
        for name, t in ms.most_common(n)
    ]
    parts: collections.Counter = collections.Counter()
    for name, t in ms.items():
        parts[model_part(sources[name])] += t
    result["parts"] = [
        {"part": p, "ms": t, "percent": 100.0 * t / total} for p, t in parts.most_common()
    ]
    return result


class _Writer:
    """The result JSON, rewritten after each measurement."""

    def __init__(self, path: str, header: dict[str, Any]):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {**header, "train": [], "inference": [], "profile": None}
        self.write()

    def write(self) -> None:
        text = json.dumps(self.data, indent=1, default=float)
        self.path.write_text(text + "\n")


def _new_state(config: Any, model: Any, mesh: Any, batch: dict) -> tuple:
    t0 = time.perf_counter()
    st, st_sharding = state.create_train_state(config, model, mesh, batch)
    jax.block_until_ready(st)
    return st, st_sharding, time.perf_counter() - t0


def _state_alive(st: Any) -> bool:
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(st))


def _train_one(
    config: Any,
    holder: dict[str, Any],
    mesh: Any,
    args: argparse.Namespace,
    compiler_options: dict[str, Any] | None,
    profile_dir: str | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Compiles and times the train step of one (dtype, batch); optionally traces it."""
    batch = int(config.train.batch_size)
    model = build_model(config)
    host_batch = make_train_batch(config, batch, args.instances)
    device_batch = sharding.shard_batch(host_batch, mesh)
    fn = step.jit_train_step(model, config, mesh, holder["sharding"])
    t0 = time.perf_counter()
    lowered = fn.lower(holder["state"], device_batch)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    t2 = time.perf_counter()
    row: dict[str, Any] = {"lower_s": t1 - t0, "compile_s": t2 - t1}
    flops = _flops(compiled)
    row["gflops_per_image"] = flops / batch / 1e9 if flops else None
    row["compiled_memory"] = _compiled_memory(compiled)

    st = holder["state"]
    metrics = None
    for _ in range(args.warmup):
        st, metrics = compiled(st, device_batch)
    jax.block_until_ready((st, metrics))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        st, metrics = compiled(st, device_batch)
    jax.block_until_ready((st, metrics))
    elapsed = time.perf_counter() - t0
    holder["state"] = st
    row["step_s"] = elapsed / args.steps
    row["images_per_s"] = batch * args.steps / elapsed
    m = jax.device_get(metrics)
    row["total_loss"] = float(m["total"])
    row["nonfinite_last_step"] = bool(int(m["nonfinite"]))
    stats = _memory_stats(jax.devices()[0])
    row["peak_bytes_in_use_so_far"] = stats.get("peak_bytes_in_use") if stats else None

    profile = None
    if profile_dir is not None:
        with jax.profiler.trace(profile_dir):
            for _ in range(args.profile_steps):
                st, metrics = compiled(st, device_batch)
            jax.block_until_ready((st, metrics))
        holder["state"] = st
        profile = top_ops(profile_dir, hlo_sources(compiled.as_text()), n=args.top)
        profile.update(dtype=str(config.model.compute_dtype), batch=batch, steps=args.profile_steps)
    del compiled, lowered, fn
    return row, profile


def _inference_one(config: Any, variables: Any, args: argparse.Namespace) -> dict[str, Any]:
    """ms per image at batch 1: forward, detections, masks, stuff argmax and panoptic merge."""
    model = build_model(config)
    infer = make_inference_fn(model, config, orderings=tuple(args.orderings), batch_size=1)
    size = int(config.data.image_size[0])
    rng = np.random.default_rng(1)
    host = {
        "image": rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8),  # as the spec ships
        "image_shape": np.asarray([[size, size]], np.int32),
        "orig_shape": np.asarray([[size, size]], np.int32),
    }
    placed = infer.put_variables(variables)
    t0 = time.perf_counter()
    jax.block_until_ready(infer(placed, host))
    first = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        jax.block_until_ready(infer(placed, host))
    times = []
    for _ in range(args.infer_repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(infer(placed, host))
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    stats = _memory_stats(jax.devices()[0])
    return {
        "first_call_s": first,
        "compile_s_estimate": first - median,
        "ms_per_image": 1e3 * median,
        "ms_min": 1e3 * min(times),
        "repeats": len(times),
        "orderings": list(args.orderings),
        "peak_bytes_in_use_so_far": stats.get("peak_bytes_in_use") if stats else None,
    }


def _csv(kind: type) -> Any:
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (defaults: the GPU run of docs/BENCHMARKS.md, 'accelerator')."""
    p = argparse.ArgumentParser(
        prog="python -m oanet_jax.bench.accelerator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="base", help="configs/NAME.py (base: ResNet-50, paper)")
    p.add_argument("--size", type=int, default=1024, help="square padded image side")
    p.add_argument("--dtypes", type=_csv(str), default=["bfloat16", "float32"])
    p.add_argument("--batches", type=_csv(int), default=[1, 8, 16], help="training batch sizes")
    p.add_argument("--instances", type=int, default=8, help="ground-truth boxes per image")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per batch size")
    p.add_argument("--infer-repeats", type=int, default=20, help="timed inference calls")
    p.add_argument("--orderings", type=_csv(str), default=["srm"], help="panoptic merge order")
    p.add_argument("--no-inference", action="store_true", help="skip the inference timing")
    p.add_argument("--profile-dtype", default="bfloat16", help="'' = no profile")
    p.add_argument("--profile-batch", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="ops listed from the profile")
    p.add_argument("--trace-dir", default="/tmp/oanet_accelerator_trace")
    p.add_argument("--out", default="docs/benchmarks/accelerator.json")
    p.add_argument(
        "--cpu-fast-compile",
        action="store_true",
        help="on the CPU backend compile without LLVM optimisation (tests: same program)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes the JSON to ``--out``.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      The result dict that was written.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    fast = args.cpu_fast_compile and jax.default_backend() == "cpu"
    compiler_options = dict(_CPU_FAST_COMPILE) if fast else None
    header = {
        "section": "accelerator",
        "machine": machine(),
        "args": vars(args),
        "command": " ".join(["python -m oanet_jax.bench.accelerator", *(argv or sys.argv[1:])]),
    }
    out = _Writer(args.out, header)
    batches = sorted(set(args.batches))
    mesh = sharding.make_mesh(
        make_config(args.config, args.size, args.dtypes[0], batches[0]).sharding,
        devices=jax.devices()[:1],
    )
    holder: dict[str, Any] = {}
    compiles = 0

    def ensure_state(config: Any) -> None:
        nonlocal compiles
        if "state" in holder and _state_alive(holder["state"]):
            return
        # Parameters are float32 whatever the compute dtype: one state serves every run.
        holder.pop("state", None)
        gc.collect()
        model = build_model(config)
        host = make_train_batch(config, 1, args.instances)
        holder["state"], holder["sharding"], init_s = _new_state(config, model, mesh, host)
        compiles += 1
        out.data.setdefault("init_s", []).append(init_s)

    for dtype in args.dtypes:
        for batch in batches:
            config = make_config(args.config, args.size, dtype, batch)
            row: dict[str, Any] = {"dtype": dtype, "batch": batch, "image_size": args.size}
            profile_here = (
                dtype == args.profile_dtype and batch == args.profile_batch and args.steps > 0
            )
            try:
                ensure_state(config)
                compiles += 1
                measured, profile = _train_one(
                    config,
                    holder,
                    mesh,
                    args,
                    compiler_options,
                    args.trace_dir if profile_here else None,
                )
                row.update(measured)
                if profile is not None:
                    out.data["profile"] = profile
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
                row["error"] = _error(e)
            print(json.dumps(row, default=float), flush=True)
            out.data["train"].append(row)
            out.write()
            gc.collect()

        if args.no_inference:
            continue
        config = make_config(args.config, args.size, dtype, 1)
        row = {"dtype": dtype, "batch": 1, "image_size": args.size}
        try:
            ensure_state(config)
            st = holder["state"]
            variables = {"params": st.params}
            if jax.tree.leaves(st.batch_stats):
                variables["batch_stats"] = st.batch_stats
            compiles += 1
            row.update(_inference_one(config, variables, args))
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
        print(json.dumps(row, default=float), flush=True)
        out.data["inference"].append(row)
        out.write()

    out.data["compiles"] = compiles
    out.data["wall_s"] = time.perf_counter() - start
    out.write()
    return out.data


if __name__ == "__main__":
    main()
