"""The SVDQuant algorithm for one layer, and the fidelity ordering on FLUX-shaped outlier layers."""

import pytest
import torch

from svdquant import file_options, kernels, numerics, quantize, synthetic
from svdquant.linear import SVDQLinear


def test_weight_quantizer_rules():
    w = torch.randn(64, 256) * 0.1
    w[0, :64] = 0.0
    codes, wscales = quantize.quantize_weight_int4(w)
    assert codes.dtype == torch.int8 and wscales.shape == (4, 64)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert wscales[0, 0] == 0 and not codes[0, :64].any()
    amax = w.reshape(64, 4, 64).abs().amax(-1).t()
    assert bool((wscales.float() <= (amax / 7).bfloat16().float() * 1.001).all())

    def err(c, s):
        return (numerics.dequantize_groups(c, s.t()) - w).square().sum()

    plain_codes, plain_scales = quantize.quantize_weight_int4(w, clip_ratios=(1.0,))
    assert err(codes, wscales) <= err(plain_codes, plain_scales)


def test_decomposition_reconstructs_the_weight():
    torch.manual_seed(1)
    x, w, b = synthetic.outlier_layer(256, 512, tokens=64, seed=3)
    t = quantize.quantize_linear(w, b, x, rank=32)
    assert t.lora_down.shape == (512, 32) and t.lora_up.shape == (256, 32) and t.smooth.shape == (512,)
    codes = numerics.unpack_int4(t.qweight, signed=True)
    residual = numerics.unrotated_residual(numerics.dequantize_groups(codes, t.wscales.t()), t.rotation,
                                           torch.ones(512 // 64, dtype=torch.bool))
    # dense reading of the file: W = R / smooth + lora_up @ lora_down^T (R turned back where rotated)
    dense = residual / t.smooth.float() + t.lora_up.float() @ t.lora_down.float().t()
    assert float((dense - w).norm() / w.norm()) < 0.15
    assert torch.equal(t.bias, b.bfloat16())


def test_shifted_unsigned_layer():
    """Post-GELU input: the quantized path sees x + shift unsigned; the bias removes the shift."""
    torch.manual_seed(2)
    k, n = 256, 128
    x = torch.nn.functional.gelu(torch.randn(128, k) * 2, approximate="tanh")
    w, b = torch.randn(n, k) * 0.05, torch.randn(n) * 0.1
    shift = torch.full((k,), numerics.GELU_SHIFT)
    t = quantize.quantize_linear(w, b, x, rank=16, shift=shift)
    layer = SVDQLinear.from_tensors(t.as_dict())
    assert layer.unsigned_groups.all()
    codes, _ = numerics.quantize_activations(x, t.smooth, t.shift)
    assert int(codes.min()) >= 0 and int(codes.max()) == 15
    codes_w = numerics.unpack_int4(t.qweight, signed=True)
    residual = numerics.dequantize_groups(codes_w, t.wscales.t()) / t.smooth.float()
    # without activation quantization the layer is x W^T + bias + residual @ shift
    dense_bias = t.bias.float() + residual @ t.shift.float()
    assert float((dense_bias - b).abs().max()) < 0.01
    ref = x @ w.t() + b
    assert float((layer(x) - ref).norm() / ref.norm()) < 0.1


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize.quantize_linear(torch.randn(8, 100), None, torch.randn(4, 100))
    with pytest.raises(ValueError, match="rank 200"):
        quantize.quantize_linear(torch.randn(128, 128), None, torch.randn(4, 128), rank=200)


def test_fidelity_ordering_on_flux_shaped_outlier_layer():
    """SVDQuant r32 < smooth-only < naive W4A4 by clear margins (K = N = 3072, 256 tokens)."""
    x, w, b = synthetic.outlier_layer()
    errors = synthetic.layer_fidelity(x, w, b, rank=32)
    assert errors["svdquant_r32"] < 0.8 * errors["smooth_w4a4"]
    assert errors["smooth_w4a4"] < 0.6 * errors["naive_w4a4"]


def test_refined_split_lowers_the_output_error_on_held_out_inputs():
    """The low-rank branch refitted to what the quantized residual leaves (the default) against
    SVDQuant's own split, on tokens the layer was not calibrated on."""
    x, w, b = synthetic.outlier_layer(256, 512, tokens=512, seed=5)
    calibration, held_out = x[0::2], x[1::2]
    errors = {rounds: quantize.relative_output_error(
        quantize.quantize_linear(w, b, calibration, rank=32, alphas=(0.5,), refine_rounds=rounds, compensate=False),
        w, b, held_out) for rounds in (0, quantize.REFINE_ROUNDS)}
    assert quantize.REFINE_ROUNDS == 2 and errors[2] < 0.97 * errors[0]


def test_compensated_codes_round_to_nearest_for_uncorrelated_inputs():
    """With a diagonal Gram matrix no column's error moves another: the codes are the nearest ones,
    at the given scales (0 where a scale is 0); correlated inputs change some codes, never a scale."""
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(8)) * 0.1
    w[5, 64:128] = 0.0
    codes, wscales = quantize.quantize_weight_int4(w)
    one_hot = torch.eye(192) * torch.linspace(0.5, 3.0, 192)
    assert torch.equal(quantize._compensated_codes(w, wscales, one_hot).to(torch.int8), codes)
    correlated = torch.randn(64, 192, generator=torch.Generator().manual_seed(9)) @ torch.randn(192, 192) * 0.1
    compensated = quantize._compensated_codes(w, wscales, correlated)
    assert not torch.equal(compensated.to(torch.int8), codes) and not compensated[5, 64:128].any()
    assert int(compensated.min()) >= -8 and int(compensated.max()) <= 7


@pytest.mark.parametrize("pow2_scales", [False, True])
def test_error_compensation_lowers_the_output_error_on_held_out_inputs(pow2_scales):
    """The final residual rounded with error compensation on the calibration inputs (the default)
    against rounding to nearest, on tokens the layer was not calibrated on; the scales (power-of-two
    ones included) are the same. Where the inputs share 16 directions across channels, as real
    activations do, it gains; on the outlier layer's independent channels, whose Gram matrix's
    off-diagonal part is sampling noise (256 tokens, 512 channels), the shrinkage keeps it from
    following that noise."""
    x, w, b = synthetic.outlier_layer(256, 512, tokens=512, seed=5)
    gen = torch.Generator().manual_seed(5)
    shared = x + 3.0 * torch.randn(512, 16, generator=gen) @ torch.randn(16, 512, generator=gen) / 4.0
    for inputs, most in ((shared, 0.96), (x, 1.01)):
        calibration, held_out = inputs[0::2], inputs[1::2]
        layers = {compensate: quantize.quantize_linear(w, b, calibration, rank=32, alphas=(0.5,),
                                                       pow2_scales=pow2_scales, compensate=compensate)
                  for compensate in (False, True)}
        errors = {compensate: quantize.relative_output_error(t, w, b, held_out, pow2_scales)
                  for compensate, t in layers.items()}
        assert errors[True] < most * errors[False]
        assert torch.equal(layers[True].wscales, layers[False].wscales)
    assert not torch.equal(layers[True].qweight, layers[False].qweight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pow2_weight_quantizer(dtype):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 1024, generator=gen) * torch.logspace(-3, 0, 16).repeat_interleave(64) * 0.05
    w[3, :64] = 0.0
    codes, wscales = quantize.quantize_weight_int4(w, scale_dtype=dtype, pow2_scales=True)
    assert codes.dtype == torch.int8 and wscales.shape == (16, 96) and wscales.dtype == dtype
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    found = numerics.pow2_weight_exponents(wscales)
    assert found is not None and int(found[1].max()) <= numerics.POW2_WEIGHT_MAX_EXP
    assert not codes[3, :64].any()
    plain_codes, plain_scales = quantize.quantize_weight_int4(w, scale_dtype=dtype)

    def err(c, s):
        return float((numerics.dequantize_groups(c, s.t()) - w).norm() / w.norm())

    # the restriction costs accuracy, but stays within a bounded factor of the free scales
    assert err(plain_codes, plain_scales) <= err(codes, wscales) < 1.5 * err(plain_codes, plain_scales)


def test_pow2_scales_layer_runs_with_pow2_activations():
    x, w, b = synthetic.outlier_layer(128, 256, tokens=32, seed=4)
    t = quantize.quantize_linear(w, b, x, rank=16, pow2_scales=True, alphas=(0.5,))
    layer = SVDQLinear.from_tensors(t.as_dict())
    assert layer.pow2_weights and not layer.pow2_activations  # opt-in
    file_options.apply_file_options(layer, {"pow2_scales": True})  # "from file": on for a file with power-of-two scales
    assert layer.pow2_activations
    y = layer(x.bfloat16())
    ref = kernels.svdq_linear_reference(x.bfloat16(), layer.qweight, layer.wscales, layer.smooth, layer.lora_down,
                                        layer.lora_up, layer.bias, pow2_activations=True, rotation=layer.rotation)
    assert torch.equal(y, ref)
    layer.pow2_activations = False
    assert not layer.pow2_activations
    assert not torch.equal(layer(x.bfloat16()), y)
    plain = SVDQLinear.from_tensors(quantize.quantize_linear(w, b, x, rank=16, alphas=(0.5,)).as_dict())
    assert not plain.pow2_weights and not plain.pow2_activations


def test_pow2_activation_switch():
    """The loader's one activation-scale setting reaches every W4A4 layer: from the file (exact for
    a file without power-of-two weights), or forced either way; there is no global default."""
    x, w, b = synthetic.outlier_layer(64, 128, tokens=8, seed=6)
    layer = SVDQLinear.from_tensors(quantize.quantize_linear(w, b, x, rank=16, alphas=(0.5,)).as_dict())
    assert not layer.pow2_activations
    file_options.apply_file_options(layer, {}, pow2_activations=True)
    assert layer.pow2_activations
    file_options.apply_file_options(layer, {"pow2_scales": True}, pow2_activations=False)
    assert not layer.pow2_activations
    file_options.apply_file_options(layer, {})
    assert not layer.pow2_activations
    assert not hasattr(kernels, "pow2_activations")


def test_straight_through_quantizer_is_the_numerics_one_with_float32_scales():
    gen = torch.Generator().manual_seed(10)
    v = (torch.randn(8, 256, generator=gen) * torch.linspace(0.1, 4.0, 256)).requires_grad_()
    unsigned = torch.tensor([False, True, False, True])
    q = quantize._ste_quantize_groups(v, unsigned)
    codes, scales = numerics.quantize_groups(v.detach(), unsigned, scale_dtype=torch.float32)
    assert torch.allclose(q.detach(), numerics.dequantize_groups(codes, scales), rtol=1e-6, atol=0)
    q.square().sum().backward()
    assert v.grad.abs().sum() > 0


def test_learned_smoothing_lowers_the_output_error_on_held_out_inputs():
    """Per-channel smoothing refined by gradient steps (opt-in) against the searched s, on tokens the
    layer was not calibrated on (inputs with 16 shared directions, as in the compensation's test)."""
    x, w, b = synthetic.outlier_layer(256, 512, tokens=512, seed=5)
    gen = torch.Generator().manual_seed(5)
    x = x + 3.0 * torch.randn(512, 16, generator=gen) @ torch.randn(16, 512, generator=gen) / 4.0
    calibration, held_out = x[0::2], x[1::2]
    layers = {steps: quantize.quantize_linear(w, b, calibration, rank=32, alphas=(0.5,), smoothing_steps=steps)
              for steps in (0, quantize.LEARNED_SMOOTHING_STEPS)}
    errors = {steps: quantize.relative_output_error(t, w, b, held_out) for steps, t in layers.items()}
    assert errors[quantize.LEARNED_SMOOTHING_STEPS] < 0.99 * errors[0]
    assert not torch.equal(layers[0].smooth, layers[quantize.LEARNED_SMOOTHING_STEPS].smooth)


def test_learned_smoothing_runs_in_inference_mode():
    """ComfyUI runs its nodes (the Quantizer among them) in torch.inference_mode: the learned smoothing
    must learn there too, and give what it gives outside."""
    x, w, b = synthetic.outlier_layer(128, 256, tokens=128, seed=6)
    learned = quantize.quantize_linear(w, b, x, rank=16, alphas=(0.5,), smoothing_steps=10)
    with torch.inference_mode():
        inside = quantize.quantize_linear(w, b, x, rank=16, alphas=(0.5,), smoothing_steps=10)
    searched = quantize.quantize_linear(w, b, x, rank=16, alphas=(0.5,))
    assert torch.equal(inside.smooth, learned.smooth) and not torch.equal(inside.smooth, searched.smooth)


def test_hadamard_rotation_lowers_the_held_out_error_and_is_stored():
    """The default group rotation against none on an outlier layer (-20% here), on tokens the layer was
    not calibrated on; the layer runs it (the reference path rotates what the quantizer simulated)."""
    x, w, b = synthetic.outlier_layer(256, 512, tokens=512, seed=5)
    calibration, held_out = x[0::2], x[1::2]
    plain = quantize.quantize_linear(w, b, calibration, rank=32, rotation="none")
    rotated = quantize.quantize_linear(w, b, calibration, rank=32)
    assert plain.rotation is None and torch.equal(rotated.rotation, numerics.hadamard_rotation())
    error = quantize.relative_output_error(rotated, w, b, held_out)
    assert error < 0.9 * quantize.relative_output_error(plain, w, b, held_out)
    layer = SVDQLinear.from_tensors(rotated.as_dict())
    ref = held_out.double() @ w.double().t() + b.double()
    assert abs(float((layer(held_out.bfloat16()).double() - ref).norm() / ref.norm()) - error) < 0.1 * error
    with pytest.raises(ValueError, match="unknown rotation 'quarot'"):
        quantize.quantize_linear(w, b, calibration, rotation="quarot")


def test_learned_rotation_is_an_orthogonal_butterfly_the_layer_runs(monkeypatch):
    """rotation="learned": a butterfly learned from the Hadamard's angles (the best of the steps, the start
    included), stored as its coefficients; the quantized residual is in its frame (a residual left in
    another frame would be off by O(1))."""
    monkeypatch.setattr(quantize, "LEARNED_ROTATION_STEPS", 15)
    x, w, b = synthetic.outlier_layer(128, 256, tokens=256, seed=6)
    calibration, held_out = x[0::2], x[1::2]
    learned = quantize.quantize_linear(w, b, calibration, rank=16, rotation="learned", alphas=(0.5,))
    m = numerics.rotation_matrix(learned.rotation)
    assert torch.allclose(m @ m.t(), torch.eye(64, dtype=torch.float64), atol=1e-5)
    hadamard = quantize.quantize_linear(w, b, calibration, rank=16, alphas=(0.5,))
    error = quantize.relative_output_error(learned, w, b, held_out)
    assert error < 1.1 * quantize.relative_output_error(hadamard, w, b, held_out)
    layer = SVDQLinear.from_tensors(learned.as_dict())
    ref = held_out.double() @ w.double().t() + b.double()
    assert abs(float((layer(held_out.bfloat16()).double() - ref).norm() / ref.norm()) - error) < 0.1 * error
