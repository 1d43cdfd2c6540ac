"""Quantizing a whole FLUX transformer, one block at a time.

1. Run the 16-bit model on calibration inputs block by block (`flux.model.Flux.embed`, then each
   double and single block with only that block's weights loaded), holding every call's block
   inputs, and record for each W4A4 layer of the block the inputs it sees (evenly spaced tokens,
   at most `quantize.MAX_CALIBRATION_TOKENS`).
2. SVDQuant that block's W4A4 layers with `quantize.quantize_linear` (GELU-fed input columns
   shifted and quantized unsigned); the modulation layers get 4-bit weights only
   (`numerics.quantize_w4a16`); everything else stays as it is. The block's results are handed
   on (written to the output file) and the block is freed before the next one is read.
The fused single-block layers are quantized as the single linears ComfyUI has (one smoothing
vector and one rank-r branch for linear1 and for linear2). Held-out calls, run through the same
16-bit blocks, give each W4A4 layer's relative output error (the quality report).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from .. import format as fmt
from .. import numerics, quantize
from ..kernels import RANK_MULTIPLE
from ..linear import DENSE, W4A4, W4A16
from . import nunchaku_import
from .arch import FluxConfig, LinearSpec, check_tensors, config_from_tensors, dense_shapes, linear_layers, norm_scales
from .model import DoubleStreamBlock, Flux, SingleStreamBlock, dense_linear

# The quality report's held-out calls: seeds apart from the calibration calls' (seed + i, i < 16).
HELD_OUT_CALLS, HELD_OUT_SEED = 2, 1000
WORST_LAYERS_SHOWN = 5


@contextmanager
def recording(module: torch.nn.Module, names: list[str], calls: int,
              max_tokens: int = quantize.MAX_CALIBRATION_TOKENS, store: torch.device | str = "cpu"):
    """Records the inputs of `module`'s named linear layers while the block runs `calls` calls:
    yields name -> list of float32 [tokens, K] pieces on `store`, up to ceil(max_tokens / calls)
    evenly spaced tokens per call (gathered with recorded_inputs)."""
    per_call = math.ceil(max_tokens / calls)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if x.shape[0] > per_call:
                x = x[torch.linspace(0, x.shape[0] - 1, per_call, device=x.device).long()]
            seen[name].append(x.float().to(store))
        return hook

    handles = [module.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def recorded_inputs(seen: dict[str, list[torch.Tensor]],
                    max_tokens: int = quantize.MAX_CALIBRATION_TOKENS) -> dict[str, torch.Tensor]:
    return {name: torch.cat(xs)[:max_tokens] for name, xs in seen.items()}


def collect_calibration(model: torch.nn.Module, names: list[str], inputs: list[tuple],
                        max_tokens: int = quantize.MAX_CALIBRATION_TOKENS) -> dict[str, torch.Tensor]:
    """Inputs of the named linear layers over calls `model(*args)` for args in `inputs`:
    name -> float32 [tokens, K] on the CPU, up to max_tokens evenly spaced tokens per layer."""
    with recording(model, names, len(inputs), max_tokens) as seen, torch.no_grad():
        for args in inputs:
            model(*args)
    return recorded_inputs(seen, max_tokens)


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


def gelu_shift(spec: LinearSpec) -> torch.Tensor | None:
    """The input shift [K] of a layer whose input columns are partly or all GELU outputs."""
    if spec.gelu_columns is None:
        return None
    shift = torch.zeros(spec.in_features)
    shift[spec.gelu_columns[0]:spec.gelu_columns[1]] = numerics.GELU_SHIFT
    return shift


def _block_prefixes(cfg: FluxConfig) -> list[str]:
    return ([f"double_blocks.{i}" for i in range(cfg.depth)]
            + [f"single_blocks.{i}" for i in range(cfg.depth_single_blocks)])


def _part_keys(cfg: FluxConfig) -> dict[str, list[str]]:
    """The unquantized model's tensor names by the part that holds them: "" (the embedders and the
    final layer, loaded together as the stem) and each block, in forward order."""
    parts: dict[str, list[str]] = {"": []} | {prefix: [] for prefix in _block_prefixes(cfg)}
    for key in dense_shapes(cfg):
        head = ".".join(key.split(".")[:2])
        parts[head if head in parts else ""].append(key)
    return parts


def _meta_module(build: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor], prefix: str,
                 device: torch.device) -> torch.nn.Module:
    """The module `build` makes, holding the given tensors themselves (no second copy), on device."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict({key.removeprefix(prefix): t for key, t in tensors.items()}, strict=True, assign=True)
    return module.to(device).requires_grad_(False)


@dataclass
class _Calls:
    """The block inputs of a set of model calls, on the quantization device: per call (img, txt,
    vec, pe) before the single blocks, (img, None, vec, pe) from the first single block on."""

    states: list[list]

    def run(self, block: torch.nn.Module) -> None:
        for state in self.states:
            img, txt, vec, pe = state
            if isinstance(block, DoubleStreamBlock):
                state[0], state[1] = block(img, txt, vec, pe)
            else:
                if txt is not None:  # the single blocks take the text tokens followed by the image tokens
                    img, state[1] = torch.cat((txt, img), dim=1), None
                state[0] = block(img, vec, pe)


def _quantize_blocks(load: Callable[[list[str]], dict[str, torch.Tensor]], cfg: FluxConfig, calibration: list[tuple],
                     held_out: list[tuple], write: Callable[[str, torch.Tensor], None], *, rank: int, smooth: bool,
                     alphas, dtype: torch.dtype, pow2_scales: bool, smoothing_steps: int, rotation: str,
                     device: torch.device,
                     progress: bool, on_layer: Callable[[str], None] | None) -> tuple[dict[str, dict], dict[str, float]]:
    """The streaming quantizer: load(keys) gives those tensors of the 16-bit model (keys of one
    part: the stem, then each block in order), write(key, tensor) takes every tensor of the
    quantized model once. Returns the quantized layers' descriptions and, where held-out calls are
    given, each W4A4 layer's relative output error on them."""
    specs = linear_layers(cfg)
    parts = _part_keys(cfg)
    layers: dict[str, dict] = {}
    errors: dict[str, float] = {}
    with tqdm(total=sum(spec.kind != DENSE for spec in specs.values()), desc="quantizing", unit="layer",
              disable=not progress) as bar, torch.no_grad():
        stem_tensors = load(parts[""])
        stem_cfg = dataclasses.replace(cfg, depth=0, depth_single_blocks=0)
        stem = _meta_module(lambda: Flux(stem_cfg, dense_linear(dtype)), stem_tensors, "", device)
        call_sets = [_Calls([list(stem.embed(*(None if t is None else t.to(device) for t in args)))
                             for args in calls]) for calls in (calibration, held_out)]
        for key, t in stem_tensors.items():
            write(key, t)
        del stem, stem_tensors

        for prefix in _block_prefixes(cfg):
            tensors = load(parts[prefix])
            block_class = DoubleStreamBlock if prefix.startswith("double") else SingleStreamBlock
            block = _meta_module(lambda: block_class(cfg, dense_linear(dtype)), tensors, f"{prefix}.",
                                 device)
            names = [name for name in specs if name.startswith(f"{prefix}.")]
            w4a4 = [name.removeprefix(f"{prefix}.") for name in names if specs[name].kind == W4A4]
            seen = []
            for calls in call_sets:
                with recording(block, w4a4, max(len(calls.states), 1), store=device) as inputs:
                    calls.run(block)
                seen.append({f"{prefix}.{name}": x for name, x in recorded_inputs(inputs).items()}
                            if calls.states else {})
            calibrated, held = seen

            for key, t in tensors.items():
                if key.rsplit(".", 1)[0] not in specs or specs[key.rsplit(".", 1)[0]].kind == DENSE:
                    write(key, t)
            for name in names:
                spec = specs[name]
                if spec.kind == DENSE:
                    continue
                module = block.get_submodule(name.removeprefix(f"{prefix}."))
                home = tensors[f"{name}.weight"].device
                if spec.kind == W4A4:
                    result = quantize.quantize_linear(module.weight, module.bias, calibrated.pop(name), rank=rank,
                                                      shift=gelu_shift(spec), smooth=smooth, alphas=alphas, dtype=dtype,
                                                      pow2_scales=pow2_scales, smoothing_steps=smoothing_steps,
                                                      rotation=rotation)
                    if held_out:
                        errors[name] = quantize.relative_output_error(result, module.weight, module.bias,
                                                                      held.pop(name), pow2_scales)
                    layer = result.as_dict()
                    layers[name] = fmt.describe_w4a4(layer)
                else:
                    layer = quantize.quantize_weight_w4a16(module.weight, module.bias, dtype)
                    layers[name] = fmt.describe_w4a16(layer)
                for field, t in layer.items():
                    write(f"{name}.{field}", t.to(home))
                bar.update(1)
                if on_layer is not None:
                    on_layer(name)
            del block, tensors, calibrated, held
    return layers, errors


def _require_finite(key: str, t: torch.Tensor, where) -> torch.Tensor:
    """t, or a FormatError naming the file (where) and the tensor if it holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise fmt.FormatError(where, f"tensor {key} contains NaN or Inf; the checkpoint is damaged or was not "
                                     f"saved from a working model")
    return t


def quality_summary(errors: dict[str, float]) -> dict:
    """The quality report of a quantization: the mean and the worst W4A4 layers' relative output
    error on held-out calls, and every layer's (rounded to 6 significant digits)."""
    if not errors:
        return {}
    worst = sorted(errors.items(), key=lambda item: item[1], reverse=True)[:WORST_LAYERS_SHOWN]
    return {"what": "relative output error ||y_4bit - y_16bit|| / ||y_16bit|| of each W4A4 layer on the inputs it "
                    f"sees in {HELD_OUT_CALLS} held-out calibration calls of the 16-bit model",
            "mean": float(f"{sum(errors.values()) / len(errors):.6g}"),
            "worst": [[name, float(f"{err:.6g}")] for name, err in worst],
            "layers": {name: float(f"{err:.6g}") for name, err in errors.items()}}


def quantize_flux(tensors: dict[str, torch.Tensor], cfg: FluxConfig, calibration: list[tuple], rank: int = 32,
                  smooth: bool = True, alphas=quantize.DEFAULT_ALPHAS, progress: bool = True,
                  dtype: torch.dtype = torch.bfloat16, pow2_scales: bool = False,
                  device: str | torch.device | None = None,
                  on_layer: Callable[[str], None] | None = None, calibration_prompts: int = 0,
                  held_out: list[tuple] | None = None, smoothing_steps: int = 0,
                  rotation: str = quantize.DEFAULT_ROTATION) -> fmt.QuantizedModel:
    """SVDQuant a FLUX state dict (ComfyUI names) into a natural-format model.

    calibration: model calls (noise, timestep, context, pooled, guidance) for `flux.model.Flux`.
    rank=0 and smooth=False give plain W4A4 (what SVDQuant improves on); alphas are the smoothing
    exponents searched per layer. pow2_scales: power-of-two weight group scales in every W4A4 layer
    (quantize.quantize_linear, docs/DESIGN.md#scales); recorded in the metadata, and files with them
    run with power-of-two activation scales by default (file_options).
    device: where the calibration forward and the quantization run, one block at a time (default:
    where the tensors are); the result is on the tensors' device. on_layer: called with each
    quantized layer's name when it is done. calibration_prompts: how many real prompts the
    calibration calls took (0: random stand-ins), recorded in the metadata. held_out: calls whose
    layer inputs measure each W4A4 layer's output error; the mean and the worst layers go into
    quantization["held_out_error"] (quantize_checkpoint also writes every layer's: quality_summary).
    smoothing_steps: the learned smoothing's steps per layer (quantize.quantize_linear; 0: the searched
    smoothing only), recorded in the metadata. rotation: the group rotation of every W4A4 layer's signed
    input groups (quantize.ROTATIONS), recorded in the metadata.
    """
    check_tensors(cfg, tensors, {})
    device = torch.device(device) if device is not None else tensors["img_in.weight"].device
    out: dict[str, torch.Tensor] = {}
    layers, errors = _quantize_blocks(
        lambda keys: {key: _require_finite(key, tensors[key], "state dict") for key in keys}, cfg, calibration,
        held_out or [], out.__setitem__, rank=rank, smooth=smooth, alphas=alphas, dtype=dtype, pow2_scales=pow2_scales,
        smoothing_steps=smoothing_steps, rotation=rotation, device=device, progress=progress, on_layer=on_layer)
    return fmt.QuantizedModel(out, layers, "flux", cfg.to_dict(),
                              _quantization(rank, smooth, len(calibration), calibration_prompts, pow2_scales,
                                            smoothing_steps, rotation, errors))


def _quantization(rank, smooth, calls, prompts, pow2_scales, smoothing_steps, rotation, errors) -> dict:
    """The file's `quantization` metadata; with a quality report, its mean and worst layers (every
    layer's error is in the file's `quality` metadata and the JSON beside it)."""
    out = {"method": "svdquant", "group_size": numerics.GROUP_SIZE, "act_shift": numerics.GELU_SHIFT,
           "rank": rank, "smooth": smooth, "calibration_calls": calls, "calibration_prompts": prompts,
           "pow2_scales": pow2_scales, "smoothing_steps": smoothing_steps, "rotation": rotation}
    if errors:
        summary = quality_summary(errors)
        out["held_out_error"] = {"mean": summary["mean"], "worst": summary["worst"]}
    return out


# ---------------------------------------------------------------------------------------------
# A 16-bit FLUX.1 checkpoint file -> an SVDQuant file (python -m svdquant quantize, the Quantizer node)

CHECKPOINT_PREFIX = "model.diffusion_model."  # the transformer's keys in a ComfyUI checkpoint
SOURCE_DTYPES = {"BF16", "F16", "F32"}  # safetensors' names of the dtypes a checkpoint may have
# The ranks a checkpoint is quantized at: multiples of what the kernels take, up to MAX_MODEL_RANK for the
# model's own branch (LoRAs add columns to it at load, up to kernels.MAX_RANK in all).
MIN_MODEL_RANK, MAX_MODEL_RANK = RANK_MULTIPLE, 256


def _flux_config(path, shapes: dict[str, torch.Tensor]) -> FluxConfig:
    """The configuration of a FLUX.1 state dict (shape-only tensors suffice); FormatError naming
    the file and a few of the tensors it lacks where it is not one."""
    try:
        cfg, problem = config_from_tensors(shapes, {}), None
    except ValueError as exc:
        cfg, problem = None, str(exc)
    missing = [key for key in dense_shapes(cfg or FluxConfig()) if key not in shapes]
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
        check_tensors(cfg, shapes, {})
    except ValueError as exc:
        raise fmt.FormatError(path, f"not a usable FLUX.1 transformer: {exc}") from None
    return cfg


def _transformer_prefix(f) -> str:
    """Where an open safetensors file holds the transformer: under CHECKPOINT_PREFIX in a ComfyUI
    checkpoint (transformer, VAE and text encoders in one file), else at the top."""
    return CHECKPOINT_PREFIX if any(key.startswith(CHECKPOINT_PREFIX) for key in f.keys()) else ""


def checkpoint_config(path) -> FluxConfig:
    """The configuration of the 16-bit FLUX.1 transformer in a safetensors file, from its header
    alone (nothing is read): FormatError naming the file where it is not one, is already an
    SVDQuant model, or stores a dtype other than bfloat16, float16 or float32."""
    metadata = fmt.read_header(path)
    if fmt.is_natural_file(metadata) or nunchaku_import.is_nunchaku_file(path, metadata):
        raise fmt.FormatError(path, "already an SVDQuant 4-bit model; quantize the 16-bit checkpoint it was made from")
    with safe_open(str(path), framework="pt") as f:
        prefix = _transformer_prefix(f)
        slices = {key: f.get_slice(key) for key in f.keys() if key.startswith(prefix)}
    odd = [key for key, s in slices.items() if s.get_dtype() not in SOURCE_DTYPES]
    if odd:
        raise fmt.FormatError(path, f"tensor {odd[0]} is {slices[odd[0]].get_dtype()}: only bfloat16, float16 or "
                                    f"float32 checkpoints can be quantized")
    return _flux_config(path, {key.removeprefix(prefix): torch.empty(s.get_shape(), device="meta")
                               for key, s in slices.items()})


@fmt.remembered_per_file(missing=False)
def is_quantizable_checkpoint(path) -> bool:
    """Whether checkpoint_config accepts the file (a 16-bit FLUX.1 transformer), from its header alone."""
    try:
        checkpoint_config(path)
        return True
    except fmt.FormatError:
        return False


def read_checkpoint(path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The transformer's tensors (checked first with checkpoint_config) in ComfyUI names, cast to
    bf16 one at a time so that a float32 file never sits in memory at full width; only `keys`
    where given. FormatError naming the file and the tensor where one holds NaN or Inf."""
    with safe_open(str(path), framework="pt") as f:
        prefix = _transformer_prefix(f)
        keys = keys if keys is not None else [key.removeprefix(prefix) for key in f.keys() if key.startswith(prefix)]
        return {key: _require_finite(f"{prefix}{key}", f.get_tensor(f"{prefix}{key}").to(torch.bfloat16), path)
                for key in keys}


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8",
                      torch.int8: "I8"}


class StreamingWriter:
    """A safetensors file written one tensor at a time, so that the model never sits in memory.

    safetensors puts the header (every tensor's name, dtype, shape and offsets, and the metadata)
    before the data: the data goes in after header_bytes reserved bytes as it comes, and the header
    is written into that space at the end, padded with spaces (which the format allows). The file is
    `<path>.partial` until finish() renames it; discard() removes it."""

    def __init__(self, path: Path, header_bytes: int):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.header_bytes = -(-header_bytes // 8) * 8  # the data starts 8-byte aligned
        self.entries: dict[str, dict] = {}
        self.end = 0
        self.file = open(self.partial, "wb")
        self.file.seek(8 + self.header_bytes)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(raw))
        self.entries[key] = {"dtype": SAFETENSORS_DTYPES[data.dtype], "shape": list(data.shape),
                             "data_offsets": [self.end, self.end + raw.nbytes]}
        self.end += raw.nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.header_bytes:
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the {self.header_bytes} reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.header_bytes) + header + b" " * (self.header_bytes - len(header)))
        self.file.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def header_bytes_needed(cfg: FluxConfig) -> int:
    """An upper bound on the output file's header: per tensor its JSON entry (name, dtype, a shape
    of up to 2 dimensions, two offsets of up to 20 digits), per quantized layer its escaped
    description in the layers and quality metadata, and the rest of the metadata."""
    specs = linear_layers(cfg)
    names = [f"{name}.{field}" for name, spec in specs.items()
             for field in (fmt.LAYER_FIELDS[spec.kind] if spec.kind != DENSE else ("weight", "bias"))]
    names += list(norm_scales(cfg))
    return sum(len(name) + 128 for name in names) + sum(2 * len(name) + 512 for name in specs) + 8192


def output_bytes(cfg: FluxConfig, rank: int) -> int:
    """The quantized file's size at most (bias, shift and rotation counted wherever a layer may have
    them), from the tensor shapes: 4-bit codes, 16-bit scales, low-rank factors and unquantized tensors."""
    total = header_bytes_needed(cfg)
    for name, spec in linear_layers(cfg).items():
        n, k = spec.out_features, spec.in_features
        if spec.kind == W4A4:
            total += n * k // 2 + 2 * (k // numerics.GROUP_SIZE * n + 2 * k + (n + k) * rank + n)
            total += 4 * quantize.LEARNED_ROTATION_PASSES * numerics.ROTATION_STAGES * numerics.GROUP_SIZE * 2
        elif spec.kind == W4A16:
            total += n * k // 2 + 2 * (2 * k // numerics.GROUP_SIZE * n + n)
        else:
            total += 2 * (n * k + n)
    return total + 2 * sum(norm_scales(cfg).values())


# Fixed parts of the memory estimate: the Python process with torch (and its CUDA libraries), and
# how many float32 copies of a layer's weight quantize_linear's peak amounts to (the weight, the
# smoothed weight, the residual, its dequantized codes and the clipping search's temporaries, as
# torch's caching allocator keeps them; bench/NOTES.md#quantizer-streaming has the measured peaks).
PROCESS_BYTES = 2 << 30
WEIGHT_COPIES = 14


def calibration_tokens(cfg: FluxConfig, prompts: list[tuple[torch.Tensor, torch.Tensor]] | None) -> int:
    """Tokens (text + image) of one calibration call."""
    if prompts is None:
        return 16 + (STAND_IN_LATENT // cfg.patch_size) ** 2
    return max(p[0].reshape(-1, cfg.context_in_dim).shape[0] for p in prompts) + (PROMPT_LATENT // cfg.patch_size) ** 2


def memory_needed(cfg: FluxConfig, calls: int, tokens: int, on_gpu: bool) -> tuple[int, int]:
    """(system memory, GPU memory) in bytes that quantizing a checkpoint one block at a time needs
    at its peak, from the tensor sizes: the stem and the largest block in bf16, the float32 working
    set of the largest layer, the recorded inputs of one block's W4A4 layers (calibration and
    held-out calls, float32, at most MAX_CALIBRATION_TOKENS each), the calls' block inputs and the
    largest activation of a block forward (bf16), and the error compensation's matrices for the widest
    input. Without a GPU all of it is system memory."""
    shapes = dense_shapes(cfg)
    parts = _part_keys(cfg)
    part_bytes = {part: 2 * sum(math.prod(shapes[key]) for key in keys) for part, keys in parts.items()}
    weights = part_bytes.pop("") + max(part_bytes.values(), default=0)
    specs = linear_layers(cfg)
    work = WEIGHT_COPIES * 4 * max(spec.in_features * spec.out_features for spec in specs.values())
    per_block: dict[str, int] = {}
    for name, spec in specs.items():
        if spec.kind == W4A4:
            block = ".".join(name.split(".")[:2])
            per_block[block] = per_block.get(block, 0) + spec.in_features
    recorded = 2 * max(per_block.values(), default=0) * quantize.MAX_CALIBRATION_TOKENS * 4
    activations = 2 * tokens * ((calls + HELD_OUT_CALLS) * cfg.hidden_size + 4 * (3 * cfg.hidden_size + cfg.mlp_hidden))
    # the residual's error compensation (quantize._compensated_codes): three float32 K x K matrices at
    # its Cholesky step and three float32 copies of the weight (columns, scales, their reciprocals)
    widest = max((spec.in_features for spec in specs.values() if spec.kind == W4A4), default=0)
    compensation = 3 * 4 * widest**2 + 3 * 4 * max(spec.in_features * spec.out_features for spec in specs.values())
    compute = weights + work + recorded + activations + compensation
    return (PROCESS_BYTES + weights, compute) if on_gpu else (PROCESS_BYTES + compute, 0)


def available_system_memory() -> int | None:
    """Bytes of system memory available to a new allocation (MemAvailable), None where unknown."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def available_gpu_memory(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def check_output_location(target: Path, size: int) -> None:
    """FormatError naming the output before any work where its folder is missing, cannot be written
    or has less free space than `size` bytes."""
    folder = target.parent
    if not folder.is_dir():
        raise fmt.FormatError(target, f"the output folder {folder} does not exist")
    try:
        with open(target.with_name(target.name + ".partial"), "wb"):
            pass
        os.remove(target.with_name(target.name + ".partial"))
    except OSError as exc:
        raise fmt.FormatError(target, f"cannot write in the output folder {folder} ({exc.strerror})") from None
    free = shutil.disk_usage(folder).free
    if free < size:
        raise fmt.FormatError(target, f"needs {size / 2**30:.2f} GiB of disk space, the output folder {folder} has "
                                      f"{free / 2**30:.2f} GiB free")


def check_memory(source, device: torch.device, needed: tuple[int, int]) -> None:
    """FormatError naming the checkpoint before any work where the system or the GPU has less
    memory available than the estimate (memory_needed)."""
    system, gpu = needed
    free = available_system_memory()
    if free is not None and free < system:
        raise fmt.FormatError(source, f"quantizing it needs about {system / 2**30:.1f} GiB of system memory, "
                                      f"{free / 2**30:.1f} GiB are available")
    if device.type == "cuda":
        free = available_gpu_memory(device)
        if free < gpu:
            raise fmt.FormatError(source, f"quantizing it on {device} needs about {gpu / 2**30:.1f} GiB of GPU "
                                          f"memory, {free / 2**30:.1f} GiB are free (--device cpu runs without "
                                          f"a GPU, slower)")


@dataclass
class QuantizedCheckpoint:
    """What quantize_checkpoint wrote: the file, its quantized layers' descriptions, its
    quantization metadata and its quality report (quality_summary; also in `<name>.quality.json`)."""

    path: Path
    layers: dict[str, dict]
    quantization: dict
    quality: dict


def quality_report_path(target) -> Path:
    """The quality report's JSON beside the quantized file: <name>.quality.json."""
    target = Path(target)
    return target.with_name(target.name.removesuffix(".safetensors") + ".quality.json")


def quantize_checkpoint(source, target, rank: int = 32, pow2_scales: bool = False, calibration_calls: int = 4,
                        device: str | torch.device | None = None, progress: bool = True,
                        on_layer: Callable[[str], None] | None = None,
                        report: Callable[[str], None] = lambda message: None,
                        prompts: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        learned_smoothing: bool = False,
                        rotation: str = quantize.DEFAULT_ROTATION) -> QuantizedCheckpoint:
    """Quantize the 16-bit FLUX.1 transformer file `source` into the SVDQuant file `target`.

    What the CLI's `quantize` and the Quantizer node run. The checkpoint is read one block at a
    time and the calibration forward and the quantization run on `device` (default: the CPU),
    block by block, the results streamed into the target; before any of that the output folder
    (exists, writable, free space) and the memory (memory_needed against what is available) are
    checked, each a FormatError naming the file. The target is written atomically (`.partial`,
    renamed when complete) and replaced if it exists: callers decide whether it may be; the quality
    report goes into its metadata and beside it (quality_report_path). on_layer, progress: as for
    quantize_flux. report: receives what the run is about to do (model, memory, calibration)
    before the long part starts. prompts: text embeddings of real prompts to calibrate on
    (calibration_inputs), else random stand-ins; the held-out calls take them too.
    learned_smoothing: each layer's smoothing also learned on its calibration inputs
    (quantize.LEARNED_SMOOTHING_STEPS steps; bench/NOTES.md#fidelity-learned-smoothing): a smaller
    error for about 2.8x the time of the 4-bit layers' quantization. rotation: as for quantize_flux.
    """
    target = Path(target)
    if target.suffix != ".safetensors":
        raise fmt.FormatError(target, "the output name must end in .safetensors")
    if not (MIN_MODEL_RANK <= rank <= MAX_MODEL_RANK and rank % RANK_MULTIPLE == 0):
        raise ValueError(f"rank {rank}: must be a multiple of {RANK_MULTIPLE} from {MIN_MODEL_RANK} to "
                         f"{MAX_MODEL_RANK}")
    if calibration_calls < 1:
        raise ValueError(f"calibration_calls {calibration_calls}: must be at least 1")
    cfg = checkpoint_config(source)
    if prompts is not None:
        check_prompts(cfg, prompts)
    device = torch.device(device if device is not None else "cpu")
    check_output_location(target, output_bytes(cfg, rank))
    needed = memory_needed(cfg, calibration_calls, calibration_tokens(cfg, prompts), device.type == "cuda")
    report(f"{Path(source).name}: FLUX.1-{cfg.variant}, width {cfg.hidden_size}, {cfg.depth} double + "
           f"{cfg.depth_single_blocks} single blocks; quantized one block at a time on {device}: needs about "
           f"{needed[0] / 2**30:.1f} GiB of system memory" +
           (f" and {needed[1] / 2**30:.1f} GiB of GPU memory" if device.type == "cuda" else "") +
           f", writes about {output_bytes(cfg, rank) / 2**30:.2f} GiB")
    check_memory(source, device, needed)
    if prompts is None:
        report(f"calibration: {calibration_calls} model calls on random stand-in inputs (not real prompts, "
               f"no text encoder needed)")
    else:
        report(f"calibration: {calibration_calls} model calls on the text embeddings of {len(prompts)} "
               f"prompt{'s' if len(prompts) > 1 else ''}, {PROMPT_LATENT}x{PROMPT_LATENT} noise latents")
    if learned_smoothing:
        report(f"learned smoothing: {quantize.LEARNED_SMOOTHING_STEPS} optimizer steps per 4-bit layer "
               f"(about 2.8x the quantization time)")
    calibration = calibration_inputs(cfg, calibration_calls, prompts=prompts)
    held_out = calibration_inputs(cfg, HELD_OUT_CALLS, seed=HELD_OUT_SEED, prompts=prompts)
    smoothing_steps = quantize.LEARNED_SMOOTHING_STEPS if learned_smoothing else 0

    writer = StreamingWriter(target, header_bytes_needed(cfg))
    try:
        layers, errors = _quantize_blocks(lambda keys: read_checkpoint(source, keys), cfg, calibration, held_out,
                                          writer.write, rank=rank, smooth=True, alphas=quantize.DEFAULT_ALPHAS,
                                          dtype=torch.bfloat16, pow2_scales=pow2_scales,
                                          smoothing_steps=smoothing_steps, rotation=rotation, device=device,
                                          progress=progress,
                                          on_layer=on_layer)
        quantization = _quantization(rank, True, calibration_calls, len(prompts or ()), pow2_scales,
                                     smoothing_steps, rotation, errors)
        quality = quality_summary(errors)
        writer.finish({"format": fmt.FORMAT_NAME, "format_version": fmt.format_version(layers),
                       "quantization": json.dumps(quantization), "layers": json.dumps(layers), "model_type": "flux",
                       "model_config": json.dumps(cfg.to_dict()), "quality": json.dumps(quality)})
    except OSError as exc:
        writer.discard()
        raise fmt.FormatError(target, f"could not write the output ({exc.strerror or exc})") from None
    except BaseException:
        writer.discard()
        raise
    quality_report_path(target).write_text(json.dumps({"file": target.name, **quality}, indent=1) + "\n")
    return QuantizedCheckpoint(target, layers, quantization, quality)
