"""SVDQuant engine: 4-bit weights and activations plus a 16-bit low-rank branch.

Importable and testable without ComfyUI. Modules: numerics (the numerical definition),
quantize (the SVDQuant algorithm), linear (quantized modules), kernels (dispatch to the
compiled extension or the reference), format (natural safetensors files), reference_format
(the reference engine's packed layouts), synthetic (test data), cli.
"""

__version__ = "0.1.0"
