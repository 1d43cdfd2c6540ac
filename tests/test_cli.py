"""The command line: the demo (README's main job) and info."""

import logging
import re
import sys

import torch

from svdquant import cli, flux, kernels
from svdquant import format as fmt


def test_demo_quantizes_loads_samples_and_reports(tmp_path, capsys, monkeypatch):
    # the engine's log lines in the same stream as the table, the first-use ones announced again
    monkeypatch.setattr(kernels, "_announced", set())
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger("svdquant").addHandler(handler)
    try:
        assert cli.main(["demo", "--variant", "dev", "--steps", "2", "--size", "16", "--keep", str(tmp_path)]) == 0
    finally:
        logging.getLogger("svdquant").removeHandler(handler)
    out = capsys.readouterr().out
    assert "tiny FLUX.1-dev architecture" in out
    assert f"the quantized files go to {tmp_path.resolve()} (they load in ComfyUI)" in out
    if torch.cuda.is_available():  # the demo's default device: the kernels run it
        assert "quantized layers on the CUDA kernels" in out
    else:
        assert "using the PyTorch reference path" in out
        assert "quantized layers on the PyTorch reference path" in out
    table = out[out.index("\nscheme "):].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["scheme", "BF16", "SVDQuant", "plain", "(relative"], table
    row = r"^(SVDQuant r32|plain W4A4) +([\d.]+) +([\d.]+) +[\d.]+s$"
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(row, out, flags=re.MULTILINE)}
    assert rows["SVDQuant r32"][0] < rows["plain W4A4"][0] / 2  # per-layer error
    assert rows["SVDQuant r32"][1] < rows["plain W4A4"][1]      # sampled latent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-flux.1-dev-svdq-r32.safetensors",
                                                          "tiny-flux.1-dev-w4a4.safetensors"]


def quantize_argument(tmp_path, monkeypatch, name: str, flag_sets) -> list:
    """The value of quantize_checkpoint's keyword `name` that `quantize` passes for each set of flags
    (the engine is replaced by a recorder that stops the command there)."""
    calls = []

    def quantize_checkpoint(*args, **kwargs):
        calls.append(kwargs[name])
        raise fmt.FormatError(args[0], "stop here")

    monkeypatch.setattr(flux.quantizer, "quantize_checkpoint", quantize_checkpoint)
    for flags in flag_sets:
        assert cli.main(["quantize", "in.safetensors", str(tmp_path / "out.safetensors"), *flags]) == 2
    return calls


def test_quantize_takes_the_old_name_of_the_pow2_scales_flag(tmp_path, monkeypatch):
    flag_sets = ((), ("--pow2-scales",), ("--hopper-pow2",))
    assert quantize_argument(tmp_path, monkeypatch, "pow2_scales", flag_sets) == [False, True, True]


def test_quantize_passes_learned_smoothing_on(tmp_path, monkeypatch):
    flag_sets = ((), ("--learned-smoothing",))
    assert quantize_argument(tmp_path, monkeypatch, "learned_smoothing", flag_sets) == [False, True]


def test_info_tells_the_flux_variant_of_a_nunchaku_file(capsys, reference_fixture):
    assert cli.main(["info", str(reference_fixture("reference_flux_tiny.safetensors"))]) == 0
    assert "FLUX.1 dev architecture, width 256, 1 double + 1 single blocks" in capsys.readouterr().out


def test_info_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert cli.main(["info", str(bad)]) == 2
    assert "broken.safetensors: not a readable safetensors file" in capsys.readouterr().err
