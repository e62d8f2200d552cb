"""Test tiers: plain CPU (always), `interpreter` (Triton on the CPU; its own process with
TRITON_INTERPRET=1), `gpu` (needs CUDA), `slow` (needs --runslow)."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _cwd_outside_the_checkout(tmp_path_factory, monkeypatch):
    """Every test, and every process it starts, runs in an empty directory: `python -m hosl...` from
    the repo root would import the source tree instead of the installed copy, and a run without
    --out would write into the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "interpreter" in item.keywords and not interpreted:
            item.add_marker(
                pytest.mark.skip(reason="Triton interpreter tier: run with TRITON_INTERPRET=1 -m interpreter")
            )
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
