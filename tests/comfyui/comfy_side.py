"""What the ComfyUI tests run inside ComfyUI's own Python (tests/test_comfyui.py starts it with
the ComfyUI checkout as working directory). Commands:

  taesd OUT                      write a TAESD-layout VAE with 16 latent channels, random weights
  load PACK MODEL INPUTS OUT     load MODEL through the pack's loader node code, run ComfyUI's FLUX
                                 on INPUTS (and again after a low-VRAM partial load), write the
                                 outputs and what ComfyUI reports about the model to OUT
"""

import json
import os
import sys

sys.path.insert(0, os.getcwd())
import comfy.cli_args  # noqa: E402

# before ComfyUI reads them at import: the CPU, and PyTorch's attention (what the engine uses)
comfy.cli_args.args.cpu = True
comfy.cli_args.args.use_pytorch_cross_attention = True

import importlib.util  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def taesd(out: str) -> None:
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=16)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, param in vae.state_dict().items():  # ComfyUI leaves these uninitialised
        tensors[name] = torch.ones_like(param) if name == "vae_scale" else \
            torch.zeros_like(param) if name == "vae_shift" else 0.05 * torch.randn(param.shape, generator=gen)
    save_file(tensors, out)


def load(pack: str, model_file: str, inputs_file: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("svdquant_pack", os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from svdquant_pack.nodes.loader import load_svdquant_flux

    patcher = load_svdquant_flux(model_file, torch.bfloat16)
    inputs = load_file(inputs_file)
    diffusion_model = patcher.model.diffusion_model

    def run():
        with torch.no_grad():
            return diffusion_model(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"],
                                   guidance=inputs.get("guidance"))

    outputs = {"full": run()}
    size = patcher.model_size()
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=size // 3)
    # the layers ComfyUI's low-VRAM mode left in offload memory (it marks them so)
    lowvram = [name for name, m in diffusion_model.named_modules() if hasattr(m, "prev_comfy_cast_weights")]
    outputs["lowvram"] = run()
    patcher.unpatch_model(torch.device("cpu"))
    layers = {name: type(m).__name__ for name, m in diffusion_model.named_modules() if hasattr(m, "in_features")}
    facts = {"model_class": type(patcher.model).__name__, "model_type": patcher.model.model_type.name,
             "config_class": type(patcher.model.model_config).__name__,
             "model_size": size, "sampling_buffers": sum(b.numel() * b.element_size()
                                                         for b in patcher.model.model_sampling.buffers()),
             "layers": layers, "lowvram_layers": lowvram}
    save_file({k: v.contiguous() for k, v in outputs.items()}, out, metadata={"facts": json.dumps(facts)})


if __name__ == "__main__":
    {"taesd": taesd, "load": load}[sys.argv[1]](*sys.argv[2:])
