"""Step time of fo, hosl and zo, split into client compute, link and server compute; traffic; the ZO
noise's share of the client's compute; streaming probes against the synchronous loop.

Setting (--model): an OPT model with random weights, split after layer --split-layer, random tokens
of --batch x --seq with the loss on the last token (the rank-classification training the trainer
does). The default, "small", is 8 layers of hidden 256 (ffn 1024, 4 heads, vocab 8192) cut at 4:
client and server compute are of the same order, as between an edge device and its server share of
one machine. "opt-125m" is OPTConfig's defaults (12 layers, hidden 768, vocab 50272) cut at 3.

Every measurement runs in fresh processes with one torch thread each (OMP_NUM_THREADS=1), so
client and server each have one core, as two machines would:
* local: one process, the server in a thread, hosl's in-process transport (two FrameQueues);
* dist: two processes on this machine joined by hosl's dist transport (gloo over loopback);
* grpc: two processes, the client dialling the server's hosl.grpc_link over loopback with TLS (a
  certificate made for the run) and the token's handshake and MACs, as `--transport grpc` runs.
Variants (--variants; all by default): fo; hosl with the loss-difference estimator (central) and
with the cut-gradient estimators (cut-grad: one upload, dL/dh down, the 2Q probe forwards on the
client; cut-grad-one-sided: Q probe forwards, each differenced with the clean one; cut-grad-jvp: Q
forward-mode passes at w), all with row-sparse embedding noise (--zo-embedding rows, the default);
hosl central with dense noise (all), for the noise share; hosl central with --server-batch-probes
(central-stacked: the server's probe forwards as one stacked batch); hosl cut-grad-one-sided on a
client LoRA of rank 8 (one-sided-lora), and the same with --client-batch-probes (its Q probe
forwards as one forward over Q x batch rows); zo. Q in {1, 4, 16} (fo has no
probes: Q = 1 only), both transports (--transports),
and for hosl central, hosl cut-grad and zo streaming probes (the default: the client sends all of a
step's activations without waiting; cut-grad runs its first probe pair while the server computes
dL/dh) against --sync-probes (the client waits for each loss before its next probe; cut-grad waits
for dL/dh before its probes). --warmup steps are run, then --steps steps are timed one by one; the
records hold the median.

The client's process records its peak resident set (peak_rss_bytes: the client's alone over dist and
grpc, both sides' over local).

Per step (from hosl.roles.StepStats): wall, client compute (the client's forwards, backward, noise
and update), server compute (as the server reports it), link = wall - client - server (clamped at 0;
with streaming, client and server overlap, so it can hide in the overlap). Also bytes up and down
per step (the link's counters), and for the ZO clients noise_s: the time inside the noise passes
(ZOParams.add_: perturb, flip, restore-and-update), as a fraction of client compute.

    python benchmarks/bench_step.py --quick    # a smaller grid, a few minutes
    python benchmarks/bench_step.py            # the full grid, about 30 minutes on 2 cores

Writes benchmarks/results/bench_step.jsonl (--quick: bench_step_quick.jsonl) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import Recorder, bench_parser, cpu_name, environment, given, log, print_table, run_workers

MODELS = {
    "small": dict(
        sizes=dict(
            hidden_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            ffn_dim=1024,
            vocab_size=8192,
            word_embed_proj_dim=256,
        ),
        k=4,
    ),  # fmt: skip
    "opt-125m": dict(sizes=dict(), k=3),
}


# --------------------------------------------------------------------------------------------------
# The worker processes.


def build(spec):
    import torch
    import transformers

    import hosl

    torch.manual_seed(0)
    sizes = MODELS[spec["model"]]["sizes"]
    model = transformers.OPTForCausalLM(transformers.OPTConfig(dropout=0.0, attention_dropout=0.0, **sizes)).eval()
    if spec.get("lora"):  # a client LoRA of rank 8, the server trained in full
        from hosl.models import apply_lora

        model = apply_lora(model, 16.0, 8, 0, spec["k"])
    return hosl.split_model(model, spec["k"])


def config(spec):
    from hosl.config import TrainConfig
    from hosl.plan import ZO, method_of

    # The ZO settings only where the method has a ZO side (the config refuses options a method ignores).
    method = method_of(spec["method"])
    zo_side = {"q": spec["q"], "mu": 1e-3, "zo_estimator": spec["estimator"], "zo_embedding": spec["embedding"]}
    return TrainConfig(
        method=spec["method"], split_layer=spec["k"], batch_size=spec["batch"], max_length=spec["seq"],
        sync_probes=spec["sync"], optimizer="adamw", timeout=600.0, **{rate: 1e-5 for rate in method.rates},
        client_threads=spec["threads"][0], server_threads=spec["threads"][1],
        server_micro_batch=spec.get("server_micro_batch", 0), **(zo_side if ZO in method.orders else {}),
        **({"server_batch_probes": True} if spec.get("stacked") else {}),
        **({"client_lora_r": 8, "server_lora_r": 0, "zo_probes": "scratch"} if spec.get("lora") else {}),
        **({"client_batch_probes": True} if spec.get("batched") else {}),
        link_rtt_ms=spec.get("rtt_ms", 0.0), link_mbit=spec.get("mbit", 0.0),  # bench_network's emulated link
    )  # fmt: skip


def batches(spec, vocab):
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(4, vocab, (spec["batch"], spec["seq"]), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def drive(client, link, spec) -> dict:
    """Runs the client's steps; returns the timed steps' measurements."""
    noise = {"s": 0.0}
    if client.zo is not None:
        add = client.zo.add_

        def timed_add(seeds, scales, rows=None):
            t = time.perf_counter()
            add(seeds, scales, rows=rows)
            noise["s"] += time.perf_counter() - t

        client.zo.add_ = timed_add
    client.hello()
    rows = []
    for step, batch in enumerate(batches(spec, client.model.stack.config.vocab_size)):
        noise["s"] = 0.0
        sent, received = link.bytes_sent, link.bytes_received
        t = time.perf_counter()
        stats = client.train_step(step, batch)
        wall = time.perf_counter() - t
        if step >= spec["warmup"]:
            rows.append(
                dict(
                    wall_s=wall, client_s=stats.client_s, server_s=stats.server_s, link_s=stats.link_s,
                    noise_s=noise["s"], bytes_up=link.bytes_sent - sent, bytes_down=link.bytes_received - received,
                )
            )  # fmt: skip
    client.stop()
    import resource

    medians = {name: statistics.median(r[name] for r in rows) for name in rows[0]}
    # The process's peak resident set: the client's alone over dist and grpc, both sides' over local.
    return {**medians, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def worker(spec: dict) -> None:
    import torch

    from hosl.roles import SplitClient, SplitServer
    from hosl.session import local_session
    from hosl.transport import dist_link

    torch.set_num_threads(1)  # each side sets its own (--threads) when it starts
    client_model, server_model = build(spec)
    cfg = config(spec)
    if spec["role"] == "local":  # the trainer's own wiring: the link sized by the step plan
        with local_session(cfg, client_model, server_model) as client:
            out = drive(client, client.link, spec)
        print(json.dumps(out), flush=True)
        return
    if spec["role"].startswith("grpc"):
        return grpc_worker(spec, cfg, client_model, server_model)
    link = dist_link(timeout=cfg.timeout)
    if spec["role"] == "server":
        SplitServer(cfg, server_model, link).serve()
        link.close()
        print("{}", flush=True)
        return
    out = drive(SplitClient(cfg, client_model, link), link, spec)
    link.close()
    print(json.dumps(out), flush=True)


def grpc_worker(spec, cfg, client_model, server_model) -> None:
    import threading

    from hosl.grpc_link import TLS, dial, serve
    from hosl.roles import SplitClient, SplitServer

    secret = bytes.fromhex(spec["grpc"]["token"])
    target = f"localhost:{spec['grpc']['port']}"
    if spec["role"] == "grpc-server":
        done = threading.Event()

        def session(link):
            link.authenticate(secret)
            SplitServer(cfg, server_model, link).serve()
            done.set()

        tls = TLS(cert=spec["grpc"]["cert"], key=spec["grpc"]["key"])
        server = serve(session, target, tls, cfg.timeout)
        done.wait()
        server.stop(grace=5)
        print("{}", flush=True)
        return
    link = dial(target, TLS(ca=spec["grpc"]["cert"]), cfg.timeout)
    link.authenticate(secret)
    out = drive(SplitClient(cfg, client_model, link), link, spec)
    link.close()
    print(json.dumps(out), flush=True)


def grpc_setup(folder) -> dict:
    """A self-signed certificate for localhost (PEM files in folder), a token and a free port."""
    import datetime
    import secrets

    from _common import free_port
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {"cert": str(cert_path), "key": str(key_path), "token": secrets.token_hex(32), "port": free_port()}


# --------------------------------------------------------------------------------------------------
# The parent.


# name: (method, estimator, embedding noise, Q values, probe modes)
VARIANTS = {
    "fo": ("fo", "central", "all", "one", [False]),
    "hosl-central": ("hosl", "central", "rows", "all", [False, True]),
    "hosl-cut-grad": ("hosl", "cut-grad", "rows", "all", [False, True]),
    "hosl-cut-grad-one-sided": ("hosl", "cut-grad-one-sided", "rows", "all", [False]),
    "hosl-cut-grad-jvp": ("hosl", "cut-grad-jvp", "rows", "all", [False]),
    "hosl-central-all": ("hosl", "central", "all", "one", [False]),
    "hosl-central-stacked": ("hosl", "central", "rows", "all", [False]),  # --server-batch-probes
    "hosl-one-sided-lora": ("hosl", "cut-grad-one-sided", "rows", "all", [False]),  # a client LoRA, r = 8
    "hosl-one-sided-lora-batched": ("hosl", "cut-grad-one-sided", "rows", "all", [False]),  # --client-batch-probes
    "zo": ("zo", "central", "all", "all", [False, True]),
}


def grid(qs, variants, transports=("local", "dist")):
    for name in variants:
        method, estimator, embedding, which_q, syncs = VARIANTS[name]
        for q in qs[:1] if which_q == "one" else qs:
            for sync in syncs:
                for transport in transports:
                    yield (
                        name,
                        dict(
                            method=method,
                            estimator=estimator,
                            embedding=embedding,
                            q=q,
                            sync=sync,
                            stacked=name.endswith("-stacked"),
                            lora="-lora" in name,
                            batched=name.endswith("-batched"),
                        ),
                        transport,
                    )


def main(argv=None):
    parser = bench_parser(__doc__, "Q in {1, 4}, fewer steps, smaller batches")
    parser.add_argument("--model", default="small", choices=list(MODELS))
    parser.add_argument("--split-layer", type=int, default=None, help="the cut (small: 4, opt-125m: 3)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (16; --quick: 8)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (64; --quick: 32)")
    parser.add_argument("--qs", type=int, nargs="+", default=None, help="probe counts (1 4 16; --quick: 1 4)")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to time (default: all)"
    )
    parser.add_argument(
        "--transports",
        nargs="+",
        default=["local", "dist"],
        choices=["local", "dist", "grpc"],
        help="(default: local and dist)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (5; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, nargs=2, default=[1, 1], metavar=("CLIENT", "SERVER"),
        help="torch threads of the client and of the server (1 1: a core a side, as two machines would have)",
    )  # fmt: skip
    parser.add_argument(
        "--server-micro-batch", type=int, default=0, metavar="M",
        help="the server's forwards and backward over slices of M rows (0: the whole batch)",
    )  # fmt: skip
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    quick = args.quick
    spec_base = dict(
        model=args.model,
        k=given(args.split_layer, MODELS[args.model]["k"]),
        batch=given(args.batch, 8 if quick else 16),
        seq=given(args.seq, 32 if quick else 64),
        steps=given(args.steps, 3 if quick else 5),
        warmup=args.warmup,
        threads=args.threads,
        server_micro_batch=args.server_micro_batch,
    )
    qs = given(args.qs, [1, 4] if quick else [1, 4, 16])
    for name in ("batch", "seq", "steps"):
        if spec_base[name] < 1:
            parser.error(f"--{name} must be >= 1, got {spec_base[name]}")
    layers = MODELS[args.model]["sizes"].get("num_hidden_layers", 12)  # OPTConfig's default: 12
    if not 0 <= spec_base["k"] <= layers:
        parser.error(f"--split-layer must be in [0, {layers}] for {args.model}, got {spec_base['k']}")
    if min(args.threads) < 1:
        parser.error(f"--threads must be >= 1 for each side, got {args.threads[0]} {args.threads[1]}")
    if args.server_micro_batch < 0:
        parser.error(f"--server-micro-batch must be >= 0, got {args.server_micro_batch}")
    if args.warmup < 0 or any(q < 1 for q in qs):
        parser.error(f"--warmup must be >= 0 and every Q >= 1, got {args.warmup} and {qs}")
    suffix = "_quick" if quick else ("" if args.model == "small" else f"_{args.model}")
    suffix += "" if args.threads == [1, 1] else f"_threads{args.threads[0]}-{args.threads[1]}"
    suffix += f"_server_micro{args.server_micro_batch}" if args.server_micro_batch else ""
    rec = Recorder(args.out / f"bench_step{suffix}.jsonl", environment())
    import torch

    records = []
    for variant, settings, transport in grid(qs, args.variants, args.transports):
        spec = dict(spec_base, **settings)
        q, sync = spec["q"], spec["sync"]
        start = time.perf_counter()
        if transport == "local":
            out = run_workers(__file__, spec, ["local"])[0]
        elif transport == "grpc":
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                spec["grpc"] = grpc_setup(Path(folder))
                out = run_workers(__file__, spec, ["grpc-server", "grpc-client"])[1]
            del spec["grpc"]
        else:
            out = run_workers(__file__, spec, ["server", "client"])[1]
        fields = dict(
            spec, variant=variant, transport=transport, probes="sync" if sync else "streaming",
            client_threads=spec["threads"][0], server_threads=spec["threads"][1],
        )  # fmt: skip
        records.append(rec.add(torch.device("cpu"), bench="step", **fields, **out))
        log(
            f"{variant:16s} Q={q:<2d} {transport:5s} {'sync' if sync else 'stream':6s} wall {out['wall_s']:.3f} s "
            f"({time.perf_counter() - start:.0f} s)"
        )

    s = spec_base
    print(
        f"\nOPT {args.model} cut at {s['k']}, batch {s['batch']} x {s['seq']}, torch threads {s['threads'][0]} "
        f"(client) and {s['threads'][1]} (server), {cpu_name()}; "
        + (f"the server in slices of {s['server_micro_batch']} rows; " if s["server_micro_batch"] else "")
        + f"median of {s['steps']} steps\n"
    )
    fo = {r["transport"]: r["wall_s"] for r in records if r["variant"] == "fo"}
    header = ["variant", "Q", "probes", "transport", "step (s)", "/ fo", "client (s)", "link (s)", "server (s)",
              "noise (s)", "noise / client", "KiB up", "KiB down"]  # fmt: skip
    table = []
    for r in records:
        noise = f"{r['noise_s'] / r['client_s']:.1%}" if r["method"] != "fo" else "-"
        ratio = f"{r['wall_s'] / fo[r['transport']]:.2f}x" if r["transport"] in fo else "-"
        table.append([
            r["variant"], r["q"], r["probes"], r["transport"], f"{r['wall_s']:.3f}", ratio, f"{r['client_s']:.3f}",
            f"{r['link_s']:.3f}", f"{r['server_s']:.3f}", f"{r['noise_s']:.3f}", noise,
            f"{r['bytes_up'] / 1024:.0f}", f"{r['bytes_down'] / 1024:.1f}",
        ])  # fmt: skip
    print_table(header, table, numeric=[False, True, False, False] + [True] * 9)
    print("\nstreaming against synchronous probes (speedup = sync step / streaming step)\n")
    table = []
    for r in records:
        same = [
            x for x in records if x["probes"] == "sync" and all(x[f] == r[f] for f in ("variant", "q", "transport"))
        ]
        if r["probes"] != "streaming" or not same:
            continue
        sync = same[0]
        table.append([r["variant"], r["q"], r["transport"], f"{sync['wall_s']:.3f}", f"{r['wall_s']:.3f}",
                      f"{sync['wall_s'] / r['wall_s']:.2f}x"])  # fmt: skip
    header = ["variant", "Q", "transport", "sync (s)", "streaming (s)", "speedup"]
    print_table(header, table, numeric=[False, True, False, True, True, True])


if __name__ == "__main__":
    main()
