"""The pack inside a real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout (skipped otherwise).

ComfyUI runs in its own Python: COMFYUI_PYTHON, else COMFYUI_PATH/.venv/bin/python, else this one.
A server is started headless on 127.0.0.1 with --cpu and a temporary base directory holding this
pack, a test-only node pack (tests/comfyui/test_nodes) and tiny models, so the checkout itself is
not touched.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from svdquant import flux, numerics, quantize
from svdquant import format as fmt
from tiny_flux import REPO, bf16_model, quantized_model

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="COMFYUI_PATH is not set")
HERE = Path(__file__).resolve().parent / "comfyui"
UI_ONLY_NODES = {"Note", "MarkdownNote"}  # frontend-only nodes, absent from /object_info
# relative output error of the tiny model against ComfyUI's FLUX with its dequantized weights: its
# activation quantization (0.032 on 0.3.64 and 0.33); the same weights without the smoothing: 0.17
DENSE_TOLERANCE = 0.05
# relative output error of the tiny model with the pending LayerNorm against PyTorch's LayerNorm and addcmul
# (with two CPU threads 1.3e-4 on 0.3.64, 4.8e-4 on 0.33; 0 on 0.33 with the tests' one thread): one bf16
# rounding apart at most, amplified by the activation codes that flip
PENDING_TOLERANCE = 0.003


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI) / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_comfy_side(*args):
    done = subprocess.run([comfy_python(), str(HERE / "comfy_side.py"), *map(str, args)], cwd=COMFYUI,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def write_call_inputs(path: Path, cfg, seed: int) -> None:
    """One FLUX call's inputs (flux.synthetic's, the bfloat16 timestep 0.7 and guidance 3.5) as a file the
    ComfyUI side reads."""
    noise, context, pooled = flux.synthetic.flux_inputs(cfg, seed=seed, height=24, width=20)
    save_file({"x": noise, "timestep": torch.tensor([0.7]).bfloat16(), "context": context, "y": pooled,
               "guidance": torch.tensor([3.5]).bfloat16()}, str(path))


def comfy_side_result(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the facts (its header's JSON) of a file the ComfyUI side wrote."""
    return load_file(str(path)), json.loads(fmt.read_header(path)["facts"])


def dequantized_state_dict(model: fmt.QuantizedModel) -> dict[str, torch.Tensor]:
    """The model's tensors with each 4-bit layer as the 16-bit weight and bias that compute what it
    computes up to its activation quantization: W4A4 y = Q((x + shift) / smooth) R^T + x D U^T + b
    gives W = R / smooth + U D^T, b + (shift / smooth) R^T (R turned back where the layer rotates);
    W4A16 its dequantized weight."""
    out = {key: t for key, t in model.tensors.items() if key.rpartition(".")[0] not in model.layers}
    for name, layer in model.layers.items():
        t = model.layer_tensors(name)
        assert "smooth_orig" not in t  # a folded smoothing changes the layer's input: not this model's case
        if layer["kind"] == flux.arch.W4A4:
            residual = numerics.dequantize_groups(numerics.unpack_int4(t["qweight"], signed=True), t["wscales"].t())
            unsigned = numerics.unsigned_groups_from_shift(t.get("shift"), residual.shape[1])
            residual = numerics.unrotated_residual(residual, t.get("rotation"), ~unsigned)
            smooth = t["smooth"].float()
            weight = residual / smooth + t["lora_up"].float() @ t["lora_down"].float().t()
            bias = t["bias"].float() if "bias" in t else torch.zeros(weight.shape[0])
            if "shift" in t:
                bias = bias + (t["shift"].float() / smooth) @ residual.t()
        else:
            weight = numerics.dequantize_w4a16(numerics.unpack_int4(t["qweight"], signed=False), t["wscales"],
                                               t["wzeros"])
            bias = t["bias"].float() if "bias" in t else None
        out[f"{name}.weight"] = weight.bfloat16()
        if bias is not None:
            out[f"{name}.bias"] = bias.bfloat16()
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("variant, config_class, model_type",
                         [("dev", "Flux", "FLUX"), ("schnell", "FluxSchnell", "FLOW")])
def test_comfyui_builds_the_model_and_its_4bit_layers_compute_the_reference(tmp_path, variant, config_class,
                                                                           model_type):
    """The file loaded through the loader node's code into ComfyUI's own FLUX (our layers as custom
    operations) gives bit for bit what the same ComfyUI model gives with its 4-bit layers computing
    the numerics definition, also after a low-VRAM partial load; and, up to the activation
    quantization, what the same ComfyUI model class gives with ComfyUI's own operations and the
    dequantized 16-bit weights. Both references run ComfyUI's arithmetic, whatever its version.
    ComfyUI takes the model for the right FLUX.1 variant and counts it at its stored size."""
    path = tmp_path / f"tiny-{variant}.safetensors"
    model = quantized_model(variant == "dev")
    fmt.save_model(path, model)
    save_file(dequantized_state_dict(model), str(tmp_path / "dense.safetensors"))
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    write_call_inputs(tmp_path / "inputs.safetensors", cfg, seed=5)

    run_comfy_side("load", REPO, path, tmp_path / "dense.safetensors", tmp_path / "inputs.safetensors",
                   tmp_path / "out.safetensors")
    outputs, facts = comfy_side_result(tmp_path / "out.safetensors")

    assert torch.equal(outputs["full"], outputs["reference"])
    assert torch.equal(outputs["lowvram"], outputs["reference"])
    assert facts["stock_keys_loaded"] is True
    # the unet config fits this ComfyUI's FluxParams with and without its detection; a field it
    # newly requires that the pack cannot fill is an error naming it
    assert facts["unet_config"]["detected"] is True and facts["unet_config"]["undetected"] is True
    assert facts["unet_config"]["future_field"].startswith(f"{path.name}: this ComfyUI's FLUX needs future_field")
    assert rel_error(outputs["full"], outputs["stock_dense"]) < DENSE_TOLERANCE
    assert (facts["model_class"], facts["config_class"], facts["model_type"]) == ("Flux", config_class, model_type)
    assert {name for name in facts["lowvram_layers"] if name in model.layers}  # some 4-bit layers were left out
    stored = sum(t.numel() * t.element_size() for t in model.tensors.values())
    assert facts["model_size"] == stored + facts["sampling_buffers"]
    kinds = {flux.arch.W4A4: "SVDQLinear", flux.arch.W4A16: "W4A16Linear", flux.arch.DENSE: "Linear"}
    assert facts["layers"] == {name: kinds[spec.kind] for name, spec in flux.arch.linear_layers(cfg).items()}
    # every MLP's GELU runs inside its 4-bit input layer (flux.fusion.fuse_mlp_gelu, fuse_single_block_concat)
    assert facts["gelu_from"] == {**{f"double_blocks.{i}.{stream}_mlp.0": 0 for stream in ("img", "txt")
                                     for i in range(cfg.depth)},
                                  **{f"single_blocks.{i}.linear1": 3 * cfg.hidden_size
                                     for i in range(cfg.depth_single_blocks)}}
    assert facts["gelu_modules"] == []


def test_comfyui_counts_the_fp8_weights_of_layers_in_fp8_execution(tmp_path):
    """ComfyUI's memory management counts the FP8 weights each W4A4 layer in FP8 execution keeps where it
    runs (here the CPU stands in for such a GPU): the model's size, and each module's in a partial load, so
    that under a budget that fits the 4-bit model but not the FP8 weights, layers stay in offload memory
    (and compute the same) and what is loaded, FP8 weights included, fits. 4-bit execution, layers where
    FP8 execution does not run and the saved checkpoint are as without it."""
    path = tmp_path / "tiny-dev.safetensors"
    model = quantized_model(True)
    fmt.save_model(path, model)
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    write_call_inputs(tmp_path / "inputs.safetensors", cfg, seed=7)

    run_comfy_side("fp8_sizing", REPO, path, tmp_path / "inputs.safetensors", tmp_path / "out.safetensors")
    outputs, facts = comfy_side_result(tmp_path / "out.safetensors")

    w4a4 = {name for name, spec in flux.arch.linear_layers(cfg).items() if spec.kind == flux.arch.W4A4}
    fp8_bytes = facts["fp8_bytes"]
    assert set(fp8_bytes) == w4a4
    # each layer's FP8 weights: 1 byte per weight, a float32 scale and a bfloat16 bias per output channel
    assert fp8_bytes["double_blocks.0.img_attn.qkv"] == 3 * cfg.hidden_size * (cfg.hidden_size + 4 + 2)
    size = facts["model_size"]
    assert size["4bit"] == facts["size_where_fp8_does_not_run"]
    assert size["fp8"] == size["4bit"] + sum(fp8_bytes.values()) == facts["clone_size"]
    # the layers are asked where they run: on the load device, with the dtype ComfyUI then gives them
    assert facts["asked"] == [["cpu", facts["input_dtype"]]]
    # the budget fits the 4-bit model whole; in FP8 execution W4A4 layers stay in offload memory and
    # what is loaded, with the FP8 weights of the loaded layers, fits it
    partial = facts["partial"]
    assert partial["4bit"]["lowvram"] is False and partial["4bit"]["offloaded"] == []
    assert partial["fp8"]["lowvram"] is True and set(partial["fp8"]["offloaded"]) & w4a4
    assert set(partial["fp8"]["offloaded"]) & w4a4 != w4a4
    assert partial["fp8"]["loaded_size"] == partial["fp8"]["loaded_modules_size"] <= facts["budget"]
    assert torch.equal(outputs["partial"], outputs["full"])
    # a saved checkpoint holds the file's tensors only
    assert facts["saved"]["fp8"] == facts["saved"]["4bit"]
    assert not [key for key in facts["saved"]["fp8"] if "fp8" in key]


def test_pending_inputs_reach_the_4bit_layers_they_feed(tmp_path):
    """With the pack's pending tensors forced on (the CPU standing in for a GPU), every 4-bit layer fed by
    ComfyUI's LayerNorm + modulation (qkv, the double blocks' first MLP layers, the single blocks' linear1)
    receives it pending, every single block's linear2 its concatenation of the attention output and linear1's
    GELU columns, and each hands it to its kernel, once per call; every layer whose output ComfyUI adds into a
    gated residual stream hands its kernel that residual; the model computes what it computes with them off, up
    to the rounding of the LayerNorm and the modulation (numerics.modulated_layer_norm against PyTorch's LayerNorm
    and addcmul). Under torch.compile nothing stays pending. Not forced, a LayerNorm stays pending where the layer the
    loader gave it as its consumer takes it."""
    path = tmp_path / "tiny-dev.safetensors"
    model = quantized_model(True)
    fmt.save_model(path, model)
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    write_call_inputs(tmp_path / "inputs.safetensors", cfg, seed=8)

    run_comfy_side("pending_inputs", REPO, path, tmp_path / "inputs.safetensors", tmp_path / "out.safetensors")
    outputs, facts = comfy_side_result(tmp_path / "out.safetensors")

    singles = range(cfg.depth_single_blocks)
    normed = [f"double_blocks.{i}.{stream}_{layer}" for i in range(cfg.depth) for stream in ("img", "txt")
              for layer in ("attn.qkv", "mlp.0")] + [f"single_blocks.{i}.linear1" for i in singles]
    concatenated = [f"single_blocks.{i}.linear2" for i in singles]
    fed = sorted([[name, "norm"] for name in normed] + [[name, "concat"] for name in concatenated])
    gated = 4 * cfg.depth + cfg.depth_single_blocks  # attention projections, MLP outputs, linear2
    assert sorted(facts["on"]["received"]) == fed
    assert sorted(facts["on"]["handed"]) == sorted([kind for _, kind in fed] + ["residual"] * gated)
    assert facts["off"] == {"received": [], "handed": []}
    assert facts["compiled_on"]["received"] == []
    assert rel_error(outputs["on"], outputs["off"]) < PENDING_TOLERANCE
    # the loader gives each LayerNorm the layer it feeds; by default it stays pending where that layer takes it
    norm_of = {"img_attn.qkv": "img_norm1", "img_mlp.0": "img_norm2", "txt_attn.qkv": "txt_norm1",
               "txt_mlp.0": "txt_norm2", "linear1": "pre_norm"}
    blocks = [name.split(".", 2) for name in normed]  # double_blocks.3.img_mlp.0 -> double_blocks.3.img_norm2
    assert facts["consumers"] == {f"{kind}.{index}.{norm_of[rest]}": f"{kind}.{index}.{rest}"
                                  for kind, index, rest in blocks}
    taking = [[name, "norm"] for name in normed if not name.startswith("double_blocks.0.")]
    assert sorted(facts["by_consumer"]["received"]) == sorted(taking)
    assert facts["by_consumer"]["handed"] == ["norm"] * len(taking)
    assert rel_error(outputs["by_consumer"], outputs["off"]) < PENDING_TOLERANCE
    assert torch.equal(outputs["compiled_on"], outputs["off"])


# ---------------------------------------------------------------------------------------------
# LoRAs at the tiny model's widths, written in several formats

def _pair(gen, k: int, n: int, rank: int):
    """(A [r, K], B [N, r]) in bf16, small enough to leave the model working, large enough to show."""
    a, b = torch.randn(rank, k, generator=gen), torch.randn(n, rank, generator=gen)
    return (0.1 * a).bfloat16(), (0.1 * b).bfloat16()


def kohya_lora(cfg, seed: int = 1, rank: int = 8) -> dict[str, torch.Tensor]:
    """Kohya keys with alpha, on every 4-bit layer (W4A4 and W4A16) of the model."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in flux.arch.linear_layers(cfg).items():
        if spec.kind != flux.arch.DENSE:
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = _pair(gen, spec.in_features,
                                                                               spec.out_features, rank)
            out[f"{key}.alpha"] = torch.tensor(rank / 2)
    return out


def peft_lora(cfg, seed: int = 2, rank: int = 4) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys: separate q/k/v and proj_mlp parts of the fused layers, some 4-bit layers
    and the 16-bit embedder and final layer (norm_out.linear with diffusers' [scale; shift] order)."""
    gen = torch.Generator().manual_seed(seed)
    h, m = cfg.hidden_size, cfg.mlp_hidden
    modules = {"x_embedder": (cfg.in_channels * 4, h), "proj_out": (h, cfg.out_channels * 4),
               "norm_out.linear": (h, 2 * h)}
    for i in range(cfg.depth):
        modules.update({f"transformer_blocks.{i}.attn.{part}": (h, h) for part in
                        ("to_q", "to_k", "to_v", "add_v_proj", "to_out.0")})
        modules[f"transformer_blocks.{i}.ff.net.2"] = (m, h)
        modules[f"transformer_blocks.{i}.norm1.linear"] = (h, 6 * h)
    for i in range(cfg.depth_single_blocks):
        modules.update({f"single_transformer_blocks.{i}.attn.{part}": (h, h) for part in ("to_q", "to_v")})
        modules[f"single_transformer_blocks.{i}.proj_mlp"] = (h, m)
        modules[f"single_transformer_blocks.{i}.proj_out"] = (h + m, h)
        modules[f"single_transformer_blocks.{i}.norm.linear"] = (h, 3 * h)
    out = {}
    for module, (k, n) in modules.items():
        out[f"transformer.{module}.lora_A.weight"], out[f"transformer.{module}.lora_B.weight"] = _pair(gen, k, n, rank)
    return out


def xlabs_lora(cfg, seed: int = 3, rank: int = 16) -> dict[str, torch.Tensor]:
    """XLabs attention processors (ComfyUI's own loaders do not read these)."""
    gen = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    modules = {}
    for i in range(cfg.depth):
        modules.update({f"double_blocks.{i}.processor.qkv_lora{s}": (h, 3 * h) for s in (1, 2)})
        modules.update({f"double_blocks.{i}.processor.proj_lora{s}": (h, h) for s in (1, 2)})
    for i in range(cfg.depth_single_blocks):
        modules[f"single_blocks.{i}.processor.qkv_lora"] = (h, 3 * h)
        modules[f"single_blocks.{i}.processor.proj_lora"] = (h + cfg.mlp_hidden, h)
    out = {}
    for module, (k, n) in modules.items():
        out[f"{module}.down.weight"], out[f"{module}.up.weight"] = _pair(gen, k, n, rank)
    return out


def unusable_on_4bit_layers(cfg) -> dict[str, dict[str, torch.Tensor]]:
    """Adapters ComfyUI reads that cannot join a low-rank branch, on img_attn.proj: LoKr, a LoRA with
    DoRA magnitudes, a bias difference."""
    h, key = cfg.hidden_size, "lora_unet_double_blocks_0_img_attn_proj"
    pair = dict(zip((f"{key}.lora_down.weight", f"{key}.lora_up.weight"), _pair(torch.Generator().manual_seed(4), h, h, 4)))
    return {"lokr": {f"{key}.lokr_w1": torch.ones(2, 2).bfloat16(),
                     f"{key}.lokr_w2": torch.full((h // 2, h // 2), 0.01).bfloat16()},
            "dora": {**pair, f"{key}.dora_scale": torch.ones(h, 1).bfloat16()},
            "bias": {**pair, f"{key}.diff_b": torch.full((h,), 0.01).bfloat16()}}


def sdxl_lora() -> dict[str, torch.Tensor]:
    """A LoRA for another architecture: no key names a FLUX layer."""
    return {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}


def write_loras(folder: Path, cfg) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in {"kohya": kohya_lora(cfg), "peft": peft_lora(cfg), "xlabs": xlabs_lora(cfg),
                          "sdxl_style": sdxl_lora(), **unusable_on_4bit_layers(cfg)}.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))


@pytest.mark.parametrize("source", ["ours", "reference"])
def test_stock_lora_loader_and_lora_stack_apply_loras_to_the_4bit_layers(tmp_path, source, reference_fixture):
    """LoRAs added by ComfyUI's LoraLoaderModelOnly code and by the LoRA Stack node, loaded by
    ComfyUI's model management, compute what the same ComfyUI model computes with the same LoRAs
    set by the engine (bit for bit where the LoRAs are one pair per layer), with strengths that
    replace rather than add, exact restores, low-VRAM and partial loads, and a named error for an
    adapter that cannot apply.
    Also on a reference-format model, whose folded smoothing the LoRAs must account for."""
    if source == "ours":
        path = tmp_path / "tiny-dev.safetensors"
        fmt.save_model(path, quantized_model(True))
    else:
        path = reference_fixture("reference_flux_tiny.safetensors")
    cfg = flux.files.load_flux(path)[1]
    write_call_inputs(tmp_path / "inputs.safetensors", cfg, seed=6)
    write_loras(tmp_path / "loras", cfg)

    run_comfy_side("lora", REPO, path, tmp_path / "inputs.safetensors", tmp_path / "loras",
                   tmp_path / "out.safetensors")
    out, facts = comfy_side_result(tmp_path / "out.safetensors")

    quantized = {name for name, spec in flux.arch.linear_layers(cfg).items() if spec.kind != flux.arch.DENSE}
    assert facts["weight_keys"] == sorted(f"diffusion_model.{name}.weight" for name in quantized)
    base = out["reference_base"]
    assert torch.equal(out["base"], base)
    # Kohya, one pair per layer: exactly the engine's concatenation, on every 4-bit layer
    assert not torch.equal(out["reference_kohya_1"], base)
    assert torch.equal(out["kohya_1"], out["reference_kohya_1"])
    assert set(facts["lora_ranks_kohya_1"]) == {f"diffusion_model.{name}" for name in quantized}
    assert set(facts["lora_ranks_kohya_1"].values()) == {16, 8}  # W4A4: 8 padded to 16; W4A16: 8
    # strengths replace: 0.5 after 1.0 is a fresh 0.5
    kohya_half = out["reference_kohya_05"]
    assert torch.equal(out["kohya_05_after_1"], kohya_half) and torch.equal(out["kohya_05_fresh"], kohya_half)
    # the model itself again: bit for bit
    assert torch.equal(out["base_again"], base) and torch.equal(out["base_after_error"], base)
    for fact in ("restored_by_base", "restored_by_unload", "restored_by_detach", "restored_after_error",
                 "img_in_patched", "img_in_restored"):
        assert facts[fact] is True, fact
    # diffusers/PEFT with separate q/k/v (ComfyUI's row offsets) and 16-bit layers (ComfyUI's own
    # dense patches): the same LoRA up to float32 summation order
    stacked = out["reference_kohya_05_peft"]
    effect = float((stacked - kohya_half).abs().max())
    assert effect > 0.1
    assert float((out["kohya_05_peft"] - stacked).abs().max()) < 0.02 * effect
    # the LoRA Stack node on top of the stock loader: XLabs keys, composed in order
    with_stack = out["reference_kohya_05_xlabs"]
    assert torch.equal(out["kohya_05_stack_xlabs"], with_stack)
    assert not torch.equal(with_stack, kohya_half)
    # ComfyUI's low-VRAM path: 4-bit layers left in offload memory still carry their LoRAs
    assert facts["lowvram"]["model_lowvram"] is True and facts["lowvram"]["offloaded_quantized"]
    assert set(facts["lowvram"]["lora_ranks"]) == {f"diffusion_model.{name}" for name in quantized}
    assert torch.equal(out["lowvram"], with_stack) and torch.equal(out["after_partial_unload"], with_stack)
    # what cannot join the low-rank branch: an error naming the layer (and the model restored)
    layer = "UnsupportedPatchError: diffusion_model.double_blocks.0.img_attn.proj"
    assert facts["errors"]["lokr"].startswith(f"{layer}: a LoKr patch cannot be applied")
    assert facts["errors"]["dora"].startswith(f"{layer}: a DoRA patch cannot be applied")
    assert facts["errors"]["bias"].startswith(f"{layer}: a patch of its bias cannot be applied")


# ---------------------------------------------------------------------------------------------
# A running ComfyUI server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, base: Path):
        self.url, self.base = url, base

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue a prompt that ComfyUI accepts and wait for its history entry."""
        status, reply = self.post_prompt(prompt)
        assert status == 200 and not reply.get("node_errors"), reply
        return self.wait(reply["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a queued prompt, once it has finished."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-svdquant").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "svdquant_test_nodes").symlink_to(HERE / "test_nodes", target_is_directory=True)
    models = base / "models"
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True)
    for variant, guidance in (("schnell", False), ("dev", True)):
        fmt.save_model(models / "diffusion_models" / f"tiny-{variant}.safetensors", quantized_model(guidance))
        # under the names the example workflows use, so their file choices validate too
        shutil.copy(models / "diffusion_models" / f"tiny-{variant}.safetensors",
                    models / "diffusion_models" / f"svdq-int4_r32-flux.1-{variant}.safetensors")
    good = (models / "diffusion_models" / "tiny-schnell.safetensors").read_bytes()
    (models / "diffusion_models" / "truncated.safetensors").write_bytes(good[:len(good) // 2])
    save_file({"weight": torch.zeros(4, 4)}, str(models / "diffusion_models" / "not-flux.safetensors"))
    tiny = models / "diffusion_models" / "tiny-schnell.safetensors"
    save_file(load_file(str(tiny)), str(models / "diffusion_models" / "version-99.safetensors"),
              metadata={**fmt.read_header(tiny), "format_version": "99"})
    (models / "diffusion_models" / "pickled.ckpt").write_bytes(b"never read")
    write_loras(models / "loras", flux.arch.FluxConfig.from_dict(quantized_model(True).model_config))
    # the example LoRA workflow's file name, so its choice validates too
    shutil.copy(models / "loras" / "kohya.safetensors", models / "loras" / "your_flux_lora.safetensors")
    for name in ("clip_l.safetensors", "t5xxl_fp16.safetensors"):  # listed for validation, never loaded
        (models / "text_encoders" / name).write_bytes(b"")
    # the quantize workflow's choice: a 16-bit FLUX.1 dev checkpoint (the tiny one), which the
    # Quantizer lists
    save_file(bf16_model(True)[1], str(models / "diffusion_models" / "flux1-dev.safetensors"))
    (models / "vae" / "ae.safetensors").write_bytes(b"")
    run_comfy_side("taesd", models / "vae" / "taesd16.safetensors")

    port = _free_port()
    log = open(base / "comfyui.log", "w")
    process = subprocess.Popen(
        [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--use-pytorch-cross-attention", "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
        cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, (base / "comfyui.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/object_info/KSampler", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "ComfyUI did not start in 180 s"
                time.sleep(1)
        yield Server(url, base)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def test_loader_node_in_object_info(server):
    info = server.get("/object_info/SVDQuantFluxLoader")["SVDQuantFluxLoader"]
    assert info["display_name"] == "SVDQuant FLUX Loader" and info["category"] == "SVDQuant"
    assert info["output"] == ["MODEL"]
    required = info["input"]["required"]
    assert list(required) == ["model_name", "dtype", "device"]
    files = required["model_name"][1]["options"]
    assert {"tiny-schnell.safetensors", "tiny-dev.safetensors", "svdq-int4_r32-flux.1-dev.safetensors"} <= set(files)
    # only files the loader reads are offered: not other safetensors (a 16-bit FLUX.1, a newer
    # format version) or pickles
    assert not set(files) & {"not-flux.safetensors", "version-99.safetensors", "flux1-dev.safetensors",
                             "pickled.ckpt"}
    assert required["dtype"][1]["options"] == ["bfloat16", "float16"]
    assert required["device"][1]["options"][:2] == ["default", "cpu"]
    assert all(spec[1].get("tooltip") for spec in required.values())
    scales = info["input"]["optional"]["activation_scales"]
    assert scales[1]["options"] == ["from file", "power-of-two", "exact"] and scales[1]["default"] == "from file"
    assert scales[1].get("tooltip")
    execution = info["input"]["optional"]["execution"]
    assert execution[1]["options"] == ["4-bit", "FP8 (H100/H200)"] and execution[1]["default"] == "4-bit"
    assert execution[1].get("tooltip")
    assert "SVDQuantTestConditioning" in server.get("/object_info")
    # one start-up line says which kernels the 4-bit layers will use (here: none, a CPU-only run)
    lines = [line for line in (server.base / "comfyui.log").read_text().splitlines() if "svdquant: device: " in line]
    assert len(lines) == 1 and "W4A4 linear: reference (no CUDA GPU visible" in lines[0], lines


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI (graph) workflow as an API prompt, checking it against /object_info on the way: every
    node type exists, every widget value is valid, every link joins matching types."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES:
            continue
        assert node["type"] in object_info, f"node type {node['type']} is unknown to ComfyUI"
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        linked = {slot["name"]: slot["link"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        inputs, values = {}, list(node.get("widgets_values", []))
        for name in order:
            kind, options = specs[name][0], specs[name][1] if len(specs[name]) > 1 else {}
            if name in linked:
                link = links[linked[name]]
                assert link[5] == kind, f"{node['type']}.{name}: a {link[5]} link into a {kind} input"
                inputs[name] = [str(link[1]), link[2]]
                continue
            if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not isinstance(kind, list):
                assert name not in info["input"].get("required", {}), f"{node['type']}.{name} is not connected"
                continue
            value = values.pop(0)
            choices = kind if isinstance(kind, list) else options.get("options")
            if choices is not None:
                assert value in choices, f"{node['type']}.{name}: {value!r} is not one of {choices}"
            if kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), f"{node['type']}.{name}"
            inputs[name] = value
            if options.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"{node['type']}: widget values left over: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("name", ["flux.1-schnell.json", "flux.1-schnell-4bit-t5.json", "flux.1-dev.json",
                                  "flux.1-dev-lora.json", "quantize-flux.1-dev.json"])
def test_workflows_validate_in_comfyui_and_are_templates(server, name):
    workflow = json.loads((REPO / "workflows" / name).read_text())
    prompt = ui_to_api(workflow, server.get("/object_info"))
    # ComfyUI's own validation accepts it (it then runs until the empty placeholder text encoders)
    status, reply = server.post_prompt(prompt)
    assert status == 200 and not reply["node_errors"], reply
    templates = server.get("/workflow_templates")
    assert sorted(templates["comfyui-svdquant"]) == ["flux.1-dev", "flux.1-dev-lora", "flux.1-schnell",
                                                     "flux.1-schnell-4bit-t5", "quantize-flux.1-dev"]
    assert server.get(f"/api/workflow_templates/comfyui-svdquant/{name}") == workflow
    # the card's thumbnail, where ComfyUI's frontend looks for it
    thumbnail = name.replace(".json", ".jpg")
    with urllib.request.urlopen(f"{server.url}/api/workflow_templates/comfyui-svdquant/{thumbnail}") as response:
        assert response.read() == (REPO / "workflows" / thumbnail).read_bytes()


def sampling_prompt(model_name: str, guidance: float | None, prefix: str, dtype: str = "bfloat16",
                    activation_scales: str | None = None, execution: str | None = None) -> dict:
    prompt = {
        "1": {"class_type": "SVDQuantFluxLoader", "inputs": {"model_name": model_name, "dtype": dtype,
                                                              "device": "default"}},
        "2": {"class_type": "SVDQuantTestConditioning", "inputs": {"seed": 1, "tokens": 8}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd16.safetensors"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if activation_scales is not None:
        prompt["1"]["inputs"]["activation_scales"] = activation_scales
    if execution is not None:
        prompt["1"]["inputs"]["execution"] = execution
    if guidance is not None:
        prompt["9"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": guidance}}
        prompt["5"]["inputs"]["positive"] = ["9", 0]
    return prompt


@pytest.mark.parametrize("model_name, guidance, dtype", [("tiny-schnell.safetensors", None, "bfloat16"),
                                                         ("tiny-schnell.safetensors", None, "float16"),
                                                         ("tiny-dev.safetensors", 3.5, "bfloat16"),
                                                         ("reference_flux_tiny.safetensors", 3.5, "bfloat16")])
def test_a_prompt_samples_a_quantized_model_to_a_saved_image(server, model_name, guidance, dtype, reference_fixture):
    if model_name == "reference_flux_tiny.safetensors":  # a nunchaku-format file, imported on load
        shutil.copy(reference_fixture(model_name), server.base / "models" / "diffusion_models")
    prefix = f"svdquant_{Path(model_name).stem}_{dtype}"
    entry = server.run(sampling_prompt(model_name, guidance, prefix, dtype))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith(prefix)
    saved = server.base / "output" / images[0]["subfolder"] / images[0]["filename"]
    assert saved.stat().st_size > 0


def test_torch_compile_model_node_samples_a_quantized_model(server):
    """ComfyUI's TorchCompileModel (Inductor) on the loader's model: each 4-bit layer is one call of the
    pack's operator (svdquant.linear.OPERATOR), the model compiles around them, and the prompt saves an image."""
    prompt = sampling_prompt("tiny-schnell.safetensors", None, "svdquant_compiled")
    prompt["10"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}}
    prompt["5"]["inputs"]["model"] = ["10", 0]
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["8"]["images"][0]["filename"].startswith("svdquant_compiled")


@pytest.mark.parametrize("activation_scales", ["power-of-two", "exact"])
def test_the_loader_takes_an_activation_scale_choice(server, activation_scales):
    entry = server.run(sampling_prompt("tiny-schnell.safetensors", None, f"svdquant_scales_{activation_scales}",
                                       activation_scales=activation_scales))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_the_loader_takes_fp8_execution(server):
    # without an H100 the layers run as stored (the CPU here): the choice loads and samples
    entry = server.run(sampling_prompt("tiny-dev.safetensors", 3.5, "svdquant_fp8", execution="FP8 (H100/H200)"))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_a_bad_file_is_a_comfyui_error_naming_the_file(server):
    """A file whose header looks right but whose data is cut short: the loader's error names it."""
    entry = server.run(sampling_prompt("truncated.safetensors", None, "never"))
    assert entry["status"]["status_str"] == "error"
    error = next(message[1] for message in entry["status"]["messages"] if message[0] == "execution_error")
    assert error["node_type"] == "SVDQuantFluxLoader"
    assert error["exception_message"].startswith("truncated.safetensors: not a readable safetensors file")
    assert server.get("/object_info/SVDQuantFluxLoader")  # ComfyUI is still up


@pytest.mark.parametrize("model_name, problem", [
    ("not-flux.safetensors", "not an SVDQuant FLUX model"),
    ("version-99.safetensors", "unsupported format version '99'"),
    ("flux1-dev.safetensors", "not an SVDQuant FLUX model"),
    ("svdq-int4_r32-flux.1-missing.safetensors", "not found in models/diffusion_models")])
def test_a_file_the_loader_cannot_read_is_refused_before_the_prompt_runs(server, model_name, problem):
    """ComfyUI's validation of the prompt (the loader's validate_inputs) names the file and why."""
    status, reply = server.post_prompt(sampling_prompt(model_name, None, "never"))
    assert status == 400
    (error,) = reply["node_errors"]["1"]["errors"]
    assert error["extra_info"]["input_name"] == "model_name"
    assert error["details"].startswith(f"model_name - {model_name}: {problem}")


def test_lora_stack_node_in_object_info(server):
    info = server.get("/object_info/SVDQuantLoraStack")["SVDQuantLoraStack"]
    assert info["display_name"] == "SVDQuant LoRA Stack" and info["category"] == "SVDQuant"
    assert info["output"] == ["MODEL"]
    required = info["input"]["required"]
    assert list(required) == ["model"] + [f"{kind}_{slot}" for slot in range(1, 5) for kind in ("lora", "strength")]
    files = required["lora_1"][1]["options"]
    assert files[0] == "None" and {"kohya.safetensors", "xlabs.safetensors", "sdxl_style.safetensors"} <= set(files)
    assert required["strength_1"][1]["default"] == 1.0
    assert all(spec[1].get("tooltip") for spec in required.values())


def with_loras(prompt: dict, *nodes: tuple[str, dict]) -> dict:
    """The sampling prompt with LoRA nodes [(class_type, widget inputs)] chained between the model
    loader and the sampler, in order."""
    source = ["1", 0]
    for i, (class_type, inputs) in enumerate(nodes):
        node_id = str(20 + i)
        prompt[node_id] = {"class_type": class_type, "inputs": {"model": source, **inputs}}
        source = [node_id, 0]
    prompt["5"]["inputs"]["model"] = source
    return prompt


def stack_inputs(*entries: tuple[str, float]) -> dict:
    inputs = {}
    for slot in range(1, 5):
        name, strength = entries[slot - 1] if slot <= len(entries) else ("None", 1.0)
        inputs[f"lora_{slot}"], inputs[f"strength_{slot}"] = name, strength
    return inputs


def test_a_prompt_with_the_stock_lora_loader_and_the_lora_stack_samples_an_image(server):
    prompt = with_loras(sampling_prompt("tiny-dev.safetensors", 3.5, "svdquant_lora"),
                        ("LoraLoaderModelOnly", {"lora_name": "kohya.safetensors", "strength_model": 0.8}),
                        ("SVDQuantLoraStack", stack_inputs(("xlabs.safetensors", 0.5), ("peft.safetensors", -0.5))))
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["8"]["images"][0]["filename"].startswith("svdquant_lora")


def test_a_lora_matching_nothing_is_an_error_in_the_stack_and_a_warning_in_the_stock_loader(server):
    entry = server.run(with_loras(sampling_prompt("tiny-schnell.safetensors", None, "never"),
                                  ("SVDQuantLoraStack", stack_inputs(("sdxl_style.safetensors", 1.0)))))
    assert entry["status"]["status_str"] == "error"
    error = next(message[1] for message in entry["status"]["messages"] if message[0] == "execution_error")
    assert error["node_type"] == "SVDQuantLoraStack"
    assert error["exception_message"].startswith("sdxl_style.safetensors: no key names a FLUX layer")

    entry = server.run(with_loras(sampling_prompt("tiny-schnell.safetensors", None, "svdquant_sdxl_lora"),
                                  ("LoraLoaderModelOnly", {"lora_name": "sdxl_style.safetensors",
                                                           "strength_model": 1.0})))
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = (server.base / "comfyui.log").read_text()
    assert "lora key not loaded: lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in log  # ComfyUI's warning


def test_an_adapter_that_cannot_join_the_low_rank_branch_is_an_error_naming_the_layer(server):
    entry = server.run(with_loras(sampling_prompt("tiny-schnell.safetensors", None, "never"),
                                  ("LoraLoaderModelOnly", {"lora_name": "lokr.safetensors", "strength_model": 1.0})))
    assert entry["status"]["status_str"] == "error"
    error = next(message[1] for message in entry["status"]["messages"] if message[0] == "execution_error")
    assert error["exception_type"].endswith("UnsupportedPatchError")
    assert "diffusion_model.double_blocks.0.img_attn.proj: a LoKr patch cannot be applied" in error["exception_message"]
    entry = server.run(sampling_prompt("tiny-schnell.safetensors", None, "svdquant_after_lokr"))
    assert entry["status"]["status_str"] == "success", entry["status"]  # ComfyUI keeps working


# ---------------------------------------------------------------------------------------------
# The Quantizer node

def test_quantizer_node_in_object_info(server):
    info = server.get("/object_info/SVDQuantFluxQuantizer")["SVDQuantFluxQuantizer"]
    assert info["display_name"] == "SVDQuant FLUX Quantizer" and info["category"] == "SVDQuant"
    assert info["output_node"] is True and info["output"] == ["STRING"]
    required = info["input"]["required"]
    assert list(required) == ["model_name", "output_name", "rank", "pow2_scales", "calibration_calls",
                              "learned_smoothing"]
    # only 16-bit FLUX.1 checkpoints are offered: not 4-bit files, other safetensors or pickles
    files = set(required["model_name"][1]["options"])
    assert "flux1-dev.safetensors" in files
    assert not files & {"tiny-schnell.safetensors", "not-flux.safetensors", "pickled.ckpt"}
    assert {key: required["rank"][1][key] for key in ("default", "min", "max", "step")} == \
        {"default": 32, "min": 16, "max": 256, "step": 16}
    assert required["pow2_scales"][1]["default"] is False
    assert (required["calibration_calls"][1]["min"], required["calibration_calls"][1]["max"]) == (1, 16)
    assert required["learned_smoothing"][1]["default"] is False
    assert all(spec[1].get("tooltip") for spec in required.values())
    optional = info["input"]["optional"]
    assert list(optional) == ["rotation", "calibration_prompts"] and optional["calibration_prompts"][0] == "CONDITIONING"
    assert optional["rotation"][1]["options"] == ["none", "hadamard", "learned"]
    assert optional["rotation"][1]["default"] == "hadamard" and optional["rotation"][1].get("tooltip")
    assert optional["calibration_prompts"][1].get("tooltip")


def quantizer_prompt(model_name: str, output_name: str = "", pow2_scales: bool = False,
                     prompts: dict | None = None, learned_smoothing: bool = False) -> dict:
    """The Quantizer node; prompts: inputs of a test conditioning node wired to calibration_prompts."""
    prompt = {"1": {"class_type": "SVDQuantFluxQuantizer",
                    "inputs": {"model_name": model_name, "output_name": output_name, "rank": 32,
                               "pow2_scales": pow2_scales, "calibration_calls": 2,
                               "learned_smoothing": learned_smoothing}}}
    if prompts is not None:
        prompt["2"] = {"class_type": "SVDQuantTestConditioning", "inputs": {"seed": 3, "tokens": 16, **prompts}}
        prompt["1"]["inputs"]["calibration_prompts"] = ["2", 0]
    return prompt


def test_the_quantizer_node_writes_a_file_the_loader_samples(server):
    """A 16-bit dev checkpoint (ComfyUI checkpoint keys) in diffusion_models -> the Quantizer node ->
    a file in models/diffusion_models that the engine reads as dev with power-of-two scales, and that a
    prompt with the loader node samples to an image; the node refuses to overwrite it."""
    cfg, tensors = bf16_model(True)
    models = server.base / "models" / "diffusion_models"
    save_file({f"model.diffusion_model.{key}": t for key, t in tensors.items()},
              str(models / "flux1-tiny-dev.safetensors"))
    entry = server.run(quantizer_prompt("flux1-tiny-dev.safetensors", pow2_scales=True, prompts={},
                                        learned_smoothing=True))
    assert entry["status"]["status_str"] == "success", entry["status"]
    name = "svdq-int4_r32-pow2-flux1-tiny-dev.safetensors"
    assert entry["outputs"]["1"]["text"][0].startswith(f"{name}: 26 quantized layers, ")
    model, file_cfg = flux.files.load_flux(models / name)
    assert file_cfg == cfg and model.quantization["pow2_scales"] is True
    assert model.quantization["calibration_calls"] == 2 and model.quantization["calibration_prompts"] == 1
    assert model.quantization["smoothing_steps"] == quantize.LEARNED_SMOOTHING_STEPS
    assert not list(models.glob("*.partial"))

    entry = server.run(sampling_prompt(name, 3.5, "svdquant_quantized_here"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["8"]["images"][0]["filename"].startswith("svdquant_quantized_here")

    # an input that is already quantized is not offered; ComfyUI versions that check a V3 combo's
    # value against its options refuse it (0.33), others run the node, which names the problem (0.3.64)
    status, reply = server.post_prompt(quantizer_prompt("tiny-schnell.safetensors"))
    if status == 400:
        assert reply["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "model_name"
    else:
        entry = server.wait(reply["prompt_id"])
        error = next(message[1] for message in entry["status"]["messages"] if message[0] == "execution_error")
        assert error["exception_message"].startswith("tiny-schnell.safetensors: already an SVDQuant 4-bit model")
    # an existing output (named without the suffix) and calibration prompts without the pooled CLIP
    # output: named errors
    for model_name, output_name, prompts, problem in (
            ("flux1-tiny-dev.safetensors", "tiny-schnell", None, "tiny-schnell.safetensors: already exists"),
            ("flux1-tiny-dev.safetensors", "unpooled", {"pooled": False},
             "calibration_prompts: a conditioning without the pooled CLIP-L output")):
        entry = server.run(quantizer_prompt(model_name, output_name, prompts=prompts))
        assert entry["status"]["status_str"] == "error"
        error = next(message[1] for message in entry["status"]["messages"] if message[0] == "execution_error")
        assert error["node_type"] == "SVDQuantFluxQuantizer" and error["exception_message"].startswith(problem)
    assert fmt.read_header(models / "tiny-schnell.safetensors")["format"] == "svdquant"  # not overwritten
    assert not (models / "unpooled.safetensors").exists()


def test_t5_operations_load_the_t5_in_four_bits(tmp_path):
    """ComfyUI's own T5 encoder built with the pack's text-encoder operations (at a small width, with
    the quantization threshold lowered to it): every linear loads as 4-bit weights, from bf16 and
    from ComfyUI's scaled fp8 layout, computes what the dense model with the dequantized weights
    computes, and the model takes under a third of its dense size."""
    out = tmp_path / "t5.safetensors"
    run_comfy_side("t5", REPO, out)
    outputs, facts = comfy_side_result(out)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    for tag in ("bf16", "fp8"):
        assert facts[tag]["missing"] == []
        assert set(facts[tag]["layers"].values()) == {"W4A16Linear"}
        assert rel(outputs[f"{tag}_quantized"], outputs[f"{tag}_dequantized"]) <= 5e-3
        assert rel(outputs[f"{tag}_quantized"], outputs[f"{tag}_original"]) <= 0.15
        assert facts[tag]["bytes"] < facts["dense_bytes"] / 3


def test_text_encoder_node_in_object_info_and_bad_files(server):
    info = server.get("/object_info/SVDQuantFluxTextEncoders")["SVDQuantFluxTextEncoders"]
    assert info["display_name"] == "SVDQuant FLUX Text Encoders (4-bit T5)" and info["category"] == "SVDQuant"
    assert info["output"] == ["CLIP"]
    required = info["input"]["required"]
    assert list(required) == ["clip_name", "t5_name", "device"]
    assert {"clip_l.safetensors", "t5xxl_fp16.safetensors"} <= set(required["t5_name"][1]["options"])
    assert all(spec[1].get("tooltip") for spec in required.values())
    # the fixture's text-encoder files are empty: an error naming the file, and ComfyUI keeps running
    entry = server.run({"1": {"class_type": "SVDQuantFluxTextEncoders",
                              "inputs": {"clip_name": "clip_l.safetensors", "t5_name": "t5xxl_fp16.safetensors",
                                         "device": "cpu"}},
                        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert entry["status"]["status_str"] == "error"
    error = next(message[1] for message in entry["status"]["messages"] if message[0] == "execution_error")
    assert "clip_l.safetensors: not a readable safetensors file" in error["exception_message"]
    assert server.get("/object_info/KSampler")
