"""Numbers and files that must not poison a run: non-finite gradients and weights, a mu out of range,
runs of skipped steps, and bad data or config files, each one line, the right exit status, nothing
left behind."""

import json
import math

import pytest
import torch
from test_train import cfg_for, weights

from hosl import optim, roles
from hosl.train import main, run

TINY = ["--steps", "4", "--train-examples", "32", "--eval-examples", "8", "--batch-size", "8", "--max-length", "24"]


def _last_line(capsys) -> list[str]:
    bars = ("train:", "loading the model:")  # progress bars, which a slow machine shows after 2 s
    lines = [ln.strip() for ln in capsys.readouterr().err.splitlines()]
    err = [ln for ln in lines if ln and not ln.startswith(bars)]
    assert err and "Traceback" not in "\n".join(err), err
    return err


# -- first-order updates ------------------------------------------------------------------------------


def _sgd(lr, *values):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor(values)
    return p, torch.optim.SGD([p], lr=lr)


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped():
    for bad in (math.inf, math.nan):
        p, opt = _sgd(0.1, 1.0, bad)
        assert optim.fo_update(opt, 0.1, True, "server", 3) is True
        assert torch.equal(p.detach(), torch.tensor([1.0, 2.0])) and p.grad is None
    p, opt = _sgd(0.1, 1.0, 1.0)
    assert optim.fo_update(opt, 0.1, True, "server", 3) is False
    assert torch.allclose(p.detach(), torch.tensor([0.9, 1.9]))
    p, opt = _sgd(0.1, 1.0, 1.0)
    assert optim.fo_update(opt, 0.1, False, "server", 3) is True  # a non-finite loss: skipped, grads cleared
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0])) and p.grad is None


def test_an_update_that_leaves_a_weight_non_finite_stops_the_run():
    p, opt = _sgd(1e10, 1.0, 3e38)
    with pytest.raises(optim.DivergedError, match="the server's weights became non-finite at step 3"):
        optim.fo_update(opt, 1e10, True, "server", 3)


def test_a_huge_server_rate_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    status = main([*TINY, "--steps", "40", "--server-lr", "1e10", "--optimizer", "sgd", "--out", str(out)])
    err = _last_line(capsys)
    assert status == 1, err
    assert len(err) == 1 and ("non-finite" in err[0]), err


def _nan_at(monkeypatch, steps):
    """The server's loss is nan at the given steps (as a diverged server's would be)."""
    real = roles.SplitServer._loss

    def loss(self, hidden, batch, train, want_grad):
        value, grad = real(self, hidden, batch, train, want_grad)
        return (value * float("nan") if batch.step in steps else value), grad

    monkeypatch.setattr(roles.SplitServer, "_loss", loss)


@pytest.mark.parametrize("estimator", ["central", "cut-grad"])
def test_a_skipped_step_leaves_the_client_as_it_was(tmp_path, monkeypatch, estimator):
    overrides = dict(zo_estimator=estimator, q=2, client_lr=1e-2, mu=1e-2)
    run(cfg_for(tmp_path, "one", steps=1, **overrides))
    _nan_at(monkeypatch, {1})
    summary = run(cfg_for(tmp_path, "two", steps=2, **overrides))
    assert summary["skipped_steps"] == 1
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    client = [k for k in a if k.startswith("client.")]
    # The probes' round trip w + mu z - 2 mu z + mu z in float32: within a few ulps of w, not more.
    ulps = max(((a[k] - b[k]).abs() / (a[k].abs().clamp_min(1e-2) * 2**-23)).max().item() for k in client)
    assert ulps <= 4, ulps
    log = [json.loads(ln) for ln in (tmp_path / "two" / "zo_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [False, True]


def test_max_skipped_consecutive_steps_stop_the_run(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, set(range(100)))
    assert main([*TINY, "--steps", "20", "--max-skipped", "3", "--out", str(tmp_path / "r")]) == 1
    err = _last_line(capsys)
    assert "skipped 3 steps in a row up to step 2" in err[-1], err
    summary = run(cfg_for(tmp_path, "never", steps=5, max_skipped=0))
    assert summary["skipped_steps"] == 5


@pytest.mark.parametrize("mu,message", [("1e10", "larger than the client weights' RMS"),
                                        ("1e-30", "below 2^-20 of the client weights' RMS")])  # fmt: skip
def test_mu_out_of_range_is_refused_and_leaves_nothing(tmp_path, capsys, mu, message):
    out = tmp_path / "r"
    assert main([*TINY, "--mu", mu, "--out", str(out)]) == 2
    err = _last_line(capsys)
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
    assert main([*TINY, "--out", str(out)]) == 0  # the same --out, now fine


# -- bad files ---------------------------------------------------------------------------------------------


def _sst2(tmp_path, train_lines, dev="sentence\tlabel\nfine\t1\nbad\t0\n"):
    d = tmp_path / "data" / "sst2"
    d.mkdir(parents=True)
    (d / "train.tsv").write_bytes(train_lines if isinstance(train_lines, bytes) else train_lines.encode())
    (d / "dev.tsv").write_text(dev)
    return tmp_path / "data"


GOOD_TSV = "sentence\tlabel\n" + "".join(f"a fine film {i}\t{i % 2}\n" for i in range(16))
BAD_DATA = {
    "a line over the csv field limit": (GOOD_TSV + "x" * 200_000 + "\t1\n", "train.tsv:18: field larger than"),
    "not UTF-8": (GOOD_TSV.encode() + b"caf\xe9\t1\n", "train.tsv:18: not UTF-8 (byte 4 of the line"),
    "a full-width digit label": (
        GOOD_TSV + "a film\t\uff11\n",
        "row 17: sst2 label '１' has no verbalizer",
    ),
    "a superscript digit label": (
        GOOD_TSV + "a film\t\u00b2\n",
        "row 17: sst2 label '²' has no verbalizer",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, capsys, case):
    content, message = BAD_DATA[case]
    data = _sst2(tmp_path, content)
    out = tmp_path / "r"
    assert main([*TINY, "--task", "sst2", "--data-dir", str(data), "--out", str(out)]) == 2
    err = _last_line(capsys)
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_bad_json_files_name_the_file(tmp_path, capsys):
    d = tmp_path / "data" / "rte"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_bytes(b'{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{"premise": \xff}\n')
    (d / "val.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n')
    assert main([*TINY, "--task", "rte", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r")]) == 2
    assert f"{d / 'train.jsonl'}:2: not UTF-8 (byte 13 of the line" in _last_line(capsys)[-1]
    bad = tmp_path / "c.json"
    bad.write_text('{"q": 2,')
    assert main(["--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert f"--config {bad}:" in _last_line(capsys)[-1]
    run(cfg_for(tmp_path, "run", steps=2, save_every=2))
    (tmp_path / "run" / "config.json").write_text("{not json")
    assert main(["--resume", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run' / 'config.json'}:" in _last_line(capsys)[-1]
