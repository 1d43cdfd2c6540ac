"""FLUX.1: everything the engine knows about one model family, apart from the generic parts.

Modules: arch (configuration, layer map, state-dict checks), files (reading SVDQuant FLUX files),
nunchaku_import (nunchaku-format FLUX files -> the natural layout), model (the engine's own FLUX
forward), fusion (faster equivalent module changes on a loaded model), quantizer (quantizing a whole
FLUX checkpoint), lora_keys (LoRA files -> FLUX module names), synthetic (tiny FLUX models and
inputs for tests and the demo). A second model family is a sibling package with the same parts.
"""

from . import arch, files, fusion, lora_keys, model, nunchaku_import, quantizer, synthetic

__all__ = ["arch", "files", "fusion", "lora_keys", "model", "nunchaku_import", "quantizer", "synthetic"]
