"""The installed package: `python -m hosl` reports a loaded extension, hosl._C and hosl.kernels
import from the repo root and from elsewhere, no top-level `kernels` module is installed, and the
commands a user runs in the clone's root (train, replay, export) work there."""

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
        "import hosl._C, hosl.noise, hosl.kernels.noise as k;"
        "assert callable(k.add_noise_), k;"
        "print(hosl.__file__, k.__file__)"
    )
    result = run_python(["-c", code], cwd=REPO if where == "repo-root" else tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_kernels_is_the_pypi_package_or_nothing_of_ours(where, tmp_path):
    """hosl.kernels is a subpackage: hosl installs no top-level `kernels` (an unrelated PyPI name),
    whether from a wheel or editable (asked from an empty directory), and in the repository root,
    which comes first on sys.path, the checkout's kernels/ folder does not hide the PyPI package
    that transformers imports."""
    code = (
        "import importlib.util, pathlib, hosl.kernels.noise;"
        "spec = importlib.util.find_spec('kernels');"
        "ours = pathlib.Path(hosl.kernels.noise.__file__).resolve().parent;"
        f"root = pathlib.Path({str(REPO)!r}).resolve();"
        "origin = None if spec is None or spec.origin is None else pathlib.Path(spec.origin).resolve();"
        "print('kernels:', origin);"
        "assert origin is None or (origin.parent != ours and root not in origin.parents), origin;"
        "import transformers.activations"
    )
    result = run_python(["-c", code], cwd=REPO if where == "repo-root" else tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_replay_export_from_the_repo_root(tmp_path):
    """What a user runs in the clone: `python -m hosl.train`, then replay and export of its run."""
    run, hf = tmp_path / "run", tmp_path / "hf"
    train = run_python(["-m", "hosl.train", "--steps", "2", "--eval-examples", "8", "--out", str(run)], cwd=REPO)
    assert train.returncode == 0, train.stdout + train.stderr
    assert (run / "summary.json").is_file()
    replay = run_python(["-m", "hosl.replay", str(run)], cwd=REPO)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    export = run_python(["-m", "hosl.export", str(run), str(hf)], cwd=REPO)
    assert export.returncode == 0, export.stdout + export.stderr
    assert (hf / "config.json").is_file()
