"""The benchmark scripts end to end on their smallest settings: they run, and what they record holds
together (the floor under hosl under fo, AdamW's state twice the gradients, dist's bytes exactly the
local bytes plus the 8-byte length of each frame, zo equal to zo-full); slow: minutes in all. And
their flags' errors: one line and exit status 2, before any work (fast); and bench_client's variants
are configs the trainer takes (fast)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
MIB = 1 << 20


def run(script, *args):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_every_bench_client_variant_is_a_config_the_trainer_takes():
    """Each bench_client variant's flags, on its suite's own, parse into a config the trainer accepts:
    a refused combination (a flag the method does not read, two that exclude each other) fails here,
    not an hour into a suite."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_client
    finally:
        sys.path.remove(str(BENCH))
    from hosl.config import parse_config

    suites = {
        "default": (["--server-lr", "0"], bench_client.DEFAULT_VARIANTS),
        "smollm2": ([*bench_client.SMOLLM2_BASE, "--split-layer", "27"], bench_client.smollm2_variants("6e-5")),
    }
    for suite, (base, variants) in suites.items():
        assert len(variants) > 5
        for name, flags in variants.items():
            try:
                parse_config([*base, *flags])
            except (SystemExit, ValueError) as exc:
                pytest.fail(f"bench_client --suite {suite} --variants {name}: {exc}")


@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    stdout = run("bench_memory.py", "--quick", "--ks", 1, "--batches", 4, "--out", tmp_path, "--work", tmp_path)
    assert "| 4 | 1 | hosl |" in stdout
    got = {r["method"]: r for r in records(tmp_path / "bench_memory_quick.jsonl")}
    assert set(got) == {"floor", "hosl", "zo", "fo-sgd", "fo"}
    assert len({r["accounted"]["weights"] for r in got.values()}) == 1
    weights = got["floor"]["accounted"]["weights"]
    for zo_client in ("hosl", "zo"):
        a = got[zo_client]["accounted"]
        assert a["gradients"] == a["optimizer_state"] == a["saved_activations"] == 0  # forward only
        assert got[zo_client]["measured_bytes"] > got["floor"]["measured_bytes"] - MIB  # page noise at most
    fo = got["fo"]["accounted"]
    assert fo["gradients"] == weights  # every client weight trains; OPT's client has no buffers
    assert 2 * fo["gradients"] <= fo["optimizer_state"] <= 2 * fo["gradients"] + 4096  # exp_avg, exp_avg_sq, step
    assert got["fo-sgd"]["accounted"]["optimizer_state"] == 0 and fo["saved_activations"] > 0
    assert got["hosl"]["measured_bytes"] < got["fo-sgd"]["measured_bytes"] < got["fo"]["measured_bytes"]
    assert (tmp_path / "memory_quick.png").exists()


@pytest.mark.slow
def test_bench_server_memory_quick(tmp_path):
    """Each row's server holds the same weights, gradients and AdamW state; a micro-batched row's
    backward saves a slice's activations, not the batch's."""
    stdout = run("bench_server_memory.py", "--quick", "--ks", 1, "--out", tmp_path, "--work", tmp_path)
    assert "| 16 | 1 | hosl-stacked-micro |" in stdout
    got = {r["method"]: r for r in records(tmp_path / "bench_server_memory_quick.jsonl")}
    assert set(got) == {"fo", "fo-micro", "hosl", "hosl-micro", "hosl-stacked", "hosl-stacked-micro"}
    for r in got.values():
        a = r["accounted"]
        assert a["gradients"] == a["weights"] > 0  # every server weight trains
        assert 2 * a["gradients"] <= a["optimizer_state"] <= 2 * a["gradients"] + 4096
    for method in ("fo", "hosl", "hosl-stacked"):
        whole, micro = got[method]["accounted"], got[f"{method}-micro"]["accounted"]
        assert got[f"{method}-micro"]["server_micro_batch"] == 4
        assert 0 < micro["saved_activations"] < whole["saved_activations"] / 2  # 4 rows of 16

    # --resume keeps the rows of the same setting and measures nothing twice; a row of other slices goes
    path = tmp_path / "bench_server_memory_quick.jsonl"
    before = path.read_text()
    other = dict(got["fo-micro"], server_micro_batch=2, measured_bytes=1)
    path.write_text(before + json.dumps(other) + "\n")
    args = ["--quick", "--ks", "1", "--out", str(tmp_path), "--work", str(tmp_path), "--resume"]
    script = str(BENCH / "bench_server_memory.py")
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("recorded before: kept") == 6 and "| 16 | 1 | hosl-stacked-micro |" in out.stdout
    assert path.read_text() == before


@pytest.mark.slow
def test_bench_noise_quick(tmp_path):
    """Every case of the CPU run, the ZO step through the step plan among them (it walks the plan's
    passes over a plain buffer, which must say where its probes are written)."""
    run("bench_noise.py", "--quick", "--device", "cpu", "--repeats", 1, "--out", tmp_path)
    rows = records(tmp_path / "bench_noise_quick_cpu.jsonl")
    got = {(r["bench"], r["case"], r["method"]) for r in rows}
    for case in ("flat-1M", "flat-4M", "opt-small-client"):
        assert {("pass", case, "hosl-cpp"), ("pass", case, "mezo")} <= got
    assert {("zo_step", "opt-small-client", "hosl-cpp"), ("zo_step_rows", "rows", "hosl-cpp")} <= got
    assert {(r["case"], r["terms"]) for r in rows if r["bench"] == "dists"} == {
        (d, t) for d in ("gaussian", "rademacher") for t in (1, 9)
    }
    assert all(r["median_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_step_quick(tmp_path):
    stdout = run("bench_step.py", "--quick", "--qs", 1, "--steps", 1, "--out", tmp_path)
    assert "streaming against synchronous" in stdout
    rows = records(tmp_path / "bench_step_quick.jsonl")
    # 2 transports each; hosl-central, hosl-cut-grad and zo also x streaming and sync
    assert len(rows) == 26

    def one(variant, transport, probes="streaming"):
        (r,) = [r for r in rows if (r["variant"], r["transport"], r["probes"]) == (variant, transport, probes)]
        return r

    # Frames per step: a BATCH and the uploads up; one answer per upload down. dist adds 8 bytes each.
    one_upload = ("hosl-cut-grad", "hosl-cut-grad-one-sided", "hosl-cut-grad-jvp", "hosl-one-sided-lora",
                  "hosl-one-sided-lora-batched")  # fmt: skip
    for variant, uploads in (("fo", 1), ("hosl-central", 3), *((v, 1) for v in one_upload), ("zo", 2)):
        local, dist = one(variant, "local"), one(variant, "dist")
        assert dist["bytes_up"] - local["bytes_up"] == 8 * (1 + uploads)
        assert dist["bytes_down"] - local["bytes_down"] == 8 * uploads
    for variant in ("hosl-central", "hosl-cut-grad"):
        assert one(variant, "dist", "sync")["bytes_up"] == one(variant, "dist")["bytes_up"]
    for key in ("bytes_up", "bytes_down"):  # the stacked server forward sends the same frames
        assert one("hosl-central-stacked", "dist")[key] == one("hosl-central", "dist")[key]
    assert one("fo", "local")["bytes_down"] > one("hosl-central", "local")["bytes_down"] * 100  # dL/dh, losses
    for variant in one_upload:  # one activation up, dL/dh and the loss down, as fo
        assert one(variant, "local")["bytes_down"] == one("fo", "local")["bytes_down"]
        assert one(variant, "local")["bytes_up"] == one("fo", "local")["bytes_up"]
    assert all(r["wall_s"] > 0 and r["client_s"] > 0 and r["server_s"] > 0 for r in rows)
    assert all(0 < r["noise_s"] < r["client_s"] for r in rows if r["method"] != "fo")


@pytest.mark.slow
def test_bench_accuracy_quick(tmp_path):
    args = ["--quick", "--steps", 4, "--seeds", 0, "--methods", "hosl", "zo", "zo-full"]
    stdout = run("bench_accuracy.py", *args, "--out", tmp_path, "--out-root", tmp_path / "runs")
    assert "| hosl | 1 |" in stdout and "| untrained | 1 |" in stdout
    got = {r["run"]: r for r in records(tmp_path / "bench_accuracy_quick.jsonl")}
    assert set(got) == {"untrained", "hosl-seed0", "zo-seed0", "zo-full-seed0"}
    assert all(len(r["losses"]) == 4 for name, r in got.items() if name != "untrained")
    # MeZO over the split is MeZO on the whole model: the same losses and accuracy.
    assert got["zo-seed0"]["losses"] == got["zo-full-seed0"]["losses"]
    assert got["zo-seed0"]["final_eval_accuracy"] == got["zo-full-seed0"]["final_eval_accuracy"]
    assert got["zo-full-seed0"]["bytes_up_per_step"] == 0 < got["zo-seed0"]["bytes_up_per_step"]
    # A second call finds the runs done and starts none; --report starts none either.
    again = subprocess.run(
        [sys.executable, str(BENCH / "bench_accuracy.py"), *map(str, args), "--out", tmp_path, "--out-root",
         tmp_path / "runs", "--report"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0 and "done before, kept" in again.stderr and "hosl.train" not in again.stderr


@pytest.mark.slow
def test_bench_clients_quick(tmp_path):
    """Both transports count the same synchronisation per round but dist's framing; it is a few
    hundred bytes without row lists."""
    stdout = run("bench_clients.py", "--quick", "--parts", "rounds", "sync", "--rounds", 2, "--out", tmp_path)
    assert "| local | 2 |" in stdout and "| dist | 2 |" in stdout
    rows = records(tmp_path / "bench_clients_quick.jsonl")
    got = {(r["part"], r.get("transport"), r["clients"]): r for r in rows}
    assert len(rows) == 5
    for n in (1, 2):
        local, dist = got[("rounds", "local", n)], got[("rounds", "dist", n)]
        frames = 2 if n > 1 else 0  # a REPORT up, a ROUND down; dist adds an 8-byte length to each
        assert dist["sync_bytes_per_round"] == local["sync_bytes_per_round"] + 8 * frames
        assert dist["activation_bytes_per_round"] > local["activation_bytes_per_round"] > 0  # + dist's framing
    assert (
        got[("rounds", "local", 1)]["sync_bytes_per_round"] == 0 < got[("rounds", "local", 2)]["sync_bytes_per_round"]
    )
    assert got[("rounds", "local", 2)]["server_step_s"] > 0
    assert 0 < got[("sync", None, 2)]["sync_bytes_per_round"] < 1024


CUDA_ABSENT = [
    ("bench_memory.py", ["--device", "cuda"], "--device cuda: torch"),
    ("bench_noise.py", ["--device", "cuda"], "--device cuda: torch"),
]
BAD_FLAGS = [
    ("bench_memory.py", ["--jobs", "0"], "--jobs must be >= 1, got 0"),
    ("bench_noise.py", ["--repeats", "0"], "--repeats must be >= 1; got 0"),
    ("bench_boundary.py", ["--repeats", "0"], "--repeats must be >= 1; got 0"),
    ("bench_step.py", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("bench_step.py", ["--server-micro-batch", "-1"], "--server-micro-batch must be >= 0, got -1"),
    ("bench_server_memory.py", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("bench_server_memory.py", ["--server-micro-batch", "-1"], "--server-micro-batch must be >= 0, got -1"),
    ("bench_step.py", ["--split-layer", "9"], "--split-layer must be in [0, 8] for small, got 9"),
    ("bench_clients.py", ["--clients", "0"], "--clients must be >= 1, got 0"),
    ("bench_clients.py", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    *([] if torch.cuda.is_available() else CUDA_ABSENT),
]


def test_bench_master_quick(tmp_path):
    """Every variant is timed at every Q, against the float32 master's time of the same Q."""
    run("bench_master.py", "--quick", "--n", 4096, "--repeats", 1, "--out", tmp_path)
    rows = records(tmp_path / "bench_master_quick.jsonl")
    assert {(r["q"], r["variant"]) for r in rows} == {
        (q, v) for q in (1, 8) for v in ("float32 master", "bfloat16, no master", "float16, no master")
    }
    assert all(r["seconds"] > 0 and r["weights"] == 4096 for r in rows)
    assert all(r["over_master"] == 1.0 for r in rows if r["variant"] == "float32 master")


@pytest.mark.parametrize("script,flags,message", BAD_FLAGS, ids=[f"{s} {' '.join(f)}" for s, f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, script, flags, message):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *flags, "--out", str(tmp_path)], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.slow
def test_inspect_kernels_holds_the_compiled_code_properties():
    """The noise kernels compiled for an H100/H200 (sm_90) on this machine: every kernel, dtype and
    variant has no layout conversion in its term loop, no barrier and no shared memory, and the
    dense pass and the aligned rows pass move x in 128-bit vectors. A change that brings back a
    shuffle or scalar access fails here, without a GPU. (The unaligned rows path, for tables whose
    width or offset is not a multiple of a vector's positions, is scalar by construction.)"""
    got = [json.loads(line) for line in run("inspect_kernels.py", "--json").splitlines()]
    assert len(got) == 3 * 9, [r["variant"] for r in got]
    for r in got:
        where = f"{r['kernel']} {r['dtype']} {r['variant']}"
        assert r["convert_layout_in_loops"] == 0 and r["barriers_in_loops"] == 0, where
        assert r["barriers"] == 0 and r["shared_bytes"] == 0, where
        if not r["variant"].startswith("unaligned"):
            assert r["store_bits"] == 128, where
            assert r["load_bits"] == (0 if r["variant"] == "gaussian" else 128), where
