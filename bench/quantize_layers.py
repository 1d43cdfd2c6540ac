"""Seconds to quantize one W4A4 layer of each FLUX.1-dev shape with the default recipe, with its
residual rounded to nearest (compensate=False) and with the opt-in learned smoothing
(smoothing_steps=quantize.LEARNED_SMOOTHING_STEPS), and the sums over the full model's 228 W4A4
layers: what the error compensation and the learned smoothing cost at full size.

    python bench/quantize_layers.py [--device cuda] [--tokens 1024] [--out bench/results/quantize_layers_h100.json]

Random N(0, 1/K) weights, Gaussian inputs with 8 channels 50x larger (the calibration tokens a
layer gets: at most quantize.MAX_CALIBRATION_TOKENS), drawn on the device; one untimed warm-up
layer first (CUDA libraries, cuSOLVER).
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import write_result  # noqa: E402
from svdquant import flux, quantize  # noqa: E402


VARIANTS = {"default_s": {}, "nearest_s": {"compensate": False},
            "learned_s": {"smoothing_steps": quantize.LEARNED_SMOOTHING_STEPS}}


def seconds(weight: torch.Tensor, x: torch.Tensor, **options) -> float:
    if weight.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    quantize.quantize_linear(weight, None, x, **options)
    if weight.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=quantize.MAX_CALIBRATION_TOKENS)
    parser.add_argument("--shapes", help="N1xK1,N2xK2,... instead of FLUX.1-dev's (a quick check)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize_layers_h100.json"))
    args = parser.parse_args()
    specs = flux.arch.linear_layers(flux.arch.FluxConfig())
    counts = Counter((s.out_features, s.in_features) for s in specs.values() if s.kind == flux.arch.W4A4)
    if args.shapes:
        counts = Counter({tuple(map(int, shape.split("x"))): 1 for shape in args.shapes.split(",")})
    gen = torch.Generator(device=args.device).manual_seed(0)

    def layer(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(args.tokens, k, device=args.device, generator=gen)
        x[:, :8] *= 50.0
        return torch.randn(n, k, device=args.device, generator=gen) / k ** 0.5, x

    seconds(*layer(256, 256), smoothing_steps=2)
    rows = []
    print(f"{'N x K':>13} {'layers':>6} {'default s':>10} {'nearest s':>10} {'learned s':>10}", flush=True)
    for (n, k), count in counts.items():
        weight, x = layer(n, k)
        row = {"n": n, "k": k, "layers": count}
        row.update({key: round(seconds(weight, x, **options), 3) for key, options in VARIANTS.items()})
        rows.append(row)
        print(f"{f'{n} x {k}':>13} {count:>6} " + " ".join(f"{row[key]:>10.3f}" for key in VARIANTS), flush=True)
        del weight, x
    total = {key: round(sum(r[key] * r["layers"] for r in rows), 1) for key in VARIANTS}
    print(f"{'all layers':>13} {sum(counts.values()):>6} " + " ".join(f"{total[key]:>10.1f}" for key in VARIANTS))
    write_result(args.out, what="seconds to quantize one W4A4 layer (quantize_linear, rank 32) per FLUX.1-dev shape: "
                 "default recipe (error-compensated residual), compensate=False, and the opt-in learned smoothing "
                 f"(smoothing_steps={quantize.LEARNED_SMOOTHING_STEPS}); totals over the model's layers",
                 device_arg=args.device, tokens=args.tokens, shapes=rows, totals=total)


if __name__ == "__main__":
    main()
