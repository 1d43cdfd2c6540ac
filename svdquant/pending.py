"""Tensors around the W4A4 layers not computed yet, so that the layer's own kernels compute them and they are never
written (docs/DESIGN.md#producer-quantization):

- a LayerNorm output and FLUX's modulation of it: `pending_layer_norm(x, eps)` returns a PendingNorm, a tensor
  without storage of its own that stands for the LayerNorm of x; `torch.addcmul(add, pending, mult)` on it (FLUX's
  `apply_mod`) returns a new PendingNorm that also carries the modulation. A W4A4 layer's kernel computes it as
  `numerics.modulated_layer_norm` defines; any other use as PyTorch's own LayerNorm and addcmul (what ComfyUI
  computes without the pack; the two differ only in rounding);
- a concatenation along the last dimension: `concat_operand(t)` returns a PendingConcat standing for t itself,
  and `torch.cat((a, pending), -1)` on it one standing for the concatenation (FLUX's single blocks concatenate the
  attention output with linear1's GELU columns to feed linear2);
- a W4A4 layer's output (a PendingOutput, `linear.SVDQLinear.feeds_gated_residual`): times a gate it stays pending,
  and `residual + p` or `residual += p` has the layer's kernel 2 write residual + gate * y itself (FLUX's gated
  residual streams).

An SVDQLinear receiving a pending input (`linear.quantized_forward`) hands what it stands for to its kernel
(`Pending.kernel_input`). Shape, dtype, device and the other metadata queries answer from the wrapper; any other use
computes the tensor once, keeps it, and runs on it, so in-place edits of it (ComfyUI's `modulation_dims` path)
persist for its later users. The sources are read when the tensor is computed or consumed: the code between the
producer and the consumer must not write them in place (FLUX's blocks do not).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from . import kernels, numerics

# "0" turns the pending LayerNorm off for the process (read at each LayerNorm call). On by default: it makes the eager
# FLUX.1-dev call ~2 ms faster on the H100 (bench/NOTES.md#fused-norm-default), and a LayerNorm stays pending only
# where the layer it feeds computes it in its kernel 1 (`stays_pending`)
FUSED_NORM_ENV = "SVDQUANT_FUSED_NORM"
# ComfyUI's FLUX runs in 16 bits, the only dtypes kernel 1 takes
PENDING_DTYPES = (torch.bfloat16, torch.float16)
_forced: list[bool] = []


@contextlib.contextmanager
def forced(on: bool):
    """Test hook: within the block `stays_pending`, `concat_operand` and `defers_output` make pending tensors (on)
    or not (off) on every device (the CPU included) whatever SVDQUANT_FUSED_NORM, the kernels and the LayerNorm's
    consumer say; their conditions on the tensor itself still apply."""
    _forced.append(on)
    try:
        yield
    finally:
        _forced.pop()


def _pending_form(x: torch.Tensor) -> bool:
    """What every pending kind needs of the tensor it stands on: outside torch.compile (dynamo would have to trace
    the subclass; the compiled model fuses the producer itself), [B, L, K] in bf16/fp16, not requiring its
    gradient."""
    return (not torch.compiler.is_compiling() and x.dim() == 3 and x.dtype in PENDING_DTYPES
            and not (torch.is_grad_enabled() and x.requires_grad))


def _may_stay_pending(x: torch.Tensor) -> bool:
    """A producer's tensor the LayerNorm and the concatenation may leave pending: a plain tensor of _pending_form."""
    return type(x) is torch.Tensor and _pending_form(x)


def _kernels_take(device: torch.device, family_has) -> bool:
    """`forced`'s answer where a test set one, else family_has(device) (kernels.concat_on, kernels.residual_on)."""
    return _forced[-1] if _forced else family_has(device)


def stays_pending(x: torch.Tensor, normalized_shape, consumer=None) -> bool:
    """Whether a LayerNorm without affine parameters of x over `normalized_shape` should return a
    PendingNorm: outside torch.compile (dynamo would have to trace the subclass; the compiled model
    fuses the LayerNorm itself), x a plain [B, L, K] tensor in bf16/fp16 normalized over K, not
    requiring its gradient; `consumer`, the W4A4 layer the LayerNorm feeds (flux.fusion.mark_norm_consumers),
    runs its norm prologue on x (`consumer.takes_norm_prologue(x)`: where it does not, FP8 execution or weights
    ComfyUI left in host memory, the layer would compute the LayerNorm first, in PyTorch ops slower than PyTorch's
    own LayerNorm); and SVDQUANT_FUSED_NORM is not "0"."""
    if not (_may_stay_pending(x) and tuple(normalized_shape) == (x.shape[-1],)):
        return False
    if _forced:
        return _forced[-1]
    return (os.environ.get(FUSED_NORM_ENV) != "0" and consumer is not None
            and consumer.takes_norm_prologue(x))


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
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_IADD = {torch.Tensor.__iadd__, torch.Tensor.add_}


class Pending(torch.Tensor):
    """A tensor without storage of its own ([B, L, K]) that stands for a value computed at its first use other than
    the ones its kind takes over (`_fused`) and a W4A4 layer's (`kernel_input`)."""

    @staticmethod
    def __new__(cls, like: torch.Tensor, shape: tuple[int, ...]):
        wrapper = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=like.dtype, device=like.device,
                                                      requires_grad=False)
        wrapper._value = None
        return wrapper

    def value(self) -> torch.Tensor:
        """The tensor itself, computed at the first call and kept (later in-place edits included)."""
        if self._value is None:
            self._value = self._compute()
        return self._value

    def kernel_input(self) -> tuple[torch.Tensor | kernels.Concat, kernels.ModulatedNorm | None, torch.Size] | None:
        """(x, norm, lead) for `W4A4Kernel(x, norm)` computing a W4A4 layer's output on this tensor as [M, N]
        (lead: the leading dimensions to restore), while it is not computed; else None."""
        raise NotImplementedError

    def _compute(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _fused(cls, func, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The result of `func(*args, **kwargs)` (a new pending tensor, or one the op's fused form computed) where
        this kind takes that op over, else None."""
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        fused = cls._fused(func, args, kwargs)
        if fused is not None:
            return fused
        args, kwargs = tree_map_only(Pending, Pending.value, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # reached only by code that bypasses __torch_function__ (e.g. under DisableTorchFunctionSubclass):
        # the wrapper has no storage, so the op runs on the computed tensor
        args, kwargs = tree_map_only(Pending, Pending.value, (args, kwargs or {}))
        return func(*args, **kwargs)


class PendingNorm(Pending):
    """The LayerNorm of source ([B, L, K], without affine parameters, eps norm.eps), times norm.mult plus norm.add
    where those are given, in source's dtype and device: handed to a W4A4 layer's kernel as source and norm
    (`numerics.modulated_layer_norm` there), else computed at the first other use as PyTorch's `layer_norm` and
    `addcmul`, as ComfyUI's FLUX computes it without the pack."""

    @staticmethod
    def __new__(cls, source: torch.Tensor, norm: kernels.ModulatedNorm):
        wrapper = Pending.__new__(cls, source, source.shape)
        wrapper._source, wrapper._norm = source, norm
        return wrapper

    def kernel_input(self) -> tuple[torch.Tensor, kernels.ModulatedNorm, torch.Size] | None:
        if self._value is not None:
            return None
        source = self._source  # its metadata, not the wrapper's: no __torch_function__ round trips
        return source.reshape(-1, source.shape[-1]), self._norm, source.shape[:-1]

    def _compute(self) -> torch.Tensor:
        source, norm = self._source, self._norm
        value = F.layer_norm(source, source.shape[-1:], eps=norm.eps)
        if norm.mult is not None:
            rows = source.shape[0], 1, source.shape[-1]
            value = torch.addcmul(norm.add.view(rows), value, norm.mult.view(rows))
        self._source = self._norm = None
        return value

    def modulated(self, mult: torch.Tensor, add: torch.Tensor) -> PendingNorm | None:
        """`self * mult + add` pending, where the LayerNorm alone is still pending and mult and add are
        plain tensors of its dtype and device, each one row per batch broadcast over the tokens
        ([B, 1, K], or [1, 1, K], [1, K], [K] for every batch); else None."""
        if self._value is not None or self._norm.mult is not None:
            return None
        source = self._source
        rows = [_per_batch(t, source.shape, source.dtype, source.device) for t in (mult, add)]
        if rows[0] is None or rows[1] is None:  # not `None in rows`: that compares tensors with None
            return None
        return PendingNorm(self._source, kernels.ModulatedNorm(*rows, self._norm.eps))

    @classmethod
    def _fused(cls, func, args: tuple, kwargs: dict) -> PendingNorm | None:
        return _modulation(args, kwargs) if func in _ADDCMUL else None


class PendingConcat(Pending):
    """`torch.cat(pieces, -1)` of plain [B, L, Ki] tensors (one piece: that tensor itself, no copy), not computed
    until something other than a W4A4 layer or a concatenation along the last dimension uses it."""

    @staticmethod
    def __new__(cls, pieces: tuple[torch.Tensor, ...]):
        first = pieces[0]
        wrapper = Pending.__new__(cls, first, (*first.shape[:-1], sum(p.shape[-1] for p in pieces)))
        wrapper._pieces = pieces
        return wrapper

    def pieces(self) -> tuple[torch.Tensor, ...] | None:
        """The tensors it concatenates while not computed, else None."""
        return None if self._value is not None else self._pieces

    def kernel_input(self) -> tuple[kernels.Concat, None, torch.Size] | None:
        pieces = self.pieces()
        if pieces is None or len(pieces) != 2:
            return None
        first, second = pieces
        return (kernels.Concat(first.reshape(-1, first.shape[-1]), second.reshape(-1, second.shape[-1])), None,
                first.shape[:-1])

    def _compute(self) -> torch.Tensor:
        pieces, self._pieces = self._pieces, None
        # contiguous, as the wrapper's strides say (one piece may be a strided slice of its producer's output)
        return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, -1)

    @classmethod
    def _fused(cls, func, args: tuple, kwargs: dict) -> PendingConcat | None:
        return _concatenation(args, kwargs) if func in _CAT else None


class PendingOutput(Pending):
    """A W4A4 layer's output y ([B, L, N], `forward(None, None)`), times a gate [B, N] once multiplied by one per
    batch row (FLUX's `apply_mod(y, gate)`), not computed until added into a residual stream: `residual + p` and
    `residual += p` then run `forward(kernels.GatedResidual(residual, gate), out)`, the layer's kernel 2 writing
    residual + gate * y itself (numerics.gated_residual). Any other use computes y (times the gate) as PyTorch
    would. forward(residual, out) is `linear.quantized_forward` of the layer on its input."""

    @staticmethod
    def __new__(cls, forward, like: torch.Tensor, shape: tuple[int, ...], gate: torch.Tensor | None = None):
        wrapper = Pending.__new__(cls, like, shape)
        wrapper._forward, wrapper._gate, wrapper._size = forward, gate, tuple(shape)
        wrapper._like = (like.dtype, like.device)  # the output's, without __torch_function__ round trips
        return wrapper

    def kernel_input(self) -> None:
        return None  # an output, never handed to a layer's kernel as its input

    def _compute(self) -> torch.Tensor:
        y = self._forward(None, None)
        return y if self._gate is None else y * self._gate.unsqueeze(1)

    @classmethod
    def _fused(cls, func, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if kwargs or len(args) != 2:
            return None
        if func in _MUL:
            return _gated(*args)
        if func in _ADD or func in _IADD:
            return _added_into(*args, in_place=func in _IADD)
        return None


def defers_output(x: torch.Tensor) -> bool:
    """Whether a layer marked `feeds_gated_residual` should return a PendingOutput for input x (plain or pending):
    outside torch.compile, x [B, L, K] in bf16/fp16 without gradients, on a device whose W4A4 kernels add their
    output into a residual (kernels.residual_on) or under `forced(True)`."""
    return isinstance(x, torch.Tensor) and _pending_form(x) and _kernels_take(x.device, kernels.residual_on)


def _gated(a, b) -> PendingOutput | None:
    """The PendingOutput for `p * gate` (either order) of a pending ungated output and a plain gate with one row per
    batch ([B, 1, N]: _per_batch), else None."""
    p, gate = (a, b) if isinstance(a, PendingOutput) else (b, a)
    if not (isinstance(p, PendingOutput) and p._value is None and p._gate is None and type(gate) is torch.Tensor):
        return None
    if len(p._size) != 3 or (torch.is_grad_enabled() and gate.requires_grad):
        return None
    rows = _per_batch(gate, p._size, *p._like)
    return None if rows is None else PendingOutput(p._forward, gate, p._size, rows)


def _added_into(a, b, in_place: bool) -> torch.Tensor | None:
    """`residual + p` (either order) or `residual += p` for a pending gated output p and a plain contiguous residual
    of its shape, dtype and device: the layer's kernel writes residual + gate * y (into the residual itself where
    in place); else None."""
    residual, p = (a, b) if isinstance(b, PendingOutput) else (b, a)
    if in_place and residual is not a:
        return None
    if not (isinstance(p, PendingOutput) and p._value is None and p._gate is not None
            and type(residual) is torch.Tensor):
        return None
    if (tuple(residual.shape) != p._size or (residual.dtype, residual.device) != p._like
            or not residual.is_contiguous() or (torch.is_grad_enabled() and residual.requires_grad)):
        return None
    flat = residual.view(-1, p._size[-1])
    y = p._forward(kernels.GatedResidual(flat, p._gate), flat if in_place else None)
    return residual if in_place else y.reshape(p._size)


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


def concat_operand(t: torch.Tensor) -> torch.Tensor:
    """t as a PendingConcat of one piece, where a concatenation with it along the last dimension may stay pending
    (`_may_stay_pending`, on a device whose W4A4 kernels read a concatenation where its parts are:
    kernels.concat_on); else t."""
    if _may_stay_pending(t) and _kernels_take(t.device, kernels.concat_on):
        return PendingConcat((t,))
    return t


def _concatenation(args: tuple, kwargs: dict) -> PendingConcat | None:
    """The PendingConcat for `torch.cat(tensors, dim)` of a pending one and plain tensors along the last dimension,
    where it has two pieces, the first a multiple of 64 wide (what kernel 1 reads), all [B, L, Ki] of one dtype and
    device without gradients; else None."""
    if len(args) > 2 or set(kwargs) - {"dim"} or (len(args) == 2 and "dim" in kwargs):
        return None
    tensors, dim = args[0], args[1] if len(args) == 2 else kwargs.get("dim", 0)
    if not isinstance(tensors, (tuple, list)) or not tensors or not isinstance(dim, int):
        return None
    pieces = []
    for t in tensors:
        if isinstance(t, PendingConcat) and t.pieces() is not None:
            pieces.extend(t.pieces())
        elif type(t) is torch.Tensor:
            pieces.append(t)
        else:
            return None
    first = pieces[0]
    if len(pieces) != 2 or dim not in (2, -1) or first.shape[-1] % numerics.GROUP_SIZE:
        return None
    if not all(_may_stay_pending(p) and p.shape[:-1] == first.shape[:-1] and p.dtype == first.dtype
               and p.device == first.device for p in pieces):
        return None
    return PendingConcat(tuple(pieces))


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
