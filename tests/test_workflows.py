"""The example workflows (ComfyUI UI format) without ComfyUI: well-formed graphs with the defaults
each FLUX.1 variant needs. tests/test_comfyui.py checks them against a running ComfyUI."""

import json

import pytest

from tiny_flux import REPO


def load(name):
    return json.loads((REPO / "workflows" / name).read_text())


WORKFLOWS = ["flux.1-schnell.json", "flux.1-schnell-4bit-t5.json", "flux.1-dev.json", "flux.1-dev-lora.json",
             "quantize-flux.1-dev.json"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_graph_is_well_formed(name):
    workflow = load(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes)
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        output = nodes[source]["outputs"][source_slot]
        assert output["type"] == kind and link_id in output["links"]
        target_input = nodes[target]["inputs"][target_slot]
        assert target_input["type"] == kind and target_input["link"] == link_id
    linked = {link[0] for link in workflow["links"]}
    assert all(slot["link"] in linked for node in nodes.values() for slot in node["inputs"])


def by_type(workflow):
    return {node["type"]: node for node in workflow["nodes"]}


@pytest.mark.parametrize("name", ["flux.1-schnell.json", "flux.1-schnell-4bit-t5.json"])
def test_schnell_defaults(name):
    nodes = by_type(load(name))
    assert nodes["SVDQuantFluxLoader"]["widgets_values"] == ["svdq-int4_r32-flux.1-schnell.safetensors",
                                                             "bfloat16", "default", "from file", "4-bit"]
    seed, control, steps, cfg, sampler, scheduler, denoise = nodes["KSampler"]["widgets_values"]
    assert (steps, cfg, sampler, scheduler, denoise) == (4, 1.0, "euler", "simple", 1.0)
    assert "FluxGuidance" not in nodes  # schnell has no guidance embedder


@pytest.mark.parametrize("name", ["flux.1-dev.json", "flux.1-dev-lora.json"])
def test_dev_defaults(name):
    nodes = by_type(load(name))
    assert nodes["SVDQuantFluxLoader"]["widgets_values"][0] == "svdq-int4_r32-flux.1-dev.safetensors"
    steps, cfg = nodes["KSampler"]["widgets_values"][2:4]
    assert 20 <= steps <= 28 and cfg == 1.0
    assert nodes["FluxGuidance"]["widgets_values"] == [3.5]
    workflow = load(name)
    into_sampler = {link[4]: link[1] for link in workflow["links"] if link[3] == nodes["KSampler"]["id"]}
    assert into_sampler[1] == nodes["FluxGuidance"]["id"]  # the positive conditioning carries the guidance


def test_lora_workflow_puts_comfyuis_lora_loader_between_our_loader_and_the_sampler():
    workflow = load("flux.1-dev-lora.json")
    nodes = by_type(workflow)
    model_links = {(link[1], link[3]) for link in workflow["links"] if link[5] == "MODEL"}
    loader, lora, sampler = (nodes[t]["id"] for t in ("SVDQuantFluxLoader", "LoraLoaderModelOnly", "KSampler"))
    assert model_links == {(loader, lora), (lora, sampler)}
    assert nodes["LoraLoaderModelOnly"]["widgets_values"][1] == 1.0


def test_4bit_t5_workflow_encodes_the_prompt_with_our_text_encoders():
    workflow = load("flux.1-schnell-4bit-t5.json")
    nodes = by_type(workflow)
    assert "DualCLIPLoader" not in nodes
    encoders = nodes["SVDQuantFluxTextEncoders"]
    assert encoders["widgets_values"] == ["clip_l.safetensors", "t5xxl_fp16.safetensors", "default"]
    clip_links = {(link[1], link[3]) for link in workflow["links"] if link[5] == "CLIP"}
    assert clip_links == {(encoders["id"], nodes["CLIPTextEncode"]["id"])}


def test_quantize_workflow_calibrates_on_two_prompts():
    workflow = load("quantize-flux.1-dev.json")
    nodes = by_type(workflow)
    assert nodes["SVDQuantFluxQuantizer"]["widgets_values"] == ["flux1-dev.safetensors", "", 32, False, 4, False,
                                                                "hadamard"]
    encoders = [node["id"] for node in workflow["nodes"] if node["type"] == "CLIPTextEncode"]
    into = {(link[1], link[3]) for link in workflow["links"] if link[5] == "CONDITIONING"}
    combine, quantizer = nodes["ConditioningCombine"]["id"], nodes["SVDQuantFluxQuantizer"]["id"]
    assert into == {(encoders[0], combine), (encoders[1], combine), (combine, quantizer)}
    assert nodes["SVDQuantFluxQuantizer"]["inputs"][0]["name"] == "calibration_prompts"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_each_workflow_has_a_template_thumbnail(name):
    """ComfyUI's template browser shows <name>.jpg beside a custom node's <name>.json as its card."""
    thumbnail = (REPO / "workflows" / name).with_suffix(".jpg").read_bytes()
    assert thumbnail[:3] == b"\xff\xd8\xff" and len(thumbnail) < 100_000  # a JPEG, small enough for a card


def test_the_workflow_folder_holds_only_workflows_and_their_thumbnails():
    files = {path.name for path in (REPO / "workflows").iterdir()}
    assert files == set(WORKFLOWS) | {name.replace(".json", ".jpg") for name in WORKFLOWS}
