"""The accelerator benchmark runs end to end on the CPU at a tiny size, without TensorFlow.

The GPU machine it is written for has no tensorflow, pycocotools or panopticapi: the command runs
here in a subprocess where importing any of them fails.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from oanet_jax.bench import accelerator

# Runs the module as `python -m` would, after making these imports fail (no sys.path edits).
_BLOCKED_RUN = (
    "import sys, runpy\n"
    "for name in ('tensorflow', 'pycocotools', 'panopticapi'):\n"
    "    sys.modules[name] = None\n"
    "runpy.run_module('oanet_jax.bench.accelerator', run_name='__main__', alter_sys=True)\n"
    "assert not any(m.split('.')[0] == 'tensorflow' and sys.modules[m] is not None\n"
    "               for m in sys.modules)\n"
)


def test_model_part_names_the_module_and_direction():
    base = "jit(train_step)/jvp(OANet)/OANet.train_forward"
    bwd = "jit(train_step)/transpose(jvp(OANet))/OANet.train_forward"
    assert accelerator.model_part(f"{base}/OANet._trunk/backbone/res2/conv1/conv") == (
        "backbone fwd"
    )
    assert accelerator.model_part(f"{bwd}/OANet._mask_branch/mask_head/deconv/conv") == (
        "mask_head bwd"
    )
    assert accelerator.model_part(f"{base}/OANet._proposals/vmap(jit(nms))/while") == (
        "proposals fwd"
    )
    assert accelerator.model_part(f"{bwd}/OANet._mask_branch/OANet._pool/jit(f)/scatter") == (
        "mask_branch.pool bwd"
    )
    assert accelerator.model_part("jit(train_step)/add") == "other fwd"
    assert accelerator.model_part("") == "unknown"


def test_hlo_sources_reads_instruction_metadata():
    text = (
        "ENTRY %main {\n"
        '  %fusion.3 = f32[2]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/a/add"}\n'
        '  ROOT conv.1 = f32[2]{0} convolution(%x), metadata={op_type="x" op_name="jit(f)/b"}\n'
        "  %p = f32[2]{0} parameter(0)\n"
        "}\n"
    )
    assert accelerator.hlo_sources(text) == {"fusion.3": "jit(f)/a/add", "conv.1": "jit(f)/b"}


@pytest.mark.slow
def test_accelerator_command_tiny_on_cpu_without_tensorflow(tmp_path):
    out = tmp_path / "accelerator.json"
    env = dict(os.environ)
    # One CPU device, and the unoptimised (fast) compile of every program: same programs.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["JAX_PLATFORMS"] = "cpu"
    args = [
        "--config=tiny",
        "--size=64",
        "--dtypes=bfloat16",
        "--batches=1",
        "--steps=1",
        "--warmup=1",
        "--infer-repeats=1",
        "--profile-dtype=bfloat16",
        "--profile-batch=1",
        "--profile-steps=1",
        "--top=5",
        "--cpu-fast-compile",
        f"--trace-dir={tmp_path / 'trace'}",
        f"--out={out}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["section"] == "accelerator" and result["compiles"] == 3
    m = result["machine"]
    assert m["backend"] == "cpu" and m["device_count"] >= 1 and m["jax"]
    (train,) = result["train"]
    assert "error" not in train, train
    assert (train["dtype"], train["batch"], train["image_size"]) == ("bfloat16", 1, 64)
    assert train["images_per_s"] > 0 and train["compile_s"] > 0 and train["lower_s"] > 0
    assert train["gflops_per_image"] > 0 and not train["nonfinite_last_step"]
    assert train["compiled_memory"]["total_bytes"] > 0
    (infer,) = result["inference"]
    assert "error" not in infer, infer
    assert infer["ms_per_image"] > 0 and infer["orderings"] == ["srm"]
    profile = result["profile"]
    assert profile["trace_files"] and "error" not in profile, profile
    assert 0 < len(profile["ops"]) <= 5 and profile["total_ms"] > 0
    assert {"name", "source", "part", "ms", "percent"} <= set(profile["ops"][0])
    assert abs(sum(p["percent"] for p in profile["parts"]) - 100.0) < 1e-6
    print(f"accelerator benchmark, tiny CPU run: {elapsed:.0f} s")
