"""The pack imports outside ComfyUI and the engine runs with no extension built."""

import importlib.util
import inspect
import subprocess
import sys

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pack_imports_outside_comfyui():
    spec = importlib.util.spec_from_file_location("comfyui_svdquant", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        # V3 nodes: ComfyUI awaits comfy_entrypoint, and would ignore it beside NODE_CLASS_MAPPINGS
        assert inspect.iscoroutinefunction(module.comfy_entrypoint)
        assert not hasattr(module, "NODE_CLASS_MAPPINGS")
        assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    finally:
        del sys.modules[spec.name]


def test_forward_without_kernels():
    """Where no kernels can run (a CPU, no NVRTC) the engine falls back to the reference and says so once."""
    code = (
        "import os; os.environ['SVDQUANT_NVRTC'] = os.devnull\n"
        "import torch\n"
        "from svdquant import kernels, quantize\n"
        "from svdquant.linear import SVDQLinear\n"
        "assert kernels.w4a4_kernels_on(torch.device('cpu')) is None\n"
        "w, x = torch.randn(128, 128), torch.randn(8, 128)\n"
        "layer = SVDQLinear.from_tensors(quantize.quantize_linear(w, None, x, rank=16, alphas=(0.5,)).as_dict())\n"
        "y = layer(x.bfloat16()); layer(x.bfloat16())\n"
        "assert y.shape == (8, 128) and torch.isfinite(y).all()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("using the PyTorch reference path") == 1


def test_a_torch_without_custom_operators_is_refused_with_the_version_it_needs():
    """The quantized layers are a torch.library custom operator under torch.compile (svdquant.linear):
    on a torch before 2.4 the pack's import fails with one line saying which torch it needs."""
    code = (
        "import torch\n"
        "del torch.library.custom_op\n"
        "try:\n"
        "    import svdquant.linear\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.startswith("the pack needs torch 2.4 or newer (this is torch "), done.stdout + done.stderr
