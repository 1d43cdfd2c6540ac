"""A LayerNorm output (and FLUX's modulation of it) not computed yet, so that the W4A4 layer it feeds
computes it inside its own kernel 1 and the normalized tensor is not written (but for ranks above
kernels.KERNEL1_MAX_RANK, whose low-rank GEMM reads it; docs/DESIGN.md#producer-quantization).

`pending_layer_norm(x, eps)` returns a PendingNorm: a tensor without storage of its own that stands for
`numerics.modulated_layer_norm(x, None, None, eps)`. `torch.addcmul(add, pending, mult)` on it (FLUX's
`apply_mod`) returns a new PendingNorm that also carries the modulation. An SVDQLinear receiving one
(`linear.quantized_forward`) hands its source and the norm to its kernel (`W4A4Kernel(x, norm=...)`).
Shape, dtype, device and the other metadata queries answer from the wrapper; any other use computes the
tensor once, keeps it, and runs on it, so in-place edits of it (ComfyUI's `modulation_dims` path) persist
for its later users. The source is read when the tensor is computed or consumed: the code between the
LayerNorm and its consumer must not write the source in place (FLUX's blocks do not).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.utils._pytree import tree_map_only

from . import kernels, numerics

# "1" turns the fusion on for the process (read at each LayerNorm call). Off by default: on the H100 it took
# 3.6 ms of GPU time off an eager FLUX.1-dev call but added more host time than that (bench/NOTES.md#norm-prologue)
FUSED_NORM_ENV = "SVDQUANT_FUSED_NORM"
# ComfyUI's FLUX runs in 16 bits, the only dtypes kernel 1 takes
PENDING_DTYPES = (torch.bfloat16, torch.float16)
_forced: list[bool] = []


@contextlib.contextmanager
def forced(on: bool):
    """Test hook: within the block `stays_pending` says `on` on every device (the CPU included) whatever
    SVDQUANT_FUSED_NORM says; its conditions on the tensor itself still apply."""
    _forced.append(on)
    try:
        yield
    finally:
        _forced.pop()


def stays_pending(x: torch.Tensor, normalized_shape) -> bool:
    """Whether a LayerNorm without affine parameters of x over `normalized_shape` should return a
    PendingNorm: outside torch.compile (dynamo would have to trace the subclass; the compiled model
    fuses the LayerNorm itself), x a plain [B, L, K] tensor in bf16/fp16 normalized over K, not
    requiring its gradient, on a CUDA device whose W4A4 kernels have the norm prologue (where they do not, the
    layer would compute it first, slower than PyTorch's LayerNorm), and the fusion on (SVDQUANT_FUSED_NORM is
    "1")."""
    if torch.compiler.is_compiling():
        return False
    if not (type(x) is torch.Tensor and x.dim() == 3 and x.dtype in PENDING_DTYPES
            and tuple(normalized_shape) == (x.shape[-1],) and not (torch.is_grad_enabled() and x.requires_grad)):
        return False
    if _forced:
        return _forced[-1]
    return os.environ.get(FUSED_NORM_ENV) == "1" and kernels.norm_prologue_on(x.device)


def pending_layer_norm(x: torch.Tensor, eps: float) -> PendingNorm:
    """The LayerNorm of x [B, L, K] over K without affine parameters, pending."""
    if x.dim() != 3:
        raise ValueError(f"a pending LayerNorm takes x [B, L, K], not {tuple(x.shape)}")
    return PendingNorm(x, kernels.ModulatedNorm(None, None, eps))


# queries answered by the wrapper itself (its TensorImpl holds shape, strides, dtype and device)
_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.layout.__get__, torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_leaf.__get__, torch.Tensor.grad_fn.__get__, torch.Tensor.grad.__get__,
    torch.Tensor.is_cuda.__get__, torch.Tensor.is_cpu.__get__, torch.Tensor.is_meta.__get__,
    torch.Tensor.is_sparse.__get__, torch.Tensor.is_quantized.__get__, torch.Tensor.is_nested.__get__,
    torch.Tensor.itemsize.__get__, torch.Tensor.nbytes.__get__,
    torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.element_size, torch.Tensor.stride, torch.Tensor.is_contiguous, torch.Tensor.is_floating_point,
    torch.Tensor.is_complex, torch.Tensor.is_signed, torch.Tensor.get_device, torch.Tensor.__len__,
    torch.numel, torch.is_floating_point, torch.is_complex,
}
_ADDCMUL = {torch.addcmul, torch.Tensor.addcmul}


class PendingNorm(torch.Tensor):
    """`numerics.modulated_layer_norm(source, norm.mult, norm.add, norm.eps)` ([B, L, K], source's dtype
    and device), not computed until something other than a W4A4 layer or FLUX's modulation uses it."""

    @staticmethod
    def __new__(cls, source: torch.Tensor, norm: kernels.ModulatedNorm):
        wrapper = torch.Tensor._make_wrapper_subclass(cls, source.shape, dtype=source.dtype, device=source.device,
                                                      requires_grad=False)
        wrapper._source, wrapper._norm, wrapper._value = source, norm, None
        return wrapper

    def pending(self) -> tuple[torch.Tensor, kernels.ModulatedNorm] | None:
        """(source [B, L, K], the norm to apply to it) while not computed, else None."""
        return None if self._value is not None else (self._source, self._norm)

    def value(self) -> torch.Tensor:
        """The tensor itself, computed at the first call and kept (later in-place edits included)."""
        if self._value is None:
            norm = self._norm
            self._value = numerics.modulated_layer_norm(self._source, norm.mult, norm.add, norm.eps)
            self._source = self._norm = None
        return self._value

    def modulated(self, mult: torch.Tensor, add: torch.Tensor) -> PendingNorm | None:
        """`self * mult + add` pending, where the LayerNorm alone is still pending and mult and add are
        plain tensors of its dtype and device, each one row per batch broadcast over the tokens
        ([B, 1, K], or [1, 1, K], [1, K], [K] for every batch); else None."""
        if self._value is not None or self._norm.mult is not None:
            return None
        source = self._source  # its metadata, not the wrapper's: no __torch_function__ round trips
        rows = [_per_batch(t, source.shape, source.dtype, source.device) for t in (mult, add)]
        if rows[0] is None or rows[1] is None:  # not `None in rows`: that compares tensors with None
            return None
        return PendingNorm(self._source, kernels.ModulatedNorm(*rows, self._norm.eps))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in _ADDCMUL:
            modulated = _modulation(args, kwargs)
            if modulated is not None:
                return modulated
        args, kwargs = tree_map_only(PendingNorm, PendingNorm.value, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # reached only by code that bypasses __torch_function__ (e.g. under DisableTorchFunctionSubclass):
        # the wrapper has no storage, so the op runs on the computed tensor
        args, kwargs = tree_map_only(PendingNorm, PendingNorm.value, (args, kwargs or {}))
        return func(*args, **kwargs)


def _modulation(args: tuple, kwargs: dict) -> PendingNorm | None:
    """The PendingNorm for `addcmul(add, pending, mult)` (the factors in either order, value 1), else None."""
    if len(args) != 3 or set(kwargs) - {"value"} or kwargs.get("value", 1) != 1:
        return None
    add, first, second = args
    pending, mult = (first, second) if isinstance(first, PendingNorm) else (second, first)
    if not isinstance(pending, PendingNorm) or type(mult) is not torch.Tensor or type(add) is not torch.Tensor:
        return None
    if torch.is_grad_enabled() and (mult.requires_grad or add.requires_grad):
        return None
    return pending.modulated(mult, add)


def _per_batch(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """t as [B, K] rows (contiguous) when t broadcasts over the tokens of a [B, L, K] tensor, one row per
    batch or one for all, without changing its shape; else None."""
    batches, _, k = shape
    if t.dtype != dtype or t.device != device or t.dim() > 3 or t.shape[-1:] != (k,):
        return None
    lead = (1,) * (3 - t.dim()) + tuple(t.shape)
    if lead[1] != 1 or lead[0] not in (1, batches):
        return None
    return t.reshape(-1, k).expand(batches, k).contiguous()
