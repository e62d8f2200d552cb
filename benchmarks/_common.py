"""What the benchmark scripts share: the machine and versions behind each record, JSON Lines output, formatting.

Imported as `_common` by scripts run as `python benchmarks/bench_<subject>.py` (their directory is on sys.path).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

import hosl

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MIB = 1 << 20


# --------------------------------------------------------------------------------------------------
# The command line and the tables every script prints.


def bench_parser(doc: str, quick: str | None = None, out: str = "directory for the JSON Lines records"):
    """The preamble every benchmark shares: its docstring's first paragraph as the description,
    --quick (when the script has a quick mode: `quick` says what it runs) and --out (benchmarks/results)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"{out} (benchmarks/results)")
    return parser


def print_table(header: list[str], rows: list[list], numeric: list[bool] | None = None) -> None:
    """A Markdown table on stdout: text columns aligned left, numeric ones right (by default every
    column but the first is numeric)."""
    numeric = numeric if numeric is not None else [False] + [True] * (len(header) - 1)
    print("| " + " | ".join(header) + " |")
    print("|" + "".join(" ---: |" if n else " --- |" for n in numeric))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


# --------------------------------------------------------------------------------------------------
# The machine and the versions.


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def environment():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "hosl": hosl.__version__,
        "git_sha": sha or "unknown",
    }


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


# --------------------------------------------------------------------------------------------------
# Recording and output.


class Recorder:
    """Builds the records, writes each as one JSON line as soon as it is measured, keeps them for the table."""

    def __init__(self, path, env, keep=()):
        """Starts `path` afresh with the records of `keep` (a resumed run's, measured before)."""
        self.path = path
        self.env = env
        self.records = list(keep)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(rec) + "\n" for rec in self.records))

    def add(self, device, **fields):
        rec = {
            **fields,
            "device": device.type,
            "device_name": device_name(device),
            **{k: v for k, v in self.env.items() if k not in fields},  # a field given says better
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def pyplot(path):
    """matplotlib.pyplot for a file plot, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log(f"no plot ({path.name}): matplotlib is not installed; pip install '.[bench]'")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Lays out a finished figure and writes it to path (PNG), creating the folder."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def given(value, default):
    """A flag's value, or its default when the flag was not given (None): 0 is a value, not absent."""
    return default if value is None else value


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def train_run(out_root, name: str, flags: list[str], report: bool, bench: str) -> Path | None:
    """`python -m hosl.train FLAGS --out out_root/name` unless that run finished before (its
    summary.json is there): the run directory, or None under --report for a run not finished. An
    interrupted run starts again; a failed one ends the benchmark with its last line."""
    import shutil
    import time

    run_dir = Path(out_root).resolve() / name  # the child runs in the repository's root
    if (run_dir / "summary.json").exists():
        log(f"{name}: done before, kept")
        return run_dir
    if report:
        log(f"{name}: not run yet, left out")
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "hosl.train", *flags, "--out", str(run_dir)]
    log(f"{name}: " + " ".join(cmd[1:]))
    start = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"{bench}: {name} failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    log(f"{name}: {time.perf_counter() - start:.0f} s")
    return run_dir


# --------------------------------------------------------------------------------------------------
# Worker processes: a script runs itself with `--worker SPEC` (SPEC a JSON object) in fresh processes.


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(
    script, spec: dict, roles: list[str], threads: int = 1, timeout: float = 1800, extra_env: dict | None = None
) -> list[dict]:
    """Runs `script --worker SPEC` once per role, at once, as ranks 0, 1, ... of a torch.distributed
    group on loopback (rank 0 is the server); returns the JSON object each printed last, in role order.
    Each process gets `threads` torch threads (OMP_NUM_THREADS) and extra_env."""
    import os

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(len(roles))}
    env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra_env or {})
    procs = []
    for rank, role in enumerate(roles):
        payload = json.dumps({**spec, "role": role})
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), "--worker", payload],
                env={**env, "RANK": str(rank)},
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for role, p in zip(roles, procs):
        stdout, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            for other in procs:
                other.kill()
            raise RuntimeError(f"the {role} worker of {spec} failed (exit {p.returncode}); its stderr is above")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results
