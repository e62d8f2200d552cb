"""The trainer: ZO estimates against independent finite differences, each method against its
reference (fo vs fo-full, zo vs zo-full, hosl with a frozen client vs FO on the server alone),
streaming vs synchronous, dist vs local, replay and resume bit for bit, the CLI's errors."""

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _procs import free_port
from safetensors.torch import load_file

from hosl import estimators, noise, zo
from hosl.config import ADDED, TrainConfig, parse_config
from hosl.models import build
from hosl.plan import StepPlan
from hosl.replay import client_zo_params, read_log, replay
from hosl.split import split_model
from hosl.tasks import load_examples
from hosl.token import main as hosl_token_main
from hosl.train import Batches, main, run

# Small and fast: the built-in model on a slice of the synthetic task. The ZO settings are pinned to
# the paper's loss-difference step (central, Q = 1), which the protocol tests below exercise;
# hosl's defaults (cut-grad-one-sided, Q = 8) have tests of their own.
FAST = dict(
    train_examples=128, eval_examples=32, steps=6, log_every=1, batch_size=8, max_length=24,
    zo_estimator="central", q=1, client_lr=1e-4,
)  # fmt: skip


def cfg_for(tmp_path, name="run", **overrides) -> TrainConfig:
    return TrainConfig(**{**FAST, "out": str(tmp_path / name), **overrides})


def weights(run_dir) -> dict[str, torch.Tensor]:
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").exists():
        return load_file(run_dir / "model.safetensors")
    client, server = load_file(run_dir / "client.safetensors"), load_file(run_dir / "server.safetensors")
    return {**{"client." + k: v for k, v in client.items()}, **{"server." + k: v for k, v in server.items()}}


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").open()) if "loss" in r]


def _model_and_batch(cfg: TrainConfig):
    examples = load_examples(cfg.task, "train", n=cfg.train_examples, seed=cfg.seed)
    tok, model = build(cfg, examples)
    return model, Batches(examples, tok, cfg)


# --- the ZO estimate --------------------------------------------------------------------------------


def test_projected_gradient_equals_independent_finite_difference(tmp_path):
    """The run's logged g equals (L(w + mu z) - L(w - mu z)) / 2mu computed here from scratch: z from
    hosl.noise (the run's directions) laid over the client's parameters in order, the losses from the
    unsplit model."""
    cfg = cfg_for(tmp_path, steps=1, mu=1e-2)
    run(cfg)
    g_run = read_log(tmp_path / "run" / "zo_log.jsonl")[0]["grads"][0]

    model, batches = _model_and_batch(cfg)
    client, _ = split_model(model, cfg.split_layer)
    params = list(client.parameters())
    z = noise.directions(sum(p.numel() for p in params), estimators.probe_seed(cfg.seed, 0, 0), dist=cfg.zo_noise)
    batch = batches(0)

    def loss_at(sign):
        with torch.no_grad():
            start = 0
            saved = [p.detach().clone() for p in params]
            for p in params:
                p.add_(sign * cfg.mu * z[start : start + p.numel()].view_as(p))
                start += p.numel()
            value = model(**batch).loss.item()
            for p, s in zip(params, saved):
                p.copy_(s)
        return value

    g_ref = (loss_at(+1) - loss_at(-1)) / (2 * cfg.mu)
    # float32 losses of a perturbed vs an exactly-perturbed model: equal to rounding, far from 0.
    assert abs(g_run - g_ref) <= 2e-3 * abs(g_ref) + 2e-3, (g_run, g_ref)
    assert abs(g_ref) > 1e-2


def test_expected_update_follows_the_true_gradient():
    """On a smooth quadratic, the average ZO update direction over many probes aligns with -grad."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    x, y = torch.randn(64, 16), torch.randn(64, 4)

    def loss():
        return ((layer(x) - y) ** 2).mean()

    loss().backward()
    true = torch.cat([p.grad.flatten() for p in layer.parameters()])
    params = zo.ZOParams([(n, p) for n, p in layer.named_parameters()])
    mu, estimate = 1e-3, torch.zeros_like(true)
    with torch.no_grad():
        for probe in range(400):
            seed = estimators.probe_seed(1, 0, probe)
            lp, lm = None, None
            for step in estimators.schedule([seed], mu, estimators.ESTIMATORS["central"]):
                params.add_(step.seeds, step.scales)
                if step.sign > 0:
                    lp = loss().item()
                else:
                    lm = loss().item()
            params.add_([seed], [mu])  # back to w
            estimate += (lp - lm) / (2 * mu) * noise.gaussian(true.numel(), seed=seed)
    cosine = torch.nn.functional.cosine_similarity(estimate, true, dim=0).item()
    assert cosine > 0.8, cosine


def test_schedule_and_final_pass_undo_the_probes():
    """With lr 0, a whole step's passes bring the weights back to within float32 rounding."""
    buf = torch.nn.Parameter(torch.randn(10_000))
    params = zo.ZOParams([("w", buf)])
    before = params.flat.flat.clone()
    seeds = estimators.step_seeds(3, 0, 4)
    for name in ("central", "forward", "cut-grad-one-sided"):
        estimator = estimators.ESTIMATORS[name]
        for probe in estimators.schedule(seeds, 1e-3, estimator):
            params.add_(probe.seeds, probe.scales)
        params.add_(*estimators.end_terms(seeds, 1e-3, estimator, 0.0, [1.0] * 4))
        torch.testing.assert_close(params.flat.flat, before, rtol=0, atol=1e-6)
    assert estimators.probe_seed(0, 1, 2) != estimators.probe_seed(0, 2, 1) and estimators.probe_seed(0, 1, 2) < 2**63


# --- the ZO client learns -------------------------------------------------------------------------------

# The client alone: the server frozen at its initial weights (server lr 0), a slice of the task.
ALONE = dict(server_lr=0.0, train_examples=256, batch_size=16, steps=80, log_every=10)


def _frozen_server_loss(cfg: TrainConfig, client_file=None, batches=8) -> float:
    """The mean loss over the first training batches of the initial model, with the client's weights
    from client_file (None: the initial ones): what the client alone has changed."""
    model, batch_of = _model_and_batch(cfg)
    client, server = split_model(model, cfg.split_layer)
    if client_file is not None:
        saved = load_file(client_file)
        with torch.no_grad():
            for name, p in client.named_parameters():
                p.copy_(saved[name])
    total = 0.0
    with torch.no_grad():
        for step in range(batches):
            batch = batch_of(step)
            h = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            total += server(h, labels=batch["labels"]).loss.item()
    return total / batches


CLIENT_ALONE = {
    "cut-grad-rows": dict(zo_estimator="cut-grad", q=8, client_lr=1e-2, zo_embedding="rows"),
    "cut-grad-all": dict(zo_estimator="cut-grad", q=8, client_lr=1e-2, zo_embedding="all"),
    "central": dict(zo_estimator="central", q=4, client_lr=1e-2),
    "forward": dict(zo_estimator="forward", q=4, client_lr=5e-3),
    "cut-grad-client-lora": dict(zo_estimator="cut-grad", q=8, client_lr=3e-2, client_lora_r=8, server_lora_r=0),
    "cut-grad-bf16-no-master": dict(zo_estimator="cut-grad", q=8, client_lr=1e-2, dtype="bfloat16", zo_master="none"),
    "cut-grad-one-sided": dict(zo_estimator="cut-grad-one-sided", q=8, client_lr=1e-2),
    "cut-grad-one-sided-sgd": dict(zo_estimator="cut-grad-one-sided", q=8, client_lr=1e-2, zo_step="sgd"),
    "cut-grad-one-sided-gaussian": dict(zo_estimator="cut-grad-one-sided", q=8, client_lr=1e-2, zo_noise="gaussian"),
    "cut-grad-jvp": dict(zo_estimator="cut-grad-jvp", q=8, client_lr=1e-2),
    "cut-grad-jvp-bf16-no-master": dict(
        zo_estimator="cut-grad-jvp", q=8, client_lr=1e-2, dtype="bfloat16", zo_master="none"
    ),
}


def _client_alone_gain(tmp_path, overrides) -> float:
    cfg = cfg_for(tmp_path, **{**ALONE, **overrides})
    run(cfg)
    assert load_file(tmp_path / "run" / "server.safetensors").keys()  # the server ran, frozen
    return _frozen_server_loss(cfg) - _frozen_server_loss(cfg, tmp_path / "run" / "client.safetensors")


@pytest.mark.parametrize("overrides", list(CLIENT_ALONE.values()), ids=list(CLIENT_ALONE))
def test_zo_client_alone_lowers_the_loss(tmp_path, overrides):
    """With the server frozen, only the ZO client can lower the loss: it must, by a margin (the
    loss starts near 4.2; test_flipped_update_sign_fails_the_client_alone_check shows that a client
    stepping the wrong way does not pass)."""
    gain = _client_alone_gain(tmp_path, overrides)
    assert gain > 0.15, gain


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-opt"])
@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["loss", "loss-x1000"])
def test_hosl_defaults_lower_the_loss_on_two_model_shapes_at_any_loss_scale(tmp_path, monkeypatch, model, scale):
    """hosl with no --client-lr, --q, --zo-estimator or --zo-step, the server frozen: the client alone
    lowers the loss of a Llama and of an OPT shape, and by as much when the loss (so every g) is 1000
    times larger, where ZO-SGD at the same rate's steps grow 1000 times and it learns next to nothing
    (the normalized step's size is --client-lr's, not the gradient's)."""
    from hosl import split

    forward = split.ServerModel.forward

    def scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * scale
        return out

    monkeypatch.setattr(split.ServerModel, "forward", scaled)
    cfg = cfg_for(tmp_path, **{**ALONE, "model": model, "client_lr": None, "q": None, "zo_estimator": None})
    assert (cfg.zo_step, cfg.zo_estimator, cfg.zo_noise) == ("normalized", "cut-grad-one-sided", "rademacher")
    run(cfg)
    monkeypatch.undo()  # the frozen server measures the true loss
    gain = _frozen_server_loss(cfg) - _frozen_server_loss(cfg, tmp_path / "run" / "client.safetensors")
    assert gain > 0.3, gain  # 0.72 for both shapes at both scales; ZO-SGD at 5e-3: 0.80, then 0.05 and 0.08 at x1000


@pytest.mark.parametrize(
    "name",
    ["cut-grad-rows", "central", "cut-grad-bf16-no-master", "cut-grad-one-sided", "cut-grad-one-sided-sgd",
     "cut-grad-one-sided-gaussian", "cut-grad-jvp"],
)  # fmt: skip
def test_flipped_update_sign_fails_the_client_alone_check(tmp_path, monkeypatch, name):
    """The check above, with the sign of the ZO update flipped in estimators.end_terms: the loss rises."""
    end_terms = estimators.end_terms

    def flipped(seeds, mu, estimator, lr, grads, *args, **kw):
        return end_terms(seeds, mu, estimator, lr, None if grads is None else [-g for g in grads], *args, **kw)

    monkeypatch.setattr(estimators, "end_terms", flipped)
    gain = _client_alone_gain(tmp_path, CLIENT_ALONE[name])
    assert gain < 0.0, gain


@pytest.mark.parametrize("estimator", ["cut-grad", "cut-grad-one-sided", "cut-grad-jvp"])
def test_cut_grad_logged_g_equals_independent_finite_difference(tmp_path, estimator):
    """A cut-grad estimator's g (from the server's dL/dh and the client's own forwards) equals the
    loss difference of the unsplit model, computed here from scratch, to first order: central,
    (L(w + mu z) - L(w - mu z)) / 2mu, for cut-grad and for the JVP's exact derivative; one-sided,
    (L(w + mu z) - L(w)) / mu, for cut-grad-one-sided."""
    cfg = cfg_for(tmp_path, steps=1, zo_estimator=estimator, q=3, mu=1e-3, zo_embedding="all")
    run(cfg)
    g_run = read_log(tmp_path / "run" / "zo_log.jsonl")[0]["grads"]

    model, batches = _model_and_batch(cfg)
    client, _ = split_model(model, cfg.split_layer)
    params = list(client.parameters())
    batch = batches(0)
    for probe, g in enumerate(g_run):
        seed = estimators.probe_seed(cfg.seed, 0, probe)
        z = noise.directions(sum(p.numel() for p in params), seed, dist=cfg.zo_noise)

        def loss_at(sign, z=z):
            with torch.no_grad():
                start, saved = 0, [p.detach().clone() for p in params]
                for p in params:
                    p.add_(sign * cfg.mu * z[start : start + p.numel()].view_as(p))
                    start += p.numel()
                value = model(**batch).loss.double().item()
                for p, s in zip(params, saved):
                    p.copy_(s)
            return value

        if estimator == "cut-grad-one-sided":
            g_ref = (loss_at(+1) - loss_at(0)) / cfg.mu
        else:
            g_ref = (loss_at(+1) - loss_at(-1)) / (2 * cfg.mu)
        assert abs(g - g_ref) <= 0.05 * abs(g_ref) + 0.02, (g_run, probe, g_ref)
    assert max(abs(g) for g in g_run) > 0.2


def test_rows_leave_the_unused_embedding_rows_untouched(tmp_path):
    """--zo-embedding rows: the rows no batch used keep their initial bits; all: every row moves.
    (An element may come back to its bits: at Q = 1 a normalized Rademacher step moves each element
    by exactly +-lr, and two steps of opposite signs cancel.)"""
    cfg = cfg_for(tmp_path, "rows", zo_embedding="rows", train_examples=16, steps=2, batch_size=4)
    run(cfg)
    model, batches = _model_and_batch(cfg)
    client, _ = split_model(model, cfg.split_layer)
    name = next(n for n in client.state_dict() if "embed_tokens" in n)
    initial = client.state_dict()[name]
    used = torch.unique(torch.cat([batches(t)["input_ids"].flatten() for t in range(cfg.steps)]))
    unused = torch.ones(initial.shape[0], dtype=torch.bool)
    unused[used] = False
    assert unused.sum() > 10
    trained = load_file(tmp_path / "rows" / "client.safetensors")[name]
    assert torch.equal(trained[unused], initial[unused])
    assert (trained[used] != initial[used]).any(dim=1).all()
    run(cfg_for(tmp_path, "all", zo_embedding="all", train_examples=16, steps=2, batch_size=4))
    dense = load_file(tmp_path / "all" / "client.safetensors")[name]
    assert (dense[unused] != initial[unused]).any(dim=1).all()


def test_rows_of_a_learned_position_table_are_the_positions_used(tmp_path):
    """OPT's learned position table: with a clean forward to record the lookups, only the positions
    the batches used move; without one (--server-grad probe) the table stays dense. Both replay."""
    common = dict(model="builtin:tiny-opt", zo_embedding="rows", steps=2, batch_size=4, max_length=24)
    cfg = cfg_for(tmp_path, "clean", **common)
    run(cfg)
    model, _ = _model_and_batch(cfg)
    client, _ = split_model(model, cfg.split_layer)
    name = next(n for n in client.state_dict() if "embed_positions" in n)
    initial = client.state_dict()[name]
    trained = load_file(tmp_path / "clean" / "client.safetensors")[name]
    moved = (trained != initial).any(dim=1)
    # OPT looks positions up at 2 + (0 .. length - 1), and padding at 1: nothing past 2 + 24.
    assert moved[2:10].all() and not moved[2 + cfg.max_length :].any(), moved.nonzero().flatten().tolist()
    _assert_replays(cfg, tmp_path / "clean")
    log = read_log(tmp_path / "clean" / "zo_log.jsonl")
    assert all(len(r["rows"]) == 2 and None not in r["rows"] for r in log)  # tokens and positions
    probe = cfg_for(tmp_path, "probe", server_grad="probe", **common)
    run(probe)
    dense = load_file(tmp_path / "probe" / "client.safetensors")[name]
    assert (dense != initial).any(dim=1).all()
    assert all(r["rows"][1] is None for r in read_log(tmp_path / "probe" / "zo_log.jsonl"))
    _assert_replays(probe, tmp_path / "probe")


def test_all_is_the_dense_step(tmp_path):
    """--zo-embedding all logs no rows and equals the dense ZO buffer's replay, bit for bit."""
    cfg = cfg_for(tmp_path, zo_embedding="all", q=2)
    run(cfg)
    log = read_log(tmp_path / "run" / "zo_log.jsonl")
    assert all("rows" not in r for r in log)
    model, _ = _model_and_batch(cfg)
    client, _ = split_model(model, cfg.split_layer)
    named = [(n, p) for n, p in client.named_parameters() if p.requires_grad]
    replay(zo.ZOParams(named, dist=cfg.zo_noise), cfg, log)
    saved = load_file(tmp_path / "run" / "client.safetensors")
    assert all(torch.equal(p.detach(), saved[n]) for n, p in client.named_parameters())


def test_a_config_from_before_rows_stays_dense():
    """A config.json saved before --zo-embedding existed resumes with the dense noise it ran."""
    saved = json.loads(TrainConfig().to_json())
    del saved["zo_embedding"]
    assert TrainConfig.from_json(json.dumps(saved)).zo_embedding == "all"
    assert TrainConfig.from_json(TrainConfig().to_json()).zo_embedding == "rows"


def test_defaults_per_method():
    """Unset ZO flags take the method's defaults: hosl probes with cut-grad-one-sided, the others as
    before."""
    hosl = TrainConfig()
    assert (hosl.zo_estimator, hosl.q, hosl.client_lr, hosl.zo_embedding, hosl.zo_step) == (
        "cut-grad-one-sided", 8, 5e-3, "rows", "normalized"
    )  # fmt: skip
    for method in ("fo", "zo", "fo-full", "zo-full"):
        other = TrainConfig(method=method)
        assert (other.zo_estimator, other.q, other.client_lr, other.zo_step) == ("central", 1, 1e-4, "sgd"), method
    assert TrainConfig(zo_estimator="central").q == 1 and TrainConfig(q=3).q == 3


# --- methods against their references -----------------------------------------------------------------


def test_fo_split_equals_fo_full(tmp_path):
    """Classic split learning (client backprop from the server's dL/dh) trains like the unsplit model."""
    a = run(cfg_for(tmp_path, "fo", method="fo", optimizer="sgd", client_lr=0.05, server_lr=0.05))
    b = run(cfg_for(tmp_path, "full", method="fo-full", optimizer="sgd", server_lr=0.05))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "fo")), torch.tensor(losses(tmp_path / "full")))
    split, full = weights(tmp_path / "fo"), weights(tmp_path / "full")
    client, server = {k[7:]: v for k, v in split.items() if k.startswith("client.")}, split
    emb = client["stack.embed_tokens.weight"]
    torch.testing.assert_close(emb, full["model.embed_tokens.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(server["server.lm.lm_head.weight"], full["lm_head.weight"], rtol=1e-5, atol=1e-6)
    assert a["bytes_down"] > 0 and b["bytes_up"] == 0


@pytest.mark.parametrize("method", ["hosl", "fo-full"])
def test_each_side_computes_with_its_threads(tmp_path, monkeypatch, method):
    """--client-threads and --server-threads: a local run's two sides are two threads of one process,
    and each computes with its own torch thread count; an unsplit model with --threads."""
    import threading

    from hosl.roles import FullModel, SplitClient
    from hosl.split import ServerModel

    seen: dict[str, set[int]] = {"client": set(), "server": set()}

    def count(side, fn):
        def counted(self, *args, **kwargs):
            if side != "server" or threading.current_thread().name == "hosl-server":
                seen[side].add(torch.get_num_threads())
            return fn(self, *args, **kwargs)

        return counted

    monkeypatch.setattr(SplitClient, "train_step", count("client", SplitClient.train_step))
    monkeypatch.setattr(ServerModel, "forward", count("server", ServerModel.forward))
    monkeypatch.setattr(FullModel, "train_step", count("client", FullModel.train_step))
    before = torch.get_num_threads()
    try:
        if method == "hosl":
            run(cfg_for(tmp_path, "split", steps=2, client_threads=3, server_threads=1))
            assert seen == {"client": {3}, "server": {1}}
        else:
            run(cfg_for(tmp_path, "full", method="fo-full", steps=2, threads=3, server_lr=0.05))
            assert seen == {"client": {3}, "server": set()}
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--server-threads 2 is not used by --method fo-full"):
        TrainConfig(method="fo-full", server_threads=2)


@pytest.mark.parametrize("probes", ["inplace", "scratch"])
def test_zo_split_equals_zo_full(tmp_path, probes):
    """MeZO over the split (server noise continuing at the client's offset) equals MeZO on the model,
    with probes in place or in scratch copies (there on every module of both sides and of the model)."""
    run(cfg_for(tmp_path, "zo", method="zo", client_lr=2e-4, zo_probes=probes))
    run(cfg_for(tmp_path, "full", method="zo-full", client_lr=2e-4, zo_probes=probes))
    assert losses(tmp_path / "zo") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
    split, full = weights(tmp_path / "zo"), weights(tmp_path / "full")
    torch.testing.assert_close(
        split["client.stack.layers.0.mlp.up_proj.weight"], full["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        split["server.lm.model.layers.0.mlp.up_proj.weight"],
        full["model.layers.1.mlp.up_proj.weight"],
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(split["server.lm.lm_head.weight"], full["lm_head.weight"], rtol=0, atol=1e-6)


def test_client_checkpointing_trains_fo_to_the_same_bits(tmp_path, monkeypatch):
    """--client-checkpointing recomputes each client block in the backward: the run's weights and
    losses are fo's, bit for bit (k = 2, so two blocks are wrapped, and only in that run)."""
    from hosl import roles

    wrapped = []
    real = roles.checkpoint_blocks
    monkeypatch.setattr(roles, "checkpoint_blocks", lambda client: wrapped.append(real(client)))
    run(cfg_for(tmp_path, "plain", method="fo", split_layer=2, steps=3))
    assert wrapped == []
    run(cfg_for(tmp_path, "ckpt", method="fo", split_layer=2, steps=3, client_checkpointing=True))
    assert wrapped == [2]
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "plain") == losses(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="--client-checkpointing true is not used by --method hosl"):
        TrainConfig(method="hosl", client_checkpointing=True)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_fused_client_step_is_fos_step_with_no_gradient_buffer(tmp_path, monkeypatch, optimizer):
    """--client-fused-step: each client parameter steps inside the backward as soon as its gradient
    is complete, and that gradient is freed there, so at most one client gradient is held at a time;
    the weights and losses are fo's, bit for bit (AdamW, and SGD with momentum and decay)."""
    from hosl.optim import FusedStep

    held = []
    apply = FusedStep._apply

    def counting(self, one, p):
        held.append(sum(q.grad is not None for q in self.params))
        return apply(self, one, p)

    monkeypatch.setattr(FusedStep, "_apply", counting)
    kw = dict(method="fo", split_layer=2, steps=3, optimizer=optimizer, weight_decay=0.1)
    kw |= {"momentum": 0.9} if optimizer == "sgd" else {}
    run(cfg_for(tmp_path, "plain", **kw))
    assert held == []
    run(cfg_for(tmp_path, "fused", client_fused_step=True, client_checkpointing=True, **kw))
    assert held and max(held) == 1, held  # a gradient is freed before the next one is complete
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "fused")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "plain") == losses(tmp_path / "fused")


def test_a_fused_step_stops_at_a_non_finite_gradient():
    """A fused step cannot be skipped once parameters have moved: a non-finite gradient stops it."""
    from hosl.optim import DivergedError, FusedStep

    w = torch.nn.Parameter(torch.ones(3))
    fused = FusedStep([w], TrainConfig(method="fo", optimizer="sgd"), 0.1)
    with fused.stepping(0.1, 0):
        (w * 2).sum().backward()
    assert torch.equal(w.detach(), torch.full((3,), 0.8)) and w.grad is None
    with pytest.raises(DivergedError, match="a fused step cannot be skipped"), fused.stepping(0.1, 1):
        (w * float("inf")).sum().backward()
    with pytest.raises(RuntimeError, match="outside FusedStep.stepping"):
        (w * 2).sum().backward()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_checkpointed_blocks_save_only_their_inputs(family):
    """A checkpointed client's forward saves for the backward one block input per block (and the
    embedding's), far less than the plain forward; the gradients are the same."""
    from _tiny_models import batch, model

    from hosl.split import checkpoint_blocks

    ids, mask, _ = batch()

    def saved_and_grads(wrap):
        client, _ = split_model(model(family), 3)
        if wrap:
            assert checkpoint_blocks(client) == 3
        saved = []

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                saved.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = client(input_ids=ids, attention_mask=mask).hidden
        h.pow(2).sum().backward()
        return sum(saved), [p.grad.clone() for p in client.parameters()]

    plain, plain_grads = saved_and_grads(False)
    wrapped, wrapped_grads = saved_and_grads(True)
    assert wrapped * 4 < plain, (wrapped, plain)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, wrapped_grads))


def test_hosl_with_frozen_client_is_fo_on_the_server(tmp_path):
    """client lr 0: the server trains exactly as FO on the clean activations of the initial client."""
    cfg = cfg_for(tmp_path, client_lr=0.0, optimizer="sgd", server_lr=0.05)
    run(cfg)
    model, batches = _model_and_batch(cfg)
    client, server = split_model(model, cfg.split_layer)
    opt = torch.optim.SGD([p for p in server.parameters()], lr=cfg.server_lr)
    for step in range(cfg.steps):
        batch = batches(step)
        with torch.no_grad():
            h = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        server(h, labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = load_file(tmp_path / "run" / "server.safetensors")
    for name, p in server.named_parameters():
        torch.testing.assert_close(trained[name], p.detach(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("estimator", ["central", "cut-grad", "cut-grad-one-sided", "cut-grad-jvp"])
def test_streaming_equals_synchronous(tmp_path, estimator):
    extra = {"zo_estimator": estimator, "client_lr": 1e-2} if estimator.startswith("cut-grad") else {}
    run(cfg_for(tmp_path, "stream", q=3, **extra))
    run(cfg_for(tmp_path, "sync", q=3, sync_probes=True, **extra))
    a, b = weights(tmp_path / "stream"), weights(tmp_path / "sync")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "stream") == losses(tmp_path / "sync")


@pytest.mark.parametrize("sync, forwards_before", [(False, 3), (True, 1)])
def test_cut_grad_runs_its_first_probe_pair_while_the_server_works(tmp_path, monkeypatch, sync, forwards_before):
    """cut-grad reads dL/dh after its clean forward and first probe pair (those overlap the server's
    forward and backward); --sync-probes reads it right after the clean forward."""
    from hosl.roles import SplitClient

    forwards, seen = [0], []
    real_forward, real_answer = SplitClient._forward, SplitClient._answer

    def counting_forward(self, batch):
        forwards[0] += 1
        return real_forward(self, batch)

    def recording_answer(self, step, forward):
        if forward.key == (0, 0):
            seen.append(forwards[0])
        return real_answer(self, step, forward)

    monkeypatch.setattr(SplitClient, "_forward", counting_forward)
    monkeypatch.setattr(SplitClient, "_answer", recording_answer)
    cfg = cfg_for(tmp_path, zo_estimator="cut-grad", q=2, client_lr=1e-2, steps=2, sync_probes=sync)
    run(cfg)
    assert seen == [forwards_before, 1 + 2 * 2 + forwards_before]  # each step: 1 + 2Q forwards


@pytest.mark.parametrize(
    "overrides",
    [
        {"server_grad": "probe"},
        {"zo_estimator": "forward", "q": 2},
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1, "server_lr": 0.05},
        {"compression": "int8"},
        {"zo_estimator": "cut-grad", "q": 3, "client_lr": 1e-2},
        {"zo_estimator": "cut-grad", "q": 2, "weight_decay": 0.1, "compression": "fp16"},
        {"zo_estimator": "cut-grad-one-sided", "q": 3, "zo_step": "normalized", "client_lr": 1e-2},
        {"zo_probes": "scratch", "q": 2},
        {"zo_probes": "scratch", "zo_estimator": "cut-grad", "q": 3, "client_lr": 1e-2, "client_micro_batch": 3},
        {"zo_probes": "scratch", "lora_r": 2, "client_lr": 1e-3},
        {"dtype": "bfloat16", "zo_master": "none", "q": 2, "weight_decay": 0.1},
        {
            "dtype": "float16",
            "zo_master": "none",
            "zo_estimator": "cut-grad",
            "q": 3,
            "client_lr": 1e-2,
            "optimizer": "sgd",
        },
    ],
    ids=[
        "server-grad-probe",
        "forward-estimator",
        "sgd-momentum-decay",
        "int8-link",
        "cut-grad",
        "cut-grad-fp16",
        "normalized-step",
        "scratch",
        "scratch-cut-grad-micro",
        "scratch-lora",
        "bf16-no-master",
        "fp16-no-master-cut-grad",
    ],  # fmt: skip
)
def test_variants_run_and_replay(tmp_path, overrides):
    """Each variant trains, and the client's weights replay bit for bit from the ZO log."""
    cfg = cfg_for(tmp_path, **overrides)
    summary = run(cfg)
    assert summary["steps"] == cfg.steps and summary["skipped_steps"] == 0
    _assert_replays(cfg, tmp_path / "run")


def _assert_replays(cfg, run_dir):
    model, _ = _model_and_batch(cfg)
    client, _ = split_model(model, cfg.split_layer)
    replay(client_zo_params(client, cfg), cfg, read_log(run_dir / "zo_log.jsonl"))
    saved = load_file(run_dir / "client.safetensors")
    assert all(torch.equal(p.detach(), saved[n]) for n, p in client.named_parameters())
    assert any(not torch.equal(p.detach(), q) for p, q in zip(client.parameters(), _initial_client(cfg)))


def _initial_client(cfg):
    model, _ = _model_and_batch(cfg)
    client, _ = split_model(model, cfg.split_layer)
    return [p.detach().clone() for p in client.parameters()]


def test_lora_trains_only_the_adapters_on_each_side(tmp_path):
    cfg = cfg_for(tmp_path, lora_r=4, steps=4, client_lr=1e-3)
    summary = run(cfg)
    model, _ = _model_and_batch(cfg)  # the same initial weights, adapters included
    client, server = split_model(model, cfg.split_layer)
    assert summary["client_trainable_params"] == sum(p.numel() for p in client.parameters() if p.requires_grad)
    assert 0 < summary["client_trainable_params"] < summary["client_params"] / 4
    trainable = {n for n, p in client.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    after = load_file(tmp_path / "run" / "client.safetensors")
    for n, p in client.named_parameters():
        assert torch.equal(after[n], p.detach()) == (n not in trainable), n
    server_after = load_file(tmp_path / "run" / "server.safetensors")
    for n, p in server.named_parameters():
        assert torch.equal(server_after[n], p.detach()) == (not p.requires_grad), n
    _assert_replays(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "client_r,server_r,fa", [(4, 0, False), (0, 4, False), (2, 6, False), (4, 4, True)],
    ids=["client-lora", "server-lora", "both", "client-lora-fa"],
)  # fmt: skip
def test_lora_per_side(tmp_path, client_r, server_r, fa):
    """--client-lora-r and --server-lora-r: a side with a rank trains only its adapters (of that rank),
    a side of rank 0 trains in full; the client's ZO buffer is what it trains, and replays. With
    --client-lora-fa the client trains only the adapters' B (A stays at its init), the server all of its own."""
    cfg = cfg_for(tmp_path, client_lora_r=client_r, server_lora_r=server_r, client_lora_fa=fa, steps=4, client_lr=1e-3)
    summary = run(cfg)
    model, _ = _model_and_batch(cfg)
    client, server = split_model(model, cfg.split_layer)
    for side, r, prefix in ((client, client_r, "client"), (server, server_r, "server")):
        named = dict(side.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        adapters = {n for n in named if "lora_" in n}
        if fa and prefix == "client":
            adapters = {n for n in adapters if "lora_B" in n}
        assert trainable == (adapters if r else set(named)), prefix
        assert bool(adapters) == bool(r), prefix
        if r:  # rank r: lora_A is (r, in), lora_B (out, r)
            assert all(min(named[n].shape) == r for n in adapters), prefix
        assert summary[f"{prefix}_trainable_params"] == sum(named[n].numel() for n in trainable)
        after = load_file(tmp_path / "run" / f"{prefix}.safetensors")
        moved = {n for n, p in named.items() if not torch.equal(after[n], p.detach())}
        assert moved and moved <= trainable, prefix
    _assert_replays(cfg, tmp_path / "run")


class _NoPrefix:
    """hosl.roles.FrozenPrefix that keeps nothing: every forward runs every client block."""

    def __init__(self, client, j):
        self.rows = None

    def step(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize(
    "model,estimator,micro",
    [("builtin:tiny", "cut-grad-one-sided", 0), ("builtin:tiny-opt", "cut-grad", 3),
     ("builtin:tiny", "cut-grad-jvp", 3), ("builtin:tiny", "central", 0)],
    ids=["one-sided", "opt-cut-grad-micro", "jvp-micro", "central"],
)  # fmt: skip
def test_client_train_blocks_runs_the_frozen_blocks_once_a_step_to_the_same_bits(tmp_path, monkeypatch, model,
                                                                                 estimator, micro):  # fmt: skip
    """--client-train-blocks 1 at k = 3: only the client's last block trains (the embeddings and
    blocks 0-1 keep their bits, and the run replays); the frozen blocks run once a step (once a row
    slice with --client-micro-batch) however many forwards the step takes; and every bit of the run
    is that of the same run with no kept output, whose every forward runs every block."""
    from hosl import roles

    cfg = cfg_for(tmp_path, "kept", model=model, split_layer=3, client_train_blocks=1, zo_estimator=estimator,
                  q=3 if estimator != "central" else 1, client_lr=1e-2, steps=3, client_micro_batch=micro,
                  zo_probes="scratch" if estimator == "cut-grad-jvp" else "inplace")  # fmt: skip
    calls = {0: 0, 2: 0}  # the real forwards of client blocks 0 (frozen) and 2 (trained) in the steps
    zo_step, stepping = roles.SplitClient._zo_step, []

    def counted_step(self, *args, **kwargs):
        stepping.append(True)
        try:
            return zo_step(self, *args, **kwargs)
        finally:
            stepping.pop()

    def count(module, args):  # attention modules know their block's index
        if stepping and getattr(module, "layer_idx", None) in calls:
            calls[module.layer_idx] += 1

    monkeypatch.setattr(roles.SplitClient, "_zo_step", counted_step)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        run(cfg)
    finally:
        handle.remove()
        monkeypatch.undo()
    slices = -(-cfg.batch_size // micro) if micro else 1
    forwards = len(StepPlan.of(cfg).forwards)
    assert forwards > 1 and calls[0] == cfg.steps * slices and calls[2] == forwards * calls[0], calls
    initial = dict(zip((n for n, _ in split_model(_model_and_batch(cfg)[0], 3)[0].named_parameters()),
                       _initial_client(cfg)))  # fmt: skip
    after = load_file(tmp_path / "kept" / "client.safetensors")
    moved = {n for n in after if not torch.equal(after[n], initial[n])}
    trained = {n for n in after if re.search(r"layers\.2\.", n)}
    assert moved and moved <= trained and trained, (moved, trained)
    _assert_replays(cfg, tmp_path / "kept")
    monkeypatch.setattr(roles, "FrozenPrefix", _NoPrefix)
    run(dataclasses.replace(cfg, out=str(tmp_path / "every")))
    every = load_file(tmp_path / "every" / "client.safetensors")
    kept_log, every_log = (read_log(tmp_path / name / "zo_log.jsonl") for name in ("kept", "every"))
    if estimator == "cut-grad-jvp":  # its tangent pass runs attention eagerly: the frozen blocks' output
        # there differs from the clean forward's, which it gets from the kept output, in the last bits
        for a, b in zip(kept_log, every_log):
            assert a["grads"] == pytest.approx(b["grads"], rel=1e-4, abs=1e-7)
        assert all(torch.allclose(after[n], every[n], rtol=0, atol=1e-6) for n in after)
        return
    assert all(torch.equal(after[n], every[n]) for n in after)
    assert kept_log == every_log


def test_client_train_blocks_freezes_a_first_order_client_too(tmp_path):
    """fo with --client-train-blocks 1: the optimiser steps only the client's last block."""
    cfg = cfg_for(tmp_path, method="fo", split_layer=3, client_train_blocks=1, steps=2, client_lr=1e-3)
    summary = run(cfg)
    names = [n for n, _ in split_model(_model_and_batch(cfg)[0], 3)[0].named_parameters()]
    initial = dict(zip(names, _initial_client(cfg)))
    after = load_file(tmp_path / "run" / "client.safetensors")
    moved = {n for n in after if not torch.equal(after[n], initial[n])}
    trained = {n for n in after if re.search(r"layers\.2\.", n)}
    assert moved == trained and summary["client_trainable_params"] == sum(after[n].numel() for n in trained)


@pytest.mark.parametrize("estimator", ["cut-grad-one-sided", "cut-grad"])
def test_batched_probes_give_the_sequential_g_on_a_client_lora(tmp_path, estimator):
    """--client-batch-probes: a client LoRA's Q probe forwards as one forward over (Q x batch) rows, each
    row block with its probe's adapters, give the g of the sequential probes to float tolerance, alone
    and a probe at a time under --client-micro-batch (8 rows: one probe's block). Refused where the
    ZO weights are not all in linear layers, and for an estimator that uploads its probes."""
    common = dict(client_lora_r=4, server_lora_r=0, zo_estimator=estimator, q=4, steps=3, client_lr=1e-3)
    run(cfg_for(tmp_path, "sequential", zo_probes="scratch", **common))
    run(cfg_for(tmp_path, "batched", client_batch_probes=True, **common))
    run(cfg_for(tmp_path, "micro", client_batch_probes=True, client_micro_batch=8, **common))
    logs = {name: read_log(tmp_path / name / "zo_log.jsonl") for name in ("sequential", "batched", "micro")}
    want = [g for r in logs["sequential"] for g in r["grads"]]
    assert len(want) == 12 and min(abs(g) for g in want) > 1e-6
    for name in ("batched", "micro"):
        got = [g for r in logs[name] for g in r["grads"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
    with pytest.raises(ValueError, match="needs every ZO weight in a linear layer"):
        run(cfg_for(tmp_path, "full", client_batch_probes=True, zo_estimator=estimator, q=2, steps=1))
    with pytest.raises(ValueError, match="--client-batch-probes true needs --zo-estimator cut-grad"):
        cfg_for(tmp_path, "central", client_batch_probes=True, client_lora_r=4)


@pytest.mark.parametrize("estimator", ["cut-grad", "cut-grad-one-sided", "cut-grad-jvp"])
def test_replay_is_bit_identical(tmp_path, estimator):
    cfg = cfg_for(tmp_path, q=2, steps=8, zo_estimator=estimator)
    run(cfg)
    _assert_replays(cfg, tmp_path / "run")


@pytest.mark.parametrize("estimator", ["cut-grad-one-sided", "cut-grad-jvp"])
def test_a_rademacher_run_replays_and_is_not_the_gaussian_run(tmp_path, estimator):
    """--zo-noise rademacher: replay from the log gives the saved client bit for bit (the config says
    which directions), and the client differs from the Gaussian run's of the same seed."""
    cfg = cfg_for(tmp_path, "rademacher", q=2, steps=4, zo_estimator=estimator, zo_noise="rademacher")
    run(cfg)
    _assert_replays(cfg, tmp_path / "rademacher")
    run(cfg_for(tmp_path, "gaussian", q=2, steps=4, zo_estimator=estimator, zo_noise="gaussian"))
    a, b = weights(tmp_path / "rademacher"), weights(tmp_path / "gaussian")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("client"))


RESUMED = {
    "hosl": {},
    "fo": {"method": "fo"},
    "hosl-cut-grad": {"zo_estimator": "cut-grad", "q": 3},
    "hosl-cut-grad-one-sided": {"zo_estimator": "cut-grad-one-sided", "q": 3},
    "hosl-cut-grad-jvp": {"zo_estimator": "cut-grad-jvp", "q": 3},
    "fo-fused-checkpointed": {"method": "fo", "client_fused_step": True, "client_checkpointing": True},
    "hosl-bf16-no-master": {"dtype": "bfloat16", "zo_master": "none", "weight_decay": 0.1},
    "hosl-gaussian-bf16-no-master": {"zo_noise": "gaussian", "dtype": "bfloat16", "zo_master": "none"},
}


@pytest.mark.parametrize("overrides", list(RESUMED.values()), ids=list(RESUMED))
def test_resume_is_bit_identical(tmp_path, overrides):
    straight = cfg_for(tmp_path, "straight", steps=8, save_every=4, **overrides)
    run(straight)
    first = cfg_for(tmp_path, "resumed", steps=4, save_every=4, **overrides)
    run(first)
    assert main(["--resume", str(tmp_path / "resumed"), "--steps", "8"]) == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sb = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert sa["final_eval_accuracy"] == sb["final_eval_accuracy"]
    # Traffic adds up across the stop (the stopped run also evaluated once more, at its end).
    assert sb["bytes_up"] > sa["bytes_up"]
    assert losses(tmp_path / "straight")[-4:] == losses(tmp_path / "resumed")[-4:]


@pytest.mark.parametrize("method", ["hosl", "fo", "zo", "fo-full", "zo-full"])
def test_each_method_lowers_the_training_loss(tmp_path, method):
    zeroth_order = method in ("zo", "zo-full")
    lr = 2e-4 if zeroth_order else 1e-4
    cfg = cfg_for(tmp_path, method=method, steps=150 if zeroth_order else 60, client_lr=lr, train_examples=64)
    run(cfg)
    curve = losses(tmp_path / "run")
    assert sum(curve[-10:]) / 10 < 0.85 * sum(curve[:5]) / 5, curve[::10]


def test_embedded_default_run_learns(tmp_path, capsys, monkeypatch):
    """`python -m hosl.train` with no flags: above chance on the balanced synthetic task, with a summary."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    run_dir = Path(out.split("run directory: ")[1].split()[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_accuracy"] >= 0.7, summary
    for key in ("method", "model", "task", "split_layer", "steps", "final_eval_accuracy", "best_eval_accuracy",
                "client_peak_memory_bytes", "bytes_up", "bytes_down", "wall_seconds"):  # fmt: skip
        assert key in summary and key in out
    assert summary["method"] == "hosl" and summary["bytes_up"] > summary["bytes_down"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    step = next(r for r in records if "loss" in r)
    assert {"client_s", "link_s", "server_s", "bytes_up", "bytes_down", "client_peak_memory_bytes"} <= set(step)
    assert json.loads((run_dir / "config.json").read_text())["method"] == "hosl"


def test_non_finite_loss_skips_the_step_on_both_sides(tmp_path, monkeypatch):
    from hosl import roles

    forward = roles.SplitServer._forward
    calls = {"n": 0}

    def poisoned(self, hidden, mask, labels):
        out = forward(self, hidden, mask, labels)
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 1 (3 uploads a step; evaluation comes after the last step)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(roles.SplitServer, "_forward", poisoned)
    cfg = cfg_for(tmp_path, steps=3)
    summary = run(cfg)
    assert summary["skipped_steps"] == 1
    log = read_log(tmp_path / "run" / "zo_log.jsonl")
    assert [r["skipped"] for r in log] == [False, True, False]
    _assert_replays(cfg, tmp_path / "run")  # the skipped step still undid its probes
    bare = []  # strict JSON: no bare NaN or Infinity for a parser to refuse
    for name in ("zo_log.jsonl", "metrics.jsonl"):
        for line in (tmp_path / "run" / name).read_text().splitlines():
            json.loads(line, parse_constant=bare.append)
    assert bare == []
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics if m.get("step") == 1 and "loss" in m] == [None]  # the NaN loss, as null


@pytest.mark.parametrize("extra", [[], ["--clients", "2", "--zo-probes", "scratch"]], ids=["one client", "two"])
def test_a_zo_update_that_leaves_non_finite_weights_stops_the_run(tmp_path, capsys, extra):
    """A client rate so large that the update overflows (finite g, so the step is not skipped): the
    run stops with one line at that step, exit status 1, and no file holds a non-finite weight (the
    weights, with inf in them, used to be checkpointed and written as the final ones, exit 0)."""
    out = tmp_path / "r"
    argv = ["--zo-step", "sgd", "--client-lr", "1e38", "--max-skipped", "0", "--steps", "4", "--out", str(out), *extra]
    argv += [] if extra else ["--save-every", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "zeroth-order weights became non-finite" in err[-1] and "Traceback" not in "\n".join(err), err
    files = sorted(out.rglob("*.safetensors"))
    assert not (out / "client.safetensors").exists()
    for path in files:
        assert all(t.isfinite().all() for t in load_file(path).values()), path


@pytest.mark.parametrize(
    "argv,said",
    [
        (["--dtype", "bfloat16", "--server-lr", "1e38"], "the server's rate 1e+38 overflows its torch.bfloat16"),
        (["--method", "fo", "--dtype", "float16", "--client-lr", "1e6"], "weights became non-finite at step 0"),
        (["--dtype", "float16", "--zo-step", "sgd", "--client-lr", "1e38"], "zeroth-order weights became non-finite"),
    ],
    ids=["bf16 server AdamW 1e38", "fp16 fo 1e6", "fp16 zo 1e38"],
)
def test_huge_rates_in_low_precision_stop_in_one_line_with_no_weights_written(tmp_path, capsys, argv, said):
    out = tmp_path / "r"
    assert main([*argv, "--max-skipped", "0", "--steps", "3", "--save-every", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert said in err[-1] and "Traceback" not in "\n".join(err), err
    for path in sorted(out.rglob("*.safetensors")):
        assert all(t.float().isfinite().all() for t in load_file(path).values()), path


# --- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["hosl", "fo", "zo", "fo-full", "zo-full"])
def test_cuda_run_follows_the_cpu_run(tmp_path, method):
    """--device cuda against the same run on the CPU: the forward rounds differently, so the losses
    agree closely rather than exactly; the ZO clients' noise and updates are the same bits on every
    device, so the CPU rebuilds a GPU-trained client from its log exactly."""
    cpu = cfg_for(tmp_path, "cpu", method=method)
    run(cpu)
    gpu = dataclasses.replace(cpu, out=str(tmp_path / "cuda"), device="cuda")
    summary = run(gpu)
    assert summary["cuda_peak_memory_bytes"] > 0
    a, b = losses(tmp_path / "cpu"), losses(tmp_path / "cuda")
    assert len(a) == len(b) == cpu.steps
    assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a, b)), (a, b)
    if method in ("hosl", "zo"):
        _assert_replays(gpu, tmp_path / "cuda")


@pytest.mark.gpu
def test_cuda_resume_continues_the_run(tmp_path):
    """A checkpoint of a GPU run (weights and optimiser state saved from the GPU) resumes there."""
    straight = cfg_for(tmp_path, "straight", device="cuda", steps=8, save_every=4)
    run(straight)
    run(dataclasses.replace(straight, out=str(tmp_path / "resumed"), steps=4))
    assert main(["--resume", str(tmp_path / "resumed"), "--steps", "8"]) == 0
    a, b = losses(tmp_path / "straight")[-4:], losses(tmp_path / "resumed")[-4:]
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    _assert_replays(straight, tmp_path / "resumed")


# --- dist ------------------------------------------------------------------------------------------------


def test_dist_equals_local(tmp_path):
    local = cfg_for(tmp_path, "local", q=2)
    run(local)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()] + ["--q=2", "--insecure"]
    _assert_dist_equals_local(tmp_path, flags)


def test_dist_equals_local_with_cut_grad(tmp_path):
    """cut-grad over the link: the GRAD frame's dL/dh and the client's local probes, as in one process;
    over an authenticated link (hosl.auth), with checkpoints saved through CONTROL frames."""
    overrides = {"zo_estimator": "cut-grad", "q": 3, "client_lr": 1e-2}
    run(cfg_for(tmp_path, "local", **overrides))
    token = tmp_path / "token"
    token.write_text("a shared secret, long enough\n")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**FAST, **overrides}.items()]
    _assert_dist_equals_local(tmp_path, [*flags, f"--auth-token-file={token}", "--save-every=3"])
    names = sorted(p.name for p in (tmp_path / "dist" / "checkpoint-6").iterdir())
    assert names == ["client.safetensors", "manifest.json", "server.safetensors", "server_optimizer.pt", "state.json"]


def _assert_dist_equals_local(tmp_path, flags):
    """torchrun the same flags over --transport dist; the losses and weights equal tmp_path/local's."""
    port = free_port()
    out = subprocess.run(
        ["torchrun", "--nproc-per-node", "2", "--master-port", str(port), "-m", "hosl.train", *flags,
         "--transport=dist", "--out", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # --insecure (no token): each side warns once that its peers are not authenticated; with one, neither does.
    token = any(f.startswith("--auth-token-file") for f in flags)
    assert out.stderr.count("the peers of this run are not authenticated") == (0 if token else 2), out.stderr
    assert losses(tmp_path / "dist") == losses(tmp_path / "local")
    a, b = weights(tmp_path / "local"), weights(tmp_path / "dist")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the command line ------------------------------------------------------------------------------------


def test_flags_come_from_the_config(tmp_path):
    cfg = parse_config(["--split-layer", "2", "--q", "4", "--compression", "none", "--sync-probes"])
    assert (cfg.split_layer, cfg.q, cfg.compression, cfg.sync_probes) == (2, 4, None, True)
    saved = tmp_path / "c.json"
    saved.write_text(dataclasses.replace(cfg, mu=0.01).to_json())
    again = parse_config(["--config", str(saved), "--q", "2"])
    assert (again.mu, again.q, again.split_layer) == (0.01, 2, 2)
    assert TrainConfig.from_json(cfg.to_json()) == cfg


BAD = [
    (["--method", "sgd"], "--method must be one of hosl, fo, zo, fo-full, zo-full"),
    (["--task", "mnist"], "unknown task"),
    (["--model", "builtin:huge"], "unknown built-in model"),
    (["--split-layer", "9"], "--split-layer must be in [0, 4]"),
    (["--q", "0"], "--q must be in [1, 64]"),
    (["--mu", "0"], "--mu must be a finite number > 0"),
    (["--client-lora-fa"], "--client-lora-fa needs client adapters"),
    (["--client-train-blocks", "2"], "--client-train-blocks 2 is more than the client's --split-layer 1 blocks"),
    (["--client-train-blocks", "-1"], "--client-train-blocks must be >= 0, got -1"),
    (["--method", "fo-full", "--client-train-blocks", "1"], "--client-train-blocks 1 is not used by --method fo-full"),
    (
        ["--split-layer", "3", "--client-train-blocks", "1", "--client-lora-r", "2", "--client-batch-probes"],
        "--client-batch-probes runs every block on (probes x batch) rows",
    ),
    (["--method", "fo", "--zo-step", "normalized"], "--zo-step normalized is not used by --method fo"),
    (["--method", "fo", "--zo-noise", "rademacher"], "--zo-noise rademacher is not used by --method fo"),
    (["--zo-noise", "bernoulli"], "--zo-noise must be one of gaussian, rademacher, got 'bernoulli'"),
    (["--client-lr", "-1"], "--client-lr must be a finite number >= 0"),
    (["--q", "two"], "expected int, got 'two'"),
    (["--task", "sst2", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--data-dir", "/tmp"], "--data-dir /tmp is not read by --task synthetic (the built-in task): name the task"),
    (["--config", "/nonexistent.json"], "cannot read --config"),
    (["--resume", "/nonexistent"], "--resume /nonexistent"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--method", "zo", "--zo-estimator", "cut-grad"], "--zo-estimator cut-grad needs --method hosl"),
    (["--zo-estimator", "cut-grad", "--server-grad", "probe"], "--server-grad probe has none to use"),
    (["--zo-embedding", "some"], "--zo-embedding must be one of rows, all"),
    (["--transport", "dist", "--auth-token-file", "/nonexistent"], "cannot read --auth-token-file /nonexistent"),
    (["--transport", "dist"], "--transport dist needs a shared secret, or anyone who reaches the port can join"),
    (["--max-skipped", "-1"], "--max-skipped must be >= 0"),
    (["--mu", "-1e-3"], "--mu must be a finite number > 0, got -0.001"),
    (["--step", "5"], "unrecognized arguments: --step 5 (see --help)"),
    (["--model", "/nonexistent/dir"], "--model /nonexistent/dir: no such directory"),
    (["--save-total-limit", "0"], "--save-total-limit must be >= 1"),
    (["--method", "fo", "--q", "10"], "--q 10 is not used by --method fo (FO on both sides"),
    (["--method", "fo", "--server-grad", "probe"], "--server-grad probe is not used by --method fo"),
    (["--method", "fo-full", "--client-lr", "1e-3"], "--client-lr 0.001 is not used by --method fo-full"),
    (["--method", "zo", "--server-lr", "0.1"], "--server-lr 0.1 is not used by --method zo"),
    (["--method", "zo-full", "--compression", "int8"], "--compression int8 is not used by --method zo-full"),
    (["--momentum", "0.9"], "--momentum 0.9 needs --optimizer sgd (--optimizer adamw has no momentum)"),
    (["--method", "fo", "--client-micro-batch", "4"], "--client-micro-batch 4 is not used by --method fo"),
    (["--client-micro-batch", "-1"], "--client-micro-batch must be >= 0, got -1"),
    (["--method", "fo-full", "--server-micro-batch", "4"], "--server-micro-batch 4 is not used by --method fo-full"),
    (["--server-micro-batch", "-1"], "--server-micro-batch must be >= 0, got -1"),
    (["--method", "fo", "--server-batch-probes"], "--server-batch-probes true is not used by --method fo"),
    (["--zo-estimator", "cut-grad", "--server-batch-probes"], "needs --zo-estimator central or forward (cut-grad"),
    (["--zo-estimator", "central", "--server-batch-probes", "--sync-probes"], "--sync-probes would wait forever"),
    (["--zo-master", "none"], "--zo-master none keeps bfloat16 or float16 weights without a master: it needs --dtype"),
    (
        ["--dtype", "bfloat16", "--zo-master", "none", "--zo-probes", "inplace"],
        "--zo-master none needs --zo-probes scratch",
    ),
    (["--method", "fo", "--dtype", "bfloat16", "--zo-master", "none"], "--zo-master none is not used by --method fo"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    try:
        status = main([*argv, "--out", str(tmp_path / "r")])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_bad_input_from_the_shell():
    out = subprocess.run(
        [sys.executable, "-m", "hosl.train", "--q", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip() == "error: --q must be in [1, 64], got 0"


def test_a_bad_flag_under_torchrun_on_one_machine_is_said_once(monkeypatch, capsys):
    """torchrun starts every rank with the same flags: rank 0 says the error, the others only exit 2
    (before, the line came once a rank, inside torchrun's report). Ranks on other machines speak."""
    argv = ["--transport", "dist"]  # no --out: refused by every rank alike
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        said[rank] = capsys.readouterr().err
    assert "--transport dist needs --out" in said["0"] and said["1"] == ""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two machines: each rank says its own
    assert main(argv) == 2
    assert "--transport dist needs --out" in capsys.readouterr().err


def test_a_model_name_that_is_no_folder_and_no_reachable_hub_id_fails_at_once(tmp_path):
    """`--model mymodel` (a folder name without ./) with no hub to ask: one line saying so, within
    seconds (the hub client used to retry for about a minute), and nothing left in --out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf-home"))  # .invalid never resolves
    out = subprocess.run(
        [sys.executable, "-m", "hosl.train", "--model", "mymodel", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(
        "error: --model mymodel: no such local directory, not in the Hugging Face cache, and the hub (hub.invalid) "
        "cannot be reached to download it ("
    ), lines
    assert not (tmp_path / "r").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_runs_folder(capsys):
    """Without --out a run goes to runs/<method>-<task>-<time> in the working directory; failing
    before its first step (here: no such data), it takes back the runs/ folder it made."""
    assert not Path("runs").exists()
    assert main(["--task", "sst2", "--data-dir", "/nonexistent"]) == 2
    assert "/nonexistent" in capsys.readouterr().err
    assert not Path("runs").exists(), list(Path("runs").rglob("*"))
    Path("runs").mkdir()  # one that was there before stays
    assert main(["--task", "sst2", "--data-dir", "/nonexistent"]) == 2
    assert Path("runs").is_dir() and not any(Path("runs").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "--device cuda: torch" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()


def test_resume_from_another_config_is_refused(tmp_path, capsys):
    run(cfg_for(tmp_path, steps=2, save_every=2))
    assert main(["--resume", str(tmp_path / "run"), "--q", "3"]) == 2
    assert "another config: --q 3 (run: 1)" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("estimator", ["central", "cut-grad-one-sided"])
def test_resume_may_change_the_rates_and_mu_and_replay_follows(tmp_path, capsys, estimator):
    """--resume with a new client and server rate and mu: the run goes on from its checkpoint with
    them (said once, written to config.json), zo_log.jsonl holds each step's lr and mu, and replay
    of the whole log gives the final client weights bit for bit. A later resume still verifies the
    checkpoint saved before the change."""
    cfg = cfg_for(tmp_path, steps=4, save_every=2, zo_estimator=estimator, q=2, mu=1e-3, client_lr=1e-4)
    run(cfg)
    before = json.loads((tmp_path / "run" / "checkpoint-4" / "manifest.json").read_text())
    argv = ["--resume", str(tmp_path / "run"), "--steps", "8", "--client-lr", "5e-5", "--mu", "3e-3",
            "--server-lr", "1e-4"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--client-lr 5e-05 from its checkpoint on (was 0.0001)" in err and "--mu 0.003" in err
    log = read_log(tmp_path / "run" / "zo_log.jsonl")
    assert [(r["mu"], r["lr"]) for r in log] == [(1e-3, 1e-4)] * 4 + [(3e-3, 5e-5)] * 4
    saved = TrainConfig.from_json((tmp_path / "run" / "config.json").read_text())
    assert (saved.client_lr, saved.mu, saved.server_lr) == (5e-5, 3e-3, 1e-4)
    _assert_replays(cfg, tmp_path / "run")  # the first config: replay reads mu and lr from the log
    from hosl import checkpoint  # a checkpoint saved before the change verifies against the new config

    checkpoint.check_config(before, tmp_path / "run" / "config.json", tmp_path / "run" / "checkpoint-4")


def test_a_resume_may_add_a_token_and_a_legacy_manifest_verifies(tmp_path):
    """The token file is not part of a run's identity (a run may gain one on resume); a checkpoint
    whose manifest holds the digest older versions wrote (the rates and the token path in it, or
    none of the fields added since) still verifies, and a wrong digest does not."""
    from hosl import checkpoint

    run(cfg_for(tmp_path, steps=2, save_every=2, zo_noise="gaussian"))  # a run an older version could hold
    token = tmp_path / "token"
    assert hosl_token_main([str(token)]) == 0
    config = tmp_path / "run" / "config.json"
    manifest_path = tmp_path / "run" / "checkpoint-2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"] = checkpoint.config_digest(config, legacy=True)
    del manifest["digest"]  # nor did older manifests carry a digest of their own
    assert manifest["config"] != checkpoint.config_digest(config)
    manifest_path.write_text(json.dumps(manifest))
    checkpoint.check_config(manifest, config, manifest_path.parent)
    for era in range(len(ADDED)):  # saved by a version before the fields of ADDED[era:] existed
        older = {**manifest, "config": checkpoint.config_digest(config, era=era)}
        assert older["config"] not in (checkpoint.config_digest(config), manifest["config"])
        checkpoint.check_config(older, config, manifest_path.parent)
    with pytest.raises(checkpoint.CheckpointError, match="differ from those"):
        checkpoint.check_config({**manifest, "config": "0" * 64}, config, manifest_path.parent)
    assert main(["--resume", str(tmp_path / "run"), "--steps", "3", "--auth-token-file", str(token)]) == 0


def test_a_run_saved_before_zo_noise_resumes_with_gaussian_directions(tmp_path):
    """A config.json with no zo_noise, as versions before --zo-noise wrote it: the run resumes with
    the Gaussian directions it trained with (hosl's default is Rademacher now), bit for bit as a
    straight Gaussian run, and replays."""
    run(cfg_for(tmp_path, "straight", steps=4, save_every=2, zo_noise="gaussian"))
    run(cfg_for(tmp_path, "old", steps=2, save_every=2, zo_noise="gaussian"))
    config = tmp_path / "old" / "config.json"
    data = json.loads(config.read_text())
    del data["zo_noise"]
    config.write_text(json.dumps(data))
    assert main(["--resume", str(tmp_path / "old"), "--steps", "4"]) == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "old")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = TrainConfig.from_json(config.read_text())
    assert cfg.zo_noise == "gaussian" and TrainConfig().zo_noise == "rademacher"
    _assert_replays(cfg, tmp_path / "old")


def test_out_dir_is_never_overwritten(tmp_path):
    run(cfg_for(tmp_path, steps=1))
    with pytest.raises(ValueError, match="exists and is not empty"):
        run(cfg_for(tmp_path, steps=1))


def test_sst2_files_train_a_builtin_model(tmp_path):
    """The GLUE TSV layout (train.tsv, dev.tsv) through the trainer; the files are made here, so the
    test runs in every checkout (tests/test_tasks.py reads the real SST-2 where it is present)."""
    words = ["a fine film", "a dull film", "great acting", "tedious and long", "warm and funny", "flat"]
    rows = "".join(f"{w} {i}\t{i % 2}\n" for i, w in enumerate(words * 6))
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "data" / "sst2").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "sst2" / name).write_text("sentence\tlabel\n" + rows, encoding="utf-8")
    cfg = cfg_for(tmp_path, task="sst2", data_dir=str(tmp_path / "data"), steps=4, max_length=48)
    summary = run(cfg)
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0 and summary["bytes_up"] > 0
    assert summary["client_params"] > 0 and summary["task"] == "sst2"


def _save_hf_model(directory: Path) -> None:
    """A tiny Llama with a word-level fast tokenizer, saved like a hub checkpoint (no network)."""
    import tokenizers
    import transformers

    from hosl.models import builtin_config
    from hosl.tokenizers import WordTokenizer

    words = WordTokenizer.for_task("synthetic")
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i for w, i in words._ids.items()}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.normalizer = tokenizers.normalizers.Lowercase()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(builtin_config("tiny", len(vocab), 2048))
    model.save_pretrained(directory)


def test_dist_loads_each_side_from_a_checkpoint_directory(tmp_path):
    """--model DIR over dist: each process reads only its side (load_client/load_server) and the run
    equals the local one, which builds the whole model."""
    _save_hf_model(tmp_path / "model")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()] + ["--model", str(tmp_path / "model")]
    assert main([*flags, "--out", str(tmp_path / "local")]) == 0
    _assert_dist_equals_local(tmp_path, [*flags, "--insecure"])


def test_each_evaluation_prints_one_dense_line(tmp_path, capsys):
    flags = ["--steps", "4", "--eval-every", "2", "--train-examples", "32", "--eval-examples", "8"]
    assert main([*flags, "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    lines = [ln for ln in err if ln.startswith("step ")]
    assert len(lines) == 2, err
    assert lines[0].startswith("step 2/4 | loss ") and "| eval accuracy " in lines[0] and " s/step | up " in lines[0]
    assert lines[1].startswith("step 4/4 | loss ")


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedules_are_transformers(name, warmup):
    """lr_factor against transformers.get_scheduler's rates, step by step."""
    import transformers

    from hosl.optim import lr_factor

    cfg = TrainConfig(**{**FAST, "steps": 12, "lr_scheduler": name, "warmup_steps": warmup})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf_name = "constant_with_warmup" if name == "constant" and warmup else name
    sched = transformers.get_scheduler(hf_name, opt, num_warmup_steps=warmup, num_training_steps=12)
    for step in range(12):
        assert lr_factor(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_a_scheduled_run_logs_the_rates_and_replays(tmp_path):
    cfg = cfg_for(tmp_path, q=2, steps=6, lr_scheduler="cosine", warmup_steps=2, client_lr=1e-3)
    run(cfg)
    log = read_log(tmp_path / "run" / "zo_log.jsonl")
    assert log[0]["lr"] == 0.0 and log[2]["lr"] == pytest.approx(1e-3) and log[5]["lr"] < log[3]["lr"]
    _assert_replays(cfg, tmp_path / "run")


def test_a_bad_split_layer_is_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    import hosl.models

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(hosl.models, "build_model", never)
    assert main(["--split-layer", "9", "--out", str(tmp_path / "r")]) == 2
    assert "--split-layer must be in [0, 4]" in capsys.readouterr().err


def test_resume_keeps_the_config_true_and_refuses_going_back(tmp_path, capsys):
    run(cfg_for(tmp_path, steps=4, save_every=4))
    run_dir = tmp_path / "run"
    assert main(["--resume", str(run_dir), "--steps", "3"]) == 2
    assert "--steps 3 is fewer than the 4 it has done" in capsys.readouterr().err
    assert main(["--resume", str(run_dir), "--out", str(tmp_path / "other")]) == 2
    assert "--out" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["--resume", str(run_dir), "--out", str(run_dir), "--steps", "6"]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["steps"] == 6 and saved["resume"] is None
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("module", ["hosl", "hosl.replay"])
def test_help_of_the_small_commands(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(("usage", "Rebuild")), out.stderr


def test_help_groups_the_flags_once_each_and_names_the_models(capsys):
    from hosl.models import BUILTIN

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "the zeroth-order client:" in text and "examples:" in text
    assert all(name in text for name in BUILTIN)
    assert text.count("--q Q") == 1 and "; one of" not in text and "(default: none)" not in text


def test_resuming_a_dist_run_outside_torchrun_says_what_to_do(tmp_path, monkeypatch, capsys):
    run(cfg_for(tmp_path, steps=2, save_every=2))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "transport": "dist"}))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--resume", str(tmp_path / "run"), "--steps", "4"]) == 2
    assert "resume it under torchrun" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "run"), "--steps", "4", "--transport", "local"]) == 0


def test_evaluations_have_one_numbering_and_steps_0_says_what_it_evaluated(tmp_path, capsys):
    summary = run(cfg_for(tmp_path, steps=4, eval_every=2))
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    in_metrics = [(r["step"], r["steps_done"]) for r in logged if "eval_accuracy" in r]
    assert in_metrics == [(e["step"], e["steps_done"]) for e in summary["evals"]] == [(1, 2), (3, 4)]
    capsys.readouterr()
    zero = run(cfg_for(tmp_path, "zero", steps=0))
    assert "no step to run: evaluated the untrained model" in capsys.readouterr().err
    assert zero["evals"] == [{"step": -1, "steps_done": 0, "accuracy": zero["final_eval_accuracy"]}]


def test_report_to_tensorboard_writes_what_metrics_jsonl_holds_and_a_resume_purges(tmp_path):
    """train/<key> and eval/accuracy at the metrics' steps done (from 1, as the console counts). A run
    killed in its save of step 8 is resumed from checkpoint-4 and reruns steps 5 to 8: their first
    events are purged, as metrics.jsonl rewrites those lines."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hosl import checkpoint

    class Killed(BaseException):
        pass

    real_commit, calls = checkpoint.commit, []

    def commit(*args):  # the second save (step 6) dies: steps 4 and 5 were logged after checkpoint-4
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real_commit(*args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoint, "commit", commit)
        with pytest.raises(Killed):
            run(cfg_for(tmp_path, steps=8, save_every=4, eval_every=3, report_to="tensorboard"))
    assert main(["--resume", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    got = [(e.step, e.value) for e in board.Scalars("train/loss")]
    want = [(r["steps_done"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 9))
    assert all(r["steps_done"] == r["step"] + 1 for r in records)
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(got, want))
    evals = [(e.step, e.value) for e in board.Scalars("eval/accuracy")]
    assert evals == [(r["steps_done"], pytest.approx(r["eval_accuracy"])) for r in records if "eval_accuracy" in r]
    assert "train/client_s" in board.Tags()["scalars"]


@pytest.mark.parametrize(
    "file,edit,message",
    [
        ("metrics.jsonl", lambda r: "{not json", "metrics.jsonl:1: not a JSON line"),
        ("zo_log.jsonl", lambda r: "{not json", "zo_log.jsonl:1: not a JSON line"),
        ("zo_log.jsonl", lambda r: json.dumps({**r, "step": "a"}), "zo_log.jsonl:1: step must be an integer, got 'a'"),
        ("config.json", lambda r: json.dumps({**r, "steps": "x"}), "config.json: steps must be an integer, got 'x'"),
        ("config.json", lambda r: json.dumps({**r, "mu": True}), "config.json: mu must be a number, got True"),
    ],
    ids=["metrics line", "zo_log line", "zo_log step", "config steps", "config mu"],
)
def test_a_resume_refused_for_a_bad_line_or_field_changes_no_file(tmp_path, capsys, file, edit, message):
    """A bad line or a field of the wrong type in a file the resume reads is refused with one line
    naming the file (and line) before any file is written (config.json used to be rewritten first,
    with the new --steps; a step or a steps of text gave a traceback or a riddle)."""
    run(cfg_for(tmp_path, steps=2, save_every=2))
    path = tmp_path / "run" / file
    lines = path.read_text().splitlines() if file != "config.json" else [path.read_text()]
    path.write_text("\n".join([edit(json.loads(lines[0])), *lines[1:]]) + "\n")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "run"), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before


def test_a_checkpoint_without_its_manifest_or_only_a_cut_save_is_named(tmp_path, capsys):
    """The newest checkpoint's manifest removed: refused, naming it (the run used to resume from an
    older checkpoint without a word, or say it had none). A first save cut short leaves only its
    .tmp: the refusal says so and what to do. Nothing changes in either run directory."""
    run(cfg_for(tmp_path, steps=4, save_every=2, save_total_limit=2))
    (tmp_path / "run" / "checkpoint-4" / "manifest.json").unlink()
    run(cfg_for(tmp_path, "cut", steps=2, save_every=2))
    (tmp_path / "cut" / "checkpoint-2").rename(tmp_path / "cut" / "checkpoint-2.tmp")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "run"), "--steps", "6"]) == 2
    assert "checkpoint-4 has no manifest.json (removed?), so it cannot be verified" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "cut"), "--steps", "4"]) == 2
    assert "no complete checkpoint, only checkpoint-2.tmp, a save cut short" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_report_to_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    assert main(["--report-to", "tensorboard", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().endswith("needs the tensorboard package: pip install 'hosl[tensorboard]'")
    assert not (tmp_path / "r").exists()


class _NoLink:
    """What a role reads of its link when the test calls its forward alone."""

    max_frame_bytes = 0


def _sides_and_batch(cfg):
    """The client and server models of cfg and its first training batch."""
    from hosl.tasks import load_run_data

    examples = load_run_data(cfg)[0]
    tok, m = build(cfg, examples)
    client, server = split_model(m, cfg.split_layer)
    return client, server, Batches(examples, tok, cfg)(0)


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-opt"])
def test_a_micro_batched_client_forward_gives_the_whole_batchs_activation(tmp_path, model):
    """--client-micro-batch M: the rows M at a time into one activation, the same values (to float
    tolerance: a matmul over fewer rows may round otherwise); a run with it follows the same losses."""
    from hosl.roles import SplitClient

    cfg = cfg_for(tmp_path, model=model)
    client, _, batch = _sides_and_batch(cfg)

    def hidden(micro):
        with torch.no_grad():
            return SplitClient(dataclasses.replace(cfg, client_micro_batch=micro), client, _NoLink())._forward(batch)

    whole = hidden(0)
    for micro in (1, 3, 8, 100):
        got = hidden(micro)
        assert got.shape == whole.shape and torch.allclose(got, whole, rtol=0, atol=1e-6), micro
    run(cfg_for(tmp_path, "whole", model=model))
    run(cfg_for(tmp_path, "micro", model=model, client_micro_batch=3))
    assert losses(tmp_path / "micro") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_the_servers_stacked_probe_forward_gives_each_uploads_loss(tmp_path):
    """--server-batch-probes: one forward over a step's probe uploads, stacked, gives each the loss
    its own forward gives (to float tolerance), and a run with it follows the same losses."""
    from hosl.boundary import Frame, Kind
    from hosl.roles import SplitServer
    from hosl.split import Activation

    cfg = cfg_for(tmp_path, q=3, server_batch_probes=True)
    client, server_model, batch = _sides_and_batch(cfg)
    server = SplitServer(cfg, server_model, _NoLink())
    frame = Frame(Kind.BATCH, tensors={"labels": batch["labels"], "attention_mask": batch["attention_mask"]})
    with torch.no_grad():
        h = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden
        hiddens = [h + 0.01 * i * torch.randn_like(h) for i in range(4)]
        one_by_one = [
            server_model(Activation(x, batch["attention_mask"]), labels=batch["labels"], labelled_only=True).loss
            for x in hiddens
        ]
    stacked = server._stacked_losses(hiddens, frame)
    assert len(set(map(float, one_by_one))) == 4  # the uploads differ, and so do their losses
    assert [float(x) for x in stacked] == pytest.approx([float(x) for x in one_by_one], rel=1e-5)
    run(cfg_for(tmp_path, "each", q=3))
    run(cfg_for(tmp_path, "stacked", q=3, server_batch_probes=True))
    assert losses(tmp_path / "stacked") == pytest.approx(losses(tmp_path / "each"), rel=1e-5)


class _OneAct:
    """A link that hands the server one ACT frame and keeps what it sends back."""

    max_frame_bytes = 0

    def __init__(self, hidden):
        from hosl.boundary import Frame, Kind

        self.act, self.sent = Frame(Kind.ACT, tensors={"hidden": hidden}), []

    def recv(self):
        return self.act

    def send(self, frame):
        self.sent.append(frame)


def test_a_micro_batched_server_gives_the_whole_batchs_loss_and_gradients(tmp_path):
    """--server-micro-batch M: the server's forward and backward over slices of M rows give the
    whole batch's loss, dL/dh and parameter gradients (to float tolerance), with slices of unequal
    sizes and a slice without labelled tokens; so do its stacked probe forward and its scores, and
    a run with it follows the same losses (hosl and fo)."""
    from hosl.boundary import Frame, Kind
    from hosl.roles import SplitServer

    cfg = cfg_for(tmp_path)
    client, server_model, batch = _sides_and_batch(cfg)
    labels = batch["labels"].clone()
    labels[-1] = -100  # the last row has no labelled token: its slice (M = 1) is skipped, its dL/dh is 0
    frame = Frame(Kind.BATCH, tensors={"labels": labels, "attention_mask": batch["attention_mask"]})
    with torch.no_grad():
        h = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden
    hiddens = [h + 0.01 * i * torch.randn_like(h) for i in range(3)]
    params = [p for p in server_model.parameters() if p.requires_grad]

    def step(micro):
        server = SplitServer(dataclasses.replace(cfg, server_micro_batch=micro), server_model, _NoLink())
        for p in params:
            p.grad = None
        loss, grad = server._loss(h, frame, train=True, want_grad=True)
        stacked = server._stacked_losses(hiddens, frame)
        server.link = _OneAct(h)
        server.evaluate(Frame(Kind.BATCH, tensors={**frame.tensors, "labels": batch["labels"]}), server.link)
        return loss, grad, [p.grad.clone() for p in params], stacked, server.link.sent[0].tensors["scores"]

    whole = step(0)
    assert len(h) == 8 and whole[1][-1].abs().max() == 0 and whole[1][0].abs().max() > 0
    for micro in (1, 3, 5):  # 3 and 5: slices of unequal sizes, weighted by their labelled tokens
        got = step(micro)
        assert float(got[0]) == pytest.approx(float(whole[0]), rel=1e-6), micro
        for a, b in zip([got[1], *got[2]], [whole[1], *whole[2]]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), micro
        assert [float(x) for x in got[3]] == pytest.approx([float(x) for x in whole[3]], rel=1e-6), micro
        assert torch.allclose(got[4], whole[4], rtol=1e-5), micro
    for method in ("hosl", "fo"):
        run(cfg_for(tmp_path, f"{method}-whole", method=method))
        run(cfg_for(tmp_path, f"{method}-micro", method=method, server_micro_batch=3))
        assert losses(tmp_path / f"{method}-micro") == pytest.approx(losses(tmp_path / f"{method}-whole"), rel=1e-5)
