"""Rebuild a ZO-trained client's weights from its initial weights and the run's log of projected
gradients, bit for bit: the client's whole trajectory is a few scalars per step.

    python -m hosl.replay RUN_DIR      # checks the replayed client against RUN_DIR/client.safetensors

A server that knows the client's initial weights (it may have shipped them) can thus follow the
client's training from zo_log.jsonl alone, on any device: the noise is bit-identical across the
CPU kernel, the Triton kernel and the torch reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from hosl import checkpoint, zo
from hosl.config import TrainConfig
from hosl.plan import ZO, StepPlan, method_of


def read_log(path: str | Path) -> list[dict]:
    """The records of a zo_log.jsonl; ValueError naming the file and line of a bad one."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from None
    return records


def replay(params: zo.ZOParams, cfg: TrainConfig, log: Iterable[dict]) -> None:
    """Apply the logged steps to `params` (at the run's initial weights) exactly as the client did:
    every perturbation pass of the schedule, then the step's final pass (update, or restore only
    for a skipped step) and weight decay. With scratch probes the weights never held a probe: one
    pass per step, the update."""
    plans = {cfg.mu: StepPlan.of(cfg)}  # by mu: a run resumed with another mu logs each step's
    try:
        from tqdm.auto import tqdm

        log = tqdm(log, desc="replay", unit="step", delay=2, leave=False, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # tqdm comes with transformers; without it, no bar
        pass
    for record in log:
        step = record["step"]
        mu = record.get("mu", cfg.mu)  # logs written before mu was logged: the config's
        if mu not in plans:
            plans[mu] = StepPlan.of(dataclasses.replace(cfg, mu=mu))
        plan = plans[mu]
        if "clients" in record:  # a round of many clients (hosl.clients): its update alone
            if not record["skipped"]:
                per_client = record.get("rows") or [None] * len(record["clients"])
                entries = [
                    (c, g, None if r is None else zo.decode_rows(r))
                    for c, g, r in zip(record["clients"], record["grads"], per_client)
                ]
                plan.end(params, step, entries, record["lr"], cfg.weight_decay)
            continue
        rows = zo.decode_rows(record["rows"]) if "rows" in record else None
        if params.in_place:  # scratch probes left no trace in the weights: the update alone
            for _ in plan.probes(params, step, rows):
                pass  # each probe's noise pass, applied by the plan; replay needs no forward
        grads = None if record["skipped"] else record["grads"]
        plan.end(params, step, [(0, grads, rows)], record["lr"], cfg.weight_decay)


def replay_run(run_dir: str | Path):
    """The client model of a builtin-model run, rebuilt from its seed and replayed from its log."""
    from hosl.models import build
    from hosl.split import split_model
    from hosl.tasks import load_run_data

    run_dir = Path(run_dir)
    verify_run(run_dir)
    cfg = TrainConfig.from_json((run_dir / "config.json").read_text())
    method = method_of(cfg.method)
    if not cfg.model.startswith("builtin:") or not (method.split and method.client.order == ZO):
        raise ValueError("replay_run rebuilds the initial weights of builtin-model runs with a ZO client only")
    _, model = build(cfg, load_run_data(cfg)[0])
    client, _ = split_model(model, cfg.split_layer)
    replay(client_zo_params(client, cfg), cfg, read_log(run_dir / "zo_log.jsonl"))
    return client


def verify_run(run_dir: Path) -> None:
    """The run's config, log and final weights against its manifest.json (hosl.checkpoint):
    CheckpointError naming the first file that differs. A run without one (unfinished, or from an
    older hosl) is replayed unverified, with a warning."""
    manifest_path = Path(run_dir) / checkpoint.MANIFEST
    if not manifest_path.exists():
        logging.getLogger("hosl.replay").warning("%s has no %s: replaying unverified", run_dir, checkpoint.MANIFEST)
        return
    manifest = checkpoint.read_manifest(manifest_path)
    checkpoint.verify(run_dir, manifest, missing_ok=checkpoint.SERVER_FILES)
    checkpoint.check_config(manifest, Path(run_dir) / "config.json", Path(run_dir))


def client_zo_params(client, cfg: TrainConfig) -> zo.ZOParams:
    """The client's ZO buffer as the trainer builds it: its trainable parameters (its last
    --client-train-blocks blocks' alone when set), in order, its embedding tables row-sparse under
    --zo-embedding rows."""
    from hosl.split import train_last_blocks
    from hosl.zo import zo_params_of

    train_last_blocks(client, cfg.client_train_blocks)
    return zo_params_of(client, cfg)


def main(argv=None) -> int:
    import torch
    from safetensors.torch import load_file

    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m hosl.replay RUN_DIR (see --help)", file=sys.stderr)
        return 2
    try:
        client = replay_run(argv[0])
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    saved = load_file(Path(argv[0]) / "client.safetensors")
    same = all(torch.equal(p, saved[n]) for n, p in client.named_parameters())
    print("replayed client weights equal the run's:", "yes, bit for bit" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
