"""One FLUX.1-dev-sized transformer call at 1024x1024 (4096 image + 512 text tokens) on the GPU:
the engine's own FLUX forward (svdquant/flux/model.py, eager, unfused glue) with 16-bit linears,
with SVDQuant W4A4 layers on the exact Hopper path, with exact weight scales and power-of-two
activation scales (what a nunchaku-format model runs with the loader's activation_scales =
power-of-two), and with power-of-two scales (weights and activations; the row named "fast").
docs/DESIGN.md#scales defines them.

    python bench/flux_step.py [--json PATH] [--depth 19 --single 38] [--kernels sm90]

Weights are random (natural-format tensors drawn directly, no quantizer run): this measures
time and memory, not image quality. Prints a table and writes its JSON to --json.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import write_result  # noqa: E402
from svdquant import file_options, flux, kernels, numerics  # noqa: E402


def random_tensors(cfg: flux.arch.FluxConfig, quantized: bool, pow2: bool, gen: torch.Generator) -> dict:
    """A state dict for `cfg` on gen's device: dense bf16 linears, or W4A4/W4A16 natural tensors."""
    dev, bf16 = gen.device, torch.bfloat16
    out = {name: torch.ones(size, device=dev, dtype=bf16) for name, size in flux.arch.norm_scales(cfg).items()}
    for name, spec in flux.arch.linear_layers(cfg).items():
        n, k = spec.out_features, spec.in_features
        if spec.bias:
            out[f"{name}.bias"] = (0.01 * torch.randn(n, generator=gen, device=dev)).to(bf16)
        if not quantized or spec.kind == flux.arch.DENSE:
            out[f"{name}.weight"] = (torch.randn(n, k, generator=gen, device=dev) / k ** 0.5).to(bf16)
            continue
        out[f"{name}.qweight"] = torch.randint(0, 256, (n, k // 2), generator=gen, device=dev, dtype=torch.uint8)
        if spec.kind == flux.arch.W4A16:
            out[f"{name}.wscales"] = torch.full((k // 64, n), 0.01 / k ** 0.5, device=dev, dtype=bf16)
            out[f"{name}.wzeros"] = torch.full((k // 64, n), -0.07 / k ** 0.5, device=dev, dtype=bf16)
            continue
        base = torch.full((n,), 0.3 / k ** 0.5, device=dev)
        exps = torch.randint(0, 3, (k // 64, n), generator=gen, device=dev) if pow2 else torch.rand(k // 64, n, generator=gen, device=dev)
        out[f"{name}.wscales"] = (base * torch.exp2(-exps.float())).to(bf16)
        out[f"{name}.smooth"] = torch.ones(k, device=dev, dtype=bf16)
        out[f"{name}.lora_down"] = (torch.randn(k, 32, generator=gen, device=dev) / k ** 0.5).to(bf16)
        out[f"{name}.lora_up"] = (0.1 * torch.randn(n, 32, generator=gen, device=dev)).to(bf16)
        if spec.gelu_columns is not None:
            shift = torch.zeros(k, device=dev)
            shift[spec.gelu_columns[0]:spec.gelu_columns[1]] = numerics.GELU_SHIFT
            out[f"{name}.shift"] = shift.to(bf16)
            out.setdefault(f"{name}.bias", torch.zeros(n, device=dev, dtype=bf16))
    return out


def time_call(model, args, repeats: int = 7) -> float:
    """Median milliseconds of model(*args) over `repeats` calls after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            model(*args)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "flux_step_h100.json"))
    parser.add_argument("--depth", type=int, default=19)
    parser.add_argument("--single", type=int, default=38)
    parser.add_argument("--kernels", default="sm90", choices=sorted(kernels.W4A4_KERNELS),
                        help="the W4A4 kernels the quantized rows run (kernels.forced_family)")
    args = parser.parse_args()
    cfg = flux.arch.FluxConfig(depth=args.depth, depth_single_blocks=args.single)
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf16 = torch.bfloat16
    inputs = (torch.randn(1, 16, 128, 128, generator=gen, device="cuda").to(bf16),
              torch.full((1,), 0.5, device="cuda", dtype=bf16),
              torch.randn(1, 512, 4096, generator=gen, device="cuda").to(bf16),
              torch.randn(1, 768, generator=gen, device="cuda").to(bf16),
              torch.full((1,), 3.5, device="cuda", dtype=bf16))
    rows = {}
    # (name, quantized, power-of-two weight scales, power-of-two activation scales); the third row is
    # what a nunchaku-format model runs with the loader's activation_scales = power-of-two
    for name, quantized, pow2w, pow2a in (("bf16", False, False, False), ("svdquant exact", True, False, False),
                                          ("svdquant exact w, pow2 act", True, False, True),
                                          ("svdquant fast (pow2)", True, True, True)):
        tensors = random_tensors(cfg, quantized, pow2w, gen)
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        model = flux.model.from_tensors(cfg, tensors).to("cuda")  # dense layers are built on the CPU
        del tensors
        file_options.apply_file_options(model, {}, pow2_activations=pow2a)
        torch.cuda.reset_peak_memory_stats()
        with kernels.forced_family(args.kernels):
            ms = time_call(model, inputs)
        rows[name] = {"ms": round(ms, 2), "weights_GiB": round(weight_bytes / 2**30, 2),
                      "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        del model
        torch.cuda.empty_cache()
    base = rows["bf16"]["ms"]
    print(f"FLUX.1-dev shape ({cfg.depth}+{cfg.depth_single_blocks} blocks), 1024x1024, one call, {torch.cuda.get_device_name()}")
    print(f"{'variant':<27} {'ms':>8} {'x bf16':>7} {'weights GiB':>12} {'peak GiB':>9}")
    for name, row in rows.items():
        print(f"{name:<27} {row['ms']:>8.2f} {base / row['ms']:>7.2f} {row['weights_GiB']:>12.2f} {row['peak_GiB']:>9.2f}")
    write_result(args.json, what="engine FLUX forward (eager), one call at 1024x1024, random weights",
                 w4a4_kernels=args.kernels, rows=rows)

if __name__ == "__main__":
    main()
