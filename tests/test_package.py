"""The installed package: `python -m hosl` reports a loaded extension, hosl._C and hosl.kernels
import from the repo root and from elsewhere, and no top-level `kernels` module is installed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HOSL_NOISE_BACKEND")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_environment_report(where, tmp_path):
    result = run_python(["-m", "hosl"], cwd=REPO if where == "repo-root" else tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hosl._C: loaded" in result.stdout, result.stdout
    assert "noise backends on cpu:" in result.stdout
    assert "cpp    usable" in result.stdout and "default: cpp" in result.stdout


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_submodules_import(where, tmp_path):
    code = (
        "import importlib.util, hosl._C, hosl.noise;"
        "spec = importlib.util.find_spec('hosl.kernels');"
        "assert spec is not None and spec.origin.endswith('__init__.py'), spec;"
        "print(hosl.__file__)"
    )
    result = run_python(["-c", code], cwd=REPO if where == "repo-root" else tmp_path)
    assert result.returncode == 0, result.stderr


def test_no_top_level_kernels_module_installed(tmp_path):
    """hosl.kernels is a subpackage; a top-level `kernels` (an unrelated PyPI name) is not installed
    by hosl. Asked of the interpreter from an empty directory, so it holds for a wheel and for an
    editable install alike, and never sees the checkout's kernels/ folder through the working directory."""
    code = (
        "import importlib.util, pathlib, hosl.kernels;"
        "spec = importlib.util.find_spec('kernels');"
        "ours = pathlib.Path(hosl.kernels.__file__).resolve().parent;"
        "print('top-level:', None if spec is None else spec.origin);"
        "assert spec is None or pathlib.Path(spec.origin).resolve().parent != ours, spec.origin"
    )
    result = run_python(["-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
