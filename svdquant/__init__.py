"""SVDQuant engine: 4-bit weights and activations plus a 16-bit low-rank branch.

Importable and testable without ComfyUI. Modules: numerics (the numerical definition),
quantize (the SVDQuant algorithm), linear (quantized modules), kernels (dispatch to a
kernel family or the reference), cuda (NVRTC and the CUDA driver: kernels compiled at first use),
families (each kernel family's host side), format (natural safetensors files), reference_format
(the reference engine's packed layouts), lora (LoRAs on quantized layers), flux (FLUX.1
configuration, layer map, reading FLUX files), flux_model (a FLUX forward), flux_quantize
(quantizing a whole FLUX model), reference_flux (importing the reference engine's FLUX files),
synthetic (test data and tiny models), cli.
"""

__version__ = "0.1.0"
