"""LoRAs on quantized layers: a LoRA as exact low-rank deltas, and applying them to SVDQuant layers.

A delta is a pair (down [K, r], up [N, r]) in float32 with the LoRA's alpha / r folded into
down, meaning W' = W + strength * up @ down^T. A LoRA on part of a fused layer (diffusers'
separate q/k/v for FLUX's `img_attn.qkv`) becomes a pair for the fused layer whose up matrix is
zero outside that part's rows; parts with distinct down matrices sit side by side (block
diagonal), parts with one shared down matrix share its columns. So every delta is still low rank
and joins the low-rank branch exactly.

Applying (`set_module_loras`, `set_layer_loras`, `set_model_loras`) *replaces* a module's list of
(delta, strength), rebuilding from the model's own tensors each time, so strengths never accumulate
over runs and an empty list restores the original tensors bit for bit:

  SVDQLinear   lora_down = [model's own | down_1 * s_1 | ... | zeros], lora_up = [own | up_1 | ... | zeros]
               (the rank padded to a multiple of 16 for the kernels, at most MAX_RANK);
  W4A16Linear  a 16-bit low-rank side branch with the same concatenation (weights stay 4-bit);
  nn.Linear    dense, as ComfyUI patches weights: a float32 (float64 for float64) copy of the original
               weight plus strength * up @ down^T for each LoRA, rounded once to the weight's dtype.

Models imported from nunchaku-format files have a smoothing factor s0 folded between two layers
(docs/DESIGN.md#nunchaku-import, step 8): the attention output projection reads x_orig / s0 and
keeps s0 as `smooth_orig`, and the V rows of the fused [q; k; v] layer feeding it (rows 2H..3H)
produce V_orig / s0; which layer reads which one's V rows is the model family's (FLUX:
`flux.arch.V_ROWS_READ_BY`). A LoRA trained on
the original model is made exact there: its down rows are multiplied by s0 on the reading layer, its
up rows divided by s0 on the V rows (`input_fold`, `output_divisors`).

Reading LoRA files into deltas is per model family (`flux.lora_keys`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from . import format as file_format
from .kernels import MAX_RANK, RANK_MULTIPLE
from .linear import SVDQLinear, W4A16Linear

log = logging.getLogger("svdquant")

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
    """A LoRA file normalised: its name and a delta per module name of the model it is for."""

    source: str
    deltas: dict[str, LoraDelta]


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


def output_divisors(layers: Mapping[str, nn.Module], v_rows_read_by: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Layer name -> [N] divisor of its LoRA up rows, for the quantized [q; k; v] layers whose V
    rows feed a layer with a folded smoothing factor (nunchaku imports): 1 outside the V rows, s0 on
    them. `layers` maps names (any common prefix) to modules; v_rows_read_by: the model family's
    in-block producer name -> the in-block name of the layer reading its V rows (rows [2H, 3H), H
    the producer's input width), whose first H input columns are the attention output."""
    divisors = {}
    for name, layer in layers.items():
        if not isinstance(layer, SVDQLinear):
            continue
        for producer, reader in v_rows_read_by.items():
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


def set_model_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]], prefix: str = "", *,
                    v_rows_read_by: Mapping[str, str]) -> None:
    """Make `loras` [(lora, strength), ...] the model's whole LoRA list, in stacking order.

    Module names are the model's own with `prefix` removed (e.g. "diffusion_model."). Every
    linear layer not targeted now returns to its original tensors. A LoRA none of whose layers
    is in the model raises LoraError; layers missing from the model are reported in one warning.
    v_rows_read_by: as for `output_divisors`.
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
    set_layer_loras(modules, per_module, prefix, v_rows_read_by=v_rows_read_by)


def set_layer_loras(layers: Mapping[str, nn.Module], per_layer: Mapping[str, Sequence[tuple[LoraDelta, float]]],
                    prefix: str = "", *, v_rows_read_by: Mapping[str, str]) -> None:
    """Make per_layer[name] the LoRA list of every LoRA-capable module in `layers` (name -> module;
    absent from per_layer: none), with the smoothing folds of nunchaku imports accounted for.

    The folds pair layers (v_rows_read_by, as for `output_divisors`), so `layers` holds each
    [q; k; v] layer together with the layer reading it. `prefix` + name labels errors.
    """
    divisors = output_divisors(layers, v_rows_read_by)
    for name, module in layers.items():
        if isinstance(module, LORA_LAYERS):
            set_module_loras(module, per_layer.get(name, []), prefix + name, output_divisor=divisors.get(name))
