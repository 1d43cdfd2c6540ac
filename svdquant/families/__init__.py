"""Host side of each kernel family (argument checks, grid and shared-memory sizes, launches through
svdquant.cuda): sm90.py for csrc/sm90, sm80.py for csrc/sm80, w4a16.py for csrc/generic, fp8.py for csrc/fp8.

Each module names every kernel entry point it launches in `KERNELS` (CI compiles every family and
checks them against the cubins: tests/test_runtime_compile.py)."""

import ctypes
import functools

import torch


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """The streaming multiprocessors of CUDA device `index` (grid and work-split sizes)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_half(t: torch.Tensor, name: str, *, error: type[Exception] = RuntimeError) -> None:
    """Raise `error` naming `name` unless t is bfloat16 or float16 (the kernels' 16-bit types)."""
    if t.dtype not in (torch.bfloat16, torch.float16):
        raise error(f"{name} must be bfloat16 or float16, got {t.dtype}")


def aligned16(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor starts on a 16-byte boundary (the kernels' vector loads)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def check_tensor(t: torch.Tensor, like: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...], *,
                 error: type[Exception] = RuntimeError, align: int = 0) -> None:
    """Raise `error` naming `name` unless t is on like's device, of this dtype and shape, contiguous,
    and (align > 0) starts on an align-byte boundary: the argument checks every launcher makes."""
    if t.device != like.device:
        raise error(f"{name} must be on {like.device}, not {t.device}")
    if t.dtype != dtype:
        raise error(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise error(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise error(f"{name} must be contiguous")
    if align and t.data_ptr() % align:
        raise error(f"{name} must start on a {align}-byte boundary")


def check_concat(x: torch.Tensor, x2: torch.Tensor | None, norm, *, error: type[Exception] = RuntimeError) -> int:
    """Kernel 1's checks of its input in both families, x [M, K] alone (contiguous, 16-byte aligned) or, with x2,
    the concatenation of x [M, K1] and x2 [M, K2] along K that it reads where they are (K1 a multiple of 64; both
    with x's rows, dtype and device, unit column stride, 16-byte aligned rows; never with a norm). Returns K."""
    if x2 is None:
        check_tensor(x, x, "x", x.dtype, tuple(x.shape), error=error, align=16)
        return x.shape[1]
    if norm is not None:
        raise error("kernel 1 takes a norm with one input tensor, not two")
    if x.shape[1] % 64:
        raise error(f"the first input's width {x.shape[1]} is not a multiple of 64")
    if not (x2.dim() == 2 and x2.shape[0] == x.shape[0] and x2.dtype == x.dtype and x2.device == x.device):
        raise error("x2 must be 2-D with x's rows, dtype and device")
    for name, piece in (("x", x), ("x2", x2)):
        if not rows_aligned(piece):
            raise error(f"{name} needs unit column stride and 16-byte aligned rows")
    return x.shape[1] + x2.shape[1]


def residual_arguments(residual, y: torch.Tensor, *, error: type[Exception] = RuntimeError) -> tuple:
    """Kernel 2's gated-residual arguments (residual [M, N], gate [B, N], tokens per batch) for a
    kernels.GatedResidual or None ((None, None, 1)), after checking them against its output y [M, N]: y's dtype
    and device, contiguous, 16-byte aligned, M a multiple of B."""
    if residual is None:
        return None, None, 1
    m, n = y.shape
    batches = residual.gate.shape[0]
    check_tensor(residual.residual, y, "residual", y.dtype, (m, n), error=error, align=16)
    check_tensor(residual.gate, y, "gate", y.dtype, (batches, n), error=error, align=16)
    if batches == 0 or m % batches:
        raise error(f"{m} tokens do not split into {batches} equal batches of the gate")
    return residual.residual, residual.gate, max(1, m // batches)


def kernel1_operands(x, wide: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, x2) as both families' act_quant take them from a layer's input: a tensor made contiguous, or a
    kernels.Concat's two parts read where they are; concatenated where the layer's low-rank GEMM reads the whole
    input (wide: ranks above kernels.KERNEL1_MAX_RANK, which cuBLAS computes)."""
    if isinstance(x, torch.Tensor):
        return x.contiguous(), None
    return (x.value(), None) if wide else x.parts


def rows_aligned(t: torch.Tensor) -> bool:
    """Unit column stride, rows and start on 16-byte boundaries: what a kernel reading a 2-D tensor in place
    (strided rows included) needs."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def norm_arguments(norm, norm_out: torch.Tensor | None, x: torch.Tensor, *, error: type[Exception] = RuntimeError
                   ) -> tuple:
    """Kernel 1's last six arguments in both families: the norm flag, mult and add [B, K] (None without a
    modulation), tokens per batch, eps as a C double and norm_out, after checking them against x [M, K]:
    norm (a kernels.ModulatedNorm or None) with mult and add [B, K] or [B, 1, K] in x's dtype, M a multiple
    of B, eps >= 0; norm_out [M, K] in x's dtype, only with a norm; all 16-byte aligned."""
    m, k = x.shape
    if norm is None:
        if norm_out is not None:
            raise error("norm_out needs norm")
        return False, None, None, m, ctypes.c_double(0.0), None
    mult = add = None
    rows = m
    if norm.mult is not None:
        batches = norm.mult.shape[0]
        mult, add = norm.mult.reshape(batches, -1).contiguous(), norm.add.reshape(batches, -1).contiguous()
        check_tensor(mult, x, "norm.mult", x.dtype, (batches, k), error=error, align=16)
        check_tensor(add, x, "norm.add", x.dtype, (batches, k), error=error, align=16)
        if m % batches:
            raise error(f"{m} tokens do not split into {batches} equal batches")
        rows = max(1, m // batches)
    if not norm.eps >= 0:
        raise error(f"the LayerNorm's eps must be >= 0, not {norm.eps}")
    if norm_out is not None:
        check_tensor(norm_out, x, "norm_out", x.dtype, (m, k), error=error, align=16)
    return True, mult, add, rows, ctypes.c_double(norm.eps), norm_out
