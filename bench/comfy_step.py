"""One FLUX.1-dev-shaped call (19 + 38 blocks, 1024x1024: 4096 image + 512 text tokens) through
ComfyUI's own FLUX model code (issue 17 item 3), random weights, for each variant: bf16 (ComfyUI's
UNETLoader path), ComfyUI's fp8 ops (e4m3 weights, `_scaled_mm`: the UNETLoader's
fp8_e4m3fn_fast choice, `fp8_optimizations`, whose operations ComfyUI's pick_operations chooses;
the output names the class it chose), and ours (a natural-format file loaded by the pack's loader,
nodes/loader.load_svdquant_flux): exact scales, fast (power-of-two weight and activation scales),
exact weights + power-of-two activations, and the exact file in FP8 execution (the loader's
`execution` input). Each model is loaded by ComfyUI's model management
(load_models_gpu) and timed eager and compiled (`torch.compile` of the diffusion model, as
TorchCompileModel does; the first compiled call is timed on its own), with weight and peak memory.

    COMFYUI_PATH=DIR python bench/comfy_step.py [--json PATH] [--variants bf16,fp8,...] [--no-compile] [--profile]
        [--fused-norm-ab] [--pack DIR] [--host-profile]
Each timing also records how long the calls took to return (`*_issue_ms`, the host's time to issue one call) and
each timed call's [until done, until returned] (`*_calls_ms`).
--host-profile adds cProfile's largest own times of one eager and one compiled call (host side, any device).
--profile adds, per variant, the kernel time of one eager and one compiled call by kind (our kernels 1 and 2,
W4A16, cuBLAS GEMMs, attention, Triton, other) and its largest kernels (torch.profiler, CUDA only), taken
after that variant's timings; a later variant's timings then follow a profiler session, so time the
variants without --profile where the host's launch cost matters (compiled calls).
--fused-norm-ab times ours eager with the pending LayerNorm off and on (SVDQUANT_FUSED_NORM 0 / 1,
docs/DESIGN.md#producer-quantization), alternating, three rounds each, and counts the LayerNorms left pending in
one call of each.
    CPU check: ... --depth 1 --single 1 --height 64 --width 64 --txt 16 --device cpu --no-compile --repeats 1

On the GPU machine (`run`) ComfyUI and the wheels it needs that the device lacks travel in the
ignored folder .carry (47.4 MiB with the working tree for 0.3.64: under `carry`'s 64 MiB). Here:
    mkdir -p .carry/comfyui .carry/whl && (cd $COMFYUI_PATH && tar --exclude=__pycache__ -cf - comfy
        comfy_api comfy_execution comfyui_version.py folder_paths.py node_helpers.py protocol.py)
        | tar -xf - -C .carry/comfyui
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 -d .carry/whl av==18.1.0     (comfy_api imports av: 34 MiB)
then run(carry=[".carry"], timeout_s=600, command="python3 -m pip install -q --no-index --no-deps
    --no-compile --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/comfy_step.py --comfyui .carry/comfyui
    --json $OUT/comfy_step_h100.json 2>&1 | tee $OUT/log").
ComfyUI 0.33.0 also needs comfy-kitchen==0.2.31 (56 MiB) and comfy-aimdo==0.4.13 (0.3 MiB) as
wheels, and its tree is 19 MiB: over the 64 MiB of one call.
"""

import argparse
import functools
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo.utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_step import random_tensors  # noqa: E402
from record import write_result  # noqa: E402

VARIANTS = {  # name -> (label, power-of-two weight scales, power-of-two activations, FP8 execution); None: not ours
    "bf16": ("bf16 (ComfyUI ops)", None, None, None),
    "fp8": ("ComfyUI fp8 ops", None, None, None),
    "exact": ("ours exact", False, False, False),
    "fast": ("ours fast (pow2 w + act)", True, True, False),
    "exact-pow2act": ("ours exact w + pow2 act", False, True, False),
    "exact-fp8": ("ours exact, FP8 execution", False, False, True),
}
FP8_SKIPPED = "skipped (needs a CUDA GPU with fp8)"


def import_comfyui(path: str, device: str):
    """ComfyUI's modules from the tree at `path`, as tests/comfyui/comfy_side.py imports them."""
    sys.path.insert(0, os.path.abspath(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"  # read by ComfyUI's model management at import
    import comfy.model_management
    import comfy.sd

    return comfy


def import_pack(folder: Path = REPO):
    """The pack in `folder` as ComfyUI imports a custom node folder (under the name svdquant_pack)."""
    spec = importlib.util.spec_from_file_location("svdquant_pack", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from svdquant_pack.nodes import loader
    from svdquant_pack.svdquant import flux
    from svdquant_pack.svdquant import format as fmt

    return loader, flux, fmt


def write_natural_file(path, tensors: dict, cfg, flux, fmt, pow2_weights: bool) -> None:
    """`tensors` (random_tensors' natural format) as the file the pack's quantizer would write."""
    layers = {}
    for name, spec in flux.arch.linear_layers(cfg).items():
        if spec.kind != flux.arch.DENSE:
            kind = "w4a4" if spec.kind == flux.arch.W4A4 else "w4a16"
            own = {f: tensors[f"{name}.{f}"] for f in fmt.LAYER_FIELDS[kind] if f"{name}.{f}" in tensors}
            layers[name] = fmt.describe_w4a4(own) if kind == "w4a4" else fmt.describe_w4a16(own)
    model = fmt.QuantizedModel(tensors, layers, "flux", cfg.to_dict())
    model.quantization["pow2_scales"] = pow2_weights
    fmt.save_model(path, model)


def skipped_reason(comfy, variant: str, device: torch.device) -> str | None:
    """Why `variant` cannot run on `device`; None where it can."""
    if variant == "fp8" and not (device.type == "cuda" and comfy.model_management.supports_fp8_compute(device)):
        return FP8_SKIPPED
    return None


def load_variant(comfy, pack, cfg, variant: str, gen: torch.Generator, tmp: str):
    """`variant`'s FLUX model with random weights (drawn on gen's device) in ComfyUI's patcher, not yet
    loaded by its model management: bf16 and fp8 by ComfyUI's own UNETLoader path from a 16-bit state
    dict, ours from a natural-format file (written once per weight format into `tmp`) by the pack's
    loader."""
    loader, flux, fmt = pack
    _, pow2_weights, pow2_activations, fp8_execution = VARIANTS[variant]
    if pow2_weights is None:
        options = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True} if variant == "fp8" else {"dtype": torch.bfloat16}
        patcher = comfy.sd.load_diffusion_model_state_dict(random_tensors(cfg, False, False, gen), model_options=options)
    else:
        path = os.path.join(tmp, f"pow2w{int(pow2_weights)}.safetensors")
        if not os.path.exists(path):
            write_natural_file(path, random_tensors(cfg, True, pow2_weights, gen), cfg, flux, fmt, pow2_weights)
        patcher = loader.load_svdquant_flux(path, torch.bfloat16, "default", pow2_activations, fp8_execution)
    # later ComfyUI builds the diffusion model in eval mode (0.33.0 does); 0.3.64 leaves it in training mode, where
    # its fp8 operation skips the FP8 GEMM and casts the weights to 16 bits at every call (bench/NOTES.md#comfy-fp8-eval)
    patcher.model.diffusion_model.eval()
    return patcher


def layer_ops(patcher) -> str:
    """The patcher's class and the operation ComfyUI built the first qkv layer with (fp8: the class
    its pick_operations chose) and that layer's weight dtype."""
    qkv = patcher.model.diffusion_model.double_blocks[0].img_attn.qkv
    return f"{type(patcher).__name__}, qkv {type(qkv).__module__}.{type(qkv).__qualname__} ({qkv.weight.dtype})"


class Fp8OpFailures(logging.Handler):
    """Counts ComfyUI's "Exception during fp8 op" records: its fp8 operation catches a failed `_scaled_mm`
    and runs the layer in 16 bits instead (comfy.ops.fp8_ops), so the fp8 row measures that fallback."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count, self.first = 0, None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Exception during fp8 op"):
            self.count += 1
            self.first = self.first or message


# kernel name fragments -> kind, first match wins (--profile)
KERNEL_KINDS = (("ours k1", ("act_quant",)), ("ours k2", ("w4a4_gemm",)), ("w4a16", ("w4a16",)),
                ("attention", ("flash", "fmha", "sdpa", "attention")),
                ("gemm", ("nvjet", "gemm", "xmma", "cutlass", "scaled_mm")), ("triton", ("triton",)))


def kernel_time(fn) -> dict:
    """GPU kernel time of one fn() call (torch.profiler): total, by KERNEL_KINDS, and the 12 largest kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time / 1e3
            entry[1] += 1
    kinds: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name.lower() for key in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:12]
    return {"total_ms": round(sum(kinds.values()), 2),
            "by_kind_ms": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda item: -item[1])},
            "largest": [[name[:120], round(ms, 3), count] for name, (ms, count) in top]}


def pending_norms_in(call, pending) -> int:
    """How many LayerNorms stay pending (pending.pending_layer_norm) in one call."""
    made, make = [], pending.pending_layer_norm

    def counted(*args):
        made.append(args)
        return make(*args)

    pending.pending_layer_norm = counted
    try:
        call()
    finally:
        pending.pending_layer_norm = make
    return len(made)


def timed(fn, sync, warmup: int, repeats: int) -> tuple[float, float, list[list[float]]]:
    """Over `repeats` calls after `warmup` calls, in milliseconds: the median of fn() until the device is done, the
    median of fn() until it returns (the host's time to issue the call: near the first, the GPU waited for the
    host), and each call's [until done, until returned], in order."""
    for _ in range(warmup):
        fn()
    times, issued = [], []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        issued.append((time.perf_counter() - start) * 1e3)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    calls = [[round(t, 2), round(i, 2)] for t, i in zip(times, issued)]
    return round(statistics.median(times), 2), round(statistics.median(issued), 2), calls


def host_profile(fn, top: int = 25) -> list:
    """cProfile of one fn() call: the `top` functions by their own time, as [place, own ms, calls]."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [[f"{Path(file).name}:{line}:{name}", round(own * 1e3, 3), calls]
            for (file, line, name), (_, calls, own, _, _) in rows]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What this benchmark and comfy_capped.py both take: the ComfyUI tree, the model's depth, the
    call's size and the device."""
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI tree (default: $COMFYUI_PATH)")
    parser.add_argument("--depth", type=int, default=19)
    parser.add_argument("--single", type=int, default=38)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--txt", type=int, default=512, help="text tokens")
    parser.add_argument("--device", default="cuda")


def chosen_variants(parser: argparse.ArgumentParser, args) -> list[str]:
    """--variants as a list, after checking it and that a ComfyUI tree is given."""
    variants = args.variants.split(",")
    if not args.comfyui or any(v not in VARIANTS for v in variants):
        parser.error("--comfyui (or COMFYUI_PATH) is required; --variants takes names from " + ",".join(VARIANTS))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "comfy_step_h100.json"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {','.join(VARIANTS)}")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pack", default=str(REPO),
                        help="the pack's folder (default: this checkout), e.g. an older commit's `git archive`, so "
                             "that one GPU session can time two commits, a process each")
    parser.add_argument("--profile", action="store_true", help="kernel time by kind of one eager and one compiled call")
    parser.add_argument("--host-profile", action="store_true",
                        help="cProfile of one eager and one compiled call (the host's own time by function)")
    parser.add_argument("--fused-norm-ab", action="store_true",
                        help="ours eager with the pending LayerNorm off and on (SVDQUANT_FUSED_NORM), alternating")
    args = parser.parse_args()
    variants = chosen_variants(parser, args)
    logging.basicConfig(level=logging.INFO)  # ComfyUI's word on its loads and a failed fp8 op (it falls back)
    comfy = import_comfyui(args.comfyui, args.device)
    pack = import_pack(Path(args.pack))
    flux = pack[1]
    from comfyui_version import __version__ as comfyui_version
    if args.fused_norm_ab:
        from svdquant_pack.svdquant import pending

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = flux.arch.FluxConfig(depth=args.depth, depth_single_blocks=args.single)
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    inputs = (torch.randn(1, 16, args.height // 8, args.width // 8, generator=gen, device=device).to(bf16),
              torch.full((1,), 0.5, device=device, dtype=bf16),
              torch.randn(1, args.txt, cfg.context_in_dim, generator=gen, device=device).to(bf16))
    extra = {"y": torch.randn(1, cfg.vec_in_dim, generator=gen, device=device).to(bf16),
             "guidance": torch.full((1,), 3.5, device=device, dtype=bf16)}
    rows, notes = {}, {}

    def record():
        write_result(args.json, what="ComfyUI's FLUX, one call, random weights, eager and torch.compile",
                     comfyui=comfyui_version, config={"depth": cfg.depth, "single": cfg.depth_single_blocks,
                                                      "height": args.height, "width": args.width, "txt": args.txt},
                     rows=rows, models=notes, pack=os.path.abspath(args.pack))

    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            label = VARIANTS[variant][0]
            reason = skipped_reason(comfy, variant, device)
            if reason is not None:
                rows[label] = {"skipped": reason}
                continue
            patcher = load_variant(comfy, pack, cfg, variant, gen, tmp)
            comfy.model_management.load_models_gpu([patcher])
            model = patcher.model.diffusion_model
            state = model.state_dict().values()
            weight_bytes = sum(t.numel() * t.element_size() for t in state)
            on_device = sum(t.numel() * t.element_size() for t in state if t.device.type == device.type)
            notes[label] = f"{layer_ops(patcher)}, weights on {device.type}: {on_device / max(weight_bytes, 1):.0%}"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row = {"weights_GiB": round(weight_bytes / 2**30, 2)}
            failures = Fp8OpFailures()
            logging.getLogger().addHandler(failures)
            call = functools.partial(model, *inputs, **extra)
            with torch.no_grad():
                row["eager_ms"], row["eager_issue_ms"], row["eager_calls_ms"] = timed(
                    call, sync, args.warmup, args.repeats)
                if args.fused_norm_ab and VARIANTS[variant][1] is not None:
                    for _ in range(3):
                        for flag in ("0", "1"):
                            os.environ[pending.FUSED_NORM_ENV] = flag
                            row.setdefault(f"eager_ms_fused_norm_{flag}", []).append(
                                timed(call, sync, args.warmup, args.repeats)[0])
                            row[f"pending_norms_per_call_{flag}"] = pending_norms_in(call, pending)
                    os.environ.pop(pending.FUSED_NORM_ENV)
                if not args.no_compile:
                    torch._dynamo.utils.counters.clear()
                    compiled = torch.compile(model)  # what TorchCompileModel compiles (backend inductor)
                    compiled_call = functools.partial(compiled, *inputs, **extra)
                    sync()
                    start = time.perf_counter()
                    compiled_call()
                    sync()
                    row["first_compiled_call_s"] = round(time.perf_counter() - start, 1)
                    # how many graphs dynamo compiled and how often it broke them (ComfyUI's own
                    # Python breaks some for every model)
                    row["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                    row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
                    row["compiled_ms"], row["compiled_issue_ms"], row["compiled_calls_ms"] = timed(
                        compiled_call, sync, args.warmup, args.repeats)
                # profiles after this model's timings, so that no timing follows a profiler session
                if args.host_profile:
                    row["eager_host_profile"] = host_profile(call)
                    if not args.no_compile:
                        row["compiled_host_profile"] = host_profile(compiled_call)
                if args.profile and cuda:
                    row["eager_kernels"] = kernel_time(call)
                    if not args.no_compile:
                        row["compiled_kernels"] = kernel_time(compiled_call)
                if not args.no_compile:
                    del compiled, compiled_call
                    torch._dynamo.reset()
            row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
            logging.getLogger().removeHandler(failures)
            if failures.count:
                row["fp8_op_failures"] = {"count": failures.count, "first": failures.first}
            rows[label] = row
            print("row", json.dumps({label: row, "model": notes[label]}), flush=True)
            record()  # after each model: what is done survives a later one's timeout
            comfy.model_management.unload_all_models()
            del patcher, model, state
            if cuda:
                torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"ComfyUI {comfyui_version}, FLUX.1-dev shape ({cfg.depth}+{cfg.depth_single_blocks} blocks), "
          f"{args.height}x{args.width} + {args.txt} text tokens, one call, {name}")
    base = rows.get(VARIANTS["bf16"][0], {})

    def cell(row, key, width):
        if key not in row:
            return f"{'':>{width + 7}}"
        ratio = f"{base[key] / row[key]:.2f}x" if key in base else "-"
        return f"{row[key]:>{width}.2f} {ratio:>6}"

    def issued(row, key):
        return f"{row[key]:>7.2f}" if key in row else f"{'':>7}"

    print(f"{'variant':<26} {'eager ms':>10} {'x bf16':>6} {'issued':>7} {'compiled ms':>11} {'x bf16':>6} "
          f"{'issued':>7} {'1st compiled s':>15} {'weights GiB':>12} {'peak GiB':>9}")
    for label, row in rows.items():
        if "skipped" in row:
            print(f"{label:<26} {row['skipped']}")
            continue
        peak = "n/a" if row["peak_GiB"] is None else f"{row['peak_GiB']:.2f}"
        first = f"{row['first_compiled_call_s']:.1f}" if "first_compiled_call_s" in row else ""
        print(f"{label:<26} {cell(row, 'eager_ms', 10)} {issued(row, 'eager_issue_ms')} {cell(row, 'compiled_ms', 11)} "
              f"{issued(row, 'compiled_issue_ms')} {first:>15} {row['weights_GiB']:>12.2f} {peak:>9}")
    for label, note in notes.items():
        print(f"  {label}: {note}")
    print("issued: the median call's time until it returned, before the device finished (near the call's own time, "
          "the GPU waited for the host)")
    record()


if __name__ == "__main__":
    main()
