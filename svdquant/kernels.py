"""One dispatch point for the quantized linear ops.

W4A4 linears run a kernel family chosen by the GPU's capability (the registry below; issue 13):
sm_80/86/89 -> the sm80 family's INT4 variant, sm_90 -> the sm90 (Hopper) family, any other
sm_80+ GPU -> the sm80 family's INT8 variant; W4A16 linears run the w4a16 family on any sm_80+ GPU.
The kernels come from svdquant.cuda (prebuilt cubins, the NVRTC cache, or NVRTC at first use).
Where a family cannot run a call (CPU tensor, older GPU, no NVRTC, unsupported case) the op runs
the PyTorch reference in `numerics`, announced with one log line per reason, never an error.
`SVDQUANT_W4A4_KERNELS` (sm90, sm80-int4, sm80-int8, reference) or `forced_family(name)` forces one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os

import torch

from . import cuda, numerics
from .families import w4a16

log = logging.getLogger("svdquant")

_announced: set[str] = set()


def _announce_fallback(reason: str) -> None:
    if reason not in _announced:
        _announced.add(reason)
        log.warning("svdquant: using the PyTorch reference path (%s)", reason)


def uses_pow2_activations(layer) -> bool:
    """Whether `layer`'s input is quantized with power-of-two restricted scales
    (docs/DESIGN.md#scales): the layer's own `pow2_activations`, set at load by
    flux.apply_file_options from the loader's choice. Every path (kernels and reference) follows it,
    so every device computes the same function."""
    return bool(getattr(layer, "pow2_activations", False))


def svdq_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    unsigned_groups: torch.Tensor | None = None,
    pow2_activations: bool = False,
    gelu_from: int | None = None,
) -> torch.Tensor:
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ lora_down) @ lora_up^T + bias, x [M, K].

    pow2_activations: Q of the input is numerics.quantize_activations_pow2. gelu_from: output
    channels from this one on are GELU (tanh approximation) of the above, taken in float32 before
    the rounding to x's dtype, as kernel 2's epilogue does."""
    if pow2_activations:
        act_codes, atok, exps = numerics.quantize_activations_pow2(x, smooth, shift, unsigned_groups)
        act_scales = numerics.pow2_scales(atok, exps)
    else:
        act_codes, act_scales = numerics.quantize_activations(x, smooth, shift, unsigned_groups)
    weight_codes = numerics.unpack_int4(qweight, signed=True)
    y = numerics.w4a4_gemm_reference(act_codes, act_scales, weight_codes, wscales)
    if lora_down.shape[1]:
        y += numerics.lowrank_reference(x, lora_down, lora_up)
    if bias is not None:
        y += bias.float()
    return numerics.gelu_channels(y, gelu_from).to(x.dtype)


def cached_on(layer, attr: str, key: tuple, compute):
    """compute(), kept on the layer as `attr` until `key` (its source tensors' storage and version)
    changes: LoRAs and loads replace a layer's tensors, in-place edits bump their versions."""
    cached = getattr(layer, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        setattr(layer, attr, cached)
    return cached[1]


def group_shifts(shift: torch.Tensor) -> torch.Tensor | None:
    """A layer's input shift [K] as kernel 1 takes it: one fp32 value per 64-group, or None where
    the values inside a group differ (no producer of ours makes such a layer: the GELU shift covers
    whole groups with one value)."""
    grouped = shift.float().reshape(-1, numerics.GROUP_SIZE)
    return grouped[:, 0].contiguous() if bool((grouped == grouped[:, :1]).all()) else None


# ---- the W4A4 family registry --------------------------------------------------------------------
# name -> (family, the family module's svdq_linear keyword arguments)
W4A4_KERNELS = {
    "sm90": ("sm90", {}),
    "sm80-int4": ("sm80", {"mma": "int4"}),
    "sm80-int8": ("sm80", {"mma": "int8"}),
}
KERNELS_ENV = "SVDQUANT_W4A4_KERNELS"
_forced: list[str] = []


def w4a4_kernels_for(capability: tuple[int, int]) -> str | None:
    """The W4A4 kernels a GPU of this capability runs by default (None: the reference path).
    Ampere and Ada have native INT4 mma.sync; Hopper has its wgmma family; on newer GPUs INT4
    mma.sync may be emulated, INT8 mma.sync on the same codes is native everywhere."""
    if capability in ((8, 0), (8, 6), (8, 9)):
        return "sm80-int4"
    if capability == (9, 0):
        return "sm90"
    return "sm80-int8" if capability[0] >= 8 else None


@contextlib.contextmanager
def forced_family(name: str):
    """Within the block W4A4 linears run `name` (a W4A4_KERNELS key, or "reference") on any GPU that
    can run it (tests and benchmarks), ahead of SVDQUANT_W4A4_KERNELS."""
    if name not in W4A4_KERNELS and name != "reference":
        raise ValueError(f"unknown W4A4 kernels {name!r}: one of {', '.join(W4A4_KERNELS)}, reference")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _forced_choice() -> tuple[str | None, str]:
    """(the forced kernels, who forced them), or (None, '')."""
    if _forced:
        return _forced[-1], "kernels.forced_family"
    name = os.environ.get(KERNELS_ENV)
    if not name:
        return None, ""
    if name not in W4A4_KERNELS and name != "reference":
        raise ValueError(f"{KERNELS_ENV}={name!r}: one of {', '.join(W4A4_KERNELS)}, reference")
    return name, KERNELS_ENV


@functools.lru_cache(maxsize=None)
def _capability_of_index(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of_index(cuda.device_index(device))


# (family, GPU index) -> (the family's host module or None, why not)
_families: dict[tuple[str, int], tuple[object | None, str]] = {}


def _family_on(family: str, device: torch.device) -> tuple[object | None, str]:
    """The family's host module with its kernels loaded on this GPU (compiled at first use), or None
    and the reason. Decided once per family and GPU."""
    index = cuda.device_index(device)
    key = (family, index)
    if key not in _families:
        major, minor = _capability(device)
        if not cuda.FAMILIES[family].supports((major, minor)):
            _families[key] = None, f"the {family} kernels do not run on sm_{major}{minor} GPUs"
        else:
            try:
                module = importlib.import_module(f".families.{family}", __package__)
                cuda.load(family, device)
                _families[key] = module, ""
            except ImportError as exc:
                _families[key] = None, f"the {family} family's host module is missing ({exc})"
            except (cuda.NvrtcError, cuda.CudaError) as exc:
                _families[key] = None, f"the {family} kernels could not be compiled or loaded: {exc}"
    return _families[key]


def w4a4_kernels_on(device: torch.device) -> str | None:
    """The W4A4 kernels (a W4A4_KERNELS key) that linears on this device run, forced or by default,
    loading them now; None where they take the reference path."""
    if device.type != "cuda":
        return None
    name, _ = _forced_choice()
    name = name or w4a4_kernels_for(_capability(device))
    if name in (None, "reference"):
        return None
    return name if _family_on(W4A4_KERNELS[name][0], device)[0] is not None else None


def _w4a4_route(x: torch.Tensor, layer) -> tuple[object | None, dict, str]:
    """(family module, its svdq_linear variant arguments, '') for a call the kernels run, else
    (None, {}, why not)."""
    if x.device.type != "cuda":
        return None, {}, f"no CUDA kernels for {x.device.type} tensors"
    major, minor = _capability(x.device)
    name, forced_by = _forced_choice()
    if name == "reference":
        return None, {}, f"{forced_by} chose the reference path"
    if name is None:
        name = w4a4_kernels_for((major, minor))
        if name is None:
            return None, {}, f"no W4A4 kernels for sm_{major}{minor} GPUs (sm_80 or newer)"
    family, variant = W4A4_KERNELS[name]
    if x.dtype not in numerics.SUPPORTED_DTYPES or x.dtype != layer.wscales.dtype:
        return None, {}, (f"input dtype {x.dtype} with {layer.wscales.dtype} weights "
                          "(the kernels need one of bf16/fp16 for both)")
    if layer.out_features % 8:
        return None, {}, f"out_features {layer.out_features} is not a multiple of 8"
    if layer.qweight.device != x.device:
        return None, {}, f"weights on {layer.qweight.device}, input on {x.device}"
    if layer.shift is not None and _group_shifts_of(layer) is None:
        return None, {}, "the input shift varies inside a 64-channel group (the kernels take one shift per group)"
    module, reason = _family_on(family, x.device)
    if module is None:
        return None, {}, reason
    check = getattr(module, "unsupported_reason", None)
    reason = check(x, layer, **variant) if check else ""
    return (None, {}, reason) if reason else (module, variant, "")


def _group_shifts_of(layer) -> torch.Tensor | None:
    shift = layer.shift
    return cached_on(layer, "_group_shifts", (shift.data_ptr(), shift._version), lambda: group_shifts(shift))


def _fallback_reason(x: torch.Tensor, layer) -> str:
    """Why the kernels cannot run this call of an SVDQLinear ('' when they can)."""
    return _w4a4_route(x, layer)[2]


def svdq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """SVDQuant W4A4 linear on x [M, K] with an `SVDQLinear`'s tensors."""
    module, variant, reason = _w4a4_route(x, layer)
    if module is not None:
        return module.svdq_linear(x, layer, **variant)
    _announce_fallback(reason)
    return svdq_linear_reference(
        x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
        layer.bias, layer.shift, layer.unsigned_groups, uses_pow2_activations(layer), layer.gelu_from,
    )


# ---- W4A16 -----------------------------------------------------------------------------------------
def w4a16_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """4-bit weight, 16-bit activation linear on x [M, K] with a `W4A16Linear`'s tensors: the GEMV
    kernel for up to w4a16.GEMV_MAX_ROWS rows on a GPU, else W dequantized to x's dtype and a GEMM (the
    dequantization by a kernel on a GPU: the reference path's W bit for bit, in one pass)."""
    if x.device.type == "cuda":
        module, reason = _family_on("w4a16", x.device)
        if 0 < x.shape[0] <= w4a16.GEMV_MAX_ROWS:
            reason = reason or module.unsupported_reason(x, layer)
            if not reason:
                return module.linear(x, layer)
            _announce_fallback(reason)
        elif module is not None and module.dequant_runs(x, layer):
            return module.linear(x, layer)
        elif reason:
            _announce_fallback(reason)
    return w4a16_linear_reference(x, layer)


def w4a16_linear_reference(x: torch.Tensor, layer) -> torch.Tensor:
    """W dequantized to x's dtype (numerics.dequantize_w4a16), then one GEMM."""
    codes = numerics.unpack_int4(layer.qweight, signed=False)
    weight = numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def kernels_status() -> dict:
    """For the current GPU (or none): which kernels each op uses and why (for `python -m svdquant info`)."""
    if not torch.cuda.is_available():
        why = "reference (no CUDA GPU visible to torch %s)" % torch.__version__
        return {"device": "none", "W4A4 linear": why, "W4A16 linear": why}
    index = torch.cuda.current_device()
    major, minor = _capability_of_index(index)
    out = {"device": f"cuda:{index} {torch.cuda.get_device_name(index)} (sm_{major}{minor})"}
    name, forced_by = _forced_choice()
    if name is None:
        name, why = w4a4_kernels_for((major, minor)), f"default for sm_{major}{minor}"
    else:
        why = f"forced by {forced_by}"
    w4a4_family = None if name in (None, "reference") else W4A4_KERNELS[name][0]
    out["W4A4 linear"] = _family_status(w4a4_family, name, why, (major, minor), index)
    out["W4A16 linear"] = _family_status("w4a16" if major >= 8 else None, "w4a16", "any sm_80+ GPU",
                                         (major, minor), index)
    return out


def _family_status(family: str | None, name: str | None, why: str, capability: tuple[int, int], index: int) -> str:
    if family is None:
        return f"reference ({why}: no kernels)" if name != "reference" else f"reference ({why})"
    arch = cuda.target_arch(family, capability)
    if not cuda.FAMILIES[family].supports(capability):
        return f"reference ({name}, {why}: the {family} kernels do not run on sm_{capability[0]}{capability[1]})"
    try:
        importlib.import_module(f".families.{family}", __package__)
    except ImportError as exc:
        return f"reference ({name}, {why}: the {family} family's host module is missing: {exc})"
    origin = cuda.loaded_origin(family, index)
    if origin is None:
        try:
            origin = {"prebuilt": "prebuilt cubins", "cached": "NVRTC cache",
                      "compile": "NVRTC compiles them at first use"}[cuda.cubin_origin(family, arch)]
        except cuda.NvrtcError as exc:
            return f"reference ({name}, {why}: no prebuilt cubins and {exc})"
    else:
        origin = {"prebuilt": "prebuilt cubins", "cached": "NVRTC cache", "compiled": "NVRTC-compiled"}[origin] + \
            " (loaded)"
    return f"{name} ({why}), {arch}: {origin}"
