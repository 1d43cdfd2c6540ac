"""Fidelity of 4-bit schemes on a synthetic FLUX-shaped layer with activation outliers.

    python bench/fidelity.py [--out bench/results/fidelity_synthetic.json]

Prints relative output errors (float64 reference) for naive W4A4, smooth-only W4A4,
SVDQuant r32 (exact scales, and with the Hopper fast path's power-of-two restrictions: _pow2a
activation scales, design (d); _pow2w weight scales, design (c); _pow2wa both) and W4A16
weight-only, and writes them as JSON with the machine, date and commit.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import write_result  # noqa: E402
from svdquant import synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity_synthetic.json"))
    args = parser.parse_args()
    shape = dict(n=3072, k=3072, tokens=256, outliers=8, seed=0)
    start = time.perf_counter()
    errors = synthetic.layer_fidelity(*synthetic.outlier_layer(**shape), rank=32, pow2=True)
    seconds = time.perf_counter() - start
    print(f"{'scheme':<20} {'rel. error':>10}")
    for name, err in errors.items():
        print(f"{name:<20} {err:>10.4f}")
    write_result(args.out, what="relative output error ||y - y_ref|| / ||y_ref|| vs a float64 reference, "
                 "synthetic layer (Gaussian inputs with 8 outlier channels scaled 20..100x, Student-t(3) weights)",
                 shape=shape, errors=errors, seconds=round(seconds, 1))


if __name__ == "__main__":
    main()
