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
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from . import flux, flux_model, numerics, quantize, reference_flux
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


# Latent side (16-channel latents) of the calibration calls: with random stand-in prompts of 16 text
# tokens, 16x16 (64 image tokens); with real prompts, whose text embeddings have 256 or 512 tokens,
# 64x64 (1024 image tokens), so that image tokens still outnumber text tokens in what the single
# blocks' shared layers record, as they do at real image sizes (4096 image tokens at 1024x1024).
STAND_IN_LATENT, PROMPT_LATENT = 16, 64


def check_prompts(cfg: FluxConfig, prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """ValueError where the prompts' text embeddings (context [L, C] or [1, L, C], pooled [P] or
    [1, P]) do not fit the model's T5 and CLIP widths (C = context_in_dim, P = vec_in_dim)."""
    if not prompts:
        raise ValueError("no calibration prompts given")
    for i, (context, pooled) in enumerate(prompts):
        if (context.dim() not in (2, 3) or context.shape[-1] != cfg.context_in_dim or context.numel() == 0
                or context.dim() == 3 and context.shape[0] != 1 or pooled.numel() != cfg.vec_in_dim):
            raise ValueError(f"calibration prompt {i + 1}: text embeddings of shapes {tuple(context.shape)} (context) "
                             f"and {tuple(pooled.shape)} (pooled) do not fit this FLUX.1 model, which takes "
                             f"[tokens, {cfg.context_in_dim}] (T5-XXL) and [{cfg.vec_in_dim}] (CLIP-L)")


def calibration_inputs(cfg: FluxConfig, count: int = 4, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       prompts: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """`count` model calls (noise, timestep, context, pooled, guidance) at timesteps spread over
    (0, 1], on random noise latents. prompts: the text embeddings (context, pooled) of real prompts
    from the model's text encoders (check_prompts), call i taking prompt i % len(prompts); without
    them, random stand-ins (no text encoder needed)."""
    from .synthetic import flux_inputs

    if prompts is not None:
        check_prompts(cfg, prompts)
    calls = []
    for i in range(count):
        t = torch.full((1,), (i + 1) / count, dtype=dtype)
        guidance = torch.full((1,), 3.5, dtype=dtype) if cfg.guidance_embed else None
        if prompts is None:
            noise, context, pooled = flux_inputs(cfg, seed=seed + i, dtype=dtype, height=STAND_IN_LATENT,
                                                 width=STAND_IN_LATENT)
        else:
            gen = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(1, cfg.in_channels, PROMPT_LATENT, PROMPT_LATENT, generator=gen).to(dtype)
            context, pooled = prompts[i % len(prompts)]
            context = context.reshape(1, -1, cfg.context_in_dim).to(dtype)
            pooled = pooled.reshape(1, cfg.vec_in_dim).to(dtype)
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
                  dtype: torch.dtype = torch.bfloat16, hopper_pow2: bool = False,
                  device: str | torch.device | None = None,
                  on_layer: Callable[[str], None] | None = None, calibration_prompts: int = 0) -> fmt.QuantizedModel:
    """SVDQuant a FLUX state dict (ComfyUI names) into a natural-format model.

    calibration: model calls (noise, timestep, context, pooled, guidance) for `flux_model.Flux`.
    rank=0 and smooth=False give plain W4A4 (what SVDQuant improves on); alphas are the smoothing
    exponents searched per layer. hopper_pow2: power-of-two weight group scales in every W4A4 layer
    (quantize.quantize_linear), the format of the Hopper fast path; recorded in the metadata.
    device: where each layer is quantized (default: where its tensors are); the calibration forward
    runs on the CPU either way, so a GPU only ever holds one layer. The result stays on the
    tensors' device. on_layer: called with each quantized layer's name when it is done.
    calibration_prompts: how many real prompts the calibration calls took (0: random stand-ins),
    recorded in the metadata.
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
        home = weight.device
        if device is not None:
            weight, bias = weight.to(device), None if bias is None else bias.to(device)
        if spec.kind == flux.W4A4:
            layer = quantize.quantize_linear(weight, bias, seen.pop(name), rank=rank, shift=gelu_shift(spec),
                                             smooth=smooth, alphas=alphas, dtype=dtype,
                                             hopper_pow2=hopper_pow2).as_dict()
            layers[name] = fmt.describe_w4a4(layer)
        else:
            layer = quantize.quantize_weight_w4a16(weight, bias, dtype)
            layers[name] = fmt.describe_w4a16(layer)
        out.update({f"{name}.{field}": t.to(home) for field, t in layer.items()})
        if on_layer is not None:
            on_layer(name)
    quantization = {"method": "svdquant", "group_size": numerics.GROUP_SIZE, "act_shift": numerics.GELU_SHIFT,
                    "rank": rank, "smooth": smooth, "calibration_calls": len(calibration),
                    "calibration_prompts": calibration_prompts, "hopper_pow2": hopper_pow2}
    return fmt.QuantizedModel(out, layers, "flux", cfg.to_dict(), quantization)


# ---------------------------------------------------------------------------------------------
# A 16-bit FLUX.1 checkpoint file -> an SVDQuant file (python -m svdquant quantize, the Quantizer node)

CHECKPOINT_PREFIX = "model.diffusion_model."  # the transformer's keys in a ComfyUI checkpoint
SOURCE_DTYPES = {"BF16", "F16", "F32"}  # safetensors' names of the dtypes a checkpoint may have
# the kernels read the low-rank branch in 16-wide tiles
RANK_STEP, MIN_RANK, MAX_RANK = 16, 16, 256


def _flux_config(path, shapes: dict[str, torch.Tensor]) -> FluxConfig:
    """The configuration of a FLUX.1 state dict (shape-only tensors suffice); FormatError naming
    the file and a few of the tensors it lacks where it is not one."""
    try:
        cfg, problem = flux.config_from_tensors(shapes, {}), None
    except ValueError as exc:
        cfg, problem = None, str(exc)
    missing = [key for key in flux.dense_shapes(cfg or FluxConfig()) if key not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        # diffusers' FLUX (transformer_blocks.N.attn.to_q, ...) is the common mix-up
        hint = "; diffusers-format transformers are not read, use the single-file BFL/ComfyUI checkpoint" \
            if any(key.startswith("transformer_blocks.") for key in shapes) else ""
        raise fmt.FormatError(path, f"not a FLUX.1 transformer in BFL/ComfyUI key names: no tensor "
                                    f"{', '.join(missing[:3])}{more}{hint}")
    if cfg is None:
        raise fmt.FormatError(path, f"not a usable FLUX.1 transformer: {problem}")
    try:
        flux.check_tensors(cfg, shapes, {})
    except ValueError as exc:
        raise fmt.FormatError(path, f"not a usable FLUX.1 transformer: {exc}") from None
    return cfg


def _transformer_keys(f) -> list[str]:
    """The keys of an open safetensors file that hold the transformer: in a ComfyUI checkpoint
    (transformer, VAE and text encoders in one file) those under CHECKPOINT_PREFIX, else all."""
    return [key for key in f.keys() if key.startswith(CHECKPOINT_PREFIX)] or list(f.keys())


def checkpoint_config(path) -> FluxConfig:
    """The configuration of the 16-bit FLUX.1 transformer in a safetensors file, from its header
    alone (nothing is read): FormatError naming the file where it is not one, is already an
    SVDQuant model, or stores a dtype other than bfloat16, float16 or float32."""
    metadata = fmt.read_header(path)
    if fmt.is_natural_file(metadata) or reference_flux.is_reference_file(path, metadata):
        raise fmt.FormatError(path, "already an SVDQuant 4-bit model; quantize the 16-bit checkpoint it was made from")
    with safe_open(str(path), framework="pt") as f:
        slices = {key: f.get_slice(key) for key in _transformer_keys(f)}
    odd = [key for key, s in slices.items() if s.get_dtype() not in SOURCE_DTYPES]
    if odd:
        raise fmt.FormatError(path, f"tensor {odd[0]} is {slices[odd[0]].get_dtype()}: only bfloat16, float16 or "
                                    f"float32 checkpoints can be quantized")
    return _flux_config(path, {key.removeprefix(CHECKPOINT_PREFIX): torch.empty(s.get_shape(), device="meta")
                               for key, s in slices.items()})


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The transformer's tensors (checked first with checkpoint_config) in ComfyUI names, cast to
    bf16 one at a time so that a float32 file never sits in memory at full width."""
    with safe_open(str(path), framework="pt") as f:
        return {key.removeprefix(CHECKPOINT_PREFIX): f.get_tensor(key).to(torch.bfloat16)
                for key in _transformer_keys(f)}


def memory_needed(cfg: FluxConfig) -> int:
    """Bytes quantize_flux holds at its peak (the calibration forward), from the tensor sizes: the
    bf16 weights twice (the state dict and the calibration model's copy) and the recorded inputs of
    the W4A4 layers (float32, at most MAX_CALIBRATION_TOKENS per layer)."""
    weights = sum(math.prod(shape) for shape in flux.dense_shapes(cfg).values()) * 2
    recorded = sum(spec.in_features for spec in flux.linear_layers(cfg).values() if spec.kind == flux.W4A4)
    return 2 * weights + recorded * quantize.MAX_CALIBRATION_TOKENS * 4


def quantize_checkpoint(source, target, rank: int = 32, hopper_pow2: bool = False, calibration_calls: int = 4,
                        device: str | torch.device | None = None, progress: bool = True,
                        on_layer: Callable[[str], None] | None = None,
                        report: Callable[[str], None] = lambda message: None,
                        prompts: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> fmt.QuantizedModel:
    """Quantize the 16-bit FLUX.1 transformer file `source` into the SVDQuant file `target`.

    What the CLI's `quantize` and the Quantizer node run. The target is written atomically (a
    temporary file beside it, renamed when complete) and replaced if it exists: callers decide
    whether it may be. device, progress and on_layer: as for quantize_flux. report: receives what
    the run is about to do (model, memory, calibration) before the long part starts. prompts: text
    embeddings of real prompts to calibrate on (calibration_inputs), else random stand-ins.
    """
    target = Path(target)
    if target.suffix != ".safetensors":
        raise fmt.FormatError(target, "the output name must end in .safetensors")
    if not (MIN_RANK <= rank <= MAX_RANK and rank % RANK_STEP == 0):
        raise ValueError(f"rank {rank}: must be a multiple of {RANK_STEP} from {MIN_RANK} to {MAX_RANK}")
    if calibration_calls < 1:
        raise ValueError(f"calibration_calls {calibration_calls}: must be at least 1")
    cfg = checkpoint_config(source)
    if prompts is not None:
        check_prompts(cfg, prompts)
    report(f"{Path(source).name}: FLUX.1-{cfg.variant}, width {cfg.hidden_size}, {cfg.depth} double + "
           f"{cfg.depth_single_blocks} single blocks; needs about {memory_needed(cfg) / 2**30:.1f} GiB of memory "
           f"(the bf16 weights twice during calibration, plus recorded layer inputs)")
    if prompts is None:
        report(f"calibration: {calibration_calls} model calls on random stand-in inputs (not real prompts, "
               f"no text encoder needed)")
    else:
        report(f"calibration: {calibration_calls} model calls on the text embeddings of {len(prompts)} "
               f"prompt{'s' if len(prompts) > 1 else ''}, {PROMPT_LATENT}x{PROMPT_LATENT} noise latents")
    model = quantize_flux(read_checkpoint(source), cfg, calibration_inputs(cfg, calibration_calls, prompts=prompts),
                          rank=rank, hopper_pow2=hopper_pow2, progress=progress, device=device, on_layer=on_layer,
                          calibration_prompts=len(prompts or ()))
    fmt.save_model(target, model)
    return model
