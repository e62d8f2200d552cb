"""The step plan (hosl.plan): the uploads of every method and estimator against the protocol's table,
the server's gradient on the right forward, the noise walk against passes written out by hand, the
HELLO check, and no method name compared outside the table."""

import re
from pathlib import Path

import pytest
import torch

from hosl import noise, zo
from hosl.config import TrainConfig
from hosl.estimators import ESTIMATORS
from hosl.plan import GRAD, LOSS, METHODS, StepPlan

HOSL = Path(__file__).resolve().parents[1] / "hosl"


def plan(**kw) -> StepPlan:
    return StepPlan.of(TrainConfig(**kw))


# (config, uploads per step, the forward the server takes its gradient on, the answers' kinds)
TABLE = [
    (dict(method="hosl", zo_estimator="central", q=3), 1 + 2 * 3, (0, 0), {LOSS}),
    (dict(method="hosl", zo_estimator="central", q=3, server_grad="probe"), 2 * 3, (0, 1), {LOSS}),
    (dict(method="hosl", zo_estimator="forward", q=3), 1 + 3, (0, 0), {LOSS}),
    (dict(method="hosl", zo_estimator="forward", q=3, server_grad="probe"), 1 + 3, (0, 1), {LOSS}),
    (dict(method="hosl", zo_estimator="cut-grad", q=3), 1, (0, 0), {GRAD}),
    (dict(method="hosl", zo_estimator="cut-grad-one-sided", q=3), 1, (0, 0), {GRAD}),
    (dict(method="hosl", zo_estimator="cut-grad-jvp", q=3), 1, (0, 0), {GRAD}),
    (dict(method="zo", zo_estimator="central", q=3), 2 * 3, None, {LOSS}),
    (dict(method="zo", zo_estimator="forward", q=3), 1 + 3, None, {LOSS}),
    (dict(method="fo"), 1, (0, 0), {GRAD}),
    (dict(method="fo-full"), 0, None, set()),
    (dict(method="zo-full", q=3), 0, None, set()),
]


@pytest.mark.parametrize("kw,uploads,grad_on,answers", TABLE, ids=[str(t[0]) for t in TABLE])
def test_uploads_and_the_servers_gradient(kw, uploads, grad_on, answers):
    p = plan(**kw)
    assert len(p.uploads) == uploads
    grads = [f.key for f in p.forwards if f.server_grad]
    assert grads == ([] if grad_on is None else [grad_on])  # once a step: never accumulated twice
    assert {f.answer for f in p.uploads} == answers


def test_probe_forwards_follow_the_schedule_order():
    central = plan(method="hosl", zo_estimator="central", q=2)
    assert [f.key for f in central.forwards] == [(0, 0), (0, 1), (0, -1), (1, 1), (1, -1)]
    cut = plan(method="hosl", zo_estimator="cut-grad", q=2)
    assert [f.key for f in cut.forwards] == [(0, 0), (0, 1), (0, -1), (1, 1), (1, -1)]
    assert [f.upload for f in cut.forwards] == [True, False, False, False, False] and cut.estimator.local
    assert plan(method="zo", zo_estimator="central", q=2).clean is None
    for name in ("cut-grad-one-sided", "cut-grad-jvp"):
        one = plan(method="hosl", zo_estimator=name, q=2)
        assert [f.key for f in one.forwards] == [(0, 0), (0, 1), (1, 1)], name
        assert [f.upload for f in one.forwards] == [True, False, False]


@pytest.mark.parametrize("estimator", ["central", "forward", "cut-grad", "cut-grad-one-sided"])
def test_the_walk_applies_the_passes_written_out_by_hand(estimator):
    """After each yielded probe the weights are w + sign mu z_probe (one rounding per pass), with the
    passes as the estimators module's docstring states them, written here without its schedule."""
    cfg = TrainConfig(method="hosl", zo_estimator=estimator, q=3, mu=1e-2)
    p = StepPlan.of(cfg)
    w = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = zo.ZOParams([("w", torch.nn.Parameter(w.clone()))])
    want = w.clone()
    seeds, mu = p.seeds(5), cfg.mu
    previous = None
    for forward in p.probes(params, step=5):
        s = seeds[forward.probe]
        if forward.sign < 0:
            terms = [(s, -2 * mu)]
        elif previous is None:
            terms = [(s, mu)]
        elif estimator in ("forward", "cut-grad-one-sided"):
            terms = [(previous, -mu), (s, mu)]
        else:
            terms = [(previous, mu), (s, mu)]
        noise.add_(want, [t[0] for t in terms], [t[1] for t in terms], backend="torch")
        assert torch.equal(params.flat.flat, want), forward.key
        previous = s
    assert previous == seeds[-1]


def test_a_client_that_plans_another_step_is_refused_at_hello(monkeypatch, tmp_path):
    from test_train import cfg_for

    from hosl.roles import SplitClient
    from hosl.train import run

    real = SplitClient.hello

    def other_plan(self):
        self.plan = StepPlan.of(TrainConfig(method="hosl", zo_estimator="cut-grad", q=self.cfg.q + 1))
        return real(self)

    monkeypatch.setattr(SplitClient, "hello", other_plan)
    with pytest.raises(Exception, match="the client plans another step than this server"):
        run(cfg_for(tmp_path, steps=1))


def test_every_methods_saved_config_loads():
    """A saved config holds the method's resolved defaults, which the unused-option check accepts."""
    for name in METHODS:
        cfg = TrainConfig(method=name)
        assert TrainConfig.from_json(cfg.to_json()) == cfg


def _source_lines_matching(pattern: re.Pattern, skip: str) -> list[str]:
    """`file:line: text` of every line of hosl's sources but `skip` that the pattern finds."""
    return [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(HOSL.glob("*.py"))
        if path.name != skip
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]


def test_no_method_name_is_compared_outside_the_table():
    compared = re.compile(r"\bmethod\s*(==|!=|\bin\b|\bnot in\b)|\bmethod\.name\b")
    found = _source_lines_matching(compared, "plan.py")
    assert not found, found


def test_no_estimator_name_is_compared_outside_its_table():
    """The estimators are data (hosl.estimators.ESTIMATORS): no code elsewhere branches on a name of
    one."""
    names = "|".join(re.escape(f'"{n}"') for n in ESTIMATORS)
    compared = re.compile(rf"(==|!=|\bin\b)\s*\(?({names})|({names})\s*(==|!=)|\bestimator\s*(==|!=)")
    found = _source_lines_matching(compared, "estimators.py")
    assert not found, found


def test_the_config_is_declared_in_its_sections():
    """Every TrainConfig field sits in one section of config.SECTIONS, declared in that order: the
    source reads section by section and --help offers every flag in its group."""
    import dataclasses

    from hosl.config import SECTIONS, build_parser

    declared = [f.name for f in dataclasses.fields(TrainConfig)]
    assert declared == [name for names in SECTIONS.values() for name in names]
    flags = {a.dest for a in build_parser()._actions}
    assert set(declared) <= flags
