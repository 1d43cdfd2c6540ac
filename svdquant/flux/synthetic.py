"""Tiny FLUX.1-architecture models with planted outlier channels, and random inputs, for the tests,
the quantizer's stand-in calibration and the demo; nothing here is downloaded."""

from __future__ import annotations

import torch

from .arch import FluxConfig, linear_layers, norm_scales


def tiny_flux_config(guidance_embed: bool = False, depth: int = 2, depth_single_blocks: int = 2):
    """A FLUX.1-architecture configuration small enough for CPU tests: width 256 (2 heads of 128,
    so FLUX's RoPE axes still apply), MLP 1024, the real input widths (16 latent channels, T5
    4096, CLIP 768), so ComfyUI's FLUX conditioning fits it. guidance_embed: dev (True) or
    schnell (False)."""
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
    gen = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    tensors = {}
    for name, spec in linear_layers(cfg).items():
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
    for name, size in norm_scales(cfg).items():
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
