"""Run-time choices a model file makes for its layers, applied to the loaded model."""

from __future__ import annotations

import torch

from . import linear


def apply_file_options(module: torch.nn.Module, quantization: dict, pow2_activations: bool | None = None,
                       fp8_execution: bool = False) -> None:
    """The file's run-time choices (its `quantization` metadata), applied to every layer of `module`.

    The activation-scale choice (docs/DESIGN.md#scales) is one setting, carried to every W4A4 layer's
    `pow2_activations` here: pow2_activations None means "from the file": power-of-two activation
    scales for a file whose weights have power-of-two scales (quantization["pow2_scales"]), which
    was made to run with them, exact scales for every other file; True or False overrides that for
    every W4A4 layer (True: the faster Hopper activation quantization for any model, nunchaku-format
    ones included, at a slightly larger quantization error; False: the exact one everywhere).
    fp8_execution: every W4A4 layer runs on FP8 tensor cores where it can (docs/DESIGN.md#fp8-execution).
    """
    choice = bool(quantization.get("pow2_scales")) if pow2_activations is None else bool(pow2_activations)
    for layer in module.modules():
        if isinstance(layer, linear.SVDQLinear):
            layer.pow2_activations = choice
            layer.fp8_execution = fp8_execution
