"""LoRAs on quantized FLUX: reading every common file format, and applying to SVDQuant layers.

Reading (`load_lora`, `convert_lora`) normalises a LoRA file into per-module deltas keyed by
ComfyUI/BFL FLUX module names (`double_blocks.0.img_attn.qkv`, `single_blocks.3.linear1`, ...):

  Kohya            lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / .lora_up.weight / .alpha
  Kohya, diffusers lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight (OneTrainer),
  names            lycoris_... (SimpleTuner)
  diffusers / PEFT transformer.transformer_blocks.0.attn.to_q.lora_A.weight / .lora_B.weight
  XLabs            double_blocks.0.processor.qkv_lora1.down.weight / .up.weight
  ComfyUI / BFL    diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (or .lora_down/.lora_up)

A delta is a pair (down [K, r], up [N, r]) in float32 with the LoRA's alpha / r folded into
down, meaning W' = W + strength * up @ down^T. A LoRA on part of a fused layer (diffusers' separate
q/k/v for `img_attn.qkv`; q/k/v and proj_mlp for `single_blocks.i.linear1`) becomes a pair for the
fused layer whose up matrix is zero outside that part's rows; parts with distinct down matrices
sit side by side (block diagonal), parts with one shared down matrix share its columns. So every
delta is still low rank and joins the low-rank branch exactly.

Applying (`set_module_loras`, `set_layer_loras`, `set_model_loras`) *replaces* a module's list of
(delta, strength), rebuilding from the model's own tensors each time, so strengths never accumulate
over runs and an empty list restores the original tensors bit for bit:

  SVDQLinear   lora_down = [model's own | down_1 * s_1 | ... | zeros], lora_up = [own | up_1 | ... | zeros]
               (the rank padded to a multiple of 16 for the kernels, at most MAX_RANK);
  W4A16Linear  a 16-bit low-rank side branch with the same concatenation (weights stay 4-bit);
  nn.Linear    dense, as ComfyUI patches weights: a float32 (float64 for float64) copy of the original
               weight plus strength * up @ down^T for each LoRA, rounded once to the weight's dtype.

Models imported from the reference engine have a smoothing factor s0 folded between two layers:
the attention output projection (a double block's img/txt_attn.proj, a single block's linear2
attention columns) reads x_orig / s0 and keeps s0 as `smooth_orig`, and the V rows of the qkv layer
feeding it (rows 2H..3H of img/txt_attn.qkv and of linear1) produce V_orig / s0. A LoRA trained on
the original model is made exact there: its down rows are multiplied by s0 on the reading layer, its
up rows divided by s0 on the V rows (`input_fold`, `output_divisors`).

Only safetensors files are read: never pickle.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from . import format as file_format
from .linear import SVDQLinear, W4A16Linear

log = logging.getLogger("svdquant")

# What the low-rank kernels take: ranks in multiples of 16, at most 1024 in all.
RANK_MULTIPLE = 16
MAX_RANK = 1024
# The layers a LoRA can apply to.
LORA_LAYERS = (SVDQLinear, W4A16Linear, nn.Linear)


class LoraError(file_format.FormatError):
    """A LoRA that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA's update of one layer: W' = W + strength * up @ down^T.

    down [K, r] float32 with alpha / r folded in; up [N, r] float32; source: the LoRA file's name.
    """

    down: torch.Tensor
    up: torch.Tensor
    source: str

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    @classmethod
    def from_pair(cls, lora_down: torch.Tensor, lora_up: torch.Tensor, alpha: float | None, source: str,
                  name: str) -> "LoraDelta":
        """A LoRA pair as files store it: lora_down (A) [r, K], lora_up (B) [N, r], alpha or None.

        The delta is (alpha / r) * B @ A, alpha None meaning alpha = r (PEFT files carry no alpha).
        FP8 and 16-bit factors are upcast to float32. `name` only labels errors.
        """
        if lora_down.dim() != 2 or lora_up.dim() != 2 or lora_up.shape[1] != lora_down.shape[0]:
            raise LoraError(source, f"{name}: lora down {tuple(lora_down.shape)} and up {tuple(lora_up.shape)} "
                                    "are not a linear layer's low-rank pair")
        if alpha is not None and not math.isfinite(alpha):
            raise LoraError(source, f"{name}: alpha is {alpha}, not a finite number")
        down, up = lora_down.float(), lora_up.float()
        if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
            raise LoraError(source, f"{name}: contains NaN or Inf")
        rank = down.shape[0]
        scale = 1.0 if alpha is None else alpha / rank
        return cls((down * scale).t().contiguous(), up.contiguous(), source)

    def placed_in_rows(self, start: int, total_rows: int) -> "LoraDelta":
        """The same delta as the rows [start, start + N) of a layer with total_rows outputs."""
        up = self.up.new_zeros(total_rows, self.rank)
        up[start:start + self.up.shape[0]] = self.up
        return LoraDelta(self.down, up, self.source)


@dataclass(frozen=True)
class Lora:
    """A LoRA file normalised: its name and a delta per ComfyUI/BFL FLUX module name."""

    source: str
    deltas: dict[str, LoraDelta]


# ---------------------------------------------------------------------------------------------
# Key normalisation

@dataclass(frozen=True)
class _Target:
    """Where a LoRA module name lands: a FLUX module, optionally a block of its rows.

    rows = (first, count, total) in units of the layer's input width H (the hidden size): to_k
    of a fused [q; k; v] layer is (1, 1, 3). swap_halves: the LoRA's output halves come in the
    other order (diffusers' norm_out.linear is [scale; shift], ComfyUI's final layer [shift; scale]).
    """

    module: str
    rows: tuple[int, int, int] | None = None
    swap_halves: bool = False


# In-block module names of every format -> ComfyUI/BFL in-block module. FLUX.1's single-block
# linear1 is [q; k; v; mlp_in] with mlp_in 4 H wide, so 7 H rows in all.
_DOUBLE_BLOCK = {
    # ComfyUI / BFL / Kohya
    **{name: _Target(name) for name in (
        "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
        "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")},
    # diffusers
    "attn.to_q": _Target("img_attn.qkv", (0, 1, 3)),
    "attn.to_k": _Target("img_attn.qkv", (1, 1, 3)),
    "attn.to_v": _Target("img_attn.qkv", (2, 1, 3)),
    "attn.add_q_proj": _Target("txt_attn.qkv", (0, 1, 3)),
    "attn.add_k_proj": _Target("txt_attn.qkv", (1, 1, 3)),
    "attn.add_v_proj": _Target("txt_attn.qkv", (2, 1, 3)),
    "attn.to_out.0": _Target("img_attn.proj"),
    "attn.to_add_out": _Target("txt_attn.proj"),
    "ff.net.0.proj": _Target("img_mlp.0"),
    "ff.net.2": _Target("img_mlp.2"),
    "ff_context.net.0.proj": _Target("txt_mlp.0"),
    "ff_context.net.2": _Target("txt_mlp.2"),
    "norm1.linear": _Target("img_mod.lin"),
    "norm1_context.linear": _Target("txt_mod.lin"),
    # XLabs attention processors
    "processor.qkv_lora1": _Target("img_attn.qkv"),
    "processor.proj_lora1": _Target("img_attn.proj"),
    "processor.qkv_lora2": _Target("txt_attn.qkv"),
    "processor.proj_lora2": _Target("txt_attn.proj"),
}
_SINGLE_BLOCK = {
    **{name: _Target(name) for name in ("linear1", "linear2", "modulation.lin")},
    "linear1_qkv": _Target("linear1", (0, 3, 7)),  # ComfyUI's name for linear1's attention rows
    "attn.to_q": _Target("linear1", (0, 1, 7)),
    "attn.to_k": _Target("linear1", (1, 1, 7)),
    "attn.to_v": _Target("linear1", (2, 1, 7)),
    "proj_mlp": _Target("linear1", (3, 4, 7)),
    "proj_out": _Target("linear2"),  # diffusers' proj_out reads [attn | mlp], as linear2 does
    "norm.linear": _Target("modulation.lin"),
    "processor.qkv_lora": _Target("linear1", (0, 3, 7)),
    "processor.proj_lora": _Target("linear2"),
}
_TOP_LEVEL = {
    **{name: _Target(name) for name in (
        "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
        "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
        "final_layer.adaLN_modulation.1")},
    "x_embedder": _Target("img_in"),
    "context_embedder": _Target("txt_in"),
    "time_text_embed.timestep_embedder.linear_1": _Target("time_in.in_layer"),
    "time_text_embed.timestep_embedder.linear_2": _Target("time_in.out_layer"),
    "time_text_embed.text_embedder.linear_1": _Target("vector_in.in_layer"),
    "time_text_embed.text_embedder.linear_2": _Target("vector_in.out_layer"),
    "time_text_embed.guidance_embedder.linear_1": _Target("guidance_in.in_layer"),
    "time_text_embed.guidance_embedder.linear_2": _Target("guidance_in.out_layer"),
    "proj_out": _Target("final_layer.linear"),
    "norm_out.linear": _Target("final_layer.adaLN_modulation.1", swap_halves=True),
}


def _underscored(table: dict[str, _Target]) -> dict[str, _Target]:
    # Kohya-style names replace every '.' by '_'; dotted names are looked up the same way.
    return {name.replace(".", "_"): target for name, target in table.items()}


_BLOCKS = {  # block prefix of any format -> (ComfyUI/BFL block prefix, in-block table)
    "double_blocks": ("double_blocks", _underscored(_DOUBLE_BLOCK)),
    "transformer_blocks": ("double_blocks", _underscored(_DOUBLE_BLOCK)),
    "single_blocks": ("single_blocks", _underscored(_SINGLE_BLOCK)),
    "single_transformer_blocks": ("single_blocks", _underscored(_SINGLE_BLOCK)),
}
_TOP_LEVEL_UNDERSCORED = _underscored(_TOP_LEVEL)
_BLOCK_NAME = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)_(\d+)_(.+)$")

# Module name prefixes of the formats, longest first so that none hides another.
_MODULE_PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "transformer.",
                    "lora_transformer_", "lora_unet_", "lycoris_")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "lora_prior_te")

# Key suffixes naming a LoRA factor, longest first (".lora.down.weight" also ends in ".down.weight").
# Not SD-era diffusers' "to_q_lora.down.weight": no FLUX trainer writes it, and it would read XLabs'
# "processor.qkv_lora.down.weight" as module "processor.qkv".
_ROLE_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),  # XLabs: processor.qkv_lora1.down.weight
    (".alpha", "alpha"),
)
# Key parts of adapters that are not a plain low-rank pair; they cannot join the low-rank branch.
_UNSUPPORTED = ((".lokr_", "LoKr"), (".hada_", "LoHa"), (".dora_scale", "DoRA"), (".lora_magnitude_vector", "DoRA"))


def _split_key(key: str) -> tuple[str, str] | None:
    """'<module>.lora_down.weight' -> ('<module>', 'down'); None for a key that is no LoRA factor."""
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    return None


def _resolve(module_key: str) -> _Target | None:
    """A LoRA file's module name (any format) -> its FLUX target, None if it names no FLUX layer."""
    name = module_key
    for prefix in _MODULE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = name.replace(".", "_")
    match = _BLOCK_NAME.match(name)
    if match is None:
        return _TOP_LEVEL_UNDERSCORED.get(name)
    block, index, inner = match.groups()
    flux_block, table = _BLOCKS[block]
    target = table.get(inner)
    if target is None:
        return None
    return _Target(f"{flux_block}.{index}.{target.module}", target.rows, target.swap_halves)


def _place(delta: LoraDelta, target: _Target, name: str) -> LoraDelta:
    """Put a part's delta where it acts in the FLUX module (rows of a fused layer, swapped halves)."""
    if target.swap_halves:
        half = delta.up.shape[0] // 2
        return LoraDelta(delta.down, torch.cat((delta.up[half:], delta.up[:half])), delta.source)
    if target.rows is None:
        return delta
    first, count, total = target.rows
    hidden = delta.down.shape[0]  # every part of a fused FLUX layer reads the hidden state
    if delta.up.shape[0] != count * hidden:
        raise LoraError(delta.source, f"{name}: {delta.up.shape[0]} output rows, expected {count} x {hidden} "
                                      f"for this part of {target.module}")
    return delta.placed_in_rows(first * hidden, total * hidden)


def _combine(parts: list[LoraDelta], module: str) -> LoraDelta:
    """One delta for a module from its parts: parts with an identical down matrix share columns
    (their up matrices, zero outside their own rows, add up), the others sit side by side."""
    shapes = {(p.down.shape[0], p.up.shape[0]) for p in parts}
    if len(shapes) > 1:
        raise LoraError(parts[0].source, f"{module}: its LoRA parts disagree on the layer's shape "
                                         f"((in, out) = {sorted(shapes)})")
    groups: list[LoraDelta] = []
    for part in parts:
        for i, group in enumerate(groups):
            if group.down.shape == part.down.shape and torch.equal(group.down, part.down):
                groups[i] = LoraDelta(group.down, group.up + part.up, group.source)
                break
        else:
            groups.append(part)
    if len(groups) == 1:
        return groups[0]
    return LoraDelta(torch.cat([g.down for g in groups], dim=1), torch.cat([g.up for g in groups], dim=1),
                     parts[0].source)


def convert_lora(tensors: dict[str, torch.Tensor], source: str) -> Lora:
    """Normalise a LoRA state dict (any supported format) into per-module deltas.

    source: the file's name, for messages. Keys that name no FLUX layer are reported in one
    warning; LoKr, LoHa and DoRA weights, unpaired factors, and a LoRA with no FLUX layer at all
    raise LoraError.
    """
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched: list[str] = []
    text_encoder = 0
    for key, tensor in tensors.items():
        for marker, kind in _UNSUPPORTED:
            if marker in key:
                raise LoraError(source, f"{kind} weights are not supported, only plain LoRA (low-rank pairs) "
                                        f"can join the quantized layers (key {key})")
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            text_encoder += 1
            continue
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        module_key, role = split
        factors.setdefault(module_key, {})[role] = (key, tensor)

    parts: dict[str, list[LoraDelta]] = {}
    for module_key, roles in factors.items():
        target = _resolve(module_key)
        if target is None:
            unmatched.extend(key for key, _ in roles.values())
            continue
        if "down" not in roles or "up" not in roles:
            present = ", ".join(key for key, _ in roles.values())
            raise LoraError(source, f"{module_key}: has {present} but not both a down and an up matrix")
        alpha = None
        if "alpha" in roles:
            alpha_key, alpha_tensor = roles["alpha"]
            if alpha_tensor.numel() != 1:
                raise LoraError(source, f"{alpha_key}: an alpha of shape {tuple(alpha_tensor.shape)}, "
                                        "expected one number")
            alpha = float(alpha_tensor.float().item())
        delta = LoraDelta.from_pair(roles["down"][1], roles["up"][1], alpha, source, module_key)
        parts.setdefault(target.module, []).append(_place(delta, target, module_key))

    if not parts:
        shown = ", ".join(sorted(tensors)[:5])
        raise LoraError(source, f"no key names a FLUX layer, so it changes nothing (keys: {shown}"
                                f"{', ...' if len(tensors) > 5 else ''})")
    if text_encoder:
        log.info("%s: %d text-encoder keys left to the text encoder's LoRA loader", source, text_encoder)
    if unmatched:
        log.warning("%s: %d keys match no FLUX layer and are ignored: %s", source, len(unmatched),
                    ", ".join(sorted(unmatched)))
    return Lora(source, {module: _combine(module_parts, module) for module, module_parts in parts.items()})


def load_lora(path) -> Lora:
    """Read and normalise a LoRA file (safetensors only; FP8-stored weights are upcast)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraError(path, "only .safetensors LoRA files are read (pickle-based files are never loaded)")
    file_format.read_header(path)  # a clear error for a missing file or a broken header
    return convert_lora(file_format.load_tensors(path), path.name)


# ---------------------------------------------------------------------------------------------
# Applying

def _sources(loras: Sequence[tuple[LoraDelta, float]]) -> str:
    return ", ".join(dict.fromkeys(delta.source for delta, _ in loras))


def _check_shapes(module: nn.Module, loras: Sequence[tuple[LoraDelta, float]], name: str) -> None:
    for delta, _ in loras:
        if delta.down.shape[0] != module.in_features or delta.up.shape[0] != module.out_features:
            raise LoraError(delta.source, f"{name}: LoRA for a {delta.up.shape[0]}x{delta.down.shape[0]} layer, "
                                          f"the model's is {module.out_features}x{module.in_features}")


def input_fold(layer: nn.Module) -> torch.Tensor | None:
    """[K] factor by which the layer's runtime input is smaller than the original model's
    (x_runtime = x_orig / fold), None where they are the same (no `smooth_orig`: our own files).

    smooth_orig is the factor the quantizer chose and `smooth` what the layer still divides by; the
    difference was folded into the producing layer. Computed in the layer's float type, at least
    float32 (a float64 model stays exact).
    """
    smooth_orig = getattr(layer, "smooth_orig", None)
    if smooth_orig is None:
        return None
    dtype = torch.promote_types(smooth_orig.dtype, torch.float32)
    return smooth_orig.to(dtype) / layer.smooth.to(dtype)


# producer -> the layer reading its V rows (rows [2H, 3H), H = the producer's input width, the
# hidden size), by in-block name; the reading layer's first H input columns are the attention output.
_V_ROWS_READ_BY = {"img_attn.qkv": "img_attn.proj", "txt_attn.qkv": "txt_attn.proj", "linear1": "linear2"}


def output_divisors(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Layer name -> [N] divisor of its LoRA up rows, for the quantized qkv / linear1 layers whose
    V rows feed a layer with a folded smoothing factor (reference imports): 1 outside the V rows,
    s0 on them. `layers` maps names (any common prefix) to modules."""
    divisors = {}
    for name, layer in layers.items():
        if not isinstance(layer, SVDQLinear):
            continue
        for producer, reader in _V_ROWS_READ_BY.items():
            if name != producer and not name.endswith("." + producer):
                continue
            reading = layers.get(name[:len(name) - len(producer)] + reader)
            fold = None if reading is None else input_fold(reading)
            if fold is not None:
                hidden = layer.in_features
                divisor = fold.new_ones(layer.out_features)
                divisor[2 * hidden:3 * hidden] = fold[:hidden]
                divisors[name] = divisor
    return divisors


def _lowrank_columns(loras: Sequence[tuple[LoraDelta, float]], like: torch.Tensor,
                     input_scale: torch.Tensor | None = None, output_divisor: torch.Tensor | None = None):
    """The LoRAs' columns for a low-rank branch in `like`'s dtype and device: down * strength, up.

    input_scale [K] multiplies the down rows, output_divisor [N] divides the up rows (the smoothing
    folds of reference imports). Computed in like's float type, at least float32, rounded once.
    """
    compute = torch.promote_types(like.dtype, torch.float32)
    downs, ups = [], []
    for delta, strength in loras:
        down = delta.down.to(like.device, compute) * strength
        up = delta.up.to(like.device, compute)
        if input_scale is not None:
            down = down * input_scale.to(like.device, compute)[:, None]
        if output_divisor is not None:
            up = up / output_divisor.to(like.device, compute)[:, None]
        downs.append(down.to(like.dtype))
        ups.append(up.to(like.dtype))
    return downs, ups


def _set_svdq(layer: SVDQLinear, loras: Sequence[tuple[LoraDelta, float]], name: str,
              output_divisor: torch.Tensor | None) -> None:
    own_down = layer.lora_down[:, :layer.base_rank]
    own_up = layer.lora_up[:, :layer.base_rank]
    if not loras:
        # copies only where LoRA columns follow the model's own; otherwise these are the buffers
        layer.lora_down, layer.lora_up = own_down.contiguous(), own_up.contiguous()
        return
    downs, ups = _lowrank_columns(loras, own_down, input_fold(layer), output_divisor)
    rank = layer.base_rank + sum(d.shape[1] for d in downs)
    padding = -rank % RANK_MULTIPLE
    if rank + padding > MAX_RANK:
        raise LoraError(_sources(loras), f"{name}: the model's rank {layer.base_rank} plus these LoRAs is "
                                         f"{rank + padding} (padded to {RANK_MULTIPLE}), over the kernels' {MAX_RANK}")
    downs.append(own_down.new_zeros(layer.in_features, padding))
    ups.append(own_up.new_zeros(layer.out_features, padding))
    layer.lora_down = torch.cat([own_down, *downs], dim=1)
    layer.lora_up = torch.cat([own_up, *ups], dim=1)


def _set_w4a16(layer: W4A16Linear, loras: Sequence[tuple[LoraDelta, float]]) -> None:
    if not loras:
        layer.lora_down = layer.lora_up = None
        return
    downs, ups = _lowrank_columns(loras, layer.wscales)
    layer.lora_down = torch.cat(downs, dim=1)
    layer.lora_up = torch.cat(ups, dim=1)


def _set_dense(layer: nn.Linear, loras: Sequence[tuple[LoraDelta, float]]) -> None:
    # The original weight is kept as a non-persistent buffer so that it moves with the module
    # and restores bit for bit; every call starts again from it.
    original = layer._buffers.get("weight_without_lora")
    if original is None:
        if not loras:
            return
        original = layer.weight.data
        layer.register_buffer("weight_without_lora", original, persistent=False)
    if not loras:
        layer.weight.data = original
        del layer._buffers["weight_without_lora"]
        return
    # float32 for 16-bit weights, as ComfyUI; a float64 weight stays float64
    weight = original.to(torch.promote_types(original.dtype, torch.float32), copy=True)
    for delta, strength in loras:
        weight += strength * (delta.up.to(weight) @ delta.down.to(weight).t())
    layer.weight.data = weight.to(original.dtype)


def set_module_loras(module: nn.Module, loras: Sequence[tuple[LoraDelta, float]], name: str = "",
                     output_divisor: torch.Tensor | None = None) -> None:
    """Make `loras` [(delta, strength), ...] the module's whole LoRA list (empty: none).

    SVDQLinear, W4A16Linear and nn.Linear; the result depends only on the module's original
    tensors and this list, never on earlier calls. Strength-0 entries are left out. `name`
    labels errors. An SVDQLinear's own folded input factor (`input_fold`) is applied here;
    output_divisor (`output_divisors`, SVDQLinear only) is the fold of the layer reading its output.
    """
    if not isinstance(module, LORA_LAYERS):
        raise TypeError(f"{name}: LoRAs apply to SVDQLinear, W4A16Linear and nn.Linear, not {type(module).__name__}")
    if output_divisor is not None and not isinstance(module, SVDQLinear):
        raise TypeError(f"{name}: an output divisor applies to SVDQLinear layers, not {type(module).__name__}")
    loras = [(delta, strength) for delta, strength in loras if strength != 0]
    _check_shapes(module, loras, name)
    if isinstance(module, SVDQLinear):
        _set_svdq(module, loras, name, output_divisor)
    elif isinstance(module, W4A16Linear):
        _set_w4a16(module, loras)
    else:
        _set_dense(module, loras)


def set_model_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]], prefix: str = "") -> None:
    """Make `loras` [(lora, strength), ...] the model's whole LoRA list, in stacking order.

    Module names are the model's own with `prefix` removed (e.g. "diffusion_model."). Every
    linear layer not targeted now returns to its original tensors. A LoRA none of whose layers
    is in the model raises LoraError; layers missing from the model are reported in one warning.
    """
    modules = {name[len(prefix):]: module for name, module in model.named_modules() if name.startswith(prefix)}
    per_module: dict[str, list[tuple[LoraDelta, float]]] = {}
    for lora, strength in loras:
        missing = [target for target in lora.deltas if not isinstance(modules.get(target), LORA_LAYERS)]
        if len(missing) == len(lora.deltas):
            raise LoraError(lora.source, "none of its layers is a linear layer of this model")
        if missing:
            log.warning("%s: %d layers are not in this model and are skipped: %s", lora.source, len(missing),
                        ", ".join(sorted(missing)))
        for target, delta in lora.deltas.items():
            if target not in missing:
                per_module.setdefault(target, []).append((delta, strength))
    set_layer_loras(modules, per_module, prefix)


def set_layer_loras(layers: Mapping[str, nn.Module], per_layer: Mapping[str, Sequence[tuple[LoraDelta, float]]],
                    prefix: str = "") -> None:
    """Make per_layer[name] the LoRA list of every LoRA-capable module in `layers` (name -> module;
    absent from per_layer: none), with the smoothing folds of reference imports accounted for.

    The folds pair layers, so `layers` holds each qkv / linear1 together with the layer reading
    it. `prefix` + name labels errors.
    """
    divisors = output_divisors(layers)
    for name, module in layers.items():
        if isinstance(module, LORA_LAYERS):
            set_module_loras(module, per_layer.get(name, []), prefix + name, output_divisor=divisors.get(name))
