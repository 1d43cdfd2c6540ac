"""Tests of the Hopper (sm_90a) W4A4 kernels against the numerical definition in `numerics`.

Skipped unless an sm_90 GPU is present. The kernels come through svdquant.cuda: prebuilt cubins
(`python setup.py build_ext --inplace`) where present, else NVRTC; svdquant/families/sm90.py
launches them.

Kernel 1's codes and scales must equal `numerics.quantize_activations` (pow2 mode:
`numerics.quantize_activations_pow2`, whose codes times 2^-e are the stored e4m3 operands, or times
2^(3-e) the s8 operands of the fast kernel 2) exactly:
it performs the same IEEE divisions (reciprocal + Markstein correction, exact for normal quotients)
and rounds half to even like torch.round, so there is no tie case where the two may differ.
Kernel 2 (exact and fast variants) is compared with a float64 evaluation of the same codes,
scales and low-rank inputs.
"""

from __future__ import annotations

import pytest
import torch

from svdquant import kernels, lora, numerics
from svdquant.families import sm90
from svdquant.linear import SVDQLinear

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                                reason="needs an sm_90 GPU")

DEV = "cuda"


@pytest.fixture(autouse=True)
def _sm90_family():
    """Layers run the sm90 family whatever SVDQUANT_W4A4_KERNELS says."""
    with kernels.forced_family("sm90"):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _activations(m: int, k: int, dtype: torch.dtype, gen: torch.Generator, unsigned: torch.Tensor) -> torch.Tensor:
    """Random activations with planted outliers: a few hot channels (x30) and single spikes (x100).

    Groups flagged unsigned get post-GELU-like values (>= -GELU_SHIFT, as the shifted layers see).
    """
    x = torch.randn(m, k, generator=gen, device=DEV)
    hot = torch.randint(0, k, (max(1, k // 64),), generator=gen, device=DEV)
    x[:, hot] *= 30.0
    spikes = torch.randint(0, m * k, (max(1, m * k // 5000),), generator=gen, device=DEV)
    x.view(-1)[spikes] *= 100.0
    cols = unsigned.to(DEV).repeat_interleave(numerics.GROUP_SIZE)
    x[:, cols] = torch.nn.functional.gelu(x[:, cols], approximate="tanh")
    return x.to(dtype)


def _wscales(groups: int, n: int, dtype: torch.dtype, gen: torch.Generator, pow2: bool) -> torch.Tensor:
    if not pow2:
        return (torch.rand(groups, n, generator=gen, device=DEV) * 0.02 + 1e-3).to(dtype)
    # power-of-two fractions 2^-f, f in [0, 4], of a per-channel base (f = 0 somewhere in each row)
    low = 4e-3 if dtype == torch.bfloat16 else 4e-2
    base = (torch.rand(n, generator=gen, device=DEV) * 0.04 + low).to(dtype).float()
    exps = torch.randint(0, numerics.POW2_WEIGHT_MAX_EXP + 1, (groups, n), generator=gen, device=DEV)
    exps[torch.randint(0, groups, (n,), generator=gen, device=DEV), torch.arange(n, device=DEV)] = 0
    scales = (base * torch.exp2(-exps.float())).to(dtype)
    assert torch.equal(scales.float(), base * torch.exp2(-exps.float()))
    return scales


def _layer(n: int, k: int, rank: int, dtype: torch.dtype, gen: torch.Generator, unsigned: bool,
           bias: bool = True, pow2_weights: bool = False) -> SVDQLinear:
    groups = k // numerics.GROUP_SIZE
    tensors = {
        "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, device=DEV, dtype=torch.uint8),
        "wscales": _wscales(groups, n, dtype, gen, pow2_weights),
        "smooth": (torch.rand(k, generator=gen, device=DEV) * 4 + 0.05).to(dtype),
        "lora_down": (torch.randn(k, rank, generator=gen, device=DEV) * 0.05).to(dtype),
        "lora_up": (torch.randn(n, rank, generator=gen, device=DEV) * 0.05).to(dtype),
    }
    if bias:
        tensors["bias"] = torch.randn(n, generator=gen, device=DEV).to(dtype)
    if unsigned:  # every other group shifted (unsigned), the rest signed
        flags = torch.arange(groups, device=DEV) % 2 == 1
        tensors["shift"] = (flags.repeat_interleave(numerics.GROUP_SIZE) * numerics.GELU_SHIFT).to(dtype)
    layer = SVDQLinear.from_tensors(tensors)
    assert layer.pow2_weights == (pow2_weights or groups == 1)  # one scale per row is its own base
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _kernel1(x: torch.Tensor, layer: SVDQLinear, pow2: bool = False, int8_operands: bool = False):
    """Kernel 1 with the layer's whole low-rank branch (sm90.svdq_linear leaves ranks above
    KERNEL1_MAX_RANK to cuBLAS; the kernel itself takes up to 1024)."""
    smooth, inv_smooth, shift, _ = sm90.layer_inputs(layer)
    down = sm90.kernel1_lora_down(layer.lora_down)
    return sm90.act_quant(x, smooth, inv_smooth, shift, down, pow2, int8_operands)


@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("k,rank", [(128, 32), (320, 160), (1600, 32), (1600, 320), (320, 48), (128, 0)])
@pytest.mark.parametrize("mode", ["exact", "pow2", "pow2_int8"])
def test_act_quant_matches_reference(m, dtype, unsigned, k, rank, mode):
    # K = 128, 320: one or two groups per CTA of a small cluster; K = 1600 (25 groups): clusters
    # whose last CTA has fewer groups; ranks run in blocks of 64, each a sweep over the resident x
    # slice (32, 48: one partial block whose wgmma rows past the ranks are discarded; 160: the last
    # block half full, its missing rows zero-filled by TMA; 320: five blocks). pow2_int8: the same
    # codes as the fast kernel 2's s8 operands
    pow2, int8_operands = mode != "exact", mode == "pow2_int8"
    gen = _gen(m * 7 + rank + unsigned + k + 11 * pow2)
    layer = _layer(64, k, rank, dtype, gen, unsigned)
    x = _activations(m, k, dtype, gen, layer.unsigned_groups)
    codes, ascales, lora_act = _kernel1(x, layer, pow2, int8_operands)
    torch.cuda.synchronize()

    got = sm90.act_operands_to_natural(codes, int8_operands)
    if pow2:
        ref_codes, ref_atok, ref_exps = numerics.quantize_activations_pow2(x, layer.smooth, layer.shift)
        ref = ref_codes.float() * torch.exp2(-ref_exps.float()).repeat_interleave(numerics.GROUP_SIZE, dim=1)
        assert torch.equal(ascales[0, :m], ref_atok.float())
    else:
        ref_codes, ref_scales = numerics.quantize_activations(x, layer.smooth, layer.shift)
        ref = ref_codes.float()
        assert torch.equal(ascales[:, :m].t(), ref_scales.float())
    mismatch = (got != ref).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} codes differ, first at {mismatch[:5].tolist()}"
    assert bool((ascales[:, m:] == 0).all()), "padding rows of the scales must be zero"

    ref_lora = (x.double() @ layer.lora_down.double()).to(dtype)
    assert _rel(lora_act, ref_lora) <= 1e-3


def _gemm_reference(codes: torch.Tensor, ascales: torch.Tensor, lora_act: torch.Tensor, layer: SVDQLinear,
                    int8_operands: bool):
    """float64 evaluation of kernel 2 on kernel 1's outputs (group or token scales)."""
    m, k = codes.shape
    n, groups = layer.out_features, k // numerics.GROUP_SIZE
    a = sm90.act_operands_to_natural(codes, int8_operands).double().reshape(m, groups, 64)
    w = numerics.unpack_int4(layer.qweight, signed=True).double().reshape(n, groups, 64)
    y = torch.zeros(m, n, dtype=torch.float64, device=DEV)
    for g in range(groups):
        asc = ascales[g if ascales.shape[0] > 1 else 0, :m].double()
        y += (a[:, g] @ w[:, g].t()) * asc[:, None] * layer.wscales[g].double()[None, :]
    y += lora_act.double() @ layer.lora_up.double().t()
    if layer.bias is not None:
        y += layer.bias.double()
    return y


def _gelu_tanh64(y: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, in float64."""
    return 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))


def _run_gemm(x: torch.Tensor, layer: SVDQLinear, pow2: bool = False, fast: bool = False, tile_t: int = 0,
              half_rows: int = -1, gelu_from: int = -1):
    """Kernels 1 and 2 on poisoned outputs; returns (y, float64 reference on kernel 1's outputs)."""
    codes, ascales, lora_act = _kernel1(x, layer, pow2 or fast, fast)
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=DEV)
    if fast:
        wexp, wbase = sm90.pow2_weights(layer)
        y = sm90.w4a4_gemm_pow2(codes, ascales, lora_act, layer.qweight, wexp, wbase, layer.lora_up, layer.bias, out,
                                tile_t, half_rows, gelu_from)
    else:
        y = sm90.w4a4_gemm(codes, ascales, lora_act, layer.qweight, layer.wscales, layer.lora_up, layer.bias, out,
                           gelu_from)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    assert bool(torch.isfinite(y).all()), f"{int((~torch.isfinite(y)).sum())} outputs unwritten or not finite"
    ref = _gemm_reference(codes, ascales, lora_act, layer, fast)
    if gelu_from >= 0:
        ref[:, gelu_from:] = _gelu_tanh64(ref[:, gelu_from:])
    return y, ref


@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097, 4608])
@pytest.mark.parametrize("rank", [32, 160])
@pytest.mark.parametrize("pow2", [False, True])
def test_gemm_matches_float64(m, rank, pow2):
    # pow2: the exact kernel 2 on kernel 1's pow2 outputs (per-token scales, 2^-e in the codes)
    gen = _gen(1000 + m + rank + pow2)
    layer = _layer(384, 576, rank, torch.bfloat16, gen, unsigned=False)
    x = _activations(m, 576, torch.bfloat16, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, pow2)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)


@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097, 4608])
@pytest.mark.parametrize("rank", [32, 160, 224])
@pytest.mark.parametrize("tile_t", [128, 256])
def test_fast_gemm_matches_float64(m, rank, tile_t):
    # K = 576: 9 groups, an odd count for the main loop unrolled by two; rank 224 = 32 + 64 + 128
    gen = _gen(2000 + m + rank + tile_t)
    layer = _layer(384, 576, rank, torch.bfloat16, gen, unsigned=False, pow2_weights=True)
    x = _activations(m, 576, torch.bfloat16, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, fast=True, tile_t=tile_t)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)


@pytest.mark.parametrize("m,half_rows", [(4608, 1), (4608, 3), (4097, 1), (4097, 2), (300, 1), (300, 5)])
def test_fast_gemm_half_tiles(m, half_rows):
    # the last half_rows 256-token rows of the schedule run as 128-token tiles after the whole ones;
    # 4097: the last half tile holds one token; 300: both rows, and more rows asked for than exist
    gen = _gen(4000 + m + half_rows)
    layer = _layer(3072, 256, 32, torch.bfloat16, gen, unsigned=True, pow2_weights=True)
    x = _activations(m, 256, torch.bfloat16, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, fast=True, tile_t=256, half_rows=half_rows)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)


@pytest.mark.parametrize("m", [4097, 4608])
@pytest.mark.parametrize("tile_t", [128, 256])
def test_fast_gemm_persistent_tiles(m, tile_t):
    # 24 channel tiles x 17..36 token tiles: more tiles than SMs, so each CTA runs several in a row
    gen = _gen(3000 + m + tile_t)
    layer = _layer(3072, 256, 32, torch.bfloat16, gen, unsigned=True, pow2_weights=True)
    x = _activations(m, 256, torch.bfloat16, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, fast=True, tile_t=tile_t)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)


@pytest.mark.parametrize("n,k,rank,dtype,unsigned,bias", [
    (136, 64, 0, torch.bfloat16, False, True),      # one group, a partial channel tile, no low rank
    (8, 192, 16, torch.float16, True, False),       # 8 channels, three groups, unsigned groups, fp16
    (3072, 3072, 32, torch.bfloat16, True, True),   # a FLUX shape
    (520, 1024, 48, torch.float16, False, True),
])
@pytest.mark.parametrize("path", ["exact", "exact_pow2_act", "fast", "fast256"])
def test_gemm_awkward_shapes(n, k, rank, dtype, unsigned, bias, path):
    gen = _gen(n + k + rank)
    fast = path.startswith("fast")
    layer = _layer(n, k, rank, dtype, gen, unsigned, bias, pow2_weights=fast)
    x = _activations(300, k, dtype, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, pow2=path == "exact_pow2_act", fast=fast, tile_t=int(path[4:] or 128) if fast else 0)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)


@pytest.mark.parametrize("gelu_from", [0, 136, 384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["exact", "fast", "fast256"])
def test_gemm_epilogue_gelu(gelu_from, dtype, path):
    # GELU (tanh approximation) on the output channels from gelu_from on, in fp32 before the
    # rounding: 0 all of them (an MLP's first layer), 136 from inside the second channel tile (the
    # rows of one warp on both sides; FLUX's single blocks start it at 3 x hidden size), 384 = N none
    gen = _gen(5000 + gelu_from)
    fast = path.startswith("fast")
    layer = _layer(384, 576, 32, dtype, gen, unsigned=False, pow2_weights=fast)
    x = _activations(300, 576, dtype, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, fast=fast, tile_t=int(path[4:] or 128) if fast else 0, gelu_from=gelu_from)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)
    # GELU's negative tail (outputs down to about -0.17) to the precision of the output dtype
    neg = ref[:, gelu_from:] < -1e-2
    assert bool(neg.any()) == (gelu_from < 384)
    tail = (y[:, gelu_from:][neg].double() - ref[:, gelu_from:][neg]).abs() / ref[:, gelu_from:][neg].abs()
    assert tail.numel() == 0 or float(tail.max()) <= (2 ** -7 if dtype == torch.bfloat16 else 2 ** -9)


def test_svdq_linear_gelu_from_matches_reference_path():
    # a layer that applies the GELU (flux.fuse_mlp_gelu) computes it on CUDA as the reference path does
    gen = _gen(31)
    layer = _layer(384, 512, 32, torch.bfloat16, gen, unsigned=False, pow2_weights=True)
    layer.pow2_activations, layer.gelu_from = True, 128
    x = _activations(200, 512, torch.bfloat16, gen, layer.unsigned_groups)
    y = layer(x)
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                        layer.bias, layer.shift, layer.unsigned_groups, True, gelu_from=128)
    assert _rel(y, ref) <= 5e-3, _rel(y, ref)
    assert bool((y[:, 128:] >= -0.2).all()) and not bool((y[:, :128] >= -0.2).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("pow2_weights,pow2_activations", [(False, False), (False, True), (True, False),
                                                           (True, True)])
def test_svdq_linear_cuda_matches_reference_path(dtype, unsigned, pow2_weights, pow2_activations):
    # (True, True): our Hopper format with restricted activations, the fast kernel 2
    gen = _gen(7 + unsigned)
    layer = _layer(256, 512, 32, dtype, gen, unsigned, pow2_weights=pow2_weights)
    layer.pow2_activations = pow2_activations
    x = _activations(2 * 77, 512, dtype, gen, layer.unsigned_groups).reshape(2, 77, 512)
    assert kernels._fallback_reason(x.reshape(-1, 512), layer) == ""
    y = layer(x)
    ref = kernels.svdq_linear_reference(
        x.reshape(-1, 512), layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
        layer.bias, layer.shift, layer.unsigned_groups, kernels.uses_pow2_activations(layer)).reshape(2, 77, 256)
    assert y.shape == ref.shape and y.dtype == dtype
    # the kernels round lora_act to the 16-bit dtype before the up projection; the reference keeps fp32
    assert _rel(y, ref) <= 5e-3, _rel(y, ref)


@pytest.mark.parametrize("rank", [32, 48, 224])
@pytest.mark.parametrize("fast", [False, True])
def test_svdq_linear_cuda_low_rank_split(rank, fast):
    # ranks above KERNEL1_MAX_RANK (LoRAs joined to the branch) take cuBLAS for x @ lora_down
    gen = _gen(11 + rank)
    layer = _layer(384, 576, rank, torch.bfloat16, gen, unsigned=True, pow2_weights=fast)
    layer.pow2_activations = fast
    x = _activations(300, 576, torch.bfloat16, gen, layer.unsigned_groups)
    assert (rank > sm90.KERNEL1_MAX_RANK) == (sm90.layer_inputs(layer)[3].shape[0] == 0)
    y = layer(x)
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                        layer.bias, layer.shift, layer.unsigned_groups, fast)
    assert _rel(y, ref) <= 5e-3, _rel(y, ref)


def test_bad_kernel_inputs_raise_named_errors():
    # the host side's checks must raise (with the numbers in the message), never crash the process
    gen = _gen(9)
    layer = _layer(64, 128, 32, torch.bfloat16, gen, unsigned=False)
    smooth, inv_smooth, shift, down = sm90.layer_inputs(layer)
    with pytest.raises(RuntimeError, match="input width 100 is not a multiple of 64"):
        sm90.act_quant(torch.zeros(4, 100, device=DEV, dtype=torch.bfloat16), smooth, inv_smooth, shift, down, False)
    with pytest.raises(RuntimeError, match="int8_operands needs pow2"):
        sm90.act_quant(torch.zeros(4, 128, device=DEV, dtype=torch.bfloat16), smooth, inv_smooth, shift, down, False,
                       True)
    codes, ascales, lora_act = _kernel1(torch.zeros(4, 128, device=DEV, dtype=torch.bfloat16), layer)
    with pytest.raises(RuntimeError, match=r"wscales must have shape \[2, 64\], got \[2, 32\]"):
        sm90.w4a4_gemm(codes, ascales, lora_act, layer.qweight, layer.wscales[:, :32].contiguous(), layer.lora_up,
                       layer.bias)


def test_fp32_input_falls_back():
    layer = _layer(64, 128, 16, torch.bfloat16, _gen(3), unsigned=False)
    x = torch.randn(5, 128, device=DEV)
    assert "dtype" in kernels._fallback_reason(x, layer)
    assert layer(x).shape == (5, 64)


def test_shift_varying_inside_a_group_falls_back():
    # kernel 1 takes one shift per 64-group; a layer whose shift varies inside one runs the reference
    gen = _gen(5)
    layer = _layer(64, 128, 16, torch.bfloat16, gen, unsigned=True)
    x = _activations(5, 128, torch.bfloat16, gen, layer.unsigned_groups)
    assert kernels._fallback_reason(x, layer) == ""
    with torch.no_grad():
        layer.shift[64:] = torch.linspace(0.1, 0.2, 64, device=DEV).to(layer.shift.dtype)  # group 1, still positive
    assert "shift" in kernels._fallback_reason(x, layer)
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                        layer.bias, layer.shift, layer.unsigned_groups, False)
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("pow2", [False, True])
def test_loras_up_to_the_largest_combined_rank(pow2):
    """LoRAs on the low-rank branch (issue 5): the model's rank 32 plus LoRAs of ranks 64 and 919
    make 1015 columns, padded to 1024, the most the kernels take; CUDA equals the reference path."""
    gen = _gen(31 + pow2)
    layer = _layer(256, 512, 32, torch.bfloat16, gen, unsigned=True, pow2_weights=pow2)
    layer.pow2_activations = pow2
    loras = [(lora.LoraDelta(torch.randn(512, r, generator=gen, device=DEV) * 0.02,
                             torch.randn(256, r, generator=gen, device=DEV) * 0.02, "test.safetensors"), strength)
             for r, strength in ((64, 0.8), (919, 0.5))]
    lora.set_module_loras(layer, loras)
    assert layer.rank == lora.MAX_RANK
    x = _activations(300, 512, torch.bfloat16, gen, layer.unsigned_groups)
    assert kernels._fallback_reason(x, layer) == ""
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down,
                                        layer.lora_up, layer.bias, layer.shift, layer.unsigned_groups, pow2)
    assert _rel(layer(x), ref) <= 5e-3
    with pytest.raises(lora.LoraError, match="1024"):
        lora.set_module_loras(layer, loras + [loras[0]])


def test_torch_compile_with_inductor_around_the_kernels():
    # what ComfyUI's TorchCompileModel node does to a 4-bit model: Inductor compiles the 16-bit ops
    # between the quantized layers, which run the sm_90a kernels as they are
    from svdquant import flux, flux_model, synthetic
    from tiny_flux import eager_and_compiled, quantized_model

    model = quantized_model(True)
    cfg = flux.FluxConfig.from_dict(model.model_config)
    engine = flux_model.from_tensors(cfg, model.tensors).to(DEV)
    for layer in engine.modules():
        if isinstance(layer, SVDQLinear):
            layer.pow2_activations = True
    noise, context, pooled = synthetic.flux_inputs(cfg, seed=2, height=32, width=32)
    args = tuple(t.to(DEV) for t in (noise, torch.tensor([0.6]).bfloat16(), context, pooled,
                                     torch.tensor([3.5]).bfloat16()))
    eager, compiled, reasons = eager_and_compiled(engine, args)
    assert reasons and all("torch.compiler.disable" in reason for reason in reasons), reasons[:2]
    assert bool(torch.isfinite(compiled).all())
    # Inductor keeps fp32 between the fused 16-bit ops where eager rounds after each: on this tiny
    # random model eager bf16 is itself ~20% from a float32 run (measured on the CPU)
    assert _rel(compiled, eager) < 0.5, _rel(compiled, eager)
