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
