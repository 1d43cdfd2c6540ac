"""The W4A16 linear (docs/DESIGN.md#w4a4): W4A16Linear against a float64 evaluation of its
definition (numerics.quantize_w4a16 / dequantize_w4a16), the GEMV kernel
(csrc/generic/w4a16_gemv.cu) against a float64 product of the same codes and group scales, and the
dequantization kernel for many rows (csrc/generic/w4a16_dequant.cu) against the reference's W bit
for bit.

The GPU tests skip without an sm_80+ CUDA GPU; there the kernels must load (prebuilt, cached or
compiled by NVRTC: svdquant/cuda.py).
"""

from __future__ import annotations

import pytest
import torch

from random_layers import DEV, gen, needs_sm80, w4a16_layer
from svdquant import kernels, numerics
from svdquant.families import w4a16
from svdquant.linear import W4A16Linear


def test_w4a16_linear_matches_float64_reference():
    w = torch.randn(96, 128) * 0.05
    codes, wscales, wzeros = numerics.quantize_w4a16(w)
    assert int(codes.max()) <= 15 and codes.dtype == torch.uint8
    dense = codes.double() * wscales.double().t().repeat_interleave(64, 1) + wzeros.double().t().repeat_interleave(64, 1)
    # min/max quantization: every weight within one step of its value
    assert bool(((dense - w.double()).abs() <= wscales.double().t().repeat_interleave(64, 1) + 1e-6).all())
    bias = torch.randn(96)
    layer = W4A16Linear.from_tensors({"qweight": numerics.pack_int4(codes), "wscales": wscales, "wzeros": wzeros,
                                      "bias": bias.bfloat16()})
    x = torch.randn(3, 5, 128)
    y = layer(x)
    ref = x.double() @ dense.t() + bias.bfloat16().double()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5


def _reference(x: torch.Tensor, layer: W4A16Linear) -> torch.Tensor:
    codes = numerics.unpack_int4(layer.qweight, signed=False)
    w = numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).double()
    y = x.double() @ w.t()
    return y if layer.bias is None else y + layer.bias.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(8, 64), (72, 1088), (200, 3072), (3072, 12288)])
def test_gemv_matches_float64(dtype, m, n, k):
    # n = 72, 200: CTAs whose last rows fall past N; k = 1088: a 512-byte step that lanes share unevenly
    generator = gen(m * 1000 + n + k)
    layer = w4a16_layer(n, k, dtype, generator, bias=(m % 2 == 1))
    x = torch.randn(m, k, generator=generator, device=DEV)
    x[:, torch.randint(0, k, (4,), generator=generator, device=DEV)] *= 40.0  # outlier channels
    x = x.to(dtype)
    y = w4a16.gemv(x, layer.qweight, layer.wscales, layer.wzeros, layer.bias)
    ref = _reference(x, layer)
    # fp32 accumulation of unrounded weights: the error is the output's rounding to 16 bits
    rounding = _rel(ref.to(dtype), ref)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, ref) <= 1.5 * rounding + 1e-5


@needs_sm80
def test_layer_uses_gemv_for_few_rows_and_gemm_for_many():
    generator = gen(3)
    layer = w4a16_layer(512, 3072, torch.bfloat16, generator)
    x = torch.randn(2, 9, 3072, generator=generator, device=DEV).bfloat16()
    few, many = layer(x[:, :2]), layer(x)  # 4 rows: GEMV; 18 rows: dequantize + GEMM
    ref = _reference(x.reshape(-1, 3072), layer).reshape(2, 9, 512)
    assert _rel(few, ref[:, :2]) <= 5e-3 and _rel(many, ref) <= 5e-3
    gemv = w4a16.gemv(x[:, :2].reshape(4, 3072), layer.qweight, layer.wscales, layer.wzeros, layer.bias)
    assert torch.equal(few.reshape(4, 512), gemv)


@needs_sm80
def test_gemv_rejects_bad_input():
    layer = w4a16_layer(64, 128, torch.bfloat16, gen(4))
    with pytest.raises(RuntimeError, match="rows"):
        w4a16.gemv(torch.zeros(9, 128, device=DEV, dtype=torch.bfloat16), layer.qweight, layer.wscales,
                   layer.wzeros, None)
    with pytest.raises(RuntimeError, match="wscales"):
        w4a16.gemv(torch.zeros(1, 128, device=DEV, dtype=torch.float16), layer.qweight, layer.wscales,
                   layer.wzeros, None)


@needs_sm80
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(1, 64), (7, 192), (200, 3072), (4096, 10240)])
def test_dequant_equals_the_reference_weight(scale_dtype, out_dtype, n, k):
    # W for a GEMM over many rows: the reference path's numerics.dequantize_w4a16(...).to(out) bit for bit
    layer = w4a16_layer(n, k, scale_dtype, gen(n + k), bias=False)
    out = torch.full((n, k), float("nan"), dtype=out_dtype, device=DEV)
    w4a16.dequant(layer.qweight, layer.wscales, layer.wzeros, out)
    codes = numerics.unpack_int4(layer.qweight, signed=False)
    assert torch.equal(out, numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).to(out_dtype))


@needs_sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_rows_equal_the_reference_path(dtype):
    # a prompt's worth of tokens (the 4-bit T5): the dequantization kernel then one GEMM, exactly
    # what the PyTorch reference computes with its own dequantization
    generator = gen(11)
    layer = w4a16_layer(640, 1024, torch.bfloat16, generator)
    x = torch.randn(300, 1024, generator=generator, device=DEV).to(dtype)
    tensors = (layer.qweight, layer.wscales, layer.wzeros, layer.bias)
    assert torch.equal(kernels.w4a16_linear(x, *tensors), kernels.w4a16_linear_reference(x, *tensors))
