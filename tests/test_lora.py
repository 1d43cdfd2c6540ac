"""LoRA reading (every format -> the same per-module deltas) and applying (exact, removable, no leaks).

Everything runs at tiny FLUX widths: hidden 256 (2 heads of 128), MLP 1024, one double-stream and
one single-stream block. Exactness tests use dyadic values (small integers times powers of two)
whose every product and partial sum is exact in float32, so the engine's float32 path and an
independent float64 formula must agree bit for bit.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from svdquant import numerics
from svdquant.format import FormatError
from svdquant.linear import SVDQLinear, W4A16Linear
from svdquant.flux.arch import V_ROWS_READ_BY
from svdquant.flux.lora_keys import convert_lora, load_lora
from svdquant.lora import MAX_RANK, LoraDelta, LoraError, set_model_loras, set_module_loras

H, MLP = 256, 1024
RANK = 32  # the quantized layers' own low-rank branch

# Every LoRA-capable FLUX module at tiny widths: name -> (in K, out N, kind).
TINY_FLUX = {
    "img_in": (64, H, "bf16"), "txt_in": (4096, H, "bf16"),
    "time_in.in_layer": (256, H, "bf16"), "time_in.out_layer": (H, H, "bf16"),
    "vector_in.in_layer": (768, H, "bf16"), "vector_in.out_layer": (H, H, "bf16"),
    "guidance_in.in_layer": (256, H, "bf16"), "guidance_in.out_layer": (H, H, "bf16"),
    "final_layer.linear": (H, 64, "bf16"), "final_layer.adaLN_modulation.1": (H, 2 * H, "bf16"),
    **{f"double_blocks.0.{s}_{name}": shape for s in ("img", "txt") for name, shape in {
        "attn.qkv": (H, 3 * H, "w4a4"), "attn.proj": (H, H, "w4a4"), "mlp.0": (H, MLP, "w4a4"),
        "mlp.2": (MLP, H, "w4a4"), "mod.lin": (H, 6 * H, "w4a16")}.items()},
    "single_blocks.0.linear1": (H, 3 * H + MLP, "w4a4"), "single_blocks.0.linear2": (H + MLP, H, "w4a4"),
    "single_blocks.0.modulation.lin": (H, 3 * H, "w4a16"),
}

# ComfyUI/BFL module -> diffusers module, for the unfused ones.
DIFFUSERS_NAME = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
    "double_blocks.0.txt_attn.proj": "transformer_blocks.0.attn.to_add_out",
    "double_blocks.0.img_mlp.0": "transformer_blocks.0.ff.net.0.proj",
    "double_blocks.0.img_mlp.2": "transformer_blocks.0.ff.net.2",
    "double_blocks.0.txt_mlp.0": "transformer_blocks.0.ff_context.net.0.proj",
    "double_blocks.0.txt_mlp.2": "transformer_blocks.0.ff_context.net.2",
    "double_blocks.0.img_mod.lin": "transformer_blocks.0.norm1.linear",
    "double_blocks.0.txt_mod.lin": "transformer_blocks.0.norm1_context.linear",
    "single_blocks.0.linear2": "single_transformer_blocks.0.proj_out",
    "single_blocks.0.modulation.lin": "single_transformer_blocks.0.norm.linear",
}
# Fused ComfyUI modules -> their diffusers parts with (first row, rows).
DIFFUSERS_PARTS = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0, H), ("transformer_blocks.0.attn.to_k", H, H),
                                     ("transformer_blocks.0.attn.to_v", 2 * H, H)],
    "double_blocks.0.txt_attn.qkv": [("transformer_blocks.0.attn.add_q_proj", 0, H),
                                     ("transformer_blocks.0.attn.add_k_proj", H, H),
                                     ("transformer_blocks.0.attn.add_v_proj", 2 * H, H)],
    "single_blocks.0.linear1": [("single_transformer_blocks.0.attn.to_q", 0, H),
                                ("single_transformer_blocks.0.attn.to_k", H, H),
                                ("single_transformer_blocks.0.attn.to_v", 2 * H, H),
                                ("single_transformer_blocks.0.proj_mlp", 3 * H, MLP)],
}


def dyadic(gen: torch.Generator, shape, low: int, high: int, exponent: int) -> torch.Tensor:
    """Integers in [low, high] times 2**exponent (exact in bf16 for |integers| <= 256)."""
    return torch.randint(low, high + 1, shape, generator=gen).float() * 2.0 ** exponent


def powers_of_two(gen: torch.Generator, shape, low: int, high: int) -> torch.Tensor:
    return 2.0 ** torch.randint(low, high + 1, shape, generator=gen).float()


# ---------------------------------------------------------------------------------------------
# Canonical LoRAs and the formats they are written in

def canonical_lora(seed: int = 0, rank: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """ComfyUI/BFL module -> (A [r, K], B [N, r], alpha) for every module, values exact in bf16.

    alpha = r / 2, so alpha / r is a power of two and folding it commutes with rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (k, n, _) in TINY_FLUX.items():
        a = (torch.randn(rank, k, generator=gen) * 0.1).bfloat16().float()
        b = (torch.randn(n, rank, generator=gen) * 0.1).bfloat16().float()
        out[name] = (a, b, rank / 2)
    return out


def expected_deltas(canon) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: ((a * (alpha / a.shape[0])).t(), b) for name, (a, b, alpha) in canon.items()}


def kohya(canon, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b, alpha) in canon.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = a.to(dtype)
        out[f"{key}.lora_up.weight"] = b.to(dtype)
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def comfy_native(canon, down: str, up: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b, alpha) in canon.items():
        out[f"diffusion_model.{name}.{down}.weight"] = a.bfloat16()
        out[f"diffusion_model.{name}.{up}.weight"] = b.bfloat16()
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    return out


def diffusers_modules(canon):
    """(diffusers module, A, B part, alpha) for every module: fused ones split into their parts
    sharing A (as converters from fused formats write them), the final layer's halves swapped."""
    for name, (a, b, alpha) in canon.items():
        if name in DIFFUSERS_PARTS:
            for part, first, rows in DIFFUSERS_PARTS[name]:
                yield part, a, b[first:first + rows], alpha
        elif name == "final_layer.adaLN_modulation.1":  # diffusers' norm_out.linear is [scale; shift]
            yield "norm_out.linear", a, torch.cat((b[H:], b[:H])), alpha
        else:
            yield DIFFUSERS_NAME[name], a, b, alpha


def peft(canon) -> dict[str, torch.Tensor]:
    """diffusers/PEFT: no alpha in the file, so it is folded into A (exact: a power of two)."""
    out = {}
    for module, a, b, alpha in diffusers_modules(canon):
        out[f"transformer.{module}.lora_A.weight"] = (a * (alpha / a.shape[0])).bfloat16()
        out[f"transformer.{module}.lora_B.weight"] = b.bfloat16()
    return out


def kohya_diffusers_names(canon) -> dict[str, torch.Tensor]:
    out = {}
    for module, a, b, alpha in diffusers_modules(canon):
        key = "lora_transformer_" + module.replace(".", "_")
        out[f"{key}.lora_down.weight"] = a.bfloat16()
        out[f"{key}.lora_up.weight"] = b.bfloat16()
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


XLABS_MODULES = {
    "double_blocks.0.img_attn.qkv": "double_blocks.0.processor.qkv_lora1",
    "double_blocks.0.img_attn.proj": "double_blocks.0.processor.proj_lora1",
    "double_blocks.0.txt_attn.qkv": "double_blocks.0.processor.qkv_lora2",
    "double_blocks.0.txt_attn.proj": "double_blocks.0.processor.proj_lora2",
    "single_blocks.0.linear1": "single_blocks.0.processor.qkv_lora",  # the attention rows only
    "single_blocks.0.linear2": "single_blocks.0.processor.proj_lora",
}


def xlabs_canonical(seed: int = 0):
    """The canonical LoRA restricted to what XLabs files hold: attention layers, and of linear1
    only its q/k/v rows (the MLP rows' B is zero)."""
    full = canonical_lora(seed)
    canon = {name: full[name] for name in XLABS_MODULES}
    a, b, alpha = canon["single_blocks.0.linear1"]
    b = b.clone()
    b[3 * H:] = 0
    canon["single_blocks.0.linear1"] = (a, b, alpha)
    return canon


def xlabs(canon) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b, alpha) in canon.items():
        if name == "single_blocks.0.linear1":
            b = b[:3 * H]
        out[f"{XLABS_MODULES[name]}.down.weight"] = (a * (alpha / a.shape[0])).bfloat16()
        out[f"{XLABS_MODULES[name]}.up.weight"] = b.bfloat16()
    return out


def assert_deltas_equal(lora, expected) -> None:
    assert sorted(lora.deltas) == sorted(expected)
    for name, (down, up) in expected.items():
        delta = lora.deltas[name]
        assert torch.equal(delta.down, down), name
        assert torch.equal(delta.up, up), name


# ---------------------------------------------------------------------------------------------
# Reading

@pytest.mark.parametrize("writer", [
    kohya,
    kohya_diffusers_names,
    peft,
    lambda canon: comfy_native(canon, "lora_down", "lora_up"),
    lambda canon: comfy_native(canon, "lora_A", "lora_B"),
], ids=["kohya", "kohya-diffusers-names", "diffusers-peft", "comfyui-lora_down", "comfyui-bfl-lora_A"])
def test_every_format_converts_to_the_same_deltas(tmp_path, writer):
    canon = canonical_lora()
    path = tmp_path / "style.safetensors"
    save_file(writer(canon), str(path))
    assert_deltas_equal(load_lora(path), expected_deltas(canon))


def test_xlabs_converts_to_the_same_deltas_as_kohya(tmp_path):
    canon = xlabs_canonical()
    save_file(xlabs(canon), str(tmp_path / "xlabs.safetensors"))
    save_file(kohya(canon), str(tmp_path / "kohya.safetensors"))
    from_xlabs = load_lora(tmp_path / "xlabs.safetensors")
    assert_deltas_equal(from_xlabs, expected_deltas(canon))
    assert_deltas_equal(load_lora(tmp_path / "kohya.safetensors"), expected_deltas(canon))
    assert not bool(from_xlabs.deltas["single_blocks.0.linear1"].up[3 * H:].any())


def test_separate_q_k_v_become_block_diagonal_on_the_fused_layer():
    gen = torch.Generator().manual_seed(1)
    parts = {p: (torch.randn(r, H, generator=gen), torch.randn(H, r, generator=gen))
             for p, r in (("to_q", 2), ("to_k", 3), ("to_v", 4))}
    tensors = {}
    for p, (a, b) in parts.items():
        tensors[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"] = a
        tensors[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"] = b
    delta = convert_lora(tensors, "qkv.safetensors").deltas["double_blocks.0.img_attn.qkv"]
    expected_up = torch.zeros(3 * H, 9)
    expected_up[:H, 0:2], expected_up[H:2 * H, 2:5], expected_up[2 * H:, 5:9] = (b for _, b in parts.values())
    assert torch.equal(delta.up, expected_up)
    assert torch.equal(delta.down, torch.cat([a.t() for a, _ in parts.values()], dim=1))


def test_only_some_parts_of_a_fused_layer_leave_the_other_rows_zero():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, H, generator=gen), torch.randn(MLP, 4, generator=gen)
    tensors = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": a,
               "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": b}
    delta = convert_lora(tensors, "mlp.safetensors").deltas["single_blocks.0.linear1"]
    assert delta.up.shape == (3 * H + MLP, 4)
    assert not bool(delta.up[:3 * H].any())
    assert torch.equal(delta.up[3 * H:], b)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_weights_are_upcast(tmp_path, fp8):
    canon = canonical_lora(rank=4)
    stored = kohya(canon, dtype=fp8)
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    lora = load_lora(tmp_path / "fp8.safetensors")
    upcast = {name: (stored[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"].float(),
                     stored[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"].float(), alpha)
              for name, (_, _, alpha) in canon.items()}
    assert_deltas_equal(lora, expected_deltas(upcast))
    assert any(bool((d.down != 0).any()) for d in lora.deltas.values())


def test_keys_matching_nothing_are_listed_in_one_warning(tmp_path, caplog):
    tensors = kohya({"img_in": canonical_lora()["img_in"]})
    tensors["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = torch.zeros(4, 320)
    tensors["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"] = torch.zeros(320, 4)
    tensors["diffusion_model.img_in.lora_B.bias"] = torch.zeros(H)
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 768)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING, logger="svdquant"):
        lora = load_lora(path)
    assert list(lora.deltas) == ["img_in"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "mixed.safetensors" in warnings[0] and "3 keys" in warnings[0]
    for key in ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight", "diffusion_model.img_in.lora_B.bias"):
        assert key in warnings[0]
    assert "lora_te1" not in warnings[0]  # text-encoder keys belong to the text encoder's loader


def test_a_lora_matching_no_flux_layer_is_an_error(tmp_path):
    path = tmp_path / "sdxl_style.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(path))
    with pytest.raises(LoraError, match="sdxl_style.safetensors: no key names a FLUX layer"):
        load_lora(path)


@pytest.mark.parametrize("key, kind", [
    ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "LoKr"),
    ("lycoris_transformer_blocks_0_attn_to_q.lokr_w2", "LoKr"),
    ("lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a", "LoHa"),
    ("lora_unet_double_blocks_0_img_attn_qkv.dora_scale", "DoRA"),
])
def test_lokr_loha_dora_are_refused_by_name(tmp_path, key, kind):
    path = tmp_path / "lycoris.safetensors"
    tensors = kohya({"img_in": canonical_lora()["img_in"]})
    tensors[key] = torch.zeros(4, 4)
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match=f"lycoris.safetensors: {kind} weights are not supported"):
        load_lora(path)


def test_bad_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(LoraError, match="style.ckpt: only .safetensors"):
        load_lora(tmp_path / "style.ckpt")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="broken.safetensors"):
        load_lora(broken)
    unpaired = tmp_path / "unpaired.safetensors"
    save_file({"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64)}, str(unpaired))
    with pytest.raises(LoraError, match="unpaired.safetensors: lora_unet_img_in: has .* not both"):
        load_lora(unpaired)
    nan = tmp_path / "nan.safetensors"
    save_file({"lora_unet_img_in.lora_down.weight": torch.full((4, 64), float("nan")),
               "lora_unet_img_in.lora_up.weight": torch.zeros(H, 4)}, str(nan))
    with pytest.raises(LoraError, match="nan.safetensors: lora_unet_img_in: contains NaN"):
        load_lora(nan)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_alpha_is_an_error_naming_the_file_and_module(tmp_path, alpha):
    path = tmp_path / "alpha.safetensors"
    tensors = kohya({"img_in": canonical_lora()["img_in"]})
    tensors["lora_unet_img_in.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match=f"^alpha.safetensors: lora_unet_img_in: alpha is {alpha}, not a finite"):
        load_lora(path)


def test_an_alpha_that_is_not_one_number_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "alpha.safetensors"
    tensors = kohya({"img_in": canonical_lora()["img_in"]})
    tensors["lora_unet_img_in.alpha"] = torch.tensor([2.0, 2.0])
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match=r"^alpha.safetensors: lora_unet_img_in.alpha: an alpha of shape \(2,\)"):
        load_lora(path)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_a_non_finite_alpha_from_comfyui_patches_is_an_error_naming_the_layer(alpha):
    # ComfyUI's LoRA loaders hand the alpha they read to from_pair (nodes/lora.py), file name unknown
    a, b = torch.ones(4, H), torch.ones(H, 4)
    with pytest.raises(LoraError, match=f"^LoRA patches: diffusion_model.img_in: alpha is {alpha}"):
        LoraDelta.from_pair(a, b, alpha, "LoRA patches", "diffusion_model.img_in")


# ---------------------------------------------------------------------------------------------
# Applying to one layer

def dyadic_svdq_layer(k: int, n: int, seed: int = 0) -> SVDQLinear:
    """An SVDQLinear with power-of-two scales and smoothing and small dyadic low-rank factors."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    return SVDQLinear.from_tensors({
        "qweight": numerics.pack_int4(codes),
        "wscales": powers_of_two(gen, (k // 64, n), -8, -5).bfloat16(),
        "smooth": powers_of_two(gen, (k,), -1, 1).bfloat16(),
        "lora_down": dyadic(gen, (k, RANK), -1, 1, -3).bfloat16(),
        "lora_up": dyadic(gen, (n, RANK), -1, 1, -2).bfloat16(),
        "bias": dyadic(gen, (n,), -8, 8, -4).bfloat16(),
    })


def lossless_input(layer: SVDQLinear, tokens: int, seed: int = 0) -> torch.Tensor:
    """float32 x whose activation quantization is exact: x / smooth = code * 2^e per 64-group with
    |code| <= 7 and one code 7 per group, so scale = absmax / 7 = 2^e and the codes come back."""
    gen = torch.Generator().manual_seed(seed)
    groups = layer.in_features // 64
    codes = torch.randint(-7, 8, (tokens, groups, 64), generator=gen).float()
    codes[:, :, 0] = 7
    v = codes * powers_of_two(gen, (tokens, groups, 1), -3, -2)
    return v.reshape(tokens, -1) * layer.smooth.float()


def dyadic_lora_pair(k: int, n: int, rank: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return dyadic(gen, (rank, k), -1, 1, 0), dyadic(gen, (n, rank), -1, 1, -2)


def test_quantized_layer_plus_loras_equals_the_formula_in_float64():
    k, n = H, 3 * H
    layer = dyadic_svdq_layer(k, n)
    own = {name: getattr(layer, name).double() for name in ("wscales", "smooth", "lora_down", "lora_up", "bias")}
    weight_codes = numerics.unpack_int4(layer.qweight, signed=True).double()
    x = lossless_input(layer, tokens=8)
    loras = [(dyadic_lora_pair(k, n, 8, seed=1), 4.0, 1.0), (dyadic_lora_pair(k, n, 12, seed=2), 12.0, 0.5)]
    set_module_loras(layer, [(LoraDelta.from_pair(a, b, alpha, "x.safetensors", "qkv"), strength)
                             for (a, b), alpha, strength in loras])
    assert layer.lora_down.shape == (k, 64) and layer.lora_up.shape == (n, 64)  # 32 + 8 + 12 -> 64

    xd = x.double()
    residual = weight_codes * own["wscales"].t().repeat_interleave(64, dim=1)  # [N, K]
    expected = (xd / own["smooth"]) @ residual.t() + xd @ own["lora_down"] @ own["lora_up"].t() + own["bias"]
    for (a, b), alpha, strength in loras:
        expected += strength * (alpha / a.shape[0]) * (xd @ a.double().t() @ b.double().t())
    assert torch.equal(layer(x).double(), expected)


def test_apply_then_remove_restores_buffers_and_outputs_bit_for_bit():
    layer = dyadic_svdq_layer(H, H, seed=3)
    original = {name: getattr(layer, name) for name in ("lora_down", "lora_up")}
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(3)).bfloat16()
    before = layer(x)
    a, b = dyadic_lora_pair(H, H, 16, seed=4)
    set_module_loras(layer, [(LoraDelta.from_pair(a, b, 8.0, "x.safetensors", "proj"), 1.0)])
    assert not torch.equal(layer(x), before)
    set_module_loras(layer, [])
    assert layer.rank == RANK
    for name, tensor in original.items():
        assert torch.equal(getattr(layer, name), tensor)
    assert torch.equal(layer(x), before)


def test_a_later_strength_replaces_the_earlier_one():
    a, b = dyadic_lora_pair(H, H, 16, seed=5)
    delta = LoraDelta.from_pair(a, b, 16.0, "x.safetensors", "proj")
    reused, fresh = dyadic_svdq_layer(H, H, seed=5), dyadic_svdq_layer(H, H, seed=5)
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(5)).bfloat16()
    set_module_loras(reused, [(delta, 1.0)])
    reused(x)
    set_module_loras(reused, [(delta, 0.5)])
    set_module_loras(fresh, [(delta, 0.5)])
    assert torch.equal(reused.lora_down, fresh.lora_down) and torch.equal(reused.lora_up, fresh.lora_up)
    assert torch.equal(reused(x), fresh(x))


def test_strength_zero_leaves_the_layer_as_it_was():
    layer = dyadic_svdq_layer(H, H, seed=6)
    down = layer.lora_down
    a, b = dyadic_lora_pair(H, H, 16, seed=6)
    set_module_loras(layer, [(LoraDelta.from_pair(a, b, None, "x.safetensors", "proj"), 0.0)])
    assert layer.lora_down.data_ptr() == down.data_ptr() and layer.rank == RANK  # not even copied
    with pytest.raises(TypeError, match="conv: LoRAs apply to"):
        set_module_loras(nn.Conv2d(4, 4, 1), [], name="conv")
    with pytest.raises(TypeError, match="mod: an output divisor applies to SVDQLinear"):
        set_module_loras(dyadic_w4a16_layer(H, H), [], name="mod", output_divisor=torch.ones(H))


def test_combined_rank_over_the_kernel_limit_is_an_error_naming_the_files():
    layer = dyadic_svdq_layer(64, 64, seed=7)
    big = [(LoraDelta.from_pair(torch.ones(496, 64), torch.ones(64, 496), None, name, "l"), 1.0)
           for name in ("a.safetensors", "b.safetensors")]
    one_more = (LoraDelta.from_pair(torch.ones(1, 64), torch.ones(64, 1), None, "c.safetensors", "l"), 1.0)
    with pytest.raises(LoraError, match=r"a.safetensors, b.safetensors, c.safetensors: l: .* 1040 .* 1024"):
        set_module_loras(layer, big + [one_more], name="l")
    set_module_loras(layer, big)  # 32 + 2 * 496 = 1024 is still allowed
    assert layer.rank == MAX_RANK


def test_a_lora_for_another_layer_shape_is_an_error():
    layer = dyadic_svdq_layer(H, H, seed=8)
    delta = LoraDelta.from_pair(torch.ones(4, 2 * H), torch.ones(H, 4), None, "wide.safetensors", "proj")
    with pytest.raises(LoraError, match="wide.safetensors: proj: LoRA for a 256x512 layer"):
        set_module_loras(layer, [(delta, 1.0)], name="proj")


def dyadic_w4a16_layer(k: int, n: int, seed: int = 0) -> W4A16Linear:
    gen = torch.Generator().manual_seed(seed)
    wscales = powers_of_two(gen, (k // 64, n), -8, -5).bfloat16()
    return W4A16Linear.from_tensors({
        "qweight": numerics.pack_int4(torch.randint(0, 16, (n, k), generator=gen)),
        "wscales": wscales, "wzeros": (-7 * wscales.float()).bfloat16(),
        "bias": dyadic(gen, (n,), -8, 8, -4).bfloat16(),
    })


def test_w4a16_layer_plus_lora_equals_the_formula_and_removes_exactly():
    k, n = H, 6 * H
    layer = dyadic_w4a16_layer(k, n)
    weight = numerics.dequantize_w4a16(numerics.unpack_int4(layer.qweight, signed=False), layer.wscales,
                                       layer.wzeros).double()
    x = dyadic(torch.Generator().manual_seed(9), (4, k), -16, 16, -4)
    before = layer(x)
    a, b = dyadic_lora_pair(k, n, 8, seed=9)
    set_module_loras(layer, [(LoraDelta.from_pair(a, b, 4.0, "x.safetensors", "mod"), 0.5)])
    assert "lora_down" not in layer.state_dict()  # the file format does not change
    expected = x.double() @ weight.t() + layer.bias.double() + 0.5 * 0.5 * (x.double() @ a.double().t() @ b.double().t())
    assert torch.equal(layer(x).double(), expected)
    set_module_loras(layer, [])
    assert layer.lora_down is None and torch.equal(layer(x), before)


def test_bf16_linear_gets_comfyui_dense_delta_and_restores_exactly():
    gen = torch.Generator().manual_seed(10)
    layer = nn.Linear(H, 2 * H).bfloat16()
    original = layer.weight.data
    a, b = torch.randn(8, H, generator=gen), torch.randn(2 * H, 8, generator=gen)
    set_module_loras(layer, [(LoraDelta.from_pair(a, b, 4.0, "x.safetensors", "final"), 0.75)])
    # ComfyUI: float32 copy of the weight += (strength * alpha / r) * (B @ A), one rounding
    assert torch.equal(layer.weight.data, (original.float() + (0.75 * 0.5) * (b @ a)).bfloat16())
    assert "weight_without_lora" not in layer.state_dict()
    set_module_loras(layer, [])
    assert layer.weight.data_ptr() == original.data_ptr() and torch.equal(layer.weight, original)
    assert not hasattr(layer, "weight_without_lora")


# ---------------------------------------------------------------------------------------------
# Applying to a model

def tiny_flux(without: tuple[str, ...] = ()) -> nn.Module:
    """A module tree with every LoRA-capable tiny FLUX layer under its ComfyUI name."""
    root = nn.Module()
    for i, (name, (k, n, kind)) in enumerate(TINY_FLUX.items()):
        if name.startswith(without):
            continue
        layer = {"w4a4": lambda: dyadic_svdq_layer(k, n, seed=i), "w4a16": lambda: dyadic_w4a16_layer(k, n, seed=i),
                 "bf16": lambda: nn.Linear(k, n).bfloat16()}[kind]()
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_model_loras_reach_every_layer_stack_and_clear(tmp_path):
    model = tiny_flux()
    original = {name: t.clone() for name, t in model_tensors(model).items()}
    canon, other = canonical_lora(seed=11), canonical_lora(seed=12, rank=8)
    save_file(kohya(canon), str(tmp_path / "one.safetensors"))
    save_file(peft(other), str(tmp_path / "two.safetensors"))
    one, two = load_lora(tmp_path / "one.safetensors"), load_lora(tmp_path / "two.safetensors")

    set_model_loras(model, [(one, 1.0), (two, 0.5)], v_rows_read_by=V_ROWS_READ_BY)
    # a later run: replaces, never adds
    set_model_loras(model, [(one, 0.5), (two, 0.25)], v_rows_read_by=V_ROWS_READ_BY)
    modules = dict(model.named_modules())
    for name, (k, n, kind) in TINY_FLUX.items():
        layer = modules[name]
        (a1, b1, alpha1), (a2, b2, alpha2) = canon[name], other[name]
        if kind == "bf16":
            expected = (original[f"{name}.weight"].float() + (0.5 * alpha1 / 4) * (b1 @ a1)
                        + (0.25 * alpha2 / 8) * (b2 @ a2)).bfloat16()
            assert torch.equal(layer.weight.data, expected), name
            continue
        own = RANK if kind == "w4a4" else 0
        down, up = layer.lora_down, layer.lora_up
        assert down.shape[1] == (RANK + 16 if kind == "w4a4" else 12), name  # 32 + 4 + 8 padded to 48
        assert torch.equal(down[:, own:own + 4], (a1.t() * (0.5 * alpha1 / 4)).bfloat16()), name
        assert torch.equal(down[:, own + 4:own + 12], (a2.t() * (0.25 * alpha2 / 8)).bfloat16()), name
        assert torch.equal(up[:, own:own + 12], torch.cat((b1, b2), dim=1).bfloat16()), name
        if kind == "w4a4":
            assert torch.equal(down[:, :RANK], original[f"{name}.lora_down"]), name
            assert not bool(down[:, own + 12:].any()) and not bool(up[:, own + 12:].any()), name

    set_model_loras(model, [], v_rows_read_by=V_ROWS_READ_BY)
    restored = model_tensors(model)
    assert sorted(restored) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
    assert all(m.lora_down is None for m in model.modules() if isinstance(m, W4A16Linear))


def test_layers_missing_from_the_model_are_warned_once_and_a_lora_for_none_is_an_error(tmp_path, caplog):
    model = tiny_flux(without=("guidance_in",))  # a schnell-like model
    save_file(kohya(canonical_lora()), str(tmp_path / "dev.safetensors"))
    lora = load_lora(tmp_path / "dev.safetensors")
    with caplog.at_level(logging.WARNING, logger="svdquant"):
        set_model_loras(model, [(lora, 1.0)], v_rows_read_by=V_ROWS_READ_BY)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "guidance_in.in_layer, guidance_in.out_layer" in warnings[0]
    only_guidance = {name: d for name, d in lora.deltas.items() if name.startswith("guidance_in")}
    with pytest.raises(LoraError, match="dev.safetensors: none of its layers"):
        set_model_loras(model, [(type(lora)(lora.source, only_guidance), 1.0)], v_rows_read_by=V_ROWS_READ_BY)


# ---------------------------------------------------------------------------------------------
# Reference imports: a smoothing factor folded between two layers

def dense_reading(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [N, K], bias [N]) in float64 of what the layer computes without activation
    quantization: W4A4 R / smooth + lora_up @ lora_down^T, bias + R @ (shift / smooth); W4A16 the
    dequantized weight (+ its LoRA side branch); dense layers their weight."""
    if isinstance(layer, SVDQLinear):
        codes = numerics.unpack_int4(layer.qweight, signed=True).double()
        residual = codes * layer.wscales.double().t().repeat_interleave(64, dim=1) / layer.smooth.double()
        shift = layer.shift.double() if layer.shift is not None else torch.zeros(layer.in_features, dtype=torch.float64)
        return (residual + layer.lora_up.double() @ layer.lora_down.double().t(),
                layer.bias.double() + residual @ shift)
    if isinstance(layer, W4A16Linear):
        codes = numerics.unpack_int4(layer.qweight, signed=False)
        weight = numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).double()
        if layer.lora_down is not None:
            weight = weight + layer.lora_up.double() @ layer.lora_down.double().t()
        return weight, layer.bias.double()
    return layer.weight.double(), layer.bias.double()


def dense_flux(cfg, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], norm_scales) -> nn.Module:
    from svdquant import flux

    model = flux.model.Flux(cfg, flux.model.dense_linear(torch.float64))
    state = {name: scale.double() for name, scale in norm_scales.items()}
    for name, (weight, bias) in weights.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    model.load_state_dict(state, strict=True)
    return model


def test_loras_on_a_reference_import_act_on_the_original_model(reference_fixture, monkeypatch):
    """The reference model folds s0 out of img/txt_attn.proj and linear2's attention columns into
    the V rows feeding them. The quantized model plus a LoRA must compute the original (unfolded)
    model plus that LoRA: checked on the dense readings of both, as whole FLUX forwards in float64."""
    from svdquant import flux
    from svdquant import lora as lora_module

    model, cfg = flux.files.load_flux(reference_fixture("reference_flux_tiny.safetensors"))
    norm_scales = {name: model.tensors[name] for name in flux.arch.norm_scales(cfg)}
    layers = list(flux.arch.linear_layers(cfg))
    assert set(layers) == set(TINY_FLUX)
    plain = flux.model.from_tensors(cfg, model.tensors, dtype=torch.float64)
    divisors = lora_module.output_divisors(dict(plain.named_modules()), V_ROWS_READ_BY)
    assert sorted(divisors) == ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv",
                                "single_blocks.0.linear1"]

    # the original model: the runtime input of a folded layer is x_orig / fold, its V rows V_orig / s0
    original = {name: dense_reading(plain.get_submodule(name)) for name in layers}
    for name in layers:
        fold = lora_module.input_fold(plain.get_submodule(name))
        if fold is not None:
            weight, bias = original[name]
            original[name] = (weight / fold, bias)
    for name, divisor in divisors.items():
        weight, bias = original[name]
        original[name] = (weight * divisor[:, None], bias * divisor)
    canon = canonical_lora(seed=13, rank=8)
    strength = 0.8
    for name, (a, b, alpha) in canon.items():
        weight, bias = original[name]
        original[name] = (weight + strength * (alpha / a.shape[0]) * (b.double() @ a.double()), bias)

    lora = convert_lora(kohya(canon), "style.safetensors")
    inputs = [t.double() for t in synthetic_inputs(cfg)]
    with torch.no_grad():
        expected = dense_flux(cfg, original, norm_scales)(*inputs)
        outputs = {}
        for folds_applied in (True, False):
            if not folds_applied:  # control: the same LoRA ignoring the folds
                monkeypatch.setattr(lora_module, "output_divisors", lambda layers, v_rows_read_by: {})
                monkeypatch.setattr(lora_module, "input_fold", lambda layer: None)
            quantized = flux.model.from_tensors(cfg, model.tensors, dtype=torch.float64)
            set_model_loras(quantized, [(lora, strength)], v_rows_read_by=V_ROWS_READ_BY)
            readings = {name: dense_reading(quantized.get_submodule(name)) for name in layers}
            outputs[folds_applied] = dense_flux(cfg, readings, norm_scales)(*inputs)

    def error(out):
        return float((out - expected).norm() / expected.norm())

    assert error(outputs[True]) < 1e-12  # float64 rounding only (about 5e-16 measured)
    assert error(outputs[False]) > 1e-2  # ignoring the folds: about 3%


def synthetic_inputs(cfg):
    from svdquant import flux

    noise, context, pooled = flux.synthetic.flux_inputs(cfg, seed=14, height=16, width=16, text_tokens=12,
                                                   dtype=torch.float32)
    return noise, torch.tensor([0.6]), context, pooled, torch.tensor([3.5])
