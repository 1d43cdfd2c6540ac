"""SVDQuant engine: 4-bit weights and activations plus a 16-bit low-rank branch.

Importable and testable without ComfyUI. Modules: numerics (the numerical definition),
quantize (the SVDQuant algorithm), linear (quantized modules), kernels (dispatch to a
kernel family or the reference), cuda (NVRTC and the CUDA driver: kernels compiled at first use),
families (each kernel family's host side), format (natural safetensors files), nunchaku_format
(nunchaku's packed layer layouts), file_options (a file's run-time choices applied at load), lora
(LoRAs as exact low-rank deltas, applied to quantized layers), synthetic (outlier test data), cli.
Generic parts know no model family; each family is a subpackage with the same parts: flux (FLUX.1:
architecture map, file reading, nunchaku import, forward, whole-model quantizer, LoRA key maps,
tiny models).
"""

__version__ = "0.1.0"
