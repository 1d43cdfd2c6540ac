"""FP8 execution (docs/DESIGN.md#fp8-execution): numerics' definition on the CPU, the fp8 family's
activation quantization against it bit for bit, and whole layers against numerics.fp8_linear_reference
on an H100 (the GPU tests skip elsewhere)."""

import pytest
import torch

from random_layers import activations, gen, needs_sm90, rel, w4a4_layer
from svdquant import file_options, kernels, numerics
from svdquant.families import fp8


def _ideal(layer, x):
    """The layer's product with unquantized activations, in float64: (x + shift) / smooth . R^T +
    x @ lora_down @ lora_up^T + bias, R the dequantized residual (turned back where the layer rotates)."""
    r = numerics.dequantize_groups(numerics.unpack_int4(layer.qweight, signed=True), layer.wscales.t())
    r = numerics.unrotated_residual(r, layer.rotation, ~layer.unsigned_groups).double()
    v = x.double() + (0 if layer.shift is None else layer.shift.double())
    y = (v / layer.smooth.double()) @ r.t() + (x.double() @ layer.lora_down.double()) @ layer.lora_up.double().t()
    return y if layer.bias is None else y + layer.bias.double()


# ---- the definition, on the CPU ---------------------------------------------------------------------

def test_fp8_per_token_quantization():
    x = activations(9, 256, torch.bfloat16, gen(1, "cpu"), torch.zeros(4, dtype=torch.bool))
    x[3] = 0
    codes, scales = numerics.quantize_fp8_per_token(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (9, 1)
    assert scales[3].item() == 0 and not codes[3].float().any()
    big = x.float().abs().argmax(dim=1)
    assert torch.equal(codes.float()[torch.arange(9), big].abs()[x.float().abs().amax(1) > 0],
                       torch.full((8,), numerics.E4M3_MAX))
    # e4m3 keeps 3 mantissa bits: each value within half a step (2^-4 relative) or under the smallest step
    err = (codes.float() * scales - x.float()).abs()
    assert bool((err <= x.float().abs() * 2.0**-4 + scales * 2.0**-9 + 1e-30).all())


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rotated", [False, True])
def test_fp8_weights_compute_the_layer(unsigned, bias, rotated):
    # merged branch, smoothing, the shift's share in the bias and the rotation turned back: the FP8
    # layer computes what the W4A4 layer's product stands for, to FP8's precision (a misplaced term
    # would be off by O(1))
    generator = gen(3 + unsigned + 2 * bias, "cpu")
    layer = w4a4_layer(96, 256, 32, torch.bfloat16, generator, unsigned, bias=bias)
    if rotated:
        layer.rotation = numerics.butterfly_rotation(torch.rand(numerics.ROTATION_STAGES, 32, generator=generator) * 6.3)
    x = activations(40, 256, torch.bfloat16, generator, layer.unsigned_groups)
    codes, scales, fbias = numerics.fp8_weights(layer.qweight, layer.wscales, layer.smooth, layer.lora_down,
                                                layer.lora_up, layer.bias, layer.shift, layer.rotation)
    assert codes.shape == (96, 256) and scales.shape == (96,)
    assert (fbias is None) == (not bias and not unsigned)
    y = numerics.fp8_linear_reference(x, codes, scales, fbias)
    ideal = _ideal(layer, x)
    assert y.dtype == torch.bfloat16 and rel(y, ideal) < 0.05, rel(y, ideal)
    # computed in blocks of output channels (here 1 to 96 rows at a time): each row is its own computation
    for chunk_floats in (1, 256 * 40):
        blocked = numerics.fp8_weights(layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                       layer.bias, layer.shift, layer.rotation, chunk_floats=chunk_floats)
        assert torch.equal(blocked[0].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(blocked[1], scales)
        assert (fbias is None and blocked[2] is None) or torch.allclose(blocked[2], fbias, rtol=1e-6, atol=1e-6)
    # the W4A4 layer itself (4-bit activations) is further from it
    assert rel(y, ideal) < rel(kernels.W4A4Kernel(*layer._kernel_tensors()).reference(x), ideal)


def test_fp8_execution_is_a_layer_mode_the_file_options_set():
    layer = w4a4_layer(64, 128, 16, torch.bfloat16, gen(5, "cpu"), unsigned=False)
    file_options.apply_file_options(layer, {}, fp8_execution=True)
    kernel = layer.w4a4_kernel()
    assert kernel.fp8_execution and kernel.base_rank == 16
    file_options.apply_file_options(layer, {})
    assert not layer.w4a4_kernel().fp8_execution and layer.w4a4_kernel() is not kernel
    # on the CPU an FP8-execution layer computes the file's W4A4 function (the reference path)
    x = activations(5, 128, torch.bfloat16, gen(6, "cpu"), layer.unsigned_groups)
    y = layer(x)
    layer.fp8_execution = True
    assert torch.equal(layer(x), y)
    # a transient kernel (the layer's tensors copied to another device for one call) runs as stored
    assert layer.w4a4_kernel().fp8_execution and not layer.w4a4_kernel(torch.device("cpu")).fp8_execution


@pytest.mark.parametrize("bias, unsigned", [(False, False), (True, False), (False, True)])
def test_fp8_weights_bytes_are_what_the_fp8_weights_take(bias, unsigned):
    # what a memory manager is told before the first call: the bytes of the tensors fp8.weights keeps
    # (a bias for a layer with a bias or an input shift), 0 where FP8 execution does not run
    layer = w4a4_layer(48, 192, 16, torch.bfloat16, gen(7 + bias + 2 * unsigned, "cpu"), unsigned, bias=bias)
    kept = sum(t.nbytes for t in fp8.weights(layer.w4a4_kernel()) if t is not None)
    assert fp8.weights_bytes(192, 48, bias or unsigned) == kept
    layer.fp8_execution = True
    assert not kernels.fp8_execution_runs(torch.device("cpu"), torch.bfloat16, 48)
    assert layer.fp8_weights_bytes(torch.device("cpu"), torch.bfloat16) == 0
    assert fp8.layer_unsupported_reason(torch.bfloat16, 48) == ""
    assert fp8.layer_unsupported_reason(torch.float16, 48).startswith("torch.float16")
    assert fp8.layer_unsupported_reason(torch.bfloat16, 40) == "out_features 40 is not a multiple of 16"


# ---- the GPU ------------------------------------------------------------------------------------------

@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (7, 3072), (255, 192), (256, 15360), (4097, 3072)])
def test_fp8_act_quant_matches_numerics(dtype, m, k):
    generator = gen(m + k)
    x = activations(m, k, dtype, generator, torch.zeros(k // 64, dtype=torch.bool))
    x[m // 2] = 0
    codes, scales = fp8.act_quant(x)
    ref_codes, ref_scales = numerics.quantize_fp8_per_token(x)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales, ref_scales)


@needs_sm90
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("m", [1, 77, 4608])
@pytest.mark.parametrize("gelu_from", [None, 128])
def test_fp8_layer_matches_reference(unsigned, m, gelu_from):
    generator = gen(17 + m + unsigned)
    layer = w4a4_layer(384, 512, 32, torch.bfloat16, generator, unsigned)
    layer.fp8_execution, layer.gelu_from = True, gelu_from
    x = activations(m, 512, torch.bfloat16, generator, layer.unsigned_groups)
    kernel = layer.w4a4_kernel()
    assert kernel.fallback_reason(x) == ""
    y = layer(x)
    codes, scales, bias = numerics.fp8_weights(layer.qweight, layer.wscales, layer.smooth, layer.lora_down,
                                               layer.lora_up, layer.bias, layer.shift)
    ref = numerics.fp8_linear_reference(x, codes, scales, bias, gelu_from)
    assert y.dtype == torch.bfloat16 and rel(y, ref) <= 5e-3, rel(y, ref)
    # it ran FP8 (the 4-bit kernels differ from it by far more than cuBLAS's rounding)
    layer.fp8_execution = False
    assert rel(layer(x), ref) > 2 * rel(y, ref)


@needs_sm90
def test_fp8_layer_keeps_lora_columns_as_a_16_bit_branch():
    generator = gen(23)
    layer = w4a4_layer(256, 512, 48, torch.bfloat16, generator, unsigned=True)
    layer.fp8_execution, layer.base_rank = True, 16  # columns 16..47: LoRAs joined to the branch
    x = activations(300, 512, torch.bfloat16, generator, layer.unsigned_groups)
    y = layer(x)
    codes, scales, bias = numerics.fp8_weights(layer.qweight, layer.wscales, layer.smooth, layer.lora_down[:, :16],
                                               layer.lora_up[:, :16], layer.bias, layer.shift)
    ref = (numerics.fp8_linear_reference(x, codes, scales, bias).float()
           + numerics.lowrank_reference(x, layer.lora_down[:, 16:], layer.lora_up[:, 16:]))
    assert rel(y, ref) <= 5e-3, rel(y, ref)


@needs_sm90
def test_fp8_weights_bytes_on_the_gpu_are_what_the_layer_keeps():
    generator = gen(31)
    layer = w4a4_layer(384, 512, 32, torch.bfloat16, generator, unsigned=True)
    device = layer.qweight.device
    assert layer.fp8_weights_bytes(device, torch.bfloat16) == 0  # 4-bit execution
    layer.fp8_execution = True
    expected = layer.fp8_weights_bytes(device, torch.bfloat16)
    assert expected == fp8.weights_bytes(512, 384, True)
    assert layer.fp8_weights_bytes(device, torch.float16) == 0
    layer(activations(8, 512, torch.bfloat16, generator, layer.unsigned_groups))
    assert sum(t.nbytes for t in fp8.weights(layer.w4a4_kernel()) if t is not None) == expected


@needs_sm90
def test_fp8_execution_falls_back_to_the_4_bit_kernels_for_fp16():
    generator = gen(29)
    layer = w4a4_layer(128, 256, 32, torch.float16, generator, unsigned=False)
    x = activations(50, 256, torch.float16, generator, layer.unsigned_groups)
    y = layer(x)
    layer.fp8_execution = True
    assert fp8.unsupported_reason(x, layer.w4a4_kernel()).startswith("torch.float16")
    assert torch.equal(layer(x), y)


def peak_growth(run):
    """(run()'s result, the most GPU memory allocated during it beyond what was allocated before)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before


@needs_sm90
def test_fp8_layer_left_in_offload_memory_runs_as_stored():
    # ComfyUI's partial load leaves some layers in system memory and copies their tensors in for each call:
    # such a call runs the 4-bit kernels on the copies, with no FP8 weights made for it (their conversion's
    # float32 temporaries are several times the layer's 4-bit bytes, a budget the partial load does not leave)
    generator = gen(37)
    layer = w4a4_layer(3072, 3072, 32, torch.bfloat16, generator, unsigned=True)
    x = activations(64, 3072, torch.bfloat16, generator, layer.unsigned_groups)
    as_stored = layer(x)
    layer.fp8_execution = True
    offloaded = layer.to("cpu")
    y, peak = peak_growth(lambda: offloaded(x))
    assert torch.equal(y, as_stored)
    assert peak < fp8.weights_bytes(3072, 3072, True)


@needs_sm90
def test_fp8_weights_take_little_memory_beyond_what_they_keep():
    # made in the little memory ComfyUI leaves beside the weights it loads: FLUX's largest input width in float32
    # would be 180 MiB per temporary; the blocks keep each at 16 MiB
    generator = gen(41)
    layer = w4a4_layer(3072, 15360, 32, torch.bfloat16, generator, unsigned=True)
    kept, peak = peak_growth(lambda: numerics.fp8_weights(layer.qweight, layer.wscales, layer.smooth,
                                                          layer.lora_down, layer.lora_up, layer.bias, layer.shift))
    kept_bytes = sum(t.nbytes for t in kept if t is not None)
    assert peak - kept_bytes < 8 * (16 << 20)  # one block at a time


@needs_sm90
def test_fp8_weights_are_made_when_the_layer_moves_to_the_gpu():
    # before any activation exists (a first call would place them between its allocations); the call keeps nothing
    generator = gen(43)
    layer = w4a4_layer(1024, 3072, 32, torch.bfloat16, generator, unsigned=True).to("cpu")
    layer.fp8_execution = True
    x = activations(64, 3072, torch.bfloat16, generator, layer.unsigned_groups)
    warm = w4a4_layer(64, 3072, 32, torch.bfloat16, generator, unsigned=True)
    warm.fp8_execution = True
    warm(x)  # what the process keeps from a first FP8 call (cuBLAS's workspace)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer.to(x.device)
    moved = torch.cuda.memory_allocated()
    four_bit = sum(t.nbytes for t in layer.buffers())
    assert moved - before >= four_bit + fp8.weights_bytes(3072, 1024, True)
    y = layer(x)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - y.nbytes == moved
