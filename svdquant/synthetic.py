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
                   pow2: bool = False) -> dict[str, float]:
    """Relative output error ||y - y_ref|| / ||y_ref|| (float64 reference) of 4-bit schemes.

    naive_w4a4: INT4 weights and activations, no smoothing, no low-rank;
    smooth_w4a4: with the smoothing search; svdquant_r{rank}: smoothing + rank-r branch;
    w4a16: 4-bit weights only (asymmetric, group 64), 16-bit activations.
    pow2 adds the Hopper fast-path restrictions of svdquant_r{rank}: _pow2a, activation scales
    restricted to powers of two per token (design (d), same weights); _pow2w, weight scales
    restricted per row (design (c), quantize_linear(hopper_pow2=True)), exact activations; _pow2wa,
    both (what the fast kernels compute).
    """
    from .linear import SVDQLinear  # linear imports kernels; keep this module light to import

    ref = x.double() @ weight.double().t() + bias.double()

    def rel(y: torch.Tensor) -> float:
        return float((y.double() - ref).norm() / ref.norm())

    def run(tensors: quantize.W4A4Tensors, pow2_activations: bool = False) -> float:
        layer = SVDQLinear.from_tensors(tensors.as_dict())
        layer.pow2_activations = pow2_activations
        return rel(layer(x.float()))

    out = {}
    for name, kwargs in (("naive_w4a4", dict(rank=0, smooth=False)), ("smooth_w4a4", dict(rank=0)),
                         (f"svdquant_r{rank}", dict(rank=rank))):
        tensors = quantize.quantize_linear(weight, bias, x, **kwargs)
        out[name] = run(tensors)
    if pow2:
        out[f"svdquant_r{rank}_pow2a"] = run(tensors, pow2_activations=True)
        tensors = quantize.quantize_linear(weight, bias, x, rank=rank, hopper_pow2=True)
        out[f"svdquant_r{rank}_pow2w"] = run(tensors)
        out[f"svdquant_r{rank}_pow2wa"] = run(tensors, pow2_activations=True)
    codes, wscales, wzeros = numerics.quantize_w4a16(weight)
    out["w4a16"] = rel(x.double() @ numerics.dequantize_w4a16(codes, wscales, wzeros).double().t() + bias.double())
    return out


def tiny_flux_config(guidance_embed: bool = False, depth: int = 2, depth_single_blocks: int = 2):
    """A FLUX.1-architecture configuration small enough for CPU tests: width 256 (2 heads of 128,
    so FLUX's RoPE axes still apply), MLP 1024, the real input widths (16 latent channels, T5
    4096, CLIP 768), so ComfyUI's FLUX conditioning fits it. guidance_embed: dev (True) or
    schnell (False)."""
    from .flux import FluxConfig

    return FluxConfig(hidden_size=256, num_heads=2, depth=depth, depth_single_blocks=depth_single_blocks,
                      guidance_embed=guidance_embed)


def tiny_flux_state_dict(cfg, seed: int = 0, outliers: int = 4, dtype: torch.dtype = torch.bfloat16):
    """Random weights for a FLUX model of configuration `cfg`, with planted outlier channels.

    Weights are Gaussian with 1/sqrt(fan-in) scale (unit-variance outputs); q/k norm scales near 1.
    What makes 4-bit quantization hard in trained FLUX models is planted per block, `outliers`
    channels each: modulation scales of 8..40 on some hidden channels (outliers in the inputs of
    qkv, mlp_in and linear1), and 10x rows in the V projection and the first MLP layer (outliers
    in the inputs of the attention output projections and of the GELU-fed layers). Gates and the
    other modulation outputs are kept small, so the residual stream stays bounded.
    """
    from . import flux

    gen = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    tensors = {}
    for name, spec in flux.linear_layers(cfg).items():
        weight = torch.randn(spec.out_features, spec.in_features, generator=gen) / spec.in_features ** 0.5
        bias = 0.02 * torch.randn(spec.out_features, generator=gen)
        if name.endswith("mod.lin") or name.endswith("modulation.lin"):
            weight *= 0.1  # modulation follows vec, not the tokens: keep it a small perturbation
            chunks = spec.out_features // h
            for c in {1, chunks - 2}:  # the scale chunks
                channels = torch.randperm(h, generator=gen)[:outliers]
                bias[c * h + channels] = torch.linspace(8.0, 40.0, outliers)
            for c in range(2, chunks, 3):  # the gates
                bias[c * h:(c + 1) * h] = 0.1
        elif name.endswith("attn.qkv") or name.endswith("linear1"):
            v_rows = 2 * h + torch.randperm(h, generator=gen)[:outliers]
            weight[v_rows] *= 10.0
            if name.endswith("linear1"):
                weight[3 * h + torch.randperm(cfg.mlp_hidden, generator=gen)[:outliers]] *= 10.0
        elif name.endswith("mlp.0"):
            weight[torch.randperm(spec.out_features, generator=gen)[:outliers]] *= 10.0
        tensors[f"{name}.weight"] = weight.to(dtype)
        if spec.bias:
            tensors[f"{name}.bias"] = bias.to(dtype)
    for name, size in flux.norm_scales(cfg).items():
        tensors[name] = (1.0 + 0.1 * torch.randn(size, generator=gen)).to(dtype)
    return tensors


def flux_inputs(cfg, batch: int = 1, height: int = 16, width: int = 16, text_tokens: int = 16, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16):
    """Random model inputs (noise latents [B, C, H, W], T5-like context, CLIP-like pooled vector)
    standing in for real text embeddings, which a tiny model cannot use anyway."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, cfg.in_channels, height, width, generator=gen)
    context = torch.randn(batch, text_tokens, cfg.context_in_dim, generator=gen)
    pooled = torch.randn(batch, cfg.vec_in_dim, generator=gen)
    return noise.to(dtype), context.to(dtype), pooled.to(dtype)
