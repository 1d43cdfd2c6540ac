"""FLUX.1-dev through ComfyUI on a simulated 16 / 12 / 8 GiB card (issue 17 item 4): for ours (fast
and exact formats, loaded by the pack's loader), ComfyUI's fp8 ops and bf16 (ComfyUI's UNETLoader
path), random weights (comfy_step.load_variant), a 20-step 1024x1024 sampling run through
ComfyUI's own sampling code (comfy.sample.sample, euler / simple, cfg 1.0 as a FLUX.1-dev
workflow's KSampler runs it; random T5 tokens, CLIP pooled vector and guidance 3.5 of the right
shapes), uncapped and at each cap. Each row: the model call of one step (median over steps 2..N of
ComfyUI's apply_model, timed by a model_function_wrapper: the step's compute plus ComfyUI's
streaming of the weights it left in system memory), the first step, the load (sampling start to
the first call: ComfyUI moving what fits to the GPU), the image (the whole sampling run) and the
image with the model already loaded (first call to the end: what every later image on that card
costs, as ComfyUI keeps the model loaded between prompts), the ratio of the per-step time and of
the loaded image to ours fast and ours exact at the same cap, the peak GPU memory, and how much of
the model ComfyUI kept on the GPU (its own loaded_size / model_size). Eager only.

How the cap is made. Before each capped run every model is unloaded (the model sits in system
memory, ComfyUI's offload device) and a ballast of (total device memory - cap) bytes is allocated
on the GPU, in torch's allocator; what the process already holds (CUDA context, cuBLAS workspace,
anything left over) then counts against the cap as it does on a card of that size. Why this is
what a card of `cap` GiB does in ComfyUI 0.3.64 (comfy/model_management.py):
  - every load decision reads free memory, get_free_memory = the driver's free memory
    (torch.cuda.mem_get_info) + torch's reserved-but-inactive bytes; the ballast lowers the first
    by its size and is active, so it adds nothing to the second: ComfyUI sees cap - (used) free;
  - from that it computes what to keep on the GPU (load_models_gpu: free minus the sampler's
    estimate of the inference memory and the 0.4 GiB extra reserve) and partially loads the rest
    (lowvram: those layers' weights stay in system memory and are copied in at each call);
  - the total (mem_get_info's second value, still the H100's) feeds only the Windows reserve, the
    startup log, and dtype choices for GPUs without bf16 or fp8 compute: none of them on Linux on
    an H100, so nothing else differs;
  - the cap is physical: an allocation beyond it fails as on the small card (out of memory, no
    silent use of the H100's other memory), unlike `--reserve-vram`, which only shifts ComfyUI's
    arithmetic.
What differs from a real small card: this host's PCIe link (the streamed weights' copy speed:
a laptop RTX 4090 has PCIe 4.0 x16 at most, usually slower in practice), and torch's native
allocator is used (as in comfy_step; ComfyUI's main.py would pick cudaMallocAsync).
The peak is torch's peak allocation during the sampling run less the ballast. The first row of the
first 4-bit variant also builds the kernels (NVRTC, first use) in its first model call, which its
image times include.

    COMFYUI_PATH=DIR python bench/comfy_capped.py [--json PATH] [--variants fast,bf16,fp8,exact]
        [--caps none,16,12,8] [--steps 20] [--deadline-s 480]
    CPU check (no cap: the CPU has nothing to cap): ... --device cpu --caps none --variants bf16,fast
        --depth 1 --single 1 --height 64 --width 64 --txt 16 --steps 2
On the GPU machine: as bench/comfy_step.py (.carry with ComfyUI 0.3.64 and the av wheel) plus the
two wheels comfy.sample needs (its k-diffusion samplers import torchsde), in .carry/whl:
    pip download --no-deps --only-binary=:all: -d .carry/whl torchsde==0.2.6 trampoline==0.1.2
and bench/comfy_capped.py --json $OUT/comfy_capped_h100.json. Each row is printed as a JSON line and
the JSON file is rewritten after each row, so a run cut short keeps what it measured; configurations
not started by --deadline-s seconds are recorded as skipped, an out-of-memory error at a cap as that
row's failure (a finding: ComfyUI's estimate did not leave that model enough).
"""

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_step import (VARIANTS, add_model_arguments, chosen_variants, import_comfyui, import_pack,  # noqa: E402
                        layer_ops, load_variant, skipped_reason)
from record import write_result  # noqa: E402

GiB = 2**30
REFERENCES = ("fast", "exact")  # the ratios' denominators: ours at the same cap


def parse_caps(text: str) -> list[int | None]:
    """'none,16,12,8' -> [None, 16, 12, 8] (GiB; None: the whole card)."""
    caps = []
    for item in text.split(","):
        cap = None if item.strip() == "none" else int(item)
        if cap is not None and cap <= 0:
            raise ValueError(f"a cap is a positive number of GiB, not {item!r}")
        caps.append(cap)
    return caps


def ballast_bytes(total: int, cap_gib: int | None) -> int:
    """Bytes to hold so that a card of `total` bytes has the memory of a `cap_gib` GiB one."""
    if cap_gib is None:
        return 0
    if cap_gib * GiB >= total:
        raise ValueError(f"a {cap_gib} GiB cap is not below the card's {total / GiB:.1f} GiB")
    return total - cap_gib * GiB


def hold_ballast(nbytes: int, device: torch.device) -> torch.Tensor | None:
    """The ballast, after giving torch's cached blocks back so that they count as the driver's free
    memory; fails if the process already uses more than the cap leaves (nothing to measure)."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free:
        raise RuntimeError(f"the ballast needs {nbytes / GiB:.2f} GiB, {free / GiB:.2f} GiB is free")
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None


def flux_conditioning(cfg, txt: int, gen: torch.Generator, bf16) -> list:
    """What CLIPTextEncode + FluxGuidance hand the sampler: T5 tokens, the CLIP pooled vector and the
    guidance, in system memory (ComfyUI's intermediate device) as a text encoder leaves them."""
    tokens = torch.randn(1, txt, cfg.context_in_dim, generator=gen).to(bf16)
    pooled = torch.randn(1, cfg.vec_in_dim, generator=gen).to(bf16)
    return [[tokens, {"pooled_output": pooled, "guidance": 3.5}]]


class CallTimer:
    """A ComfyUI model_function_wrapper that records when each model call starts and ends."""

    def __init__(self, sync):
        self.sync, self.starts, self.ends = sync, [], []

    def __call__(self, apply_model, args):
        self.sync()
        self.starts.append(time.perf_counter())
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.sync()
        self.ends.append(time.perf_counter())
        return out


def sample_image(comfy, patcher, latent, positive, negative, steps: int, sync) -> dict:
    """One KSampler run (euler, simple, cfg 1.0) from `latent`, timed as the module docstring says."""
    timer = CallTimer(sync)
    patcher.set_model_unet_function_wrapper(timer)
    noise = comfy.sample.prepare_noise(latent, 0)
    sync()
    start = time.perf_counter()
    comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                        disable_pbar=True, seed=0)
    sync()
    end = time.perf_counter()
    calls = [(e - s) * 1e3 for s, e in zip(timer.starts, timer.ends)]
    return {"step_ms": round(statistics.median(calls[1:] or calls), 1), "first_step_ms": round(calls[0], 1),
            "load_s": round(timer.starts[0] - start, 2), "image_s": round(end - start, 2),
            "image_loaded_s": round(end - timer.starts[0], 2), "model_calls": len(calls)}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with its per-step and loaded-image times over those of ours fast / exact at the same
    cap (above 1: ours is that many times faster)."""
    ours = {(r["variant"], r["cap_GiB"]): r for r in rows if "step_ms" in r and r["variant"] in REFERENCES}
    out = []
    for row in rows:
        row = dict(row)
        for ref in REFERENCES:
            base = ours.get((ref, row["cap_GiB"]))
            if base is not None and "step_ms" in row:
                row[f"step_over_{ref}"] = round(row["step_ms"] / base["step_ms"], 3)
                row[f"image_over_{ref}"] = round(row["image_loaded_s"] / base["image_loaded_s"], 3)
        out.append(row)
    return out


def print_table(rows: list[dict], title: str) -> None:
    """The rows side by side; '/ fast', '/ exact': the time over ours' at the same cap."""
    columns = [("step ms", "step_ms", ".1f"), ("/ fast", "step_over_fast", ".2f"),
               ("/ exact", "step_over_exact", ".2f"),
               ("1st ms", "first_step_ms", ".1f"), ("load s", "load_s", ".2f"), ("image s", "image_s", ".2f"),
               ("loaded s", "image_loaded_s", ".2f"), ("/ fast", "image_over_fast", ".2f"),
               ("/ exact", "image_over_exact", ".2f"), ("GPU GiB", "on_gpu_GiB", ".2f"), ("of GiB", "model_GiB", ".2f"),
               ("peak GiB", "peak_GiB", ".2f")]
    print(title)
    print(f"{'variant':<26} {'cap':>4} " + " ".join(f"{head:>{max(len(head), 7)}}" for head, _, _ in columns))
    for r in rows:
        cap = "-" if r["cap_GiB"] is None else str(r["cap_GiB"])
        if "step_ms" not in r:
            print(f"{VARIANTS[r['variant']][0]:<26} {cap:>4} {r.get('skipped') or r['failed']}")
            continue
        cells = [format(r[key], spec) if r.get(key) is not None else "" for _, key, spec in columns]
        print(f"{VARIANTS[r['variant']][0]:<26} {cap:>4} "
              + " ".join(f"{cell:>{max(len(head), 7)}}" for cell, (head, _, _) in zip(cells, columns)))
    print("loaded s: the image with the model already loaded (first model call to the end); GPU GiB: what ComfyUI "
          "kept on the GPU of the model's GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--json",
                        default=os.path.join(os.environ.get("OUT", "bench/results"), "comfy_capped_h100.json"))
    parser.add_argument("--variants", default="fast,bf16,fp8,exact",
                        help=f"a subset of {','.join(VARIANTS)}, run in this order")
    parser.add_argument("--caps", default="none,16,12,8", help="GiB of usable device memory, 'none' for the whole card")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--deadline-s", type=float, default=480, help="start no configuration after this many seconds")
    args = parser.parse_args()
    variants, caps = chosen_variants(parser, args), parse_caps(args.caps)
    if args.device == "cpu" and caps != [None]:
        parser.error("on the CPU only --caps none: the cap is device memory")
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO)  # ComfyUI's word on each load: "loaded partially / completely"
    comfy = import_comfyui(args.comfyui, args.device)
    import comfy.sample  # noqa: E402  (after import_comfyui has set ComfyUI's options)

    pack = import_pack()
    flux = pack[1]
    from comfyui_version import __version__ as comfyui_version

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    total = torch.cuda.mem_get_info(device)[1] if cuda else None
    ballasts = {cap: ballast_bytes(total, cap) if cuda else 0 for cap in caps}  # checked before any work
    cfg = flux.arch.FluxConfig(depth=args.depth, depth_single_blocks=args.single)
    bf16 = torch.bfloat16
    cond_gen = torch.Generator().manual_seed(1)
    positive = flux_conditioning(cfg, args.txt, cond_gen, bf16)
    negative = flux_conditioning(cfg, args.txt, cond_gen, bf16)  # not evaluated at cfg 1.0, as in ComfyUI
    latent = torch.zeros(1, cfg.in_channels, args.height // 8, args.width // 8)  # EmptySD3LatentImage
    card = f"{torch.cuda.get_device_name()} ({total / GiB:.1f} GiB)" if cuda else "CPU"
    title = (f"ComfyUI {comfyui_version}, FLUX.1-dev shape ({cfg.depth}+{cfg.depth_single_blocks} blocks), "
             f"{args.height}x{args.width} + {args.txt} text tokens, {args.steps} steps euler, {card}")
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        print("row", json.dumps(row), flush=True)
        write_result(args.json, what="ComfyUI's FLUX on a simulated smaller card: one step and a sampling run",
                     comfyui=comfyui_version, rows=with_ratios(rows),
                     config={"depth": cfg.depth, "single": cfg.depth_single_blocks, "height": args.height,
                             "width": args.width, "txt": args.txt, "steps": args.steps, "sampler": "euler",
                             "scheduler": "simple", "cfg": 1.0})

    gen = torch.Generator(device=device).manual_seed(0)
    late = f"not started: past --deadline-s {args.deadline_s:.0f}"
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            reason = skipped_reason(comfy, variant, device)
            if reason is None and time.perf_counter() - started > args.deadline_s:
                reason = late
            if reason is not None:
                for cap in caps:
                    record({"variant": variant, "cap_GiB": cap, "skipped": reason})
                continue
            patcher = load_variant(comfy, pack, cfg, variant, gen, tmp)
            note = layer_ops(patcher)
            patcher.detach()  # in system memory (ComfyUI's offload device) wherever ComfyUI built it
            for cap in caps:
                if time.perf_counter() - started > args.deadline_s:
                    record({"variant": variant, "cap_GiB": cap, "skipped": late})
                    continue
                comfy.model_management.unload_all_models()  # the model in system memory, as after a file load
                row = {"variant": variant, "cap_GiB": cap}
                try:
                    ballast = hold_ballast(ballasts[cap], device) if cuda else None
                except RuntimeError as exc:
                    record({**row, "skipped": str(exc)})
                    continue
                try:
                    row["comfy_free_GiB"] = round(comfy.model_management.get_free_memory(device) / GiB, 2)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    with torch.no_grad():
                        row.update(sample_image(comfy, patcher, latent, positive, negative, args.steps, sync))
                    peak = (torch.cuda.max_memory_allocated() - ballasts[cap]) / GiB if cuda else None
                    row.update({"on_gpu_GiB": round(patcher.loaded_size() / GiB, 2),
                                "model_GiB": round(patcher.model_size() / GiB, 2),
                                "partially_loaded": bool(patcher.model.model_lowvram),
                                "peak_GiB": None if peak is None else round(peak, 2), "model": note})
                except torch.OutOfMemoryError as exc:  # a finding at that cap, not the end of the run
                    row["failed"] = f"out of memory: {str(exc).splitlines()[0]}"
                finally:
                    del ballast
                record(row)
            comfy.model_management.unload_all_models()
            del patcher
    print_table(with_ratios(rows), title)


if __name__ == "__main__":
    main()
