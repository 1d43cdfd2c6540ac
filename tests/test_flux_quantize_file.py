"""Quantizing a 16-bit FLUX.1 checkpoint file: `python -m svdquant quantize` and
flux.quantizer.quantize_checkpoint (what the ComfyUI Quantizer node runs)."""

import errno
import json
import os
import re
import types

import pytest
import torch
from safetensors.torch import save_file

from svdquant import cli, flux, numerics, quantize
from svdquant import format as fmt
from tiny_flux import TEST_ALPHAS, bf16_model, quantized_model


def write_checkpoint(path, guidance_embed: bool, prefix: str = "", dtype=torch.bfloat16, extra=None):
    _, tensors = bf16_model(guidance_embed)
    save_file({f"{prefix}{key}": t.to(dtype) for key, t in tensors.items()} | (extra or {}), str(path))
    return path


def expected_kinds(cfg) -> dict[str, str]:
    return {name: spec.kind for name, spec in flux.arch.linear_layers(cfg).items() if spec.kind != flux.arch.DENSE}


def test_cli_quantizes_a_schnell_checkpoint_as_quantize_flux_does(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "flux1-tiny-schnell.safetensors", guidance_embed=False)
    target = tmp_path / "out" / "svdq.safetensors"
    target.parent.mkdir()
    assert cli.main(["quantize", str(source), str(target), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FLUX.1-schnell, width 256, 2 double + 2 single blocks; quantized one block at a time on cpu: needs about" \
        in out
    assert "random stand-in inputs (not real prompts" in out
    assert f"wrote {target}: 26 quantized layers, " in out
    assert "held-out relative output error of the 4-bit layers: mean 0.0" in out

    model, cfg = flux.files.load_flux(target)
    assert cfg.variant == "schnell"
    assert {name: desc["kind"] for name, desc in model.layers.items()} == expected_kinds(cfg)
    assert model.quantization["rank"] == 32 and model.quantization["calibration_calls"] == 4
    assert model.quantization["pow2_scales"] is False and model.quantization["smoothing_steps"] == 0
    # the file is exactly what the engine's quantize_flux makes from the same tensors
    cfg, tensors = bf16_model(False)
    direct = flux.quantizer.quantize_flux(tensors, cfg, flux.quantizer.calibration_inputs(cfg, 4), progress=False)
    assert model.tensors.keys() == direct.tensors.keys()
    assert all(torch.equal(model.tensors[key], direct.tensors[key]) for key in direct.tensors)
    # no temporary file left; the quality report beside the file
    assert sorted(p.name for p in target.parent.iterdir()) == ["svdq.quality.json", "svdq.safetensors"]

    # the quality report: each W4A4 layer's error on the held-out calls, as a loaded layer computes it
    report = json.loads((target.parent / "svdq.quality.json").read_text())
    assert report == {"file": "svdq.safetensors", **json.loads(fmt.read_header(target)["quality"])}
    w4a4 = [name for name, kind in expected_kinds(cfg).items() if kind == flux.arch.W4A4]
    assert list(report["layers"]) == w4a4
    assert report["mean"] == pytest.approx(sum(report["layers"].values()) / len(w4a4), rel=1e-5)
    assert report["worst"] == [list(item) for item in sorted(report["layers"].items(), key=lambda item: -item[1])[:5]]
    assert model.quantization["held_out_error"] == {"mean": report["mean"], "worst": report["worst"]}
    dense = flux.model.Flux(cfg, flux.model.dense_linear()).requires_grad_(False)
    dense.load_state_dict(tensors)
    held_out = flux.quantizer.calibration_inputs(cfg, flux.quantizer.HELD_OUT_CALLS, seed=flux.quantizer.HELD_OUT_SEED)
    engine = flux.model.from_tensors(cfg, model.tensors)
    for name, x in flux.quantizer.collect_calibration(dense, w4a4[:6], held_out).items():
        ref = x.double() @ tensors[f"{name}.weight"].double().t() + tensors[f"{name}.bias"].double()
        engine.get_submodule(name).gelu_from = None
        with torch.no_grad():
            out = engine.get_submodule(name)(x.bfloat16()).double()
        # the layer rounds its output to bf16 (relative 2^-9), the report's simulation does not
        assert float((out - ref).norm() / ref.norm()) == pytest.approx(report["layers"][name], abs=2e-3)


def test_cli_reads_a_comfyui_checkpoint_of_dev_in_float32_with_the_options(tmp_path, capsys):
    # a ComfyUI checkpoint: the transformer under model.diffusion_model., beside other models
    source = write_checkpoint(tmp_path / "flux1-tiny-dev-checkpoint.safetensors", guidance_embed=True,
                              prefix="model.diffusion_model.", dtype=torch.float32,
                              extra={"first_stage_model.decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)})
    target = tmp_path / "svdq-pow2.safetensors"
    assert cli.main(["quantize", str(source), str(target), "--rank", "16", "--pow2-scales",
                     "--calibration-calls", "2", "--device", "cpu"]) == 0
    assert "FLUX.1-dev" in capsys.readouterr().out
    model, cfg = flux.files.load_flux(target)
    assert cfg.variant == "dev" and {name: desc["kind"] for name, desc in model.layers.items()} == expected_kinds(cfg)
    assert model.quantization["pow2_scales"] is True and model.quantization["rank"] == 16
    assert model.quantization["calibration_calls"] == 2
    assert all(desc["rank"] == 16 for desc in model.layers.values() if desc["kind"] == flux.arch.W4A4)
    _, tensors = bf16_model(True)
    assert torch.equal(model.tensors["guidance_in.in_layer.weight"], tensors["guidance_in.in_layer.weight"])


def test_overwrite_replaces_an_existing_output_only_when_asked(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "in.safetensors", guidance_embed=False)
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    assert cli.main(["quantize", str(source), str(target)]) == 2
    assert capsys.readouterr().err == "error: out.safetensors: already exists (--overwrite replaces it)\n"
    assert target.read_bytes() == b"keep me"
    assert cli.main(["quantize", str(source), str(target), "--overwrite", "--device", "cpu"]) == 0
    assert flux.files.load_flux(target)[1].variant == "schnell"


def _bad_inputs(tmp_path):
    """name -> (input file, the problem its error names)"""
    cfg, tensors = bf16_model(False)
    (tmp_path / "text.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(tmp_path / "sdxl.safetensors"))
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, str(tmp_path / "diffusers.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("single_blocks.1.linear2")},
              str(tmp_path / "incomplete.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, str(tmp_path / "fp8.safetensors"))
    fmt.save_model(tmp_path / "quantized.safetensors", quantized_model(False))
    return {
        "text": "not a readable safetensors file",
        "sdxl": "not a FLUX.1 transformer in BFL/ComfyUI key names: no tensor img_in.weight, img_in.bias, "
                "time_in.in_layer.weight and ",
        "diffusers": "diffusers-format transformers are not read",
        "incomplete": "no tensor single_blocks.1.linear2.weight, single_blocks.1.linear2.bias",
        "fp8": "is F8_E4M3: only bfloat16, float16 or float32 checkpoints can be quantized",
        "quantized": "already an SVDQuant 4-bit model",
    }


def test_unusable_inputs_and_outputs_are_one_line_errors_naming_the_file(tmp_path, capsys):
    for name, problem in _bad_inputs(tmp_path).items():
        assert cli.main(["quantize", str(tmp_path / f"{name}.safetensors"), str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {name}.safetensors: ") and problem in err and err.count("\n") == 1, err
    source = write_checkpoint(tmp_path / "in.safetensors", guidance_embed=False)
    assert cli.main(["quantize", str(source), str(tmp_path / "out.bin")]) == 2
    assert capsys.readouterr().err == "error: out.bin: the output name must end in .safetensors\n"
    assert cli.main(["quantize", str(tmp_path / "missing.safetensors"), str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err == "error: missing.safetensors: no such file\n"
    assert not list(tmp_path.glob("out*"))
    with pytest.raises(SystemExit) as exit_info:  # argparse: a rank the kernels cannot run
        cli.main(["quantize", str(source), str(tmp_path / "out.safetensors"), "--rank", "20"])
    assert exit_info.value.code == 2


def test_an_interrupted_or_failed_write_leaves_no_file(tmp_path, monkeypatch, capsys):
    source = write_checkpoint(tmp_path / "in.safetensors", guidance_embed=True)
    target = tmp_path / "out.safetensors"
    done = []

    def stop_after_three(layer: str) -> None:
        done.append(layer)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        flux.quantizer.quantize_checkpoint(source, target, progress=False, on_layer=stop_after_three)
    assert done == list(expected_kinds(bf16_model(True)[0]))[:3]  # one call per layer, in order

    # stopped while writing, or the disk fills up: the partial file is removed
    real_write = flux.quantizer.StreamingWriter.write

    def write_then_fail(error):
        def write(self, key, tensor):
            real_write(self, key, tensor)
            if len(self.entries) == 30:  # inside double block 0
                raise error
        return write

    monkeypatch.setattr(quantize, "DEFAULT_ALPHAS", TEST_ALPHAS)
    monkeypatch.setattr(flux.quantizer.StreamingWriter, "write", write_then_fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        flux.quantizer.quantize_checkpoint(source, target, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]
    monkeypatch.setattr(flux.quantizer.StreamingWriter, "write",
                        write_then_fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert cli.main(["quantize", str(source), str(target), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.endswith("\nerror: out.safetensors: could not write the output (No space left on "
                                            "device)\n")
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


def test_checkpoints_are_read_one_block_at_a_time(tmp_path, monkeypatch):
    source = write_checkpoint(tmp_path / "in.safetensors", guidance_embed=False)
    reads = []
    read = flux.quantizer.read_checkpoint

    def read_one_part(path, keys=None):
        reads.append(sorted({".".join(key.split(".")[:2]) if "blocks." in key else "stem" for key in keys}))
        return read(path, keys)

    monkeypatch.setattr(flux.quantizer, "read_checkpoint", read_one_part)
    monkeypatch.setattr(quantize, "DEFAULT_ALPHAS", TEST_ALPHAS)
    flux.quantizer.quantize_checkpoint(source, tmp_path / "out.safetensors", progress=False, calibration_calls=1)
    assert reads == [["stem"], ["double_blocks.0"], ["double_blocks.1"], ["single_blocks.0"], ["single_blocks.1"]]


def test_memory_needed_for_full_size_flux_fits_a_consumer_pc():
    """Streaming block by block: full-size FLUX.1-dev within 16 GiB of system memory and 12 GiB of
    GPU memory by the estimate, with prompts of 512 tokens and 16 calibration calls."""
    cfg = flux.arch.FluxConfig()
    tokens = flux.quantizer.calibration_tokens(cfg, [(torch.zeros(512, 4096), torch.zeros(768))])
    assert tokens == 512 + 1024
    system, gpu = flux.quantizer.memory_needed(cfg, 16, tokens, on_gpu=True)
    assert 2 < system / 2**30 < 4 and 2 < gpu / 2**30 < 12
    system_only, none = flux.quantizer.memory_needed(cfg, 16, tokens, on_gpu=False)
    assert none == 0 and system_only == flux.quantizer.PROCESS_BYTES + gpu
    # the output at rank 32: 6.3 GiB, as the published files
    assert round(flux.quantizer.output_bytes(cfg, 32) / 2**30, 1) == 6.3


def test_not_enough_memory_or_disk_is_said_before_any_work(tmp_path, capsys, monkeypatch):
    source = write_checkpoint(tmp_path / "in.safetensors", guidance_embed=False)
    target = tmp_path / "out.safetensors"
    monkeypatch.setattr(flux.quantizer, "_quantize_blocks", lambda *args, **kwargs: pytest.fail("work started"))
    monkeypatch.setattr(flux.quantizer, "available_system_memory", lambda: 2**30)
    assert cli.main(["quantize", str(source), str(target), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    needed = flux.quantizer.memory_needed(bf16_model(False)[0], 4, 80, on_gpu=False)[0] / 2**30
    assert f"needs about {needed:.1f} GiB of system memory" in out
    assert err == f"error: in.safetensors: quantizing it needs about {needed:.1f} GiB of system memory, " \
                  f"1.0 GiB are available\n"
    monkeypatch.setattr(flux.quantizer, "available_system_memory", lambda: 2**40)
    monkeypatch.setattr(flux.quantizer.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=2**20))
    assert cli.main(["quantize", str(source), str(target), "--device", "cpu"]) == 2
    assert re.fullmatch(r"error: out.safetensors: needs 0.0\d GiB of disk space, the output folder .* has 0.00 GiB "
                        r"free\n", capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["in.safetensors"]


def test_missing_or_read_only_output_folders_are_said_before_any_work(tmp_path, capsys, monkeypatch):
    source = write_checkpoint(tmp_path / "in.safetensors", guidance_embed=False)
    monkeypatch.setattr(flux.quantizer, "_quantize_blocks", lambda *args, **kwargs: pytest.fail("work started"))
    assert cli.main(["quantize", str(source), str(tmp_path / "nowhere" / "out.safetensors")]) == 2
    assert capsys.readouterr().err == f"error: out.safetensors: the output folder {tmp_path / 'nowhere'} does not " \
                                      f"exist\n"
    (tmp_path / "file").write_bytes(b"")
    assert cli.main(["quantize", str(source), str(tmp_path / "file" / "out.safetensors")]) == 2
    assert "error: out.safetensors: the output folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert cli.main(["quantize", str(source), str(locked / "out.safetensors")]) == 2
        assert capsys.readouterr().err == f"error: out.safetensors: cannot write in the output folder {locked} " \
                                          f"(Permission denied)\n"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_named_and_nothing_is_written(tmp_path, capsys, bad):
    _, tensors = bf16_model(False)
    damaged = dict(tensors)
    damaged["double_blocks.0.txt_attn.proj.weight"] = tensors["double_blocks.0.txt_attn.proj.weight"].clone()
    damaged["double_blocks.0.txt_attn.proj.weight"][3, 5] = bad
    source = tmp_path / "damaged.safetensors"
    save_file({f"model.diffusion_model.{key}": t for key, t in damaged.items()}, str(source))
    assert cli.main(["quantize", str(source), str(tmp_path / "out.safetensors"), "--calibration-calls", "1",
                     "--device", "cpu"]) == 2
    # after the progress bar
    assert capsys.readouterr().err.endswith(
        "\nerror: damaged.safetensors: tensor model.diffusion_model.double_blocks.0.txt_attn.proj.weight contains "
        "NaN or Inf; the checkpoint is damaged or was not saved from a working model\n")
    assert [p.name for p in tmp_path.iterdir()] == ["damaged.safetensors"]


def t5_like_prompts(count: int, tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Text embeddings shaped like a FLUX prompt's: T5-XXL-like context (small values with a few
    massive channels, as T5's outlier features) and a CLIP-L-like pooled vector."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        context = torch.randn(tokens, 4096, generator=gen) * 0.15
        context[:, [131, 2049, 3001]] *= 400.0
        prompts.append((context, torch.randn(768, generator=gen)))
    return prompts


def test_calibration_on_prompts_fits_the_text_stream_better():
    """Calibration calls on given text embeddings (cycled, on 64x64 latents) quantize the text-stream
    layers for what they see on held-out prompts of the same kind better than random stand-ins do."""
    cfg, tensors = bf16_model(False)
    prompts = t5_like_prompts(3, 64, seed=1)
    calls = flux.quantizer.calibration_inputs(cfg, 4, prompts=prompts)
    assert [torch.equal(call[2][0], prompts[i % 3][0].bfloat16()) for i, call in enumerate(calls)] == [True] * 4
    assert calls[0][0].shape == (1, 16, flux.quantizer.PROMPT_LATENT, flux.quantizer.PROMPT_LATENT)
    assert calls[0][3].shape == (1, 768) and [float(call[1]) for call in calls] == [0.25, 0.5, 0.75, 1.0]

    dense = flux.model.Flux(cfg, flux.model.dense_linear()).requires_grad_(False)
    dense.load_state_dict(tensors)
    text_layers = [name for name, spec in flux.arch.linear_layers(cfg).items() if spec.kind == flux.arch.W4A4 and "txt_" in name]
    held_out = flux.quantizer.calibration_inputs(cfg, 2, seed=500, prompts=t5_like_prompts(2, 64, seed=99))
    inputs = flux.quantizer.collect_calibration(dense, text_layers, held_out)

    def text_stream_error(calibration, prompts_used: int) -> float:
        model = flux.quantizer.quantize_flux(tensors, cfg, calibration, progress=False, calibration_prompts=prompts_used)
        assert model.quantization["calibration_prompts"] == prompts_used
        engine = flux.model.from_tensors(cfg, model.tensors)
        errors = []
        for name, x in inputs.items():
            layer = engine.get_submodule(name)
            ref = numerics.gelu_channels(
                x.double() @ tensors[f"{name}.weight"].double().t() + tensors[f"{name}.bias"].double(), layer.gelu_from)
            with torch.no_grad():
                out = layer(x.bfloat16()).double()
            errors.append(float((out - ref).norm() / ref.norm()))
        return sum(errors) / len(errors)

    # measured: 0.058 (stand-ins) against 0.052 (prompts)
    assert text_stream_error(calls, 3) < 0.95 * text_stream_error(flux.quantizer.calibration_inputs(cfg, 4), 0)


def test_calibration_prompts_that_do_not_fit_are_named_errors(tmp_path):
    cfg, _ = bf16_model(False)
    source = write_checkpoint(tmp_path / "flux1-tiny-schnell.safetensors", guidance_embed=False)
    good = t5_like_prompts(1, 8, seed=2)[0]
    for context, pooled, shown in ((torch.zeros(8, 2048), good[1], "(8, 2048) (context)"),
                                   (good[0], torch.zeros(1280), "(1280,) (pooled)"),
                                   (torch.zeros(2, 8, 4096), good[1], "(2, 8, 4096) (context)")):
        with pytest.raises(ValueError, match=r"calibration prompt 2: .*" + re.escape(shown)):
            flux.quantizer.quantize_checkpoint(source, tmp_path / "never.safetensors", prompts=[good, (context, pooled)])
    assert not (tmp_path / "never.safetensors").exists()

    reports = []
    model = flux.quantizer.quantize_checkpoint(source, tmp_path / "prompted.safetensors", calibration_calls=2,
                                              prompts=[good], progress=False, report=reports.append)
    assert model.quantization["calibration_prompts"] == 1 and model.quantization["calibration_calls"] == 2
    assert reports[-1] == "calibration: 2 model calls on the text embeddings of 1 prompt, 64x64 noise latents"
    assert flux.files.load_flux(tmp_path / "prompted.safetensors")[0].quantization["calibration_prompts"] == 1
