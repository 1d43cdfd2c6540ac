"""The arithmetic of bench/comfy_capped.py's simulated small card (the GPU run itself is a benchmark)."""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import comfy_capped  # noqa: E402

GiB = 2**30
H100_TOTAL = 85_045_870_592  # what torch.cuda.mem_get_info reports as an H100 SXM's total


def test_ballast_leaves_the_cap():
    for cap in (16, 12, 8):
        assert H100_TOTAL - comfy_capped.ballast_bytes(H100_TOTAL, cap) == cap * GiB
    assert comfy_capped.ballast_bytes(H100_TOTAL, None) == 0


def test_a_cap_at_or_above_the_card_is_refused():
    with pytest.raises(ValueError, match="not below"):
        comfy_capped.ballast_bytes(16 * GiB, 16)
    with pytest.raises(ValueError, match="not below"):
        comfy_capped.ballast_bytes(H100_TOTAL, 80)


def test_parse_caps():
    assert comfy_capped.parse_caps("none,16,12,8") == [None, 16, 12, 8]
    with pytest.raises(ValueError):
        comfy_capped.parse_caps("16,0")
    with pytest.raises(ValueError):
        comfy_capped.parse_caps("16GB")


def test_ratios_are_over_ours_at_the_same_cap():
    def row(variant, cap, step_ms, loaded_s):
        return {"variant": variant, "cap_GiB": cap, "step_ms": step_ms, "image_loaded_s": loaded_s}

    rows = comfy_capped.with_ratios([row("fast", None, 100.0, 2.0), row("exact", None, 200.0, 4.0),
                                     row("fast", 8, 120.0, 2.5), row("bf16", None, 150.0, 3.0),
                                     row("bf16", 8, 600.0, 12.5), row("bf16", 12, 500.0, 10.0),
                                     {"variant": "fp8", "cap_GiB": 8, "skipped": "no fp8"}])
    bf16_full, bf16_8, bf16_12 = rows[3], rows[4], rows[5]
    assert (bf16_full["step_over_fast"], bf16_full["step_over_exact"]) == (1.5, 0.75)
    assert (bf16_full["image_over_fast"], bf16_full["image_over_exact"]) == (1.5, 0.75)
    assert (bf16_8["step_over_fast"], bf16_8["image_over_fast"]) == (5.0, 5.0)
    assert "step_over_exact" not in bf16_8  # no exact row at 8 GiB
    assert not any(key.endswith(("_fast", "_exact")) for key in bf16_12)  # no ours at 12 GiB
    assert rows[6] == {"variant": "fp8", "cap_GiB": 8, "skipped": "no fp8"}
