"""The W4A4 family registry of svdquant/kernels.py (issue 13's dispatch), without a GPU: which
kernels each GPU generation runs, and how tests and users force a family."""

import pytest
import torch

from svdquant import kernels


@pytest.mark.parametrize("capability,expected", [
    ((8, 0), "sm80-int4"), ((8, 6), "sm80-int4"), ((8, 9), "sm80-int4"),  # INT4 mma.sync is native
    ((9, 0), "sm90"),
    ((8, 7), "sm80-int8"), ((10, 0), "sm80-int8"), ((12, 0), "sm80-int8"),  # INT8 mma.sync everywhere
    ((7, 5), None), ((6, 1), None),
])
def test_registry_by_capability(capability, expected):
    assert kernels.w4a4_kernels_for(capability) == expected


def test_forced_family_nests_and_ranks_above_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "sm80-int8")
    assert kernels._forced_choice() == ("sm80-int8", kernels.KERNELS_ENV)
    with kernels.forced_family("sm90"):
        with kernels.forced_family("reference"):
            assert kernels._forced_choice() == ("reference", "kernels.forced_family")
        assert kernels._forced_choice() == ("sm90", "kernels.forced_family")
    assert kernels._forced_choice() == ("sm80-int8", kernels.KERNELS_ENV)
    monkeypatch.delenv(kernels.KERNELS_ENV)
    assert kernels._forced_choice() == (None, "")


def test_unknown_family_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="sm80-int4"):
        with kernels.forced_family("sm86"):
            pass
    monkeypatch.setenv(kernels.KERNELS_ENV, "int4")
    with pytest.raises(ValueError, match=kernels.KERNELS_ENV):
        kernels._forced_choice()


def test_cpu_takes_the_reference_path():
    assert kernels.w4a4_kernels_on(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        status = kernels.kernels_status()
        assert status["device"] == "none" and status["W4A4 linear"].startswith("reference")
