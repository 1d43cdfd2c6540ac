"""One dispatch point for the quantized linear ops, on tensors: `W4A4Kernel` (a W4A4 layer's op, built
from its tensors, keeping what the kernels derive from them) and `w4a16_linear`; the kernels' limits
(RANK_MULTIPLE, MAX_RANK, KERNEL1_MAX_RANK) are defined here.

W4A4 linears run a kernel family chosen by the GPU's capability (the registry below; issue 13):
sm_80/86/89 -> the sm80 family's INT4 variant, sm_90 -> the sm90 (Hopper) family, any other
sm_80+ GPU -> the sm80 family's INT8 variant (each family picks its own kernel 2 for power-of-two
layers: sm90.svdq_linear, sm80.svdq_linear); W4A16 linears run the w4a16 family on any sm_80+ GPU.
The kernels come from svdquant.cuda (prebuilt cubins, the NVRTC cache, or NVRTC at first use).
Where a family cannot run a call (CPU tensor, older GPU, no NVRTC, unsupported case) the op runs
the PyTorch reference in `numerics`, announced with one log line per reason, never an error.
`SVDQUANT_W4A4_KERNELS` (sm90, sm80-int4, sm80-int8, reference) or `forced_family(name)` forces one.
A layer in FP8 execution (docs/DESIGN.md#fp8-execution) runs the fp8 family where it can (Hopper,
bfloat16), the W4A4 kernels above elsewhere, and the W4A4 reference on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from typing import NamedTuple

import torch

from . import cuda, numerics
from .families import rows_aligned, w4a16

log = logging.getLogger("svdquant")

_announced: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning logged the first time it comes up (one line per reason, not one per call)."""
    if message not in _announced:
        _announced.add(message)
        log.warning(message)


def _announce_fallback(reason: str) -> None:
    _warn_once(f"svdquant: using the PyTorch reference path ({reason})")


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
    rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ lora_down) @ lora_up^T + bias, x [M, K].

    pow2_activations: Q of the input is numerics.quantize_activations_pow2. rotation: the layer's
    group rotation (numerics.rotate_groups) or None. gelu_from: output
    channels from this one on are GELU (tanh approximation) of the above, taken in float32 before
    the rounding to x's dtype, as kernel 2's epilogue does."""
    if pow2_activations:
        act_codes, atok, exps = numerics.quantize_activations_pow2(x, smooth, shift, unsigned_groups, rotation)
        act_scales = numerics.pow2_scales(atok, exps)
    else:
        act_codes, act_scales = numerics.quantize_activations(x, smooth, shift, unsigned_groups, rotation)
    weight_codes = numerics.unpack_int4(qweight, signed=True)
    y = numerics.w4a4_gemm_reference(act_codes, act_scales, weight_codes, wscales)
    if lora_down.shape[1]:
        y += numerics.lowrank_reference(x, lora_down, lora_up)
    if bias is not None:
        y += bias.float()
    return numerics.gelu_channels(y, gelu_from).to(x.dtype)


def group_shifts(shift: torch.Tensor) -> torch.Tensor | None:
    """A layer's input shift [K] as kernel 1 takes it: one fp32 value per 64-group, or None where
    the values inside a group differ (no producer of ours makes such a layer: the GELU shift covers
    whole groups with one value)."""
    grouped = shift.float().reshape(-1, numerics.GROUP_SIZE)
    return grouped[:, 0].contiguous() if bool((grouped == grouped[:, :1]).all()) else None


# How kernel 1 of the W4A4 families applies a layer's group rotation (csrc/common/device.cuh
# rotate_octet): none, numerics.hadamard_rotation() by sums and differences, or any other rotation
# (any number of passes) by its coefficients
ROTATION_NONE, ROTATION_HADAMARD, ROTATION_COEFFICIENTS = 0, 1, 2
# kernel 1's coefficient rows per pass: float4 (4 s + j) * 8 + t of the pass's 192
ROTATION_COEFFICIENT_ROWS = numerics.ROTATION_STAGES * 32


def rotation_passes(rotation: torch.Tensor) -> int:
    """The passes P of a group rotation [6P, 64, 2] (P >= 1); ValueError for any other shape."""
    stages = rotation.shape[0] if rotation.dim() == 3 else 0
    if rotation.shape[1:] != (numerics.GROUP_SIZE, 2) or stages == 0 or stages % numerics.ROTATION_STAGES:
        raise ValueError(f"a group rotation is [6 P, {numerics.GROUP_SIZE}, 2] with P >= 1 passes, "
                         f"got {list(rotation.shape)}")
    return stages // numerics.ROTATION_STAGES


def rotation_coefficients(rotation: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A group rotation's coefficients (float32 [6P, 64, 2]) in kernel 1's layout (device.cuh's
    rotate_octet_coefficients): float32 [192 P, 4] on device, row 192 p + (4 s + j) * 8 + t holding
    rotation[6 p + s, 8 t + 2 j] and rotation[6 p + s, 8 t + 2 j + 1]."""
    passes = rotation_passes(rotation)
    grouped = rotation.to(device=device, dtype=torch.float32).reshape(passes * numerics.ROTATION_STAGES, 8, 4, 4)
    return grouped.transpose(1, 2).reshape(passes * ROTATION_COEFFICIENT_ROWS, 4).contiguous()


def kernel1_rotation(rotation: torch.Tensor | None, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """A group rotation (float32 [6P, 64, 2] or None) as kernel 1 takes it: (ROTATION_NONE, None),
    (ROTATION_HADAMARD, None) where it is exactly numerics.hadamard_rotation() (6 stages), else
    (ROTATION_COEFFICIENTS, rotation_coefficients(rotation, device))."""
    if rotation is None:
        return ROTATION_NONE, None
    if torch.equal(rotation.to(device="cpu", dtype=torch.float32), numerics.hadamard_rotation()):
        return ROTATION_HADAMARD, None
    return ROTATION_COEFFICIENTS, rotation_coefficients(rotation, device)


def kernel1_rotation_passes(rotation: tuple[int, torch.Tensor | None],
                            error: type[Exception]) -> tuple[int, tuple[int, int] | None]:
    """What the kernel-1 launchers of both families pass for kernel1_rotation's (kind, coefficients):
    the passes (0 none, 1 the Hadamard, P for coefficients [192 P, 4]) and the shape the coefficients
    must have (None where there are none); `error` (the family's) for a pair kernel1_rotation does not
    make."""
    kind, coefficients = rotation
    if kind == ROTATION_COEFFICIENTS:
        passes = max(1, coefficients.shape[0] // ROTATION_COEFFICIENT_ROWS)
        return passes, (passes * ROTATION_COEFFICIENT_ROWS, 4)
    if kind not in (ROTATION_NONE, ROTATION_HADAMARD) or coefficients is not None:
        raise error(f"the rotation must be kernels.kernel1_rotation's, got kind {kind}")
    return int(kind == ROTATION_HADAMARD), None


# ---- the kernels' limits --------------------------------------------------------------------------
# The low-rank kernels take ranks in multiples of RANK_MULTIPLE, at most MAX_RANK in all (a model's
# own branch plus the LoRAs joined to it: svdquant/lora.py pads to and checks against these).
RANK_MULTIPLE = 16
MAX_RANK = 1024
# Kernel 1 of every family computes the low-rank down projection in its pass over x up to this rank
# (a model's own branch). Beyond it (LoRAs joined to the branch) one cuBLAS GEMM x @ lora_down over
# all ranks costs less than kernel 1's further rank blocks (bench/NOTES.md#v18); at rank 32 the two
# ways cost the same.
KERNEL1_MAX_RANK = 32


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


def _family_flag(device: torch.device, flag: str) -> bool:
    """Whether the W4A4 family for this device has `flag` set (False where none runs)."""
    name = w4a4_kernels_on(device)
    return name is not None and _has(_family_on(W4A4_KERNELS[name][0], device)[0], flag)


def _has(module, flag: str) -> bool:
    """Whether a family's host module (None: none) sets `flag` (KERNEL1_NORM, KERNEL1_CONCAT, KERNEL2_RESIDUAL)."""
    return module is not None and getattr(module, flag, False)


def _no_kernels_reason(device: torch.device) -> str:
    """Why no kernel family runs for tensors on `device` ('' where one may)."""
    if device.type != "cuda":
        return f"no CUDA kernels for {device.type} tensors"
    name, forced_by = _forced_choice()
    return f"{forced_by} chose the reference path" if name == "reference" else ""


def fp8_execution_runs(device: torch.device, dtype: torch.dtype, out_features: int) -> bool:
    """Whether a W4A4 layer in FP8 execution with out_features outputs and its tensors on `device` runs on FP8
    tensor cores for `dtype` inputs, keeping FP8 weights there (W4A4Kernel's routing, told before any call so
    that a model's memory manager can count them); elsewhere it runs as stored. Loads the fp8 kernels."""
    if _no_kernels_reason(device):
        return False
    module, _ = _family_on("fp8", device)
    return module is not None and not module.layer_unsupported_reason(dtype, out_features)


class ModulatedNorm(NamedTuple):
    """A W4A4 layer's input still to be produced from x by numerics.modulated_layer_norm (FLUX's LayerNorm +
    modulation feeding qkv, the MLP and the single blocks' linear1, docs/DESIGN.md#producer-quantization):
    mult and add [B, K] in x's dtype (None: the LayerNorm alone), x's M rows being B equal runs of tokens."""
    mult: torch.Tensor | None
    add: torch.Tensor | None
    eps: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The input itself, x [M, K] -> [M, K]."""
        batches = 1 if self.mult is None else self.mult.shape[0]
        m, k = x.shape
        if m % batches:
            raise ValueError(f"{m} tokens do not split into {batches} equal batches")
        return numerics.modulated_layer_norm(x.reshape(batches, m // batches, k), self.mult, self.add,
                                             self.eps).reshape(m, k)


class GatedResidual(NamedTuple):
    """Where a W4A4 layer's output y goes: residual + gate * y (numerics.gated_residual; FLUX's gated residual
    streams), residual [M, N] and gate [B, N] in y's dtype, the M rows being B equal runs of tokens. A family with
    KERNEL2_RESIDUAL computes it in kernel 2's epilogue; `apply` is the same by PyTorch ops."""
    residual: torch.Tensor
    gate: torch.Tensor

    def apply(self, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """residual + gate * y for y [M, N], into out where given (the residual itself included)."""
        batches = self.gate.shape[0]
        rows = self.residual.reshape(batches, -1, y.shape[-1])
        value = numerics.gated_residual(rows, self.gate.unsqueeze(1), y.reshape(rows.shape)).reshape(y.shape)
        return value if out is None else out.copy_(value)


class Concat:
    """A W4A4 layer's input that is the concatenation of two 16-bit tensors along K, first [M, K1] and second
    [M, K2] (K1 a multiple of 64; FLUX's single blocks: the attention output and linear1's GELU columns,
    docs/DESIGN.md#producer-quantization), which a kernel 1 with the family's KERNEL1_CONCAT reads where they
    are; `value()` is the concatenated tensor, for everything else. Each part is kept as a 2-D view with unit
    column stride and 16-byte aligned rows (a copy where it is not)."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        if not (first.dim() == second.dim() == 2 and first.shape[0] == second.shape[0]):
            raise ValueError(f"a concatenation takes two 2-D tensors with the same rows, not {tuple(first.shape)} "
                             f"and {tuple(second.shape)}")
        if first.dtype != second.dtype or first.device != second.device:
            raise ValueError("the concatenated tensors differ in dtype or device")
        if first.shape[1] % numerics.GROUP_SIZE:
            raise ValueError(f"the first tensor's width {first.shape[1]} is not a multiple of {numerics.GROUP_SIZE}")
        self.parts = tuple(t if rows_aligned(t) else t.contiguous() for t in (first, second))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.parts[0].shape[0], self.parts[0].shape[1] + self.parts[1].shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def value(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=1)


def concat_on(device: torch.device) -> bool:
    """Whether W4A4 linears on this device run a kernel 1 that reads a Concat's two parts where they are (the
    family's KERNEL1_CONCAT), loading the kernels now."""
    return _family_flag(device, "KERNEL1_CONCAT")


def residual_on(device: torch.device) -> bool:
    """Whether W4A4 linears on this device run a kernel 2 that adds its output into a GatedResidual (the family's
    KERNEL2_RESIDUAL), loading the kernels now."""
    return _family_flag(device, "KERNEL2_RESIDUAL")


class W4A4Kernel:
    """One W4A4 layer's op on its tensors (docs/DESIGN.md#w4a4): `kernel(x)` is y [M, N] for x [M, K],
    computed by the kernel family the registry above picks for x's GPU, or by the PyTorch reference
    path (svdq_linear_reference) with one log line saying why (`fallback_reason`).

    Built from tensors, never from a layer: qweight, wscales, smooth, lora_down, lora_up, bias, shift
    and rotation as the file format has them (docs/DESIGN.md#format), the weight-scale format (pow2_weights:
    every group scale a power-of-two fraction of its row's largest), the activation mode
    (pow2_activations: power-of-two activation scales) and gelu_from (output channels from it on are
    GELU of the product). fp8_execution: run the layer on FP8 tensor cores where the fp8 family can
    (docs/DESIGN.md#fp8-execution), the model's own low-rank branch (its first base_rank columns; None:
    all of them) merged into the FP8 weights. The tensors a family derives from them (fp32 smooth and its
    reciprocal, the shift per group, lora_down in kernel 1's layout, the weight scales' exponents, the
    FP8 weights) are kept here by
    `derived`, each until its sources' storage or version changes (an in-place edit bumps it). A new
    tensor (a device move, LoRA columns set, a load) needs a new W4A4Kernel:
    linear.SVDQLinear.w4a4_kernel makes one whenever its layer's tensors or modes are not this one's.
    """

    def __init__(self, qweight: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor,
                 lora_up: torch.Tensor, bias: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 rotation: torch.Tensor | None = None, *,
                 pow2_weights: bool = False, pow2_activations: bool = False, gelu_from: int | None = None,
                 unsigned_groups: torch.Tensor | None = None, fp8_execution: bool = False,
                 base_rank: int | None = None):
        self.qweight, self.wscales, self.smooth = qweight, wscales, smooth
        self.lora_down, self.lora_up, self.bias, self.shift = lora_down, lora_up, bias, shift
        self.rotation = rotation
        self.pow2_weights, self.pow2_activations, self.gelu_from = pow2_weights, pow2_activations, gelu_from
        self.fp8_execution = fp8_execution
        self.base_rank = self.rank if base_rank is None else base_rank
        # per-group signed/unsigned mode of the reference path (the kernels read the shift itself)
        self.unsigned_groups = (numerics.unsigned_groups_from_shift(shift, self.in_features)
                                if unsigned_groups is None else unsigned_groups)
        self._derived: dict[str, tuple[tuple, object]] = {}

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """(qweight, wscales, smooth, lora_down, lora_up, bias, shift, rotation): what it was built from."""
        return (self.qweight, self.wscales, self.smooth, self.lora_down, self.lora_up, self.bias, self.shift,
                self.rotation)

    def derived(self, name: str, sources: tuple[torch.Tensor | None, ...], compute):
        """compute(), kept as `name` until a source tensor's storage, version or shape changes."""
        key = tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape)) for t in sources)
        kept = self._derived.get(name)
        if kept is None or kept[0] != key:
            kept = self._derived[name] = (key, compute())
        return kept[1]

    def group_shifts(self) -> torch.Tensor | None:
        """The shift as kernel 1 takes it (kernels.group_shifts): None without a shift, or where it
        varies inside a 64-channel group."""
        if self.shift is None:
            return None
        return self.derived("group_shifts", (self.shift,), lambda: group_shifts(self.shift))

    def kernel1_rotation(self) -> tuple[int, torch.Tensor | None]:
        """The rotation as kernel 1 takes it (kernels.kernel1_rotation), on the weights' device."""
        return self.derived("kernel1_rotation", (self.rotation,),
                            lambda: kernel1_rotation(self.rotation, self.qweight.device))

    def _route(self, x: torch.Tensor) -> tuple[object | None, dict, str]:
        """(family module, its svdq_linear variant arguments, '') for a call the kernels run, else
        (None, {}, why not)."""
        reason = _no_kernels_reason(x.device)
        if reason:
            return None, {}, reason
        if self.fp8_execution:
            module, reason = _family_on("fp8", x.device)
            reason = reason or module.unsupported_reason(x, self)
            if not reason:
                return module, {}, ""
            _warn_once(f"svdquant: FP8 execution does not run here ({reason}): the 4-bit layers run as stored")
        name = _forced_choice()[0]
        if name is None:
            major, minor = _capability(x.device)
            name = w4a4_kernels_for((major, minor))
            if name is None:
                return None, {}, f"no W4A4 kernels for sm_{major}{minor} GPUs (sm_80 or newer)"
        family, variant = W4A4_KERNELS[name]
        if x.dtype not in numerics.SUPPORTED_DTYPES or x.dtype != self.wscales.dtype:
            return None, {}, (f"input dtype {x.dtype} with {self.wscales.dtype} weights "
                              "(the kernels need one of bf16/fp16 for both)")
        if self.out_features % 8:
            return None, {}, f"out_features {self.out_features} is not a multiple of 8"
        if self.qweight.device != x.device:
            return None, {}, f"weights on {self.qweight.device}, input on {x.device}"
        if self.shift is not None and self.group_shifts() is None:
            return None, {}, "the input shift varies inside a 64-channel group (the kernels take one shift per group)"
        module, reason = _family_on(family, x.device)
        return (module, variant, "") if module is not None else (None, {}, reason)

    def takes_norm(self, x: torch.Tensor) -> bool:
        """Whether a call on x (or on a LayerNorm's input like x) with a `norm` runs it in kernel 1's prologue:
        the family that runs the call has one (its KERNEL1_NORM)."""
        return _has(self._route(x)[0], "KERNEL1_NORM")

    def fallback_reason(self, x: torch.Tensor) -> str:
        """Why the kernels cannot run this call ('' when they can)."""
        return self._route(x)[2]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The op by the PyTorch reference path (svdq_linear_reference), on any device."""
        return svdq_linear_reference(x, self.qweight, self.wscales, self.smooth, self.lora_down, self.lora_up,
                                     self.bias, self.shift, self.unsigned_groups, self.pow2_activations, self.gelu_from,
                                     self.rotation)

    def __call__(self, x: torch.Tensor | Concat, norm: ModulatedNorm | None = None,
                 residual: GatedResidual | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """y [M, N] for x [M, K], or with `norm` for norm.apply(x): in kernel 1's prologue where the family
        has one (its KERNEL1_NORM), else computed first. x may be a Concat: read in place where the family's
        kernel 1 can (KERNEL1_CONCAT), else concatenated first. residual: the result is residual + gate * y
        instead, in kernel 2's epilogue where the family has KERNEL2_RESIDUAL, else by PyTorch ops after it;
        written into out where given (the residual's own tensor included: in place)."""
        if isinstance(x, Concat) and norm is not None:
            raise ValueError("a norm applies to one input tensor, not to a concatenation")
        module, variant, reason = self._route(x)
        if isinstance(x, Concat) and not _has(module, "KERNEL1_CONCAT"):
            x = x.value()
        if norm is not None and not _has(module, "KERNEL1_NORM"):
            x, norm = norm.apply(x), None
        if module is None:
            _announce_fallback(reason)
            y = self.reference(x)
        else:
            options = {**variant, **({} if norm is None else {"norm": norm})}
            if residual is not None and _has(module, "KERNEL2_RESIDUAL"):
                return module.svdq_linear(x, self, residual=residual, out=out, **options)
            y = module.svdq_linear(x, self, **options)
        if residual is not None:
            return residual.apply(y, out)
        return y if out is None else out.copy_(y)


# ---- W4A16 -----------------------------------------------------------------------------------------
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit weight, 16-bit activation linear (docs/DESIGN.md#w4a4) on x [M, K]: the GEMV kernel for up
    to w4a16.GEMV_MAX_ROWS rows on a GPU, else W dequantized to x's dtype and a GEMM (the
    dequantization by a kernel on a GPU: the reference path's W bit for bit, in one pass)."""
    if x.device.type == "cuda":
        module, reason = _family_on("w4a16", x.device)
        if 0 < x.shape[0] <= w4a16.GEMV_MAX_ROWS:
            reason = reason or module.unsupported_reason(x, qweight, wscales, wzeros)
            if not reason:
                return module.linear(x, qweight, wscales, wzeros, bias)
            _announce_fallback(reason)
        elif module is not None and module.dequant_runs(x, qweight, wscales, wzeros):
            return module.linear(x, qweight, wscales, wzeros, bias)
        elif reason:
            _announce_fallback(reason)
    return w4a16_linear_reference(x, qweight, wscales, wzeros, bias)


def w4a16_linear_reference(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """W dequantized to x's dtype (numerics.dequantize_w4a16), then one GEMM."""
    codes = numerics.unpack_int4(qweight, signed=False)
    weight = numerics.dequantize_w4a16(codes, wscales, wzeros).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


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
