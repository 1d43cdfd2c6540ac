"""Quantizing a whole FLUX transformer: calibrate on the unquantized model, then each layer.

1. Run the 16-bit model (`flux_model.Flux`) on calibration inputs and record, for every W4A4
   layer, the inputs it sees (evenly spaced tokens, at most `quantize.MAX_CALIBRATION_TOKENS`).
2. SVDQuant each W4A4 layer with `quantize.quantize_linear` (GELU-fed input columns shifted and
   quantized unsigned); the modulation layers get 4-bit weights only (`numerics.quantize_w4a16`);
   everything else stays as it is.
The fused single-block layers are quantized as the single linears ComfyUI has (one smoothing
vector and one rank-r branch for linear1 and for linear2).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from . import flux, flux_model, numerics, quantize
from . import format as fmt
from .flux import FluxConfig


def collect_calibration(model: torch.nn.Module, names: list[str], inputs: list[tuple],
                        max_tokens: int = quantize.MAX_CALIBRATION_TOKENS) -> dict[str, torch.Tensor]:
    """Inputs of the named linear layers over calls `model(*args)` for args in `inputs`:
    name -> float32 [tokens, K], up to max_tokens evenly spaced tokens per layer."""
    per_call = math.ceil(max_tokens / len(inputs))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if x.shape[0] > per_call:
                x = x[torch.linspace(0, x.shape[0] - 1, per_call, device=x.device).long()]
            seen[name].append(x.float().cpu())
        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            for args in inputs:
                model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs)[:max_tokens] for name, xs in seen.items()}


def calibration_inputs(cfg: FluxConfig, count: int = 4, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """Random stand-ins for real prompts: `count` model calls at timesteps spread over (0, 1]."""
    from .synthetic import flux_inputs

    calls = []
    for i in range(count):
        noise, context, pooled = flux_inputs(cfg, seed=seed + i, dtype=dtype)
        t = torch.full((1,), (i + 1) / count, dtype=dtype)
        guidance = torch.full((1,), 3.5, dtype=dtype) if cfg.guidance_embed else None
        calls.append((noise, t, context, pooled, guidance))
    return calls


def gelu_shift(spec: flux.LinearSpec) -> torch.Tensor | None:
    """The input shift [K] of a layer whose input columns are partly or all GELU outputs."""
    if spec.gelu_columns is None:
        return None
    shift = torch.zeros(spec.in_features)
    shift[spec.gelu_columns[0]:spec.gelu_columns[1]] = numerics.GELU_SHIFT
    return shift


def quantize_flux(tensors: dict[str, torch.Tensor], cfg: FluxConfig, calibration: list[tuple], rank: int = 32,
                  smooth: bool = True, alphas=quantize.DEFAULT_ALPHAS, progress: bool = True,
                  dtype: torch.dtype = torch.bfloat16, hopper_pow2: bool = False) -> fmt.QuantizedModel:
    """SVDQuant a FLUX state dict (ComfyUI names) into a natural-format model.

    calibration: model calls (noise, timestep, context, pooled, guidance) for `flux_model.Flux`.
    rank=0 and smooth=False give plain W4A4 (what SVDQuant improves on); alphas are the smoothing
    exponents searched per layer. hopper_pow2: power-of-two weight group scales in every W4A4 layer
    (quantize.quantize_linear), the format of the Hopper fast path; recorded in the metadata.
    """
    flux.check_tensors(cfg, tensors, {})
    specs = flux.linear_layers(cfg)
    w4a4 = [name for name, spec in specs.items() if spec.kind == flux.W4A4]
    model = flux_model.Flux(cfg, flux_model.dense_linear(dtype))
    model.load_state_dict(tensors, strict=True)
    seen = collect_calibration(model, w4a4, calibration)
    del model

    out = {key: t for key, t in tensors.items()
           if key.rsplit(".", 1)[0] not in specs or specs[key.rsplit(".", 1)[0]].kind == flux.DENSE}
    layers: dict[str, dict] = {}
    quantized = [name for name, spec in specs.items() if spec.kind != flux.DENSE]
    for name in tqdm(quantized, desc="quantizing", unit="layer", disable=not progress):
        spec, weight, bias = specs[name], tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
        if spec.kind == flux.W4A4:
            layer = quantize.quantize_linear(weight, bias, seen.pop(name), rank=rank, shift=gelu_shift(spec),
                                             smooth=smooth, alphas=alphas, dtype=dtype,
                                             hopper_pow2=hopper_pow2).as_dict()
            layers[name] = fmt.describe_w4a4(layer)
        else:
            codes, wscales, wzeros = numerics.quantize_w4a16(weight, scale_dtype=dtype)
            layer = {"qweight": numerics.pack_int4(codes), "wscales": wscales, "wzeros": wzeros}
            if bias is not None:
                layer["bias"] = bias.to(dtype)
            layers[name] = fmt.describe_w4a16(layer)
        out.update({f"{name}.{field}": t for field, t in layer.items()})
    quantization = {"method": "svdquant", "group_size": numerics.GROUP_SIZE, "act_shift": numerics.GELU_SHIFT,
                    "rank": rank, "smooth": smooth, "calibration_calls": len(calibration), "hopper_pow2": hopper_pow2}
    return fmt.QuantizedModel(out, layers, "flux", cfg.to_dict(), quantization)
