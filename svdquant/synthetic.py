"""Synthetic data with the statistics that make 4-bit quantization hard: activation outlier
channels (a few input channels 20-100x larger than the rest) and heavy-tailed weights.

Used by the tests, the fidelity benchmark and the demo; nothing here is downloaded.
"""

from __future__ import annotations

import torch

from . import numerics, quantize


def outlier_layer(n: int = 3072, k: int = 3072, tokens: int = 256, outliers: int = 8, seed: int = 0):
    """A FLUX-shaped linear layer and inputs: returns (x [tokens, K], weight [N, K], bias [N]).

    x is Gaussian with `outliers` channels scaled by 20..100; the weight is Student-t (3 degrees
    of freedom, heavy tails) scaled to the magnitude of a trained transformer's weights.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen)
    channels = torch.randperm(k, generator=gen)[:outliers]
    x[:, channels] *= torch.linspace(20.0, 100.0, outliers)
    chi2 = torch.randn(n, k, 3, generator=gen).square().sum(-1)  # Student-t(3) = N / sqrt(chi2 / 3)
    weight = 0.02 * torch.randn(n, k, generator=gen) / (chi2 / 3).sqrt()
    bias = 0.1 * torch.randn(n, generator=gen)
    return x, weight, bias


def layer_fidelity(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rank: int = 32,
                   pow2: bool = False, held_out: torch.Tensor | None = None) -> dict[str, float]:
    """Relative output error ||y - y_ref|| / ||y_ref|| (float64 reference) of 4-bit schemes,
    calibrated on x and measured on held_out (default: x itself, where the error compensation of
    the residual looks better than it is: it fits the calibration tokens).

    naive_w4a4: INT4 weights and activations, no smoothing, no low-rank, weights rounded to nearest;
    smooth_w4a4: with the smoothing search (both without a group rotation); svdquant_r{rank}: smoothing
    + rank-r branch (the default recipe: refined split, error-compensated residual, group rotation);
    w4a16: 4-bit weights only (asymmetric, group 64), 16-bit activations.
    pow2 adds the power-of-two scales (docs/DESIGN.md#scales) of svdquant_r{rank}: _pow2a,
    power-of-two activation scales per token (same weights); _pow2w, power-of-two weight scales per
    row (quantize_linear(pow2_scales=True)), exact activations; _pow2wa, both (what a file with
    power-of-two scales runs by default).
    """
    from .linear import SVDQLinear  # linear imports kernels; keep this module light to import

    measured = x if held_out is None else held_out
    ref = measured.double() @ weight.double().t() + bias.double()

    def rel(y: torch.Tensor) -> float:
        return float((y.double() - ref).norm() / ref.norm())

    def run(tensors: quantize.W4A4Tensors, pow2_activations: bool = False) -> float:
        layer = SVDQLinear.from_tensors(tensors.as_dict())
        layer.pow2_activations = pow2_activations
        return rel(layer(measured.float()))

    out = {}
    for name, kwargs in (("naive_w4a4", dict(rank=0, smooth=False, compensate=False, rotation="none")),
                         ("smooth_w4a4", dict(rank=0, compensate=False, rotation="none")),
                         (f"svdquant_r{rank}", dict(rank=rank))):
        tensors = quantize.quantize_linear(weight, bias, x, **kwargs)
        out[name] = run(tensors)
    if pow2:
        out[f"svdquant_r{rank}_pow2a"] = run(tensors, pow2_activations=True)
        tensors = quantize.quantize_linear(weight, bias, x, rank=rank, pow2_scales=True)
        out[f"svdquant_r{rank}_pow2w"] = run(tensors)
        out[f"svdquant_r{rank}_pow2wa"] = run(tensors, pow2_activations=True)
    codes, wscales, wzeros = numerics.quantize_w4a16(weight)
    dense = numerics.dequantize_w4a16(codes, wscales, wzeros).double()
    out["w4a16"] = rel(measured.double() @ dense.t() + bias.double())
    return out
