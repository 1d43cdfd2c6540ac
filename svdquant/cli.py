"""Command line: python -m svdquant {demo, info, quantize}."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import format as fmt
from . import cuda, file_options, flux, kernels, numerics
from . import quantize as quantize_recipe


def cmd_info(args) -> int:
    print(json.dumps({"cuda": cuda.status(), "kernels": kernels.kernels_status()}, indent=2))
    for path in args.files:
        metadata = fmt.read_header(path)
        if metadata.get("model_type") == "flux" or flux.nunchaku_import.is_nunchaku_file(path, metadata):
            model, cfg = flux.files.load_flux(path)
            print(f"{path}: FLUX.1 {cfg.variant} architecture, width {cfg.hidden_size}, {cfg.depth} double + "
                  f"{cfg.depth_single_blocks} single blocks")
        else:
            model = fmt.load_model(path)
        kinds: dict[str, int] = {}
        for desc in model.layers.values():
            kinds[desc["kind"]] = kinds.get(desc["kind"], 0) + 1
        size = sum(t.numel() * t.element_size() for t in model.tensors.values())
        print(f"{path}: {model.model_type}, {len(model.tensors)} tensors, {size / 2**20:.1f} MiB, layers {kinds}")
        print(f"  quantization {json.dumps(model.quantization)}")
    return 0


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def cmd_demo(args) -> int:
    """Tiny FLUX model -> SVDQuant (and plain W4A4 for contrast) -> files -> loaded as the ComfyUI
    loader loads them -> a few sampling steps, compared with the BF16 model."""
    device = torch.device(args.device)
    cfg = flux.synthetic.tiny_flux_config(guidance_embed=args.variant == "dev")
    tensors = flux.synthetic.tiny_flux_state_dict(cfg)
    mib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    print(f"tiny FLUX.1-{cfg.variant} architecture: width {cfg.hidden_size} ({cfg.num_heads} heads), {cfg.depth} "
          f"double + {cfg.depth_single_blocks} single blocks, random weights with planted outlier channels, "
          f"{mib:.1f} MiB in BF16")
    dense = flux.model.Flux(cfg, flux.model.dense_linear()).requires_grad_(False)
    dense.load_state_dict(tensors)
    calibration = flux.quantizer.calibration_inputs(cfg)
    # held-out inputs: what each 4-bit layer sees in the BF16 model on a prompt it was not calibrated on
    held_out = flux.quantizer.calibration_inputs(cfg, count=1, seed=1000)
    w4a4 = [name for name, spec in flux.arch.linear_layers(cfg).items() if spec.kind == flux.arch.W4A4]
    layer_inputs = flux.quantizer.collect_calibration(dense, w4a4, held_out)
    dense.to(device)

    # scheme -> (quantizer options, file name tag)
    schemes = {f"SVDQuant r{args.rank}": (dict(rank=args.rank), f"svdq-r{args.rank}"),
               "plain W4A4": (dict(rank=0, smooth=False, rotation="none"), "w4a4")}
    if args.pow2_scales:
        schemes[f"SVDQuant r{args.rank} pow2"] = (dict(rank=args.rank, pow2_scales=True), f"svdq-r{args.rank}-pow2")
    files = {}
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(args.keep or scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.keep:
            print(f"the quantized files go to {out_dir.resolve()} (they load in ComfyUI)")
        else:
            print("the quantized files go to a temporary folder, deleted at the end (--keep DIR keeps them)")
        for scheme, (options, tag) in schemes.items():
            start = time.perf_counter()
            model = flux.quantizer.quantize_flux(tensors, cfg, calibration, **options)
            path = out_dir / f"tiny-flux.1-{cfg.variant}-{tag}.safetensors"
            fmt.save_model(path, model)
            size = path.stat().st_size / 2**20
            print(f"{scheme}: quantized {len(model.layers)} layers in {time.perf_counter() - start:.1f} s -> "
                  f"{path.name} ({size:.1f} MiB)")
            loaded, _ = flux.files.load_flux(path)  # what the ComfyUI loader node reads
            files[scheme] = flux.model.from_tensors(cfg, loaded.tensors).to(device)
            file_options.apply_file_options(files[scheme], loaded.quantization)

    noise, context, pooled = (t.to(device) for t in flux.synthetic.flux_inputs(cfg, seed=args.seed,
                                                                              height=args.size, width=args.size))
    guidance = 3.5 if cfg.guidance_embed else None

    def sample(model):
        start = time.perf_counter()
        with torch.no_grad():
            out = flux.model.sample_euler(model, noise, context, pooled, args.steps, guidance)
        return out, time.perf_counter() - start

    reference, dense_time = sample(dense)
    # every result first, then the table: what the engine logs on first use (stderr) lands above it
    rows = [f"{'BF16':<18} {'-':>17} {'-':>13} {dense_time:>7.2f}s"]
    for scheme, model in files.items():
        layer_errors = []
        for name, x in layer_inputs.items():
            weight, bias = tensors[f"{name}.weight"].double(), tensors[f"{name}.bias"].double()
            layer = model.get_submodule(name)
            with torch.no_grad():
                out = layer(x.to(device, torch.bfloat16))
            # an MLP input layer applies the GELU too (flux.fusion.fuse_mlp_gelu)
            ref = numerics.gelu_channels(x.double() @ weight.t() + bias, layer.gelu_from)
            layer_errors.append(_relative_error(out.cpu(), ref))
        out, seconds = sample(model)
        rows.append(f"{scheme:<18} {sum(layer_errors) / len(layer_errors):>17.4f} "
                    f"{_relative_error(out, reference):>13.4f} {seconds:>7.2f}s")
    path_used = "CUDA kernels" if kernels.w4a4_kernels_on(device) else \
        "PyTorch reference path (INT4 emulated in float32: slower than BF16 by design)"
    print(f"\n{args.steps} Euler steps on a {args.size}x{args.size} latent, {device.type}, quantized layers on the "
          f"{path_used}")
    print(f"{'scheme':<18} {'W4A4 layer error':>17} {'output error':>13} {'time':>8}")
    print("\n".join(rows))
    print("(relative L2 errors against the BF16 model: each 4-bit layer on held-out activations, averaged; "
          "the sampled latent)")
    return 0


def cmd_quantize(args) -> int:
    """A 16-bit FLUX.1 checkpoint -> an SVDQuant file the ComfyUI loader reads."""
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise fmt.FormatError(output, "already exists (--overwrite replaces it)")
    start = time.perf_counter()
    result = flux.quantizer.quantize_checkpoint(args.input, output, rank=args.rank, pow2_scales=args.pow2_scales,
                                               calibration_calls=args.calibration_calls, device=args.device,
                                               learned_smoothing=args.learned_smoothing, rotation=args.rotation,
                                               report=print)
    print(f"wrote {output}: {len(result.layers)} quantized layers, {output.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s")
    worst = ", ".join(f"{name} {err:.4f}" for name, err in result.quality["worst"][:3])
    print(f"held-out relative output error of the 4-bit layers: mean {result.quality['mean']:.4f}, worst {worst} "
          f"(all layers: {flux.quantizer.quality_report_path(output)})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svdquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="make a tiny FLUX model, quantize it, load it as the ComfyUI node does, "
                                       "sample a few steps and print the fidelity against BF16")
    demo.add_argument("--variant", choices=("schnell", "dev"), default="schnell",
                      help="FLUX.1 architecture variant (dev has the guidance embedder)")
    demo.add_argument("--rank", type=int, default=32, help="SVDQuant low-rank branch rank")
    demo.add_argument("--steps", type=int, default=4, help="Euler sampling steps")
    demo.add_argument("--size", type=int, default=32, help="latent height and width (image size / 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--pow2-scales", "--hopper-pow2", action="store_true",
                      help="also quantize with power-of-two weight scales and run it with power-of-two activation "
                           "scales (faster on Hopper)")
    demo.add_argument("--keep", metavar="DIR", help="keep the quantized files in DIR (they load in ComfyUI)")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="describe SVDQuant model files and which kernels run here")
    info.add_argument("files", nargs="*")
    info.set_defaults(func=cmd_info)
    quantize = sub.add_parser("quantize", help="quantize a 16-bit FLUX.1 transformer checkpoint (schnell or dev, "
                                               "BFL/ComfyUI key names) into an SVDQuant file")
    quantize.add_argument("input", help="the 16-bit .safetensors checkpoint (a ComfyUI checkpoint's "
                                        "model.diffusion_model. keys are taken)")
    quantize.add_argument("output", help="the SVDQuant file to write (.safetensors)")
    quantize.add_argument("--rank", type=int, default=32, metavar="R",
                          choices=range(flux.quantizer.MIN_MODEL_RANK, flux.quantizer.MAX_MODEL_RANK + 1,
                                        kernels.RANK_MULTIPLE),
                          help="rank of the 16-bit low-rank branch, a multiple of 16 from 16 to 256")
    quantize.add_argument("--pow2-scales", "--hopper-pow2", action="store_true",
                          help="power-of-two weight scales, run with power-of-two activation scales (faster on "
                               "H100/H200, slightly larger error)")
    quantize.add_argument("--learned-smoothing", action="store_true",
                          help="also learn each layer's smoothing on its calibration inputs: a smaller error "
                               "for about 2.8x the quantization time")
    quantize.add_argument("--rotation", choices=quantize_recipe.ROTATIONS, default=quantize_recipe.DEFAULT_ROTATION,
                          help="group rotation of each 4-bit layer's inputs before quantization (hadamard: a "
                               "smaller error at no cost; learned: learned per layer, slower to quantize and to "
                               "run, the lowest error with --learned-smoothing; none: files that engines before "
                               "format version 2 read)")
    quantize.add_argument("--calibration-calls", type=int, default=4, choices=range(1, 17), metavar="N",
                          help="model calls on random stand-in inputs whose layer inputs calibrate the "
                               "quantization (1 to 16)")
    quantize.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="where the calibration forward and the quantization run, one block at a time: "
                               "cpu, cuda, cuda:1, ...")
    quantize.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    quantize.set_defaults(func=cmd_quantize)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except fmt.FormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
