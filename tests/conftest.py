"""Test setup: 8 fake CPU devices, a compilation cache, and torch imported before tensorflow.

Importing tensorflow before torch (or triton) segfaults on this machine, so torch goes first when
it is installed. XLA_FLAGS must be set before jax initialises its backends.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# JAX's persistent compilation cache, shared by the tests and the subprocesses they start (train,
# evaluate, predict, export runs of the tiny config compile the same programs again and again).
# Keyed by the program, the compile options and the jax version, so a hit is the same executable.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"),
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

try:  # torch is a test-only numerical oracle; import it before tensorflow.
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # pragma: no cover - tests that need it skip via importorskip
    pass

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The real COCO panoptic sample lives in the shared folder beside the repository.
COCO_SAMPLE = ROOT.parent / "shared" / "data" / "coco_panoptic_sample"


@pytest.fixture(scope="session")
def coco_sample_dir() -> pathlib.Path:
    """Path to the real two-image COCO panoptic sample (skips if absent)."""
    if not COCO_SAMPLE.exists():
        pytest.skip(f"COCO sample not found at {COCO_SAMPLE}")
    return COCO_SAMPLE
