"""The W4A4 layer op end to end (docs/DESIGN.md#w4a4): SVDQLinear against a float64 evaluation of
the definition, its kernels.W4A4Kernel (kept until the layer's tensors or modes change, the tensors
it derives following in-place edits), the family registry's dispatch and its fallback to the
reference path, and every family's whole layer (kernel 1 + kernel 2, LoRA ranks, torch.compile)
against the reference path. The GPU tests skip without the GPU their family needs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from random_layers import (DEV, KERNEL1_ROTATION, activations, gen, group_rotation, needs_sm80, needs_sm90, rel,
                           w4a4_layer)
from svdquant import kernels, lora, numerics
from svdquant.families import check_concat, residual_arguments, sm80, sm90
from svdquant.linear import LoadedLinear, SVDQLinear, W4A16Linear


@pytest.fixture
def sm90_family():
    """Layers run the sm90 family whatever SVDQUANT_W4A4_KERNELS says."""
    with kernels.forced_family("sm90"):
        yield


# ---- the definition (numerics), on the CPU ----------------------------------------------------------

def _random_w4a4(n, k, rank, shift_groups=(), seed=0, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8)
    tensors = {
        "qweight": numerics.pack_int4(codes),
        "wscales": (torch.rand(k // 64, n, generator=generator) * 0.01 + 1e-3).to(dtype),
        "smooth": (torch.rand(k, generator=generator) + 0.5).to(dtype),
        "lora_down": (torch.randn(k, rank, generator=generator) * 0.05).to(dtype),
        "lora_up": (torch.randn(n, rank, generator=generator) * 0.05).to(dtype),
        "bias": torch.randn(n, generator=generator).to(dtype),
    }
    if shift_groups:
        shift = torch.zeros(k)
        for g in shift_groups:
            shift[64 * g:64 * (g + 1)] = numerics.GELU_SHIFT
        tensors["shift"] = shift.to(dtype)
    return codes, tensors


def _float64_svdq(x, codes, t):
    """Dequantize-then-matmul in float64 from the reference activation codes."""
    shift = t.get("shift")
    unsigned = numerics.unsigned_groups_from_shift(shift, x.shape[-1])
    qa, sa = numerics.quantize_activations(x, t["smooth"], shift, unsigned)
    a = qa.double() * sa.double().repeat_interleave(64, dim=-1)
    w = codes.double() * t["wscales"].double().t().repeat_interleave(64, dim=1)
    lowrank = (x.double() @ t["lora_down"].double()) @ t["lora_up"].double().t()
    return a @ w.t() + lowrank + t["bias"].double()


@pytest.mark.parametrize("shift_groups", [(), (1, 2)])
def test_svdq_linear_matches_float64_reference(shift_groups):
    n, k, rank = 136, 192, 32
    codes, tensors = _random_w4a4(n, k, rank, shift_groups)
    layer = SVDQLinear.from_tensors(tensors)
    assert layer.unsigned_groups.tolist() == [g in shift_groups for g in range(3)]
    x = torch.randn(2, 13, k) * 2
    x[..., 5] *= 60  # an outlier channel
    if shift_groups:
        x[..., 64:] = torch.nn.functional.gelu(x[..., 64:], approximate="tanh")
    y = layer(x)
    assert y.shape == (2, 13, n) and y.dtype == torch.float32
    ref = _float64_svdq(x.reshape(-1, k), codes, tensors).reshape(2, 13, n)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5
    # bf16 in, bf16 out, same numbers up to bf16 rounding of the input and output
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    ref16 = _float64_svdq(x.bfloat16().reshape(-1, k), codes, tensors).reshape(2, 13, n)
    assert float((y16.double() - ref16).norm() / ref16.norm()) < 1e-2


def test_svdq_linear_load_checks_shapes():
    _, tensors = _random_w4a4(128, 128, 16)
    layer = SVDQLinear(128, 128, rank=0)
    layer.load_state_dict(tensors)  # the rank is taken from the state dict
    assert layer.rank == 16
    bad = dict(tensors, wscales=tensors["wscales"][:1])
    with pytest.raises(RuntimeError, match="wscales"):
        SVDQLinear(128, 128).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="qweight"):
        SVDQLinear(128, 128).load_state_dict({k: v for k, v in tensors.items() if k != "qweight"})


# ---- kernels.W4A4Kernel: kept, rebuilt, derived tensors ------------------------------------------------

def test_layer_keeps_its_kernel_until_a_tensor_or_mode_changes():
    _, tensors = _random_w4a4(128, 192, 32, shift_groups=(1,))
    layer = SVDQLinear.from_tensors(tensors)
    x = torch.randn(7, 192).bfloat16()
    kernel = layer.w4a4_kernel()
    assert layer.w4a4_kernel() is kernel and kernel.tensors() == layer._kernel_tensors()
    assert (kernel.in_features, kernel.out_features, kernel.rank) == (192, 128, 32)
    base = layer(x)
    assert torch.equal(base, kernel.reference(x))
    assert kernel.fallback_reason(x) == "no CUDA kernels for cpu tensors"

    layer.pow2_activations = True  # an activation mode set at load (file options)
    pow2 = layer.w4a4_kernel()
    assert pow2 is not kernel and pow2.pow2_activations and layer.w4a4_kernel() is pow2
    assert torch.equal(layer(x), kernels.svdq_linear_reference(
        x, *layer._kernel_tensors()[:5], layer.bias, layer.shift, layer.unsigned_groups, True))
    layer.pow2_activations = False
    layer.gelu_from = 64
    assert layer.w4a4_kernel().gelu_from == 64
    layer.gelu_from = None

    # LoRA columns replace lora_down / lora_up: a new kernel on them; removing them restores the layer exactly
    delta = lora.LoraDelta(torch.randn(192, 8) * 0.1, torch.randn(128, 8) * 0.1, "test.safetensors")
    lora.set_module_loras(layer, [(delta, 0.7)])
    with_lora = layer.w4a4_kernel()
    assert with_lora.lora_down is layer.lora_down and with_lora.rank == 32 + kernels.RANK_MULTIPLE
    assert not torch.equal(layer(x), base)
    lora.set_module_loras(layer, [])
    assert layer.w4a4_kernel().rank == 32 and torch.equal(layer(x), base)

    # a move or cast (ComfyUI's model management) drops the kept kernel with the tensors it held
    kept = layer.w4a4_kernel()
    layer.to(torch.float32)
    assert layer._kernel is None
    moved = layer.w4a4_kernel()
    assert moved is not kept and moved.wscales is layer.wscales and moved.wscales.dtype == torch.float32
    # and so does a tensor swapped in without a move (ComfyUI's DynamicVRAM loading and unloading)
    layer.register_buffer("qweight", layer.qweight.clone())
    assert layer._kernel is None and layer.w4a4_kernel().qweight is layer.qweight
    # a transient kernel on copies, for a layer whose tensors are on another device than x
    transient = layer.w4a4_kernel(torch.device("cpu"))
    assert transient is not layer.w4a4_kernel() and torch.equal(transient(x.float()), layer(x.float()))


def test_kernel_derived_tensors_follow_in_place_edits():
    _, tensors = _random_w4a4(64, 128, 16, shift_groups=(1,))
    layer = SVDQLinear.from_tensors(tensors)
    kernel = layer.w4a4_kernel()
    shifts = kernel.group_shifts()
    assert shifts.tolist() == [0.0, numerics.GELU_SHIFT] and kernel.group_shifts() is shifts
    calls = []
    first = kernel.derived("doubled", (layer.lora_down,), lambda: calls.append(1) or layer.lora_down * 2)
    assert kernel.derived("doubled", (layer.lora_down,), lambda: calls.append(1)) is first and len(calls) == 1
    layer.lora_down.mul_(2)  # an in-place edit bumps the version
    assert torch.equal(kernel.derived("doubled", (layer.lora_down,), lambda: layer.lora_down * 2), first * 2)
    with torch.no_grad():  # a shift that varies inside a group: the kernels cannot take it
        layer.shift[64:] = torch.linspace(0.1, 0.2, 64).to(layer.shift.dtype)
    assert layer.w4a4_kernel() is kernel and kernel.group_shifts() is None


def test_compiled_layers_and_their_copies_each_run_their_own_tensors():
    # under torch.compile a layer is svdquant's operator called with the layer's handle: a copy
    # (copy.deepcopy, pickle) gets a handle of its own, and a layer swapped in at load
    # (linear.become_stored_kind) is found under its own
    import copy
    import pickle

    _, tensors = _random_w4a4(64, 128, 16)
    layer = SVDQLinear.from_tensors(tensors)
    copied, pickled = copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))
    loaded = LoadedLinear(128, 64)
    loaded.load_state_dict(tensors)
    for other in (copied, pickled):
        other.wscales.mul_(2)
    assert len({layer.handle, copied.handle, pickled.handle, loaded.handle}) == 4
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    torch._dynamo.reset()
    for module in (layer, copied, pickled, loaded):
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), module(x))
    assert not torch.equal(copied(x), layer(x))
    assert torch.equal(loaded(x), layer(x))


# ---- the family registry (dispatch), without a GPU --------------------------------------------------

@pytest.mark.parametrize("capability,expected", [
    ((8, 0), "sm80-int4"), ((8, 6), "sm80-int4"), ((8, 9), "sm80-int4"),  # INT4 mma.sync is native
    ((9, 0), "sm90"),
    ((8, 7), "sm80-int8"), ((10, 0), "sm80-int8"), ((12, 0), "sm80-int8"),  # INT8 mma.sync everywhere
    ((7, 5), None), ((6, 1), None),
])
def test_registry_by_capability(capability, expected):
    assert kernels.w4a4_kernels_for(capability) == expected


def test_forced_family_nests_and_ranks_above_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "sm80-int8")
    assert kernels._forced_choice() == ("sm80-int8", kernels.KERNELS_ENV)
    with kernels.forced_family("sm90"):
        with kernels.forced_family("reference"):
            assert kernels._forced_choice() == ("reference", "kernels.forced_family")
        assert kernels._forced_choice() == ("sm90", "kernels.forced_family")
    assert kernels._forced_choice() == ("sm80-int8", kernels.KERNELS_ENV)
    monkeypatch.delenv(kernels.KERNELS_ENV)
    assert kernels._forced_choice() == (None, "")


def test_unknown_family_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="sm80-int4"):
        with kernels.forced_family("sm86"):
            pass
    monkeypatch.setenv(kernels.KERNELS_ENV, "int4")
    with pytest.raises(ValueError, match=kernels.KERNELS_ENV):
        kernels._forced_choice()


def test_cpu_takes_the_reference_path():
    assert kernels.w4a4_kernels_on(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        status = kernels.kernels_status()
        assert status["device"] == "none" and status["W4A4 linear"].startswith("reference")


# ---- sm90: the whole layer on the GPU ----------------------------------------------------------------

@needs_sm90
@pytest.mark.usefixtures("sm90_family")
def test_sm90_gelu_from_matches_reference_path():
    # a layer that applies the GELU (flux.fusion.fuse_mlp_gelu) computes it on CUDA as the reference path does
    generator = gen(31)
    layer = w4a4_layer(384, 512, 32, torch.bfloat16, generator, unsigned=False, pow2_weights=True)
    layer.pow2_activations, layer.gelu_from = True, 128
    x = activations(200, 512, torch.bfloat16, generator, layer.unsigned_groups)
    y = layer(x)
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                        layer.bias, layer.shift, layer.unsigned_groups, True, gelu_from=128)
    assert rel(y, ref) <= 5e-3, rel(y, ref)
    assert bool((y[:, 128:] >= -0.2).all()) and not bool((y[:, :128] >= -0.2).all())


@needs_sm90
@pytest.mark.usefixtures("sm90_family")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("pow2_weights,pow2_activations,rotation", [
    *itertools.product([False, True], [False, True], ["none", "hadamard", "random"]),
    (False, False, "random2"), (True, True, "random2")])
def test_sm90_layer_matches_reference_path(dtype, unsigned, pow2_weights, pow2_activations, rotation):
    # (True, True): our Hopper format with restricted activations, the fast kernel 2
    generator = gen(7 + unsigned)
    layer = w4a4_layer(256, 512, 32, dtype, generator, unsigned, pow2_weights=pow2_weights,
                       rotation=group_rotation(rotation, 7))
    layer.pow2_activations = pow2_activations
    x = activations(2 * 77, 512, dtype, generator, layer.unsigned_groups).reshape(2, 77, 512)
    kernel = layer.w4a4_kernel()
    assert kernel.fallback_reason(x.reshape(-1, 512)) == ""
    y = layer(x)
    ref = kernel.reference(x.reshape(-1, 512)).reshape(2, 77, 256)
    assert y.shape == ref.shape and y.dtype == dtype
    # the kernels round lora_act to the 16-bit dtype before the up projection; the reference keeps fp32
    assert rel(y, ref) <= 5e-3, rel(y, ref)


@needs_sm90
@pytest.mark.usefixtures("sm90_family")
@pytest.mark.parametrize("rank", [32, 48, 224])
@pytest.mark.parametrize("fast", [False, True])
def test_sm90_low_rank_split(rank, fast):
    # ranks above KERNEL1_MAX_RANK (LoRAs joined to the branch) take cuBLAS for x @ lora_down
    generator = gen(11 + rank)
    layer = w4a4_layer(384, 576, rank, torch.bfloat16, generator, unsigned=True, pow2_weights=fast)
    layer.pow2_activations = fast
    x = activations(300, 576, torch.bfloat16, generator, layer.unsigned_groups)
    assert (rank > kernels.KERNEL1_MAX_RANK) == (sm90.kernel1_inputs(layer.w4a4_kernel())[3].shape[0] == 0)
    y = layer(x)
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                        layer.bias, layer.shift, layer.unsigned_groups, fast)
    assert rel(y, ref) <= 5e-3, rel(y, ref)


@needs_sm90
@pytest.mark.usefixtures("sm90_family")
def test_sm90_fp32_input_falls_back():
    layer = w4a4_layer(64, 128, 16, torch.bfloat16, gen(3), unsigned=False)
    x = torch.randn(5, 128, device=DEV)
    assert "dtype" in layer.w4a4_kernel().fallback_reason(x)
    assert layer(x).shape == (5, 64)


@needs_sm90
@pytest.mark.usefixtures("sm90_family")
def test_sm90_shift_varying_inside_a_group_falls_back():
    # kernel 1 takes one shift per 64-group; a layer whose shift varies inside one runs the reference
    generator = gen(5)
    layer = w4a4_layer(64, 128, 16, torch.bfloat16, generator, unsigned=True)
    x = activations(5, 128, torch.bfloat16, generator, layer.unsigned_groups)
    assert layer.w4a4_kernel().fallback_reason(x) == ""
    with torch.no_grad():
        layer.shift[64:] = torch.linspace(0.1, 0.2, 64, device=DEV).to(layer.shift.dtype)  # group 1, still positive
    assert "shift" in layer.w4a4_kernel().fallback_reason(x)
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                        layer.bias, layer.shift, layer.unsigned_groups, False)
    assert torch.equal(layer(x), ref)


@needs_sm90
@pytest.mark.usefixtures("sm90_family")
@pytest.mark.parametrize("pow2", [False, True])
def test_sm90_loras_up_to_the_largest_combined_rank(pow2):
    """LoRAs on the low-rank branch (issue 5): the model's rank 32 plus LoRAs of ranks 64 and 919
    make 1015 columns, padded to 1024, the most the kernels take; CUDA equals the reference path."""
    generator = gen(31 + pow2)
    layer = w4a4_layer(256, 512, 32, torch.bfloat16, generator, unsigned=True, pow2_weights=pow2)
    layer.pow2_activations = pow2
    loras = [(lora.LoraDelta(torch.randn(512, r, generator=generator, device=DEV) * 0.02,
                             torch.randn(256, r, generator=generator, device=DEV) * 0.02, "test.safetensors"), strength)
             for r, strength in ((64, 0.8), (919, 0.5))]
    lora.set_module_loras(layer, loras)
    assert layer.rank == kernels.MAX_RANK
    x = activations(300, 512, torch.bfloat16, generator, layer.unsigned_groups)
    assert layer.w4a4_kernel().fallback_reason(x) == ""
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down,
                                        layer.lora_up, layer.bias, layer.shift, layer.unsigned_groups, pow2)
    assert rel(layer(x), ref) <= 5e-3
    with pytest.raises(lora.LoraError, match="1024"):
        lora.set_module_loras(layer, loras + [loras[0]])


@needs_sm90
@pytest.mark.usefixtures("sm90_family")
def test_sm90_torch_compile_with_inductor_around_the_kernels():
    # what ComfyUI's TorchCompileModel node does to a 4-bit model: Inductor compiles the 16-bit ops
    # around the quantized layers, each one call of svdquant's operator running the sm_90a kernels
    from svdquant import flux
    from tiny_flux import eager_and_compiled, quantized_model

    model = quantized_model(True)
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    engine = flux.model.from_tensors(cfg, model.tensors).to(DEV)
    for layer in engine.modules():
        if isinstance(layer, SVDQLinear):
            layer.pow2_activations = True
    noise, context, pooled = flux.synthetic.flux_inputs(cfg, seed=2, height=32, width=32)
    args = tuple(t.to(DEV) for t in (noise, torch.tensor([0.6]).bfloat16(), context, pooled,
                                     torch.tensor([3.5]).bfloat16()))
    eager, compiled, reasons, operator_calls = eager_and_compiled(engine, args)
    assert reasons == [] and operator_calls == sum(isinstance(m, (SVDQLinear, W4A16Linear)) for m in engine.modules())
    assert bool(torch.isfinite(compiled).all())
    # Inductor keeps fp32 between the fused 16-bit ops where eager rounds after each: on this tiny
    # random model eager bf16 is itself ~20% from a float32 run (measured on the CPU)
    assert rel(compiled, eager) < 0.5, rel(compiled, eager)


# ---- sm80: the whole layer on the GPU ----------------------------------------------------------------

@needs_sm80
@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned,pow2,rank,pow2_weights,rotation", [
    (False, False, 32, False, "none"), (True, True, 32, False, "none"), (True, False, 160, False, "none"),
    (True, True, 32, True, "none"), (False, True, 160, True, "none"),  # int8: the whole-K kernel 2
    (True, False, 32, False, "hadamard"), (True, True, 32, True, "random"), (False, True, 160, False, "hadamard"),
    (True, False, 32, False, "random2"), (False, True, 160, True, "random2"),
])
def test_sm80_layer_matches_reference_path(mma, dtype, unsigned, pow2, rank, pow2_weights, rotation):
    generator = gen(7 + unsigned + rank)
    layer = w4a4_layer(256, 512, rank, dtype, generator, unsigned, pow2_weights=pow2_weights,
                       rotation=group_rotation(rotation, 7))
    layer.gelu_from, layer.pow2_activations = 128, pow2
    kernel = layer.w4a4_kernel()
    x = activations(154, 512, dtype, generator, layer.unsigned_groups)
    y = sm80.svdq_linear(x, kernel, mma=mma)
    ref = kernel.reference(x)
    assert y.shape == ref.shape and y.dtype == dtype
    # the kernels round lora_act to the 16-bit dtype before the up projection; the reference keeps fp32
    assert rel(y, ref) <= 5e-3, rel(y, ref)


# ---- each family's layer path on the CPU: what it hands its kernels (launchers replaced by recorders) ----

def _check_kernel1_rotation(given, kernel: kernels.W4A4Kernel, kind: str, rotation: torch.Tensor | None) -> None:
    """Kernel 1 was handed the layer's rotation as W4A4Kernel.kernel1_rotation keeps it: the path of
    group_rotation's `kind`, a random butterfly's coefficients (all its passes) in kernel 1's layout."""
    assert given is kernel.kernel1_rotation() and given[0] == KERNEL1_ROTATION[kind]
    if given[0] == kernels.ROTATION_COEFFICIENTS:
        assert torch.equal(given[1], kernels.rotation_coefficients(rotation, kernel.qweight.device))
    else:
        assert given[1] is None


@pytest.mark.parametrize("rank,pow2_weights,pow2_activations,rotation", [
    (32, False, False, "none"), (32, True, False, "hadamard"), (48, True, True, "random"), (224, False, True, "none"),
    (16, False, True, "random2")])
def test_sm90_layer_hands_its_kernels_the_derived_tensors(monkeypatch, rank, pow2_weights, pow2_activations,
                                                          rotation):
    calls = {}

    def act_quant(x, smooth, inv_smooth, shift, lora_down_p, pow2=False, int8_operands=False,
                  rotation=(kernels.ROTATION_NONE, None), norm=None, norm_out=None, x2=None):
        assert norm is None and norm_out is None
        calls["kernel 1"] = (smooth, inv_smooth, shift, lora_down_p, pow2, int8_operands, rotation)
        return "codes", "ascales", "fused lora_act"

    def w4a4_gemm(codes, ascales, lora_act, qweight, wscales, lora_up, bias, out=None, gelu_from=-1, residual=None):
        calls["kernel 2"] = ("exact", lora_act, qweight, (wscales,), lora_up, bias, gelu_from)
        return "y"

    def w4a4_gemm_pow2(codes, atok, lora_act, qweight, wexp, wbase, lora_up, bias, out=None, tile_t=0, half_rows=-1,
                       gelu_from=-1, residual=None):
        calls["kernel 2"] = ("fast", lora_act, qweight, (wexp, wbase), lora_up, bias, gelu_from)
        return "y"

    for name, fake in (("act_quant", act_quant), ("w4a4_gemm", w4a4_gemm), ("w4a4_gemm_pow2", w4a4_gemm_pow2)):
        monkeypatch.setattr(sm90, name, fake)
    generator = gen(41 + rank, "cpu")
    layer = w4a4_layer(64, 256, rank, torch.bfloat16, generator, unsigned=True, pow2_weights=pow2_weights,
                       rotation=group_rotation(rotation, 41))
    layer.pow2_activations, layer.gelu_from = pow2_activations, 32
    x = activations(5, 256, torch.bfloat16, generator, layer.unsigned_groups)
    kernel = layer.w4a4_kernel()
    assert sm90.svdq_linear(x, kernel) == "y"

    smooth, inv_smooth, shift, lora_down_p, pow2, int8_operands, rotation_given = calls["kernel 1"]
    assert smooth.dtype == torch.float32 and torch.equal(smooth, layer.smooth.float())
    _check_kernel1_rotation(rotation_given, kernel, rotation, group_rotation(rotation, 41))
    assert torch.equal(inv_smooth, torch.reciprocal(smooth))
    assert torch.equal(shift, kernel.group_shifts()) and shift.tolist() == [0.0, numerics.GELU_SHIFT] * 2
    fused = rank <= kernels.KERNEL1_MAX_RANK
    assert torch.equal(lora_down_p, sm90.kernel1_lora_down(layer.lora_down[:, :rank if fused else 0]))
    fast = pow2_activations and pow2_weights
    assert (pow2, int8_operands) == (pow2_activations, fast)
    path, lora_act, qweight, scales, lora_up, bias, gelu_from = calls["kernel 2"]
    assert path == ("fast" if fast else "exact") and gelu_from == 32
    assert lora_act == "fused lora_act" if fused else torch.equal(lora_act, x @ layer.lora_down)
    assert qweight is layer.qweight and lora_up is layer.lora_up and bias is layer.bias
    if fast:
        wbase, exps = numerics.pow2_weight_exponents(layer.wscales)
        assert scales[0].shape == (4, 64) and torch.equal(scales[0], exps) and torch.equal(scales[1], wbase)
        assert sm90.pow2_weight_operands(kernel)[0] is scales[0]  # kept by the kernel
    else:
        assert scales[0] is layer.wscales
    assert sm90.kernel1_inputs(kernel)[3] is lora_down_p  # kept by the kernel


@pytest.mark.parametrize("rank,pow2_activations,mma,rotation", [
    (24, False, "int4", "hadamard"), (32, True, "int8", "none"), (0, False, "int8", "random"),
    (40, True, "int4", "none"), (16, True, "int8", "random2")])
def test_sm80_layer_hands_its_kernels_the_derived_tensors(monkeypatch, rank, pow2_activations, mma, rotation):
    calls = {}

    def act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=False, int8_operands=False,
                  rotation=(kernels.ROTATION_NONE, None), norm=None, norm_out=None, x2=None):
        assert norm is None and norm_out is None
        calls["kernel 1"] = (smooth, inv_smooth, group_shift, lora_t, pow2, int8_operands, rotation)
        return "codes", "ascales", None if lora_t is None else "fused lora_act"

    def w4a4_gemm(codes, ascales, group_shift, qweight, wscales, lora_act, lora_up, bias=None, out=None,
                  gelu_from=None, mma="int8", residual=None):
        calls["kernel 2"] = (group_shift, qweight, wscales, lora_act, lora_up, bias, gelu_from, mma)
        return "y"

    monkeypatch.setattr(sm80, "act_quant", act_quant)
    monkeypatch.setattr(sm80, "w4a4_gemm", w4a4_gemm)
    generator = gen(43 + rank, "cpu")
    layer = w4a4_layer(64, 192, rank, torch.bfloat16, generator, unsigned=True, rotation=group_rotation(rotation, 43))
    layer.pow2_activations, layer.gelu_from = pow2_activations, 16
    x = activations(5, 192, torch.bfloat16, generator, layer.unsigned_groups)
    kernel = layer.w4a4_kernel()
    assert sm80.svdq_linear(x, kernel, mma=mma) == "y"

    smooth, inv_smooth, group_shift, lora_t, pow2, int8_operands, rotation_given = calls["kernel 1"]
    assert torch.equal(smooth, layer.smooth.float()) and torch.equal(inv_smooth, torch.reciprocal(smooth))
    _check_kernel1_rotation(rotation_given, kernel, rotation, group_rotation(rotation, 43))
    assert group_shift.tolist() == [0.0, numerics.GELU_SHIFT, 0.0] and pow2 == pow2_activations
    assert not int8_operands  # exact weight scales: the per-group kernel 2
    padded = -rank % kernels.RANK_MULTIPLE
    if 0 < rank <= kernels.KERNEL1_MAX_RANK:
        assert lora_t.shape == (rank + padded, 192) and torch.equal(lora_t[:rank], layer.lora_down.t())
        assert not lora_t[rank:].any()
    else:
        assert lora_t is None
    shift_given, qweight, wscales, lora_act, lora_up, bias, gelu_from, mma_given = calls["kernel 2"]
    assert shift_given is group_shift and qweight is layer.qweight and wscales is layer.wscales
    assert bias is layer.bias and (gelu_from, mma_given) == (16, mma)
    if rank > kernels.KERNEL1_MAX_RANK:  # cuBLAS for x @ lora_down, padded to the kernels' rank multiple
        assert torch.equal(lora_act, torch.nn.functional.pad(x @ layer.lora_down, (0, padded)))
    else:
        assert lora_act == ("fused lora_act" if rank else None)
    if rank:
        assert lora_up.shape == (64, rank + padded) and torch.equal(lora_up[:, :rank], layer.lora_up)
        assert not lora_up[:, rank:].any() and (lora_up is layer.lora_up) == (padded == 0)
    else:
        assert lora_up is None
    # a shift that varies inside a group: the sm80 layer path refuses it by name
    with torch.no_grad():
        layer.shift[64:128] = torch.linspace(0.1, 0.2, 64).to(layer.shift.dtype)
    with pytest.raises(sm80.Sm80InputError, match="varies inside a 64-channel group"):
        sm80.svdq_linear(x, kernel, mma=mma)


@pytest.mark.parametrize("rank,pow2_activations,mma", [(24, True, "int8"), (40, True, "int8"), (0, True, "int8"),
                                                       (32, False, "int8"), (32, True, "int4")])
def test_sm80_power_of_two_layer_runs_the_whole_k_kernel(monkeypatch, rank, pow2_activations, mma):
    # the int8 variant on pow2 weights and activations: kernel 1's s8 operands and the whole-K kernel 2;
    # exact activations or the int4 variant: the per-group kernel 2
    calls = {}

    def act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=False, int8_operands=False, rotation=None,
                  norm=None, norm_out=None, x2=None):
        assert norm is None and norm_out is None
        calls["kernel 1"] = (group_shift, lora_t, pow2, int8_operands)
        return "codes", "atok", None if lora_t is None else "fused lora_act"

    def w4a4_gemm_pow2(codes, atok, qweight, wexp, wbase, dtype, lora_act, lora_up, bias=None, out=None,
                       gelu_from=None, residual=None):
        calls["kernel 2"] = ("whole K", codes, atok, qweight, wexp, wbase, dtype, lora_act, lora_up, bias, out,
                             gelu_from)
        calls["residual"] = residual
        return "y"

    def w4a4_gemm(codes, ascales, group_shift, qweight, wscales, lora_act, lora_up, bias=None, out=None,
                  gelu_from=None, mma="int8", residual=None):
        calls["kernel 2"] = ("per group", mma)
        calls["residual"] = residual
        return "y"

    monkeypatch.setattr(sm80, "act_quant", act_quant)
    monkeypatch.setattr(sm80, "w4a4_gemm_pow2", w4a4_gemm_pow2)
    monkeypatch.setattr(sm80, "w4a4_gemm", w4a4_gemm)
    generator = gen(47 + rank, "cpu")
    layer = w4a4_layer(72, 192, rank, torch.bfloat16, generator, unsigned=True, pow2_weights=True)
    layer.pow2_activations, layer.gelu_from = pow2_activations, 16
    x = activations(5, 192, torch.bfloat16, generator, layer.unsigned_groups)
    kernel = layer.w4a4_kernel()
    out = torch.empty(5, 72, dtype=torch.bfloat16)
    gated = kernels.GatedResidual(torch.zeros(5, 72, dtype=torch.bfloat16), torch.ones(1, 72, dtype=torch.bfloat16))
    assert sm80.svdq_linear(x, kernel, mma=mma, out=out, residual=gated) == "y"
    assert calls["residual"] is gated  # either kernel 2 adds the output into the residual (KERNEL2_RESIDUAL)

    whole_k = pow2_activations and mma == "int8"
    assert sm80.runs_whole_k(kernel, mma, pow2_activations) == whole_k
    group_shift, lora_t, pow2, int8_operands = calls["kernel 1"]
    assert (pow2, int8_operands) == (pow2_activations, whole_k) and torch.equal(group_shift, kernel.group_shifts())
    if not whole_k:
        assert calls["kernel 2"] == ("per group", mma)
        return
    _, codes, atok, qweight, wexp, wbase, dtype, lora_act, lora_up, bias, out_given, gelu_from = calls["kernel 2"]
    assert (codes, atok, dtype, gelu_from) == ("codes", "atok", torch.bfloat16, 16) and out_given is out
    assert qweight is layer.qweight and bias is layer.bias
    ref_base, ref_exps = numerics.pow2_weight_exponents(layer.wscales)
    assert wexp.shape == (3, 80) and torch.equal(wexp[:, :72], ref_exps) and not wexp[:, 72:].any()
    assert torch.equal(wbase, ref_base)
    assert sm80.pow2_weight_operands(kernel)[0] is wexp  # kept by the kernel
    padded = -rank % kernels.RANK_MULTIPLE
    if rank > kernels.KERNEL1_MAX_RANK:
        assert lora_t is None and torch.equal(lora_act, torch.nn.functional.pad(x @ layer.lora_down, (0, padded)))
    else:
        assert lora_act == ("fused lora_act" if rank else None)
    if rank:
        assert lora_up.shape == (72, rank + padded) and torch.equal(lora_up[:, :rank], layer.lora_up)
    else:
        assert lora_up is None


@pytest.mark.parametrize("rank", [32, 40])
def test_sm80_layer_with_a_norm_has_kernel1_store_the_input_of_wide_ranks(monkeypatch, rank):
    # svdq_linear(h, kernel, norm=...) hands the norm to kernel 1 at every rank; above KERNEL1_MAX_RANK also a
    # buffer [M, K] that kernel 1 stores the layer's input norm.apply(h) into, which the low-rank GEMM then reads
    # (h itself is only the LayerNorm's input)
    calls = {}

    def act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=False, int8_operands=False, rotation=None,
                  norm=None, norm_out=None, x2=None):
        calls["kernel 1"] = (x, norm, norm_out)
        if norm_out is not None:
            norm_out.copy_(norm.apply(x))  # as kernel 1's prologue stores it
        return "codes", "ascales", None if lora_t is None else "fused lora_act"

    def w4a4_gemm(codes, ascales, group_shift, qweight, wscales, lora_act, lora_up, bias=None, out=None,
                  gelu_from=None, mma="int8", residual=None):
        calls["kernel 2"] = lora_act
        return "y"

    monkeypatch.setattr(sm80, "act_quant", act_quant)
    monkeypatch.setattr(sm80, "w4a4_gemm", w4a4_gemm)
    generator = gen(53 + rank, "cpu")
    layer = w4a4_layer(64, 192, rank, torch.bfloat16, generator, unsigned=False)
    h = activations(6, 192, torch.bfloat16, generator, layer.unsigned_groups)
    mult = (1 + 0.3 * torch.randn(2, 192, generator=generator)).to(torch.bfloat16)
    add = (0.5 * torch.randn(2, 192, generator=generator)).to(torch.bfloat16)
    norm = kernels.ModulatedNorm(mult, add, 1e-6)
    assert sm80.svdq_linear(h, layer.w4a4_kernel(), mma="int4", norm=norm) == "y"

    x_given, norm_given, norm_out = calls["kernel 1"]
    assert x_given is h and norm_given is norm
    if rank <= kernels.KERNEL1_MAX_RANK:
        assert norm_out is None and calls["kernel 2"] == "fused lora_act"
    else:
        assert norm_out.shape == h.shape and norm_out.dtype == h.dtype
        padded = -rank % kernels.RANK_MULTIPLE
        want = torch.nn.functional.pad(norm.apply(h) @ layer.lora_down, (0, padded))
        assert torch.equal(calls["kernel 2"], want)


@pytest.mark.parametrize("family,rank", [("sm90", 32), ("sm90", 48), ("sm80", 16), ("sm80", 40)])
def test_layer_hands_kernel1_a_concatenation_where_it_lies(monkeypatch, family, rank):
    # svdq_linear(kernels.Concat(a, b), kernel): kernel 1 gets both parts as they are (b a strided slice of a wider
    # tensor, as linear1's GELU columns are); above KERNEL1_MAX_RANK the layer's low-rank GEMM reads the whole input,
    # so kernel 1 gets the concatenated tensor
    module = sm90 if family == "sm90" else sm80
    calls = {}

    def act_quant(x, *args, norm=None, norm_out=None, x2=None, **kwargs):
        if len(args) > 7:  # sm90 passes norm, norm_out and x2 by position
            norm, norm_out, x2 = args[7:10]
        calls["kernel 1"] = (x, x2, norm, norm_out)
        fused = rank <= kernels.KERNEL1_MAX_RANK
        return "codes", "ascales", "fused lora_act" if fused else None

    def kernel2(*args, **kwargs):
        calls["kernel 2"] = [a for a in args if isinstance(a, torch.Tensor) and a.shape[0] == 6]  # lora_act
        return "y"

    monkeypatch.setattr(module, "act_quant", act_quant)
    for name in ("w4a4_gemm", "w4a4_gemm_pow2"):
        monkeypatch.setattr(module, name, kernel2)
    generator = gen(59 + rank, "cpu")
    layer = w4a4_layer(64, 320, rank, torch.bfloat16, generator, unsigned=False)
    x = activations(6, 320, torch.bfloat16, generator, layer.unsigned_groups)
    wider = torch.randn(6, 504, generator=generator).to(torch.bfloat16)
    wider[:, 312:] = x[:, 128:]
    first, second = x[:, :128].clone(), wider[:, 312:]
    assert not second.is_contiguous()
    assert module.svdq_linear(kernels.Concat(first, second), layer.w4a4_kernel()) == "y"
    x_given, x2_given, norm, norm_out = calls["kernel 1"]
    assert norm is None and norm_out is None
    if rank <= kernels.KERNEL1_MAX_RANK:
        assert x_given is first and x2_given is second
    else:
        assert x2_given is None and torch.equal(x_given, x) and x_given.is_contiguous()
        lora_act = calls["kernel 2"][0]
        assert torch.equal(lora_act[:, :rank], x @ layer.lora_down)


def test_a_concatenation_of_misaligned_parts_is_copied_and_checked():
    # kernels.Concat keeps each part where it is when kernel 1 can read it so (unit column stride, 16-byte rows),
    # else a contiguous copy; the launchers' own check (families.check_concat) names what does not fit
    a = torch.zeros(4, 128, dtype=torch.bfloat16)
    odd = torch.zeros(4, 201, dtype=torch.bfloat16)[:, 1:193]  # rows 402 bytes apart
    concat = kernels.Concat(a, odd)
    assert concat.parts[0] is a and concat.parts[1].is_contiguous() and torch.equal(concat.parts[1], odd)
    assert concat.shape == (4, 320) and concat.dtype == torch.bfloat16
    assert torch.equal(concat.value(), torch.cat((a, odd), 1))
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.Concat(a[:, :100], a)
    with pytest.raises(ValueError, match="same rows"):
        kernels.Concat(a, a[:3])
    with pytest.raises(RuntimeError, match="x2 needs unit column stride"):
        check_concat(a, odd, None)
    with pytest.raises(RuntimeError, match="a norm"):
        check_concat(a, a, kernels.ModulatedNorm(None, None, 1e-6))
    with pytest.raises(RuntimeError, match="multiple of 64"):
        check_concat(a[:, :100], a, None)
    assert check_concat(a, a[:, :64], None) == 192 and check_concat(a, None, None) == 128


@needs_sm80
@pytest.mark.parametrize("family", ["sm90", "sm80-int8", "sm80-int4"])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("rank", [32, 96])
def test_layer_on_a_concatenation_is_the_layer_on_the_concatenated_input(family, fast, rank):
    # W4A4Kernel(kernels.Concat(attention, GELU columns)) on each family equals the layer on their concatenation
    # bit for bit: kernel 1 reads both parts where they lie at rank 32, the concatenation is made first at 96
    # (cuBLAS's low-rank GEMM reads it); exact and fast layers (the fast kernel 2s after s8 operands)
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    generator = gen(61 + rank + fast)
    layer = w4a4_layer(256, 3072 + 1024, rank, torch.bfloat16, generator, True, pow2_weights=fast)
    layer.pow2_activations = fast
    x = activations(300, 4096, torch.bfloat16, generator, layer.unsigned_groups)
    linear1 = torch.randn(300, 3 * 3072 + 1024, generator=generator, device=x.device).to(torch.bfloat16)
    linear1[:, 3 * 3072:] = x[:, 3072:]
    concat = kernels.Concat(x[:, :3072].contiguous(), linear1[:, 3 * 3072:])
    with kernels.forced_family(family):
        kernel = layer.w4a4_kernel()
        assert kernel.fallback_reason(x) == ""
        assert torch.equal(kernel(concat), kernel(x))


@needs_sm80
@pytest.mark.parametrize("family", ["sm90", "sm80-int8", "sm80-int4"])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_layer_with_a_gated_residual_is_the_layer_then_the_residual(family, fast, in_place):
    # W4A4Kernel(x, residual=GatedResidual(r, gate)) on each family (kernel 2's epilogue: KERNEL2_RESIDUAL) equals
    # numerics.gated_residual of the layer's own output bit for bit, into the residual where it is `out`
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    generator = gen(67 + fast + 2 * in_place)
    layer = w4a4_layer(392, 576, 32, torch.bfloat16, generator, True, pow2_weights=fast)
    layer.pow2_activations = fast
    x = activations(600, 576, torch.bfloat16, generator, layer.unsigned_groups)
    residual = (4 * torch.randn(600, 392, generator=generator, device=x.device)).bfloat16()
    gate = torch.randn(2, 392, generator=generator, device=x.device).bfloat16()
    with kernels.forced_family(family):
        kernel = layer.w4a4_kernel()
        assert kernel.fallback_reason(x) == "" and kernels.residual_on(x.device)
        y = kernel(x)
        expected = numerics.gated_residual(residual.reshape(2, 300, 392), gate.unsqueeze(1),
                                           y.reshape(2, 300, 392)).reshape(600, 392)
        target = residual.clone()
        got = kernel(x, residual=kernels.GatedResidual(target, gate), out=target if in_place else None)
    assert (got.data_ptr() == target.data_ptr()) == in_place
    assert torch.equal(got, expected)


def test_kernel2_checks_a_gated_residual():
    # families.residual_arguments, the check both families' kernel 2 make of a kernels.GatedResidual against y
    y = torch.zeros(6, 64, dtype=torch.bfloat16)
    residual, gate = torch.zeros(6, 64, dtype=torch.bfloat16), torch.ones(2, 64, dtype=torch.bfloat16)
    assert residual_arguments(None, y) == (None, None, 1)
    got = residual_arguments(kernels.GatedResidual(residual, gate), y)
    assert got[0] is residual and got[1] is gate and got[2] == 3
    for wrong, problem in [((residual[:, :32], gate), "residual must have shape"), ((residual, gate[:, :32]), "gate"),
                           ((residual, torch.ones(4, 64, dtype=torch.bfloat16)), "equal batches"),
                           ((residual.float(), gate), "residual must be"), ((residual.t().contiguous().t(), gate),
                                                                            "contiguous")]:
        with pytest.raises(RuntimeError, match=problem):
            residual_arguments(kernels.GatedResidual(*wrong), y)
    # the PyTorch form every family falls back to: numerics.gated_residual, into out where given
    y = torch.randn(6, 64).bfloat16()
    out = torch.empty_like(y)
    assert kernels.GatedResidual(residual, gate).apply(y, out) is out
    assert torch.equal(out, numerics.gated_residual(residual.reshape(2, 3, 64), gate.unsqueeze(1),
                                                    y.reshape(2, 3, 64)).reshape(6, 64))
