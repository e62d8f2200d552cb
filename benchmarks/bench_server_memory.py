"""Server peak memory of fo and hosl, whole batch against --server-micro-batch, with the server in its own process.

Setting: the OPT-125M-shaped random checkpoint of bench_memory.py (12 layers, hidden 768, vocab
50272), split after layer k in {1, 3, 6}, batch 64, sequence 128, the loss on the last token
(--quick: bench_memory's small model, batch 16, sequence 32).

Each measurement is two fresh processes joined by hosl's dist transport (gloo over loopback), as
in a real split run: rank 0 loads only the server side with hosl.load_server and runs a SplitServer
(two torch threads, AdamW) for --steps training steps; rank 1 loads only the client side and runs a
SplitClient on random tokens. The server's number is its process's high-water mark (VmHWM) minus its
resident size (VmRSS) once the libraries are imported and warmed up on a toy OPT, before the link
and the model exist (bench_memory.py's measure, on the other side of the cut).

Methods (rows), each with the whole batch and with --server-micro-batch M (the "-micro" rows):
* fo: first-order split learning; the server's forward and backward on the client's activation;
* hosl: the paper's step (--zo-estimator central, Q = 1): the server's forward and backward on the
  clean upload, then one no-grad forward per probe upload (two);
* hosl-stacked: central with Q = 2 and --server-batch-probes: the four probe uploads in one stacked
  no-grad forward of 4 x batch rows (with M, M rows of the stack at a time).
hosl's default estimator (cut-grad) uploads no probes: its server does fo's work.

Accounted, beside each measurement (bytes; read from the live objects):
* weights: the server's distinct parameters and buffers;
* gradients, optimizer_state: the .grad tensors and AdamW's state at its step;
* saved_activations: the most bytes autograd saved for one backward (one slice's with M),
  counted once per storage, parameters left out;
* link_buffers: the largest total of encoded frames held by unfinished sends, plus the receive
  buffer (the largest frame received).
What they leave of the measurement (no-grad forwards' transients, the backward's own transients,
allocator slack) is reported as the rest.

    python benchmarks/bench_server_memory.py --quick   # a small model: a few minutes
    python benchmarks/bench_server_memory.py           # about 30 minutes on 2 cores

Writes benchmarks/results/bench_server_memory.jsonl (--quick: bench_server_memory_quick.jsonl), one
record per (method, split_layer, batch_size) as it is measured; prints the table. --resume keeps
the file's records of the same setting (model, sequence, steps, slices) and measures only the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import REPO, Recorder, bench_parser, environment, fmt_bytes, log, print_table, run_workers
from bench_memory import FULL, MALLOC, MEASURE, QUICK, make_checkpoint

METHODS = ["fo", "hosl", "hosl-stacked"]


def rows_for(micro: int) -> list[str]:
    return [row for method in METHODS for row in (method, f"{method}-micro")] if micro else METHODS


def config(spec: dict):
    """The run both sides build (the same flags on both, as the protocol checks)."""
    from hosl.config import TrainConfig

    method = spec["method"].removesuffix("-micro")
    micro = spec["micro_batch"] if spec["method"].endswith("-micro") else 0
    common = dict(split_layer=spec["k"], batch_size=spec["batch"], max_length=spec["seq"], optimizer="adamw",
                  timeout=600.0, server_micro_batch=micro, client_lr=1e-5, server_lr=1e-5)  # fmt: skip
    if method == "fo":
        return TrainConfig(method="fo", **common)
    stacked = method == "hosl-stacked"
    return TrainConfig(method="hosl", zo_estimator="central", q=2 if stacked else 1, mu=1e-3,
                       server_batch_probes=stacked, **common)  # fmt: skip


def worker(spec: dict) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline: part of the interpreter's cost)
    from bench_memory import Peak, SavedBytes, module_bytes, watch_link, watch_optimizer

    import hosl
    from hosl.roles import SplitClient, SplitServer
    from hosl.transport import dist_link

    role, k, batch_size, seq = spec["role"], spec["k"], spec["batch"], spec["seq"]
    peak = Peak(torch.device("cpu")) if role == "server" else None
    out: dict = {"baseline_bytes": peak.baseline} if peak else {}
    torch.manual_seed(0)
    cfg = config(spec)
    link = dist_link(timeout=cfg.timeout)
    if role == "client":
        model = hosl.load_client(spec["checkpoint"], k)
        client = SplitClient(cfg, model, link)
        client.hello()
        for step in range(spec["steps"]):
            ids = torch.randint(4, model.stack.config.vocab_size, (batch_size, seq))
            labels = torch.full_like(ids, -100)
            labels[:, -1] = ids[:, -1]
            client.train_step(step, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        client.stop()
        link.close()
        print("{}", flush=True)
        return

    model = hosl.load_server(spec["checkpoint"], k)
    server = SplitServer(cfg, model, link)
    out["weights"] = module_bytes(model)
    held = watch_link(link)
    parts = {"gradients": 0, "optimizer_state": 0}
    watch_optimizer(server.optimizer, parts)
    saved = SavedBytes({p.data_ptr() for p in model.parameters()})
    backward = torch.Tensor.backward

    def counted(tensor, *args, **kwargs):  # the saved bytes of each backward (each slice's, with M)
        backward(tensor, *args, **kwargs)
        saved.step_done()

    torch.Tensor.backward = counted
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        server.serve()
    out.update(peak.read())
    link.close()
    out.update(parts, saved_activations=saved.peak, link_buffers=held["peak"] + link._scratch.numel())
    print(json.dumps(out), flush=True)


def main(argv=None):
    parser = bench_parser(__doc__, "a small model and batch (a few minutes)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per measurement (2)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (64; --quick: 16)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="split layers (1 3 6)")
    parser.add_argument(
        "--server-micro-batch", dest="micro_batch", type=int, default=None,
        help="the -micro rows' slices (8; --quick: 4; 0: the whole-batch rows only)",
    )  # fmt: skip
    parser.add_argument("--work", default=None, help="where the random checkpoint goes (runs/bench_memory)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already recorded; measure the rest")
    parser.add_argument("--report", metavar="JSONL", help="print the table of saved records; measure nothing")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.report:
        return report([json.loads(line) for line in Path(args.report).read_text().splitlines() if line])
    setting = dict(QUICK if args.quick else FULL)
    batches = args.batches or ([16] if args.quick else [64])
    ks = args.ks or setting["ks"]
    micro = args.micro_batch if args.micro_batch is not None else 4 if args.quick else 8
    if micro < 0:
        parser.error(f"--server-micro-batch must be >= 0, got {micro}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    import torch

    work = Path(args.work or REPO / "runs" / "bench_memory")
    name = "opt_quick" if args.quick else "opt-125m"
    checkpoint = make_checkpoint(work / f"{name}-random", setting["model"])
    path = args.out / f"bench_server_memory{'_quick' if args.quick else ''}.jsonl"
    seq = setting["seq"]
    kept = []
    if args.resume and path.exists():  # a whole-batch row is the same for every M
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        kept = [r for r in records if (r["model"], r["seq_len"], r["steps"]) == (name, seq, args.steps)]
        kept = [r for r in kept if r["server_micro_batch"] in (0, micro)]
    done = {(r["method"], r["split_layer"], r["batch_size"]) for r in kept}
    rec = Recorder(path, environment(), keep=kept)
    for batch in batches:
        for k in ks:
            for method in rows_for(micro):
                if (method, k, batch) in done:
                    log(f"batch {batch} k {k} {method:18s} recorded before: kept")
                    continue
                start = time.perf_counter()
                spec = dict(method=method, k=k, batch=batch, seq=seq, checkpoint=str(checkpoint), steps=args.steps,
                            micro_batch=micro)  # fmt: skip
                server, _ = run_workers(__file__, spec, ["server", "client"], threads=2, extra_env=MALLOC["mmap"])
                log(f"batch {batch} k {k} {method:18s} {fmt_bytes(server['peak_bytes']):>10s}  "
                    f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
                accounted = {
                    part: server[part]
                    for part in ("weights", "gradients", "optimizer_state", "saved_activations", "link_buffers")
                }
                rec.add(
                    torch.device("cpu"),
                    bench="server_peak",
                    model=name,
                    method=method,
                    split_layer=k,
                    batch_size=batch,
                    seq_len=seq,
                    steps=args.steps,
                    server_micro_batch=micro if method.endswith("-micro") else 0,
                    measured_bytes=server["peak_bytes"],
                    baseline_bytes=server["baseline_bytes"],
                    accounted=accounted,
                    unaccounted_bytes=server["peak_bytes"] - sum(accounted.values()),
                    server_threads=2,
                    malloc=" ".join(f"{k}={v}" for k, v in MALLOC["mmap"].items()),
                    measure=MEASURE["cpu"],
                )
    report(rec.records)


def report(records) -> None:
    """The table of a run's records: each row against fo's whole-batch row of its setting."""
    r0 = records[0]
    print(f"\n{r0['model']}: server peak above the bare interpreter, malloc: {r0['malloc']}; "
          f"sequence {r0['seq_len']}, {r0['steps']} steps, on {r0['device_name']}\n")  # fmt: skip
    header = ["batch", "k", "method", "measured", "fo / this", "whole / micro", "weights", "grads", "optim",
              "saved act", "link", "rest"]  # fmt: skip
    table = []
    for r in records:
        same = {(o["method"], o["split_layer"], o["batch_size"]): o["measured_bytes"] for o in records}
        key = (r["split_layer"], r["batch_size"])
        fo, whole = same.get(("fo", *key)), same.get((r["method"].removesuffix("-micro"), *key))
        a = r["accounted"]
        table.append([
            r["batch_size"], r["split_layer"], r["method"], fmt_bytes(r["measured_bytes"]),
            f"{fo / r['measured_bytes']:.2f}" if fo else "-",
            f"{whole / r['measured_bytes']:.2f}" if r["method"].endswith("-micro") and whole else "-",
            *(fmt_bytes(a[p]) for p in ("weights", "gradients", "optimizer_state", "saved_activations",
                                         "link_buffers")),
            fmt_bytes(r["unaccounted_bytes"]),
        ])  # fmt: skip
    print_table(header, table, numeric=[True, True, False] + [True] * 9)


if __name__ == "__main__":
    main()
