"""Many clients, one server (hosl.clients): one client through the rounds is the one-client run;
every client holds the same bits after every round; the rounds equal a single-process computation
written here from the primitives; shards, sampling, replay, failures and bad input."""

import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from _procs import free_port
from safetensors.torch import load_file

from hosl import checkpoint, estimators, scoring, session, zo
from hosl import clients as many
from hosl.config import TrainConfig
from hosl.models import build
from hosl.optim import make_optimizer
from hosl.plan import StepPlan
from hosl.replay import client_zo_params, read_log, replay
from hosl.rows import LookupRecorder, embedding_tables, step_rows
from hosl.split import Activation, split_model
from hosl.tasks import load_examples
from hosl.train import Batches, main, run
from hosl.transport import LinkError

FAST = dict(train_examples=96, eval_examples=16, steps=4, log_every=1, batch_size=6, max_length=20, q=2)


def cfg_for(tmp_path, name="run", **overrides) -> TrainConfig:
    return TrainConfig(**{**FAST, "out": str(tmp_path / name), **overrides})


def _weights(run_dir):
    return load_file(run_dir / "client.safetensors"), load_file(run_dir / "server.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_client_through_the_rounds_is_the_one_client_run(tmp_path, monkeypatch):
    """--clients 1 run by rounds (REPORT, ROUND, the server's step on the round's mean) gives the
    one-client run's bits on both sides and its log: client 0's seeds, data and update are its."""
    cfg = cfg_for(tmp_path, "one", zo_probes="scratch")
    run(cfg)
    monkeypatch.setattr(session, "_rounds", lambda cfg: True)
    run(cfg_for(tmp_path, "rounds", zo_probes="scratch"))
    one, rounds = _weights(tmp_path / "one"), _weights(tmp_path / "rounds")
    assert _same(one[0], rounds[0]) and _same(one[1], rounds[1])
    a, b = read_log(tmp_path / "one" / "zo_log.jsonl"), read_log(tmp_path / "rounds" / "zo_log.jsonl")
    assert [r["grads"] for r in a] == [r["grads"][0] for r in b] and all(r["clients"] == [0] for r in b)


def _digests(monkeypatch):
    """Records a digest of each client's weights after each round's update."""
    seen: list[tuple[int, int, str]] = []
    end = StepPlan.end

    def recording(plan, params, rnd, entries, lr, weight_decay, extra=()):
        skipped = end(plan, params, rnd, entries, lr, weight_decay, extra)
        digest = hashlib.sha256(params.flat.flat.view(torch.uint8).numpy().tobytes()).hexdigest()
        seen.append((rnd, id(params), digest))
        return skipped

    monkeypatch.setattr(StepPlan, "end", recording)
    return seen


NO_MASTER = dict(dtype="bfloat16", zo_master="none", weight_decay=0.1)


@pytest.mark.parametrize(
    "per_round,extra",
    [
        (3, {}),
        (2, {}),
        (2, NO_MASTER),
        (2, {"zo_estimator": "cut-grad-one-sided"}),
        (2, {"zo_estimator": "cut-grad-jvp"}),
        (2, {"zo_estimator": "cut-grad-one-sided", "split_layer": 3, "client_train_blocks": 1}),
    ],
    ids=["all-sampled", "two-of-three", "bf16-no-master", "one-sided", "jvp", "last-block"],
)
def test_every_client_holds_the_same_bits_after_every_round(tmp_path, monkeypatch, per_round, extra):
    """Stochastically rounded updates and decay (no float32 master) included: each client draws the
    same rounding from the round's seeds."""
    seen = _digests(monkeypatch)
    cfg = cfg_for(tmp_path, clients=3, clients_per_round=per_round, steps=5, **extra)
    summary = run(cfg)
    assert summary["clients_identical"]
    by_round: dict[int, set] = {}
    holders: dict[int, set] = {}
    for rnd, who, digest in seen:
        by_round.setdefault(rnd, set()).add(digest)
        holders.setdefault(rnd, set()).add(who)
    assert sorted(by_round) == list(range(cfg.steps))
    assert all(len(holders[r]) == 3 for r in by_round)  # sampled or not, every client applied it
    assert all(len(d) == 1 for d in by_round.values())  # and all three hold the same bits
    assert len({next(iter(d)) for d in by_round.values()}) == cfg.steps  # which move every round


def _reference(cfg: TrainConfig):
    """The rounds computed in one process from the primitives, with no link, frame, RoundServer or
    RoundClient: per round, each sampled client's clean forward, the server's loss and backward
    there (dL/dh, and its gradient summed), the client's scratch probes and g (cut-grad: h+ - h-
    over 2 mu; one-sided: h+ - h over mu); then the server's optimiser step on the mean gradient and
    one noise pass per client: -lr/(K Q) g_iq z_iq, lr divided by the rms of the round's K Q g under
    --zo-step normalized."""
    examples = load_examples(cfg.task, "train", n=cfg.train_examples, seed=cfg.seed)
    tok, model = build(cfg, examples)
    client, server = split_model(model, cfg.split_layer)
    named = [(n, p) for n, p in client.named_parameters() if p.requires_grad]
    for _, p in named:
        p.requires_grad_(False)
    tables = set(embedding_tables(client))
    params = zo.ZOParams(named, row_sparse=[n for n, _ in named if n in tables], probes="scratch", dist=cfg.zo_noise)
    params.attach(client)
    optimizer = make_optimizer([p for p in server.parameters() if p.requires_grad], cfg, cfg.server_lr)
    shards = many.partition([e.label for e in examples], cfg.clients, cfg.partition, cfg.alpha, cfg.seed)
    streams = [Batches([examples[i] for i in s], tok, cfg, stream=c) for c, s in enumerate(shards)]
    schedule = many.Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
    for rnd in range(cfg.steps):
        entries = []
        for i in schedule.sampled(rnd):
            batch = streams[i](schedule.position(i, rnd))
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with torch.no_grad(), LookupRecorder(params) as recorder:
                h = client(input_ids=ids, attention_mask=mask).hidden
            rows = step_rows(params, batch, recorder)
            h.requires_grad_(True)
            server(Activation(h, mask), labels=batch["labels"], labelled_only=True).loss.backward()
            grad_h, grads = h.grad, []
            for q in range(cfg.q):
                seed = estimators.probe_seed(cfg.seed, rnd, q, i)
                with torch.no_grad():
                    with params.perturbed(seed, cfg.mu, rows):
                        plus = client(input_ids=ids, attention_mask=mask).hidden
                    if cfg.zo_estimator == "cut-grad-one-sided":
                        low, span = h.detach(), 1
                    else:
                        with params.perturbed(seed, -cfg.mu, rows):
                            low, span = client(input_ids=ids, attention_mask=mask).hidden, 2
                grads.append(float(torch.dot(grad_h.reshape(-1), (plus - low).reshape(-1))) / (span * cfg.mu))
            entries.append((i, grads, rows))
        k = len(entries)
        rate = cfg.client_lr
        if cfg.zo_step == "normalized":
            every = [g for _, grads, _ in entries for g in grads]
            rate = cfg.client_lr / math.sqrt(math.fsum(g * g for g in every) / len(every))
        for p in server.parameters():
            if p.grad is not None:
                p.grad.div_(k)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for i, grads, rows in entries:
            seeds = [estimators.probe_seed(cfg.seed, rnd, q, i) for q in range(cfg.q)]
            params.add_(seeds, [0.0 - rate * g / (cfg.q * k) for g in grads], rows=rows)
    return dict(client.named_parameters()), dict(server.named_parameters())


@pytest.mark.parametrize(
    "per_round,partition,estimator,step",
    [(3, "iid", "cut-grad-one-sided", "normalized"), (2, "dirichlet", "cut-grad-one-sided", "normalized"),
     (2, "dirichlet", "cut-grad", "normalized"), (3, "iid", "cut-grad-one-sided", "sgd")],
)  # fmt: skip
def test_rounds_equal_a_single_process_computation(tmp_path, per_round, partition, estimator, step):
    cfg = cfg_for(
        tmp_path, clients=3, clients_per_round=per_round, partition=partition, steps=3, zo_estimator=estimator,
        zo_step=step, client_lr=1e-2 if step == "normalized" else 1e-4,
    )  # fmt: skip
    run(cfg)
    client, server = _weights(tmp_path / "run")
    ref_client, ref_server = _reference(cfg)
    for name, p in ref_client.items():
        assert torch.equal(client[name], p.detach()), name
    for name, p in ref_server.items():
        torch.testing.assert_close(server[name], p.detach(), rtol=0, atol=0, msg=name)


def test_clients_that_sit_out_rounds_catch_up_to_the_same_bits(tmp_path, monkeypatch):
    """--relay sampled: a round's update goes only to its clients and the lead; the others get the
    rounds they missed from the server's log before their next step and after the last round. The
    run ends with the bits of --relay all, on every client, and the catch-up is counted."""
    seen = _digests(monkeypatch)
    common = dict(clients=4, clients_per_round=2, steps=6)
    everyone = run(cfg_for(tmp_path, "all", **common))
    seen.clear()
    lazy = run(cfg_for(tmp_path, "sampled", relay="sampled", **common))
    assert lazy["clients_identical"] and lazy["client_weights_sha256"] == everyone["client_weights_sha256"]
    assert _same(_weights(tmp_path / "all")[1], _weights(tmp_path / "sampled")[1])
    assert everyone["catch_up_bytes_per_client"] == [0, 0, 0, 0]
    assert lazy["catch_up_bytes_per_client"][0] == 0 and all(b > 0 for b in lazy["catch_up_bytes_per_client"][1:])
    assert lazy["sync_bytes_per_client"] == everyone["sync_bytes_per_client"]  # the same frames, later
    assert not lazy["clients_left"]
    applied = {}
    for rnd, who, _ in seen:
        applied.setdefault(who, []).append(rnd)
    assert len(applied) == 4 and all(rounds == list(range(6)) for rounds in applied.values())  # each, in order


@pytest.mark.parametrize("zo_noise", ["gaussian", "rademacher"])
def test_a_many_client_run_replays_bit_for_bit(tmp_path, zo_noise):
    cfg = cfg_for(
        tmp_path, clients=4, clients_per_round=2, partition="dirichlet", alpha=1.0, steps=5, zo_noise=zo_noise
    )
    run(cfg)
    examples = load_examples(cfg.task, "train", n=cfg.train_examples, seed=cfg.seed)
    _, model = build(cfg, examples)
    client, _ = split_model(model, cfg.split_layer)
    initial = {n: p.detach().clone() for n, p in client.named_parameters()}
    log = read_log(tmp_path / "run" / "zo_log.jsonl")
    assert all(len(r["clients"]) == 2 for r in log)
    replay(client_zo_params(client, cfg), cfg, log)
    saved = load_file(tmp_path / "run" / "client.safetensors")
    assert all(torch.equal(p.detach(), saved[n]) for n, p in client.named_parameters())
    assert any(not torch.equal(p.detach(), initial[n]) for n, p in client.named_parameters())


def test_the_summary_counts_each_clients_traffic_and_synchronisation(tmp_path):
    """Without row lists a round's synchronisation is a few scalars per sampled client: REPORT up,
    ROUND down, under 1 KB per client at K = 8, Q = 1 (the activations are the rest)."""
    cfg = cfg_for(tmp_path, clients=8, q=1, zo_embedding="all", steps=3)
    summary = run(cfg)
    sync, total = summary["sync_bytes_per_client"], summary["bytes_per_client"]
    assert len(sync) == len(total) == 8 and summary["shard_examples"] == [12] * 8
    assert all(0 < s / cfg.steps < 1024 for s in sync)
    assert all(s < t for s, t in zip(sync, total))


# -- shards and sampling -------------------------------------------------------------------------------


def test_iid_shards_cover_the_examples_once_and_evenly():
    shards = many.partition([i % 2 for i in range(103)], 4, "iid", seed=3)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(103)) and {len(s) for s in shards} == {25, 26}
    assert shards == many.partition([i % 2 for i in range(103)], 4, "iid", seed=3)
    assert shards != many.partition([i % 2 for i in range(103)], 4, "iid", seed=4)
    assert many.partition([0, 1, 0], 1) == [[0, 1, 2]]  # one client: every example, in order


def test_dirichlet_shards_skew_the_labels_more_as_alpha_shrinks():
    labels = [i % 4 for i in range(800)]

    def mean_labels(alpha, seed):
        shards = many.partition(labels, 8, "dirichlet", alpha, seed)
        assert sorted(i for s in shards for i in s) == list(range(800))
        return sum(len({labels[i] for i in s if True}) for s in shards) / 8

    def majority(alpha, seed):
        shards = many.partition(labels, 8, "dirichlet", alpha, seed)
        return sum(max(sum(labels[i] == y for i in s) for y in range(4)) / len(s) for s in shards) / 8

    skewed = sum(majority(0.1, s) for s in range(3)) / 3
    even = sum(majority(100.0, s) for s in range(3)) / 3
    assert skewed > 0.7 and even < 0.4, (skewed, even)
    assert mean_labels(100.0, 0) == 4


def test_each_client_can_hold_out_part_of_its_shard_for_its_own_evaluation(tmp_path, monkeypatch):
    """--client-eval-fraction: a seeded part of each shard is never trained on, and the summary has
    the final model's accuracy on each client's part, as the run's own evaluation computes it."""
    shards = many.partition([i % 2 for i in range(90)], 3, "iid", seed=0)
    train, held = many.hold_out(shards, 0.2, seed=0)
    for s, t, h in zip(shards, train, held):
        assert sorted(t + h) == s and not set(t) & set(h) and len(h) == 6
    assert many.hold_out(shards, 0.2, seed=0) == (train, held) != many.hold_out(shards, 0.2, seed=1)
    parts = []
    evaluate = scoring.evaluate

    def recording(client, tokenizer, examples, cfg, step):
        parts.append(len(examples))
        return evaluate(client, tokenizer, examples, cfg, step)

    monkeypatch.setattr(scoring, "evaluate", recording)
    summary = run(cfg_for(tmp_path, clients=3, client_eval_fraction=0.25))
    assert summary["shard_examples"] == [24, 24, 24] and parts == [16, 8, 8, 8]  # shared set, then each part
    assert len(summary["client_eval_accuracy"]) == 3 and all(0 <= a <= 1 for a in summary["client_eval_accuracy"])
    with pytest.raises(many.PartitionError, match="leaves client 0 no training examples"):
        many.hold_out([[1, 2]], 0.9, seed=0)


def test_a_partition_that_leaves_a_client_nothing_is_refused():
    with pytest.raises(many.PartitionError, match="leaves client .* no training examples"):
        many.partition([0] * 5, 8, "iid")


def test_sampling_is_seeded_and_every_client_takes_its_turn():
    a, b = many.Schedule(0, 5, 2), many.Schedule(0, 5, 2)
    rounds = [a.sampled(r) for r in range(40)]
    assert rounds == [b.sampled(r) for r in range(40)]
    assert all(len(r) == 2 and r == sorted(set(r)) for r in rounds)
    assert {i for r in rounds for i in r} == set(range(5)) and len({tuple(r) for r in rounds}) > 3
    assert rounds != [many.Schedule(1, 5, 2).sampled(r) for r in range(40)]
    # A client's batch index counts the rounds it took part in, asked in any order.
    for client in range(5):
        assert a.position(client, 40) == sum(client in r for r in rounds)
        assert a.position(client, 17) == sum(client in r for r in rounds[:17])


# -- failures and bad input ------------------------------------------------------------------------------


def _failing_at(monkeypatch, client: int, rnd: int, how):
    step = many.RoundClient.train_step

    def failing(self, r, batch):
        if self.id == client and r == rnd:
            how()
        return step(self, r, batch)

    monkeypatch.setattr(many.RoundClient, "train_step", failing)


def _battery():
    raise RuntimeError("client 2 lost its battery")


def test_a_client_that_fails_is_dropped_and_the_round_completes_without_it(tmp_path, monkeypatch):
    """--on-client-loss continue (the default): the server drops client 2 at round 1, the others go
    on to the end holding the same bits, and the summary says who left when and why."""
    _failing_at(monkeypatch, 2, 1, _battery)
    seen = _digests(monkeypatch)
    summary = run(cfg_for(tmp_path, clients=3, steps=4, timeout=60))
    assert summary["steps"] == 4 and summary["clients_identical"]
    ((who, when, why),) = summary["clients_left"]
    assert (who, when) == (2, 1) and "lost its battery" in why
    log = read_log(tmp_path / "run" / "zo_log.jsonl")
    assert [r["clients"] for r in log] == [[0, 1, 2], [0, 1], [0, 1], [0, 1]]
    holders = {}
    for rnd, _, digest in seen:
        holders.setdefault(rnd, set()).add(digest)
    assert all(len(d) == 1 for d in holders.values())
    assert not [t for t in threading.enumerate() if t.name.startswith("hosl-")]


def test_a_client_that_goes_silent_is_dropped_after_the_timeout(tmp_path, monkeypatch):
    _failing_at(monkeypatch, 1, 2, lambda: time.sleep(6))
    start = time.perf_counter()
    summary = run(cfg_for(tmp_path, clients=3, steps=4, timeout=2))
    assert time.perf_counter() - start < 60
    ((who, when, why),) = summary["clients_left"]
    assert (who, when) == (1, 2) and "2 s" in why, why


def test_losing_a_client_ends_the_run_under_on_client_loss_fail_or_below_min_clients(tmp_path, monkeypatch):
    _failing_at(monkeypatch, 2, 1, _battery)
    start = time.perf_counter()
    with pytest.raises(LinkError, match=r"client 2 left at round 1 \(--on-client-loss fail\).*lost its battery"):
        run(cfg_for(tmp_path, "fail", clients=3, timeout=60, on_client_loss="fail"))
    with pytest.raises(LinkError, match="2 clients left after client 2 left at round 1, fewer than --min-clients 3"):
        run(cfg_for(tmp_path, "min", clients=3, timeout=60, min_clients=3))
    assert time.perf_counter() - start < 30  # told, not timed out
    assert not [t for t in threading.enumerate() if t.name.startswith("hosl-")]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--clients", "0"], "--clients must be >= 1, got 0"),
        (["--clients", "2", "--clients-per-round", "3"], "--clients-per-round must be in [1, --clients 2], got 3"),
        (["--clients", "2", "--partition", "dirichlet", "--alpha", "0"], "--alpha must be a finite number > 0"),
        (["--clients-per-round", "1", "--partition", "dirichlet"], "--partition dirichlet needs --clients > 1"),
        (["--clients", "2", "--alpha", "0.1"], "--alpha 0.1 needs --partition dirichlet"),
        (["--clients", "2", "--method", "fo"], "--clients 2 needs --method hosl"),
        (["--clients", "2", "--zo-probes", "inplace"], "--clients 2 needs --zo-probes scratch"),
        (["--clients", "40", "--train-examples", "20"], "leaves client 20 no training examples"),
        (["--clients", "2", "--client-eval-fraction", "1"], "--client-eval-fraction must be in [0, 1), got 1.0"),
        (["--client-eval-fraction", "0.1"], "--client-eval-fraction 0.1 needs --clients > 1"),
    ],
)
def test_bad_many_client_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_the_metrics_log_holds_the_rounds(tmp_path):
    run(cfg_for(tmp_path, clients=2, steps=3))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [0, 1, 2]


# -- dist ----------------------------------------------------------------------------------------------


def test_three_clients_over_dist_equal_three_clients_in_one_process(tmp_path):
    """torchrun --nproc-per-node 4: the server, the lead and two clients in their own processes,
    over an authenticated link, give the local run's losses and both sides' weights bit for bit,
    and every client process ends with the lead's weights (their SHA-256). One thread in both: a
    float32 reduction's order follows the thread count."""
    overrides = dict(clients=3, clients_per_round=2, partition="dirichlet", alpha=1.0, steps=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run(cfg_for(tmp_path, "local", **overrides))
    finally:
        torch.set_num_threads(threads)
    token = tmp_path / "token"
    token.write_text("a shared secret, long enough\n")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**FAST, **overrides}.items()]
    port = free_port()
    out = subprocess.run(
        ["torchrun", "--nproc-per-node", "4", "--master-port", str(port), "-m", "hosl.train", *flags,
         "--transport=dist", f"--auth-token-file={token}", "--out", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    dist = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert dist["client_weights_sha256"] == summary["client_weights_sha256"]
    followers = sorted(re.findall(r"client (\d+): weights sha256 ([0-9a-f]{64})", out.stdout))  # lines may interleave
    assert followers == [(str(i), summary["client_weights_sha256"]) for i in (1, 2)]
    metrics = [json.loads(x).get("loss") for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x).get("loss") for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == again
    for a, b in zip(_weights(tmp_path / "local"), _weights(tmp_path / "dist")):
        assert _same(a, b)


def test_a_client_process_killed_mid_run_is_dropped_and_the_run_ends_normally(tmp_path):
    """Four processes with the torch.distributed environment (one per device; torchrun's agent would
    stop every worker when one dies): SIGKILL client 2 once the lead has logged five rounds. The
    server drops it, the others finish every round with exit status 0, the summary says who left
    when, and client 1 ends with the lead's bits."""
    port = free_port()
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**FAST, "steps": 40, "clients": 3, "timeout": 30}.items()]
    procs = []
    for rank in range(4):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
        log = open(tmp_path / f"rank{rank}.log", "w")
        cmd = [sys.executable, "-m", "hosl.train", *flags, "--transport=dist", "--insecure", "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        metrics, start = out / "metrics.jsonl", time.time()
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert time.time() - start < 120 and all(p.poll() is None for p in procs), "the run did not start"
            time.sleep(0.05)
        procs[3].send_signal(signal.SIGKILL)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0, 0, -signal.SIGKILL], [(tmp_path / f"rank{r}.log").read_text()[-2000:] for r in range(3)]
    summary = json.loads((out / "summary.json").read_text())
    ((who, when, why),) = summary["clients_left"]
    assert who == 2 and 5 <= when < 40 and "lost the client (rank 3)" in why
    assert f"client 1: weights sha256 {summary['client_weights_sha256']}" in (tmp_path / "rank2.log").read_text()
    log = read_log(out / "zo_log.jsonl")
    assert len(log) == 40 and log[-1]["clients"] == [0, 1]


def test_a_round_frame_that_does_not_describe_a_round_of_this_run_is_refused():
    from hosl.boundary import Frame, Kind

    def frame(**tensors):
        return Frame(Kind.ROUND, step=0, tensors=tensors)

    good = dict(clients=torch.tensor([0, 2]), grads=torch.zeros(2, 3, dtype=torch.float64))
    assert [c for c, _, _ in many.round_entries(frame(**good), 3, 3)] == [0, 2]
    bad = [
        (dict(good, grads=torch.zeros(2, 3)), "int64 clients and float64 grads"),
        (dict(good, grads=torch.zeros(2, 4, dtype=torch.float64)), "grads"),
        (dict(good, clients=torch.tensor([2, 0])), "names clients"),
        (dict(good, clients=torch.tensor([0, 3])), "names clients"),
        (dict(good, row_counts=torch.tensor([[2], [1]]), rows=torch.tensor([1, 2])), "row counts"),
        (dict(good, row_counts=torch.tensor([[2], [1]]), rows=torch.tensor([1.0, 2.0, 3.0])), "row counts"),
    ]
    for tensors, message in bad:
        with pytest.raises(LinkError, match=message):
            many.round_entries(frame(**tensors), 3, 3)


# -- hosl.federation in one process ---------------------------------------------------------------------


class _Federated:
    """hosl.federation in one process: the server's rounds over local links, each client a
    RoundClient on its own thread that dials again (a new local link) when its link fails.
    server_timeout: how long the server waits on a client's link (its --timeout over grpc)."""

    def __init__(self, tmp_path, steps: int, server_timeout: float = 20.0):
        import copy

        from hosl.federation import Federation
        from hosl.roles import SplitClient, SplitServer

        self.steps, self.server_timeout = steps, server_timeout
        cfg = cfg_for(tmp_path, clients=3, steps=steps, transport="grpc", insecure=True, timeout=20, eval_every=0)
        self.cfg, self.examples = cfg, load_examples(cfg.task, "train", n=cfg.train_examples, seed=cfg.seed)
        tokenizer, model = build(cfg, self.examples)
        self.hidden = model.config.hidden_size
        self.client_model, server_model = split_model(model, cfg.split_layer)
        self.federation = Federation(cfg, SplitServer(cfg, server_model, None, tmp_path / "srv"))
        self.refused: list[str] = []
        self.failures: list = []
        self.streams = session._client_data(cfg, self.examples, tokenizer)[2]
        self.clients = []
        for i in range(3):
            mine = dataclasses.replace(cfg, client_id=i)
            split = SplitClient(mine, copy.deepcopy(self.client_model), self.connect(i), client_id=i)
            c = many.RoundClient(mine, split, many.Schedule(cfg.seed, cfg.clients, cfg.clients_per_round))
            c.redial = lambda timeout, i=i: self.connect(i)
            self.clients.append(c)
        self.initial = self.clients[0].digest()

    def connect(self, i: int):
        """A new session of client i: the client's end of a local link, the server's on a handler thread."""
        client_end, server_end = session.local_links_for(self.cfg, self.hidden, client_id=i)
        server_end.timeout = self.server_timeout

        def handle():
            try:
                self.federation.session(server_end)
            except LinkError as exc:
                self.refused.append(str(exc))
                server_end.fail(str(exc))

        threading.Thread(target=handle, daemon=True).start()
        return client_end

    def thread(self, c, before_round=None, after_round=None):
        """Client c's whole run on a thread; before_round(c, rnd) / after_round(c, rnd) are the test's."""

        def drive():
            try:
                batches = session._round_batches(self.streams, c.schedule, c.id)
                c.hello()
                for rnd in range(self.steps):
                    if before_round:
                        before_round(c, rnd)
                    c.train_step(rnd, batches(rnd))
                    if after_round:
                        after_round(c, rnd)
                c.control("final")
                c.stop()
            except BaseException as exc:
                self.failures.append((c.id, exc))

        return threading.Thread(target=drive, daemon=True)

    def serve(self):
        server = threading.Thread(target=self.federation.serve, daemon=True)
        server.start()
        return server

    def run_all(self, before_round=None):
        """Every client from the start, and the server; returns once all have ended."""
        threads = [self.thread(c, before_round) for c in self.clients]
        for t in threads:
            t.start()
        server = self.serve()
        for t in [*threads, server]:
            t.join(120)
        assert not server.is_alive()

    def joins(self) -> dict:
        return {i: [rnd for j, rnd, _ in self.federation.joins if j == i] for i in range(3)}


def test_a_federation_takes_clients_that_join_late_and_come_back_and_all_end_alike(tmp_path):
    """The grpc server's rounds (hosl.federation) over local links, each client on a thread: clients 0
    and 1 start the run, client 2 joins at round 4 and catches up from the server's log, client 1's
    link fails at round 5 and it dials again. Every client ends with the same weights, which are not
    the initial ones, and the server's record names who joined and left; a client holding rounds of
    another run, or naming a client the run does not have, is refused."""
    from hosl.roles import SplitClient

    fed = _Federated(tmp_path, steps=8)
    at_round_3 = threading.Event()

    def fail_at_5(c, rnd):
        if c.id == 1 and rnd == 5:
            c.link.fail("the network went away")  # the server drops it; its next frame fails

    def start_client_2(c, rnd):
        if c.id == 0 and rnd == 3:  # client 2 starts, and is taken in before round 4
            at_round_3.set()
            deadline = time.monotonic() + 60
            while fed.federation._arrivals.empty() and time.monotonic() < deadline:
                time.sleep(0.01)

    threads = [fed.thread(c, fail_at_5, start_client_2) for c in fed.clients]
    threads[0].start()
    threads[1].start()
    server = fed.serve()
    at_round_3.wait(60)
    threads[2].start()
    for t in [*threads, server]:
        t.join(120)
    assert not fed.failures, fed.failures
    assert not server.is_alive()
    digests = {c.digest() for c in fed.clients}
    assert len(digests) == 1 and digests != {fed.initial}
    clients = fed.clients
    assert clients[1].rejoined == 1 and clients[2].catch_up_bytes > 0 and clients[0].catch_up_bytes == 0
    joins = fed.joins()
    assert joins[0] == [0] and len(joins[1]) == 2 and joins[1][1] >= 5 and joins[2] == [4], joins
    assert [i for i, _, _ in fed.federation.left] == [1]
    # Refused at the door: another run's rounds, a client the run does not have.
    for i, extra in ((0, {"applied": 2, "run": "another"}), (7, {})):
        mine = dataclasses.replace(fed.cfg, client_id=min(i, 2))
        link = fed.connect(i)
        with pytest.raises(LinkError):
            SplitClient(mine, fed.client_model, link, client_id=i).hello(**extra)
    assert any("another run" in r for r in fed.refused) and any("client 7 of a run of 3" in r for r in fed.refused)


def test_a_silent_federation_client_is_dropped_and_the_others_go_on(tmp_path):
    """Client 2 stays silent past the server's timeout before round 2: the server drops it and rounds 2
    and on go ahead with clients 0 and 1. When it wakes, the server's ERROR sends it dialling again; it
    catches up and all three end with the same weights."""
    fed = _Federated(tmp_path, steps=6, server_timeout=3.0)

    def stall(c, rnd):
        if c.id == 2 and rnd == 2:
            time.sleep(5)

    fed.run_all(stall)
    assert not fed.failures, fed.failures
    assert len({c.digest() for c in fed.clients}) == 1
    assert [(i, rnd) for i, rnd, _ in fed.federation.left] == [(2, 2)]
    assert fed.clients[2].rejoined == 1 and fed.joins()[2][0] == 0 and fed.joins()[2][1] > 2


def test_a_federation_checkpoint_restores_the_servers_weights_log_and_run_and_refuses_damage(tmp_path):
    """Federation.save after a run, then resume into a fresh server: its weights, the log of rounds (as
    frames) and the run id come back; a flipped byte in the log is refused before anything is loaded."""
    from hosl.federation import ROUNDS, Federation
    from hosl.roles import SplitServer

    fed = _Federated(tmp_path, steps=4)
    fed.run_all()
    assert not fed.failures, fed.failures
    out = tmp_path / "srv"
    (out / "config.json").write_text(fed.cfg.to_json() + "\n")
    fed.federation.save(4)
    _, model = build(fed.cfg, fed.examples)
    _, fresh_side = split_model(model, fed.cfg.split_layer)
    again = Federation(fed.cfg, SplitServer(fed.cfg, fresh_side, None, out))
    assert again.resume() == 4 and again.run_id == fed.federation.run_id and again.server.steps_done == 4
    assert [f.tensors["grads"].tolist() for f in again.log] == [
        f.tensors["grads"].tolist() for f in fed.federation.log
    ]
    saved = dict(fed.federation.server.model.named_parameters())
    assert all(torch.equal(p, saved[n]) for n, p in fresh_side.named_parameters())
    path = out / "checkpoint-4" / ROUNDS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    _, model = build(fed.cfg, fed.examples)
    _, other_side = split_model(model, fed.cfg.split_layer)
    with pytest.raises(checkpoint.CheckpointError, match="rounds.bin: its SHA-256 differs"):
        Federation(fed.cfg, SplitServer(fed.cfg, other_side, None, out)).resume()
    assert not all(torch.equal(p, saved[n]) for n, p in other_side.named_parameters())
