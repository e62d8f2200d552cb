"""The server against hostile frames: every frame a peer can send is well formed (it passed the
boundary's checks), but its content may contradict the session. The server must refuse each such
step with one LinkError before it computes on it, and never fail any other way or step its
weights on inconsistent tensors. A structured fuzz of BATCH and ACT frames holds it: a sample in
the default tier, 20,000 frames in the slow one (every mutation makes the step inconsistent, so
every step must be refused)."""

import dataclasses
import random

import pytest
import torch
from _links import ScriptedLink
from test_train import cfg_for

from hosl.boundary import Frame, Kind
from hosl.models import build
from hosl.roles import SplitServer
from hosl.split import split_model
from hosl.tasks import encode_for_training, load_run_data
from hosl.transport import LinkError


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A server of the test config (central, Q = 1: three uploads a step), a real batch and the
    activations a client would send for it."""
    cfg = cfg_for(tmp_path_factory.mktemp("srv"), "srv")
    examples = load_run_data(cfg)[0]
    tokenizer, model = build(cfg, examples)
    client, server_model = split_model(model, cfg.split_layer)
    batch = encode_for_training(tokenizer, examples[: cfg.batch_size], cfg.max_length)
    with torch.no_grad():
        hidden = client(batch["input_ids"], batch["attention_mask"]).hidden
    server = SplitServer(cfg, server_model, ScriptedLink(), None)
    return server, {"labels": batch["labels"], "attention_mask": batch["attention_mask"]}, hidden.float()


def _weights(server):
    return torch.cat([p.detach().flatten() for p in server.model.parameters()]).clone()


def _frames(server, tensors, hidden):
    step = server.steps_done
    batch = Frame(Kind.BATCH, step=step, tensors=dict(tensors), meta={"eval": False})
    acts = [
        Frame(Kind.ACT, step=step, probe=f.probe, sign=f.sign, tensors={"hidden": hidden.clone()})
        for f in server.plan.uploads
    ]
    return batch, acts


def _mutate(rng: random.Random, server, batch: Frame, acts: list[Frame]) -> str:
    """One hostile change to a well-formed step; returns its name."""
    labels, mask = batch.tensors["labels"], batch.tensors["attention_mask"]
    vocab = server._vocab_size()
    act = rng.choice(acts)
    hidden = act.tensors["hidden"]
    odd_shape = rng.choice([(), (3,), (2, 3), tuple(labels.shape) + (1,), (labels.shape[0] + 1, labels.shape[1])])
    cases = {
        "labels missing": lambda: batch.tensors.pop("labels"),
        "mask missing": lambda: batch.tensors.pop("attention_mask"),
        "an extra tensor": lambda: batch.tensors.update(extra=torch.zeros(2)),
        "labels of another dtype": lambda: batch.tensors.update(
            labels=labels.to(rng.choice([torch.float32, torch.float16, torch.int32, torch.int8, torch.bool]))
        ),
        "labels of another shape": lambda: batch.tensors.update(labels=torch.zeros(odd_shape, dtype=torch.int64)),
        "a label out of range": lambda: labels.view(-1).__setitem__(
            rng.randrange(labels.numel()), rng.choice([10**12, -7, -101, vocab, vocab + 1, -(2**63)])
        ),
        "mask of another shape": lambda: batch.tensors.update(attention_mask=torch.ones(odd_shape, dtype=torch.int64)),
        "mask of floats": lambda: batch.tensors.update(attention_mask=mask.float()),
        "a mask value not 0 or 1": lambda: mask.view(-1).__setitem__(rng.randrange(mask.numel()), rng.choice([2, -1])),
        "hidden missing": lambda: act.tensors.clear(),
        "hidden and more": lambda: act.tensors.update(extra=torch.zeros(1)),
        "hidden of another dtype": lambda: act.tensors.update(
            hidden=hidden.to(rng.choice([torch.int64, torch.float64, torch.int8, torch.bool, torch.int32]))
        ),
        "hidden of another shape": lambda: act.tensors.update(
            hidden=torch.zeros(rng.choice([(), (2,), tuple(hidden.shape[:2]), (*hidden.shape[:2], 7)]))
        ),
        "hidden of other rows": lambda: act.tensors.update(hidden=hidden[: max(1, len(hidden) - 1)].clone()),
        "an ACT of another step": lambda: setattr(act, "step", act.step + rng.choice([-1, 1, 1000])),
        "an ACT of another probe": lambda: setattr(act, "probe", act.probe + 1),
        "a LOSS for an ACT": lambda: setattr(act, "kind", Kind.LOSS),
        "a BATCH of another step": lambda: setattr(batch, "step", batch.step + rng.choice([1, 7])),
    }
    name = rng.choice(sorted(cases))
    cases[name]()
    return name


def _fuzz(session, frames: int, seed: int):
    server, tensors, hidden = session
    rng = random.Random(seed)
    sent = refused = cases = 0
    seen = set()
    while sent < frames:
        batch, acts = _frames(server, {k: v.clone() for k, v in tensors.items()}, hidden)
        name = _mutate(rng, server, batch, acts)
        seen.add(name)
        server.link = ScriptedLink(acts)
        before = _weights(server)
        sent += 1 + len(acts)
        cases += 1
        try:
            server.train_step(batch, server.link)
        except LinkError:
            refused += 1
            assert torch.equal(_weights(server), before), f"{name}: refused, yet the weights moved"
            server.optimizer.zero_grad(set_to_none=True)  # what the refused step accumulated, if any
        except Exception as exc:  # noqa: BLE001 (the property under test: nothing else escapes)
            pytest.fail(f"{name}: {type(exc).__name__}: {exc}")
    return sent, cases - refused, seen


def test_hostile_frames_are_refused(session):
    sent, accepted, seen = _fuzz(session, 400, seed=0)
    assert accepted == 0 and len(seen) == 18, (accepted, sorted(seen))


@pytest.mark.slow
def test_hostile_frames_fuzz(session):
    sent, accepted, seen = _fuzz(session, 20_000, seed=1)
    assert sent >= 20_000 and accepted == 0 and len(seen) == 18


def test_a_consistent_step_is_answered(session):
    """The control: the same frames, unchanged, are a step the server answers and takes."""
    server, tensors, hidden = session
    batch, acts = _frames(server, {k: v.clone() for k, v in tensors.items()}, hidden)
    server.link = ScriptedLink(acts)
    before, step = _weights(server), server.steps_done
    server.train_step(batch, server.link)
    assert server.steps_done == step + 1 and not torch.equal(_weights(server), before)
    assert [f.kind for f in server.link.sent] == [Kind[f.answer.upper()] for f in server.plan.uploads]


@pytest.mark.parametrize(
    "change",
    [{"client_lr": 5e-5}, {"mu": 2e-3}, {"server_lr": 1e-2}, {"q": 3}, {"seed": 1}, {"zo_noise": "gaussian"}, {}],
    ids=str,
)
def test_hello_refuses_a_client_of_another_config(session, change):
    """HELLO compares the run-defining fields and the resumable ones (the rates, mu, the schedule):
    a client with any of them changed is refused before any frame of training; the same config is
    answered."""
    server, _, _ = session
    cfg = dataclasses.replace(server.cfg, **change)
    hello = Frame(Kind.HELLO, meta={"protocol": 2, "config": cfg.hash(), "plan": server.plan.describe(),
                                    "client_numel": 0})  # fmt: skip
    fresh = SplitServer(server.cfg, server.model, ScriptedLink([hello]), None)
    with pytest.raises(LinkError, match="config differs" if change else "the script has no more frames"):
        fresh.serve()
    assert [f.kind for f in fresh.link.sent] == ([] if change else [Kind.HELLO])
