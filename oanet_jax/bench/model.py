"""Model section: jitted ResNet-50 OANet inference vs torchvision's maskrcnn_resnet50_fpn.

Both networks get the same weights and the same input: torchvision's
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()`` (seeded random weights;
with ``randomise_bn`` its FrozenBN statistics are randomised, which makes the random class scores
peaked so that both sides produce the full 100 detections, a realistic workload; the default
identity statistics give near-uniform scores and no detection at all) converted with
`convert_maskrcnn` into OANet configured as torchvision (configs/base.py with 90 thing classes
and the torchvision-parity fields). One image of ``height x width`` pixels (a multiple of 32, so
neither side pads and torchvision's resize is a no-op: its transform's min/max size are set to the
image's sides).

What each side times (medians of ``iters`` runs after ``warmup`` runs, through
`oanet_jax.bench.timing`):

* OANet: the jitted ``model.apply(variables, batch, train=False)`` on a batch already on the
  device (normalised image, as the input pipeline delivers it): backbone, FPN, RPN, proposals,
  box head, detections, mask head, plus OANet's stuff head (133 classes at stride 4) and SRM
  (canvas pasting, ranking scores). Lowering and compilation (ahead of time) are timed once each
  and reported separately.
* torchvision: ``model([image])`` under ``torch.inference_mode`` on the same device: its
  normalisation and (no-op) resize, the same Mask R-CNN pipeline, and the pasting of every mask
  into a full-resolution image (which OANet does not do); no stuff head or SRM.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch
import torchvision

from configs import base
from oanet_jax.bench.timing import time_fn
from oanet_jax.convert import torchvision as convert
from oanet_jax.modeling.build import build_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _oanet_config(dtype: str):
    cfg = base.get_config()
    m = cfg.model
    m.num_thing_classes = 90
    m.compute_dtype = dtype
    m.roi.pooler_aligned = False
    m.roi.pooler_sampling_ratio = 2
    m.roi.pooler_level_mapper = "torchvision"
    m.rpn.min_size = 1e-3
    m.test.min_size = 1e-2
    return cfg


def randomise_frozen_bn(model: torch.nn.Module, seed: int) -> None:
    """Random FrozenBatchNorm2d statistics (torchvision's are identity at init), in place.

    Scale in [0.5, 1.5), bias and mean ~ N(0, 0.2^2), variance in [0.5, 1.5), drawn in module
    order from a generator seeded with `seed` (the parity test and the model benchmark share it).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _once(fn) -> tuple[Any, float]:
    """(result, seconds) of one call of `fn`, timed by `time_fn` (no warm-up)."""
    out = {}
    t = time_fn(lambda: out.setdefault("result", fn()), warmup=0, repeats=1)
    return out["result"], t["median_s"]


def _ms(seconds: list[float]) -> list[float]:
    return [round(1e3 * s, 3) for s in seconds]


def run(
    height: int = 800,
    width: int = 1344,
    dtype: str = "float32",
    warmup: int = 2,
    iters: int = 10,
    randomise_bn: bool = True,
    seed: int = 0,
    torch_device: str | None = None,
) -> dict[str, Any]:
    """Times OANet (jitted) and torchvision Mask R-CNN inference on one image.

    Args:
      height, width: image size, multiples of 32.
      dtype: OANet compute dtype ('float32' or 'bfloat16'); torchvision runs in float32.
      warmup: untimed runs before timing (each side; OANet is compiled ahead of time, timed
        separately).
      iters: timed runs; the median is reported.
      randomise_bn: randomise torchvision's FrozenBN statistics (see the module docstring).
      seed: torch seed of the random weights and the image.
      torch_device: torch device (default 'cuda' when available, else 'cpu').

    Returns:
      A JSON-able dict: 'image' [h, w], 'oanet_lower_s', 'oanet_compile_s', 'oanet_median_ms',
      'torch_median_ms', 'speedup' (torch / OANet median), detection counts
      ('oanet_detections', 'torch_detections'), devices, dtypes, raw times.
    """
    if height % 32 or width % 32:
        raise ValueError(f"height and width must be multiples of 32, got {height}x{width}")
    device = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    tv = tv.eval()
    if randomise_bn:
        randomise_frozen_bn(tv.backbone, seed + 1)
    tv.transform.min_size = (min(height, width),)
    tv.transform.max_size = max(height, width)
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    tv = tv.to(device)

    gen = torch.Generator().manual_seed(seed + 2)
    image = torch.rand(3, height, width, generator=gen)  # [0, 1] RGB, as torchvision expects
    image_dev = image.to(device)
    outputs: dict[str, Any] = {}

    def run_torch() -> None:
        with torch.inference_mode():
            outputs["torch"] = tv([image_dev])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    torch_t = time_fn(run_torch, warmup=1 + warmup, repeats=iters)

    model = build_model(_oanet_config(dtype))
    variables = jax.device_put(convert.convert_maskrcnn(state, model))
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    normalised = ((image.numpy() - mean) / std).transpose(1, 2, 0)[None]
    batch = jax.device_put(
        {"image": normalised, "image_shape": np.asarray([[height, width]], np.int32)}
    )
    apply = jax.jit(lambda v, b: model.apply(v, b, train=False))
    lowered, lower_s = _once(lambda: apply.lower(variables, batch))
    compiled, compile_s = _once(lowered.compile)

    def run_oanet() -> Any:
        outputs["oanet"] = compiled(variables, batch)
        return outputs["oanet"]

    oanet_t = time_fn(run_oanet, warmup=1 + warmup, repeats=iters)
    oanet_ms = 1e3 * oanet_t["median_s"]
    torch_ms = 1e3 * torch_t["median_s"]

    return {
        "image": [height, width],
        "oanet_dtype": dtype,
        "oanet_device": str(jax.devices()[0]),
        "torch_device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "oanet_lower_s": round(lower_s, 3),
        "oanet_compile_s": round(compile_s, 3),
        "oanet_median_ms": round(oanet_ms, 3),
        "torch_median_ms": round(torch_ms, 3),
        "speedup": round(torch_ms / oanet_ms, 3),
        "oanet_detections": int(np.asarray(outputs["oanet"]["valid"]).sum()),
        "torch_detections": int(outputs["torch"][0]["boxes"].shape[0]),
        "warmup": warmup,
        "iters": iters,
        "oanet_times_ms": _ms(oanet_t["times_s"]),
        "torch_times_ms": _ms(torch_t["times_s"]),
    }
