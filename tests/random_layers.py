"""Random layers and inputs for the kernel tests (every family's kernels against `numerics`), and
the GPU markers those tests skip with.

Activations carry planted outliers and exact zeros; weight scales may be power-of-two fractions of
a row base (the fast kernel 2's format); layers may shift every other input group (unsigned groups).
"""

from __future__ import annotations

import pytest
import torch

from svdquant import kernels, numerics
from svdquant.families import sm80, sm90
from svdquant.linear import SVDQLinear, W4A16Linear

G = numerics.GROUP_SIZE
DEV = "cuda"


def _capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


needs_sm90 = pytest.mark.skipif(_capability() != (9, 0), reason="needs an sm_90 GPU")
needs_sm80 = pytest.mark.skipif(_capability() is None or _capability() < (8, 0),
                                reason="needs an sm_80 or newer GPU")


def gen(seed: int, device: str = DEV) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def gelu_tanh64(y: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, in float64."""
    return 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))


def activations(m: int, k: int, dtype: torch.dtype, generator: torch.Generator,
                unsigned: torch.Tensor) -> torch.Tensor:
    """Random activations with planted outliers (hot channels x30, single spikes x100, a few exact
    zeros); groups flagged unsigned get post-GELU values (>= -GELU_SHIFT, as the shifted layers see)."""
    dev = generator.device
    x = torch.randn(m, k, generator=generator, device=dev)
    hot = torch.randint(0, k, (max(1, k // 64),), generator=generator, device=dev)
    x[:, hot] *= 30.0
    spikes = torch.randint(0, m * k, (max(1, m * k // 5000),), generator=generator, device=dev)
    x.view(-1)[spikes] *= 100.0
    zeros = torch.randint(0, m * k, (max(1, m * k // 3000),), generator=generator, device=dev)
    x.view(-1)[zeros] = 0.0
    cols = unsigned.to(dev).repeat_interleave(G)
    x[:, cols] = torch.nn.functional.gelu(x[:, cols], approximate="tanh")
    return x.to(dtype)


def _wscales(groups: int, n: int, dtype: torch.dtype, generator: torch.Generator, pow2: bool) -> torch.Tensor:
    dev = generator.device
    if not pow2:
        return (torch.rand(groups, n, generator=generator, device=dev) * 0.02 + 1e-3).to(dtype)
    # power-of-two fractions 2^-f, f in [0, 4], of a per-channel base (f = 0 somewhere in each row)
    low = 4e-3 if dtype == torch.bfloat16 else 4e-2
    base = (torch.rand(n, generator=generator, device=dev) * 0.04 + low).to(dtype).float()
    exps = torch.randint(0, numerics.POW2_WEIGHT_MAX_EXP + 1, (groups, n), generator=generator, device=dev)
    exps[torch.randint(0, groups, (n,), generator=generator, device=dev), torch.arange(n, device=dev)] = 0
    scales = (base * torch.exp2(-exps.float())).to(dtype)
    assert torch.equal(scales.float(), base * torch.exp2(-exps.float()))
    return scales


# the way kernel 1 applies each of group_rotation's kinds (kernels.kernel1_rotation): none, the
# Hadamard rotation by sums and differences, a random butterfly of one or two passes by its coefficients
KERNEL1_ROTATION = {"none": kernels.ROTATION_NONE, "hadamard": kernels.ROTATION_HADAMARD,
                    "random": kernels.ROTATION_COEFFICIENTS, "random2": kernels.ROTATION_COEFFICIENTS}


def group_rotation(kind: str, seed: int = 0) -> torch.Tensor | None:
    """A layer's group rotation for the tests: "none" (None), "hadamard" (numerics.hadamard_rotation),
    "random" or "random2" (numerics.butterfly_rotation of uniform random angles: one pass, two)."""
    if kind == "none":
        return None
    if kind == "hadamard":
        return numerics.hadamard_rotation()
    passes = {"random": 1, "random2": 2}[kind]
    angles = torch.rand(passes * numerics.ROTATION_STAGES, G // 2, generator=torch.Generator().manual_seed(seed))
    return numerics.butterfly_rotation(angles * 2 * torch.pi)


def w4a4_layer(n: int, k: int, rank: int, dtype: torch.dtype, generator: torch.Generator, unsigned: bool,
               bias: bool = True, pow2_weights: bool = False, rotation: torch.Tensor | None = None) -> SVDQLinear:
    """A random SVDQLinear on the generator's device; unsigned: every other input group shifted;
    rotation: its group rotation (group_rotation) or None."""
    dev, groups = generator.device, k // G
    tensors = {
        "qweight": torch.randint(0, 256, (n, k // 2), generator=generator, device=dev, dtype=torch.uint8),
        "wscales": _wscales(groups, n, dtype, generator, pow2_weights),
        "smooth": (torch.rand(k, generator=generator, device=dev) * 4 + 0.05).to(dtype),
        "lora_down": (torch.randn(k, rank, generator=generator, device=dev) * 0.05).to(dtype),
        "lora_up": (torch.randn(n, rank, generator=generator, device=dev) * 0.05).to(dtype),
    }
    if bias:
        tensors["bias"] = torch.randn(n, generator=generator, device=dev).to(dtype)
    if unsigned:  # every other group shifted (unsigned), the rest signed
        flags = torch.arange(groups, device=dev) % 2 == 1
        tensors["shift"] = (flags.repeat_interleave(G) * numerics.GELU_SHIFT).to(dtype)
    if rotation is not None:
        tensors["rotation"] = rotation.to(dev)
    layer = SVDQLinear.from_tensors(tensors)
    assert layer.pow2_weights == (pow2_weights or groups == 1)  # one scale per row is its own base
    return layer


def w4a16_layer(n: int, k: int, dtype: torch.dtype, generator: torch.Generator, bias: bool = True) -> W4A16Linear:
    """Random codes; group scales spread over two decades with a few outlier groups, zero points
    around -8 scales (what quantize_w4a16 gives for weights centred on 0)."""
    dev, g = generator.device, k // G
    codes = torch.randint(0, 16, (n, k), generator=generator, device=dev, dtype=torch.uint8)
    scales = torch.exp(torch.empty(g, n, device=dev).uniform_(-7, -2.4, generator=generator))
    outliers = torch.rand(g, n, generator=generator, device=dev) < 0.01
    scales = torch.where(outliers, scales * 30, scales)
    zeros = -scales * (8 + torch.randn(g, n, generator=generator, device=dev))
    tensors = {"qweight": numerics.pack_int4(codes), "wscales": scales.to(dtype), "wzeros": zeros.to(dtype)}
    if bias:
        tensors["bias"] = (0.1 * torch.randn(n, generator=generator, device=dev)).to(dtype)
    return W4A16Linear.from_tensors(tensors)


# ---- kernel 1 with a layer's inputs ----------------------------------------------------------------

def sm90_kernel1(x: torch.Tensor, layer: SVDQLinear, pow2: bool = False, int8_operands: bool = False,
                 norm: kernels.ModulatedNorm | None = None, norm_out: torch.Tensor | None = None):
    """sm90 kernel 1 with the layer's whole low-rank branch (sm90.svdq_linear leaves ranks above
    kernels.KERNEL1_MAX_RANK to cuBLAS; the kernel itself takes up to kernels.MAX_RANK); norm: its
    norm prologue (x the LayerNorm's input), storing the layer's input into norm_out where given."""
    kernel = layer.w4a4_kernel()
    smooth, inv_smooth, shift, _ = sm90.kernel1_inputs(kernel)
    down = sm90.kernel1_lora_down(layer.lora_down)
    return sm90.act_quant(x, smooth, inv_smooth, shift, down, pow2, int8_operands, kernel.kernel1_rotation(), norm,
                          norm_out)


def sm80_kernel1(x: torch.Tensor, layer: SVDQLinear, pow2: bool):
    """sm80 kernel 1 with the layer's inputs (ranks above kernels.KERNEL1_MAX_RANK: none, as
    sm80.svdq_linear runs it)."""
    kernel = layer.w4a4_kernel()
    smooth, inv_smooth, group_shift, lora_t = sm80.kernel1_inputs(kernel)
    return sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2, rotation=kernel.kernel1_rotation())
