"""Unpacking nunchaku's tile-packed tensors, against tensors it packed itself."""

import pytest
import torch
from safetensors.torch import load_file

from svdquant import numerics
from svdquant import nunchaku_format as nf


@pytest.fixture(scope="module")
def packing(reference_fixture):
    return load_file(str(reference_fixture("reference_packing_N256_K256_r32.safetensors")))


def test_w4a4_layer_unpacks_to_natural(packing):
    t = packing
    packed = {name: t[f"packed.w4a4.{name}"] for name in ("qweight", "wscales", "bias", "smooth", "lora_down", "lora_up")}
    natural = nf.unpack_w4a4_layer(packed)
    assert torch.equal(numerics.unpack_int4(natural["qweight"], signed=True), t["natural.w4a4.codes"])
    assert torch.equal(natural["wscales"], t["natural.w4a4.wscales"].t())
    assert torch.equal(natural["bias"], t["natural.w4a4.bias"])
    assert torch.equal(natural["smooth"], t["natural.w4a4.smooth"])
    assert torch.equal(natural["lora_down"], t["natural.w4a4.lora_down_rK"].t())
    assert torch.equal(natural["lora_up"], t["natural.w4a4.lora_up_Nr"])


def test_w4a16_layer_unpacks_to_natural(packing):
    t = packing
    natural = nf.unpack_w4a16_layer({name: t[f"packed.w4a16.{name}"] for name in ("qweight", "wscales", "wzeros", "bias")})
    codes = numerics.unpack_int4(natural["qweight"], signed=False)
    assert torch.equal(codes, t["natural.w4a16.codes_u4"])
    assert torch.equal(natural["wscales"], t["natural.w4a16.scales"].t())
    assert natural["wscales"].shape == (4, 384)  # 16 padded group rows cut to K/64
    weight = numerics.dequantize_w4a16(codes, natural["wscales"], natural["wzeros"])
    assert torch.equal(weight.bfloat16(), t["natural.w4a16.weight_bf16"])


def test_padding_rows_must_be_zero(packing):
    table = packing["packed.w4a16.wscales"].clone()
    table[7, 0] = 1.0
    with pytest.raises(ValueError, match="padding"):
        nf.unpack_w4a16_groups(table, 256)


# double-block layers of the tiny model that the reference keeps unfused: reference -> natural name
DOUBLE_BLOCK_LAYERS = {
    "qkv_proj": "img_attn.qkv", "qkv_proj_context": "txt_attn.qkv", "out_proj": "img_attn.proj",
    "out_proj_context": "txt_attn.proj", "mlp_fc1": "img_mlp.0", "mlp_fc2": "img_mlp.2",
    "mlp_context_fc1": "txt_mlp.0", "mlp_context_fc2": "txt_mlp.2",
}


@pytest.mark.parametrize("ref_name, natural_name", DOUBLE_BLOCK_LAYERS.items())
def test_model_layers_unpack_to_known_parameters(reference_fixture, ref_name, natural_name):
    packed_file = load_file(str(reference_fixture("reference_flux_tiny.safetensors")))
    natural_file = load_file(str(reference_fixture("reference_flux_tiny.natural.safetensors")))
    prefix, nat = f"transformer_blocks.0.{ref_name}", f"double_blocks.0.{natural_name}"
    layer = nf.unpack_w4a4_layer({k[len(prefix) + 1:]: v for k, v in packed_file.items() if k.startswith(prefix + ".")})
    assert torch.equal(numerics.unpack_int4(layer["qweight"], signed=True), natural_file[f"{nat}.codes"])
    assert torch.equal(layer["wscales"], natural_file[f"{nat}.wscales"].t())
    for name in ("smooth", "lora_down", "lora_up", "bias"):
        assert torch.equal(layer[name], natural_file[f"{nat}.{name}"]), name
