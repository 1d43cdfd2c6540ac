"""Tests of the W4A16 GEMV kernel (csrc/generic/w4a16_gemv.cu) against a float64 product of the
same codes and group scales (`numerics.dequantize_w4a16`), and of the dequantization kernel for
many rows (csrc/generic/w4a16_dequant.cu) against the reference's W bit for bit.

Skipped unless an sm_80+ CUDA GPU is present; there the kernels must load (prebuilt, cached or
compiled by NVRTC: svdquant/cuda.py).
"""

from __future__ import annotations

import pytest
import torch

from svdquant import kernels, numerics
from svdquant.families import w4a16
from svdquant.linear import W4A16Linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                                reason="needs an sm_80+ CUDA GPU")

DEV = "cuda"


def _layer(n: int, k: int, dtype: torch.dtype, gen: torch.Generator, bias: bool = True) -> W4A16Linear:
    """Random codes; group scales spread over two decades with a few outlier groups, zero points
    around -8 scales (what quantize_w4a16 gives for weights centred on 0)."""
    g = k // numerics.GROUP_SIZE
    codes = torch.randint(0, 16, (n, k), generator=gen, device=DEV, dtype=torch.uint8)
    scales = torch.exp(torch.empty(g, n, device=DEV).uniform_(-7, -2.4, generator=gen))
    outliers = torch.rand(g, n, generator=gen, device=DEV) < 0.01
    scales = torch.where(outliers, scales * 30, scales)
    zeros = -scales * (8 + torch.randn(g, n, generator=gen, device=DEV))
    tensors = {"qweight": numerics.pack_int4(codes), "wscales": scales.to(dtype), "wzeros": zeros.to(dtype)}
    if bias:
        tensors["bias"] = (0.1 * torch.randn(n, generator=gen, device=DEV)).to(dtype)
    return W4A16Linear.from_tensors(tensors)


def _reference(x: torch.Tensor, layer: W4A16Linear) -> torch.Tensor:
    codes = numerics.unpack_int4(layer.qweight, signed=False)
    w = numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).double()
    y = x.double() @ w.t()
    return y if layer.bias is None else y + layer.bias.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(8, 64), (72, 1088), (200, 3072), (3072, 12288)])
def test_gemv_matches_float64(dtype, m, n, k):
    # n = 72, 200: CTAs whose last rows fall past N; k = 1088: a 512-byte step that lanes share unevenly
    gen = torch.Generator(device=DEV).manual_seed(m * 1000 + n + k)
    layer = _layer(n, k, dtype, gen, bias=(m % 2 == 1))
    x = torch.randn(m, k, generator=gen, device=DEV)
    x[:, torch.randint(0, k, (4,), generator=gen, device=DEV)] *= 40.0  # outlier channels
    x = x.to(dtype)
    y = w4a16.gemv(x, layer.qweight, layer.wscales, layer.wzeros, layer.bias)
    ref = _reference(x, layer)
    # fp32 accumulation of unrounded weights: the error is the output's rounding to 16 bits
    rounding = _rel(ref.to(dtype), ref)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, ref) <= 1.5 * rounding + 1e-5


def test_layer_uses_gemv_for_few_rows_and_gemm_for_many():
    gen = torch.Generator(device=DEV).manual_seed(3)
    layer = _layer(512, 3072, torch.bfloat16, gen)
    x = torch.randn(2, 9, 3072, generator=gen, device=DEV).bfloat16()
    few, many = layer(x[:, :2]), layer(x)  # 4 rows: GEMV; 18 rows: dequantize + GEMM
    ref = _reference(x.reshape(-1, 3072), layer).reshape(2, 9, 512)
    assert _rel(few, ref[:, :2]) <= 5e-3 and _rel(many, ref) <= 5e-3
    gemv = w4a16.gemv(x[:, :2].reshape(4, 3072), layer.qweight, layer.wscales, layer.wzeros, layer.bias)
    assert torch.equal(few.reshape(4, 512), gemv)


def test_gemv_rejects_bad_input():
    gen = torch.Generator(device=DEV).manual_seed(4)
    layer = _layer(64, 128, torch.bfloat16, gen)
    with pytest.raises(RuntimeError, match="rows"):
        w4a16.gemv(torch.zeros(9, 128, device=DEV, dtype=torch.bfloat16), layer.qweight, layer.wscales,
                              layer.wzeros, None)
    with pytest.raises(RuntimeError, match="wscales"):
        w4a16.gemv(torch.zeros(1, 128, device=DEV, dtype=torch.float16), layer.qweight, layer.wscales,
                              layer.wzeros, None)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(1, 64), (7, 192), (200, 3072), (4096, 10240)])
def test_dequant_equals_the_reference_weight(scale_dtype, out_dtype, n, k):
    # W for a GEMM over many rows: the reference path's numerics.dequantize_w4a16(...).to(out) bit for bit
    gen = torch.Generator(device=DEV).manual_seed(n + k)
    layer = _layer(n, k, scale_dtype, gen, bias=False)
    out = torch.full((n, k), float("nan"), dtype=out_dtype, device=DEV)
    w4a16.dequant(layer.qweight, layer.wscales, layer.wzeros, out)
    codes = numerics.unpack_int4(layer.qweight, signed=False)
    assert torch.equal(out, numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_rows_equal_the_reference_path(dtype):
    # a prompt's worth of tokens (the 4-bit T5): the dequantization kernel then one GEMM, exactly
    # what the PyTorch reference computes with its own dequantization
    gen = torch.Generator(device=DEV).manual_seed(11)
    layer = _layer(640, 1024, torch.bfloat16, gen)
    x = torch.randn(300, 1024, generator=gen, device=DEV).to(dtype)
    assert torch.equal(kernels.w4a16_linear(x, layer), kernels.w4a16_linear_reference(x, layer))
