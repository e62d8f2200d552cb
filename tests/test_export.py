"""hosl.export: the exported directory loads with transformers' from_pretrained and computes the split
pair's logits, for an untied and a tied head, a finished run and a checkpoint; bad input is one line."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_train import cfg_for

from hosl import train
from hosl.checkpoint import load_tensors
from hosl.config import TrainConfig
from hosl.export import export, main
from hosl.models import build
from hosl.split import split_model
from hosl.tasks import load_run_data
from hosl.tokenizers import WordTokenizer


def _pair_logits(run_dir: Path, cfg: TrainConfig, ids, mask):
    """The split pair's logits, built here from the run's config and weight files."""
    _, model = build(cfg, load_run_data(cfg)[0])
    client, server = split_model(model, cfg.split_layer)
    load_tensors(client, load_file(run_dir / "client.safetensors"))
    load_tensors(server, load_file(run_dir / "server.safetensors"))
    with torch.no_grad():
        return server(client(input_ids=ids, attention_mask=mask)).logits


def _batch(vocab_size):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def _assert_computes_the_pairs_logits(loaded, run_dir: Path, cfg: TrainConfig, batch=None):
    """`loaded` (a from_pretrained model) gives the split pair's logits at every unpadded position."""
    ids, mask = batch or _batch(loaded.config.vocab_size)
    want = _pair_logits(run_dir, cfg, ids, mask)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0), (got[real] - want[real]).abs().max()


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-opt"])  # untied head; head tied to the embedding
def test_export_computes_what_the_split_pair_computed(tmp_path, model):
    cfg = cfg_for(tmp_path, steps=3, model=model, server_lr=1e-2)
    train.run(cfg)
    exported = transformers.AutoModelForCausalLM.from_pretrained(export(tmp_path / "run", tmp_path / "hf"))
    _assert_computes_the_pairs_logits(exported, tmp_path / "run", cfg)
    if model == "builtin:tiny-opt":  # trained apart: the export keeps both
        assert not exported.config.tie_word_embeddings
        assert not torch.equal(exported.get_output_embeddings().weight, exported.get_input_embeddings().weight)
    # The built-in word-level tokenizer loads with AutoTokenizer and encodes as the run did.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    words = WordTokenizer.for_task()
    texts = [e.context + e.candidates[e.label] for e in load_run_data(cfg)[0][:20]] + ["Unheard-of words, GREAT!"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == [words.bos_token_id, *words.encode(text)], text
    assert words.unk_token_id in tokenizer(texts[-1])["input_ids"]


def test_export_of_an_unfinished_run_takes_its_newest_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, steps=2, save_every=2, server_lr=1e-2)
    train.run(cfg)
    run_dir = tmp_path / "run"
    ids, mask = _batch(build(cfg, load_run_data(cfg)[0])[1].config.vocab_size)
    want = _pair_logits(run_dir, cfg, ids, mask)  # before the final weights go
    for name in ("summary.json", "client.safetensors", "server.safetensors", "manifest.json"):
        (run_dir / name).unlink()  # as if killed after its last save
    exported = transformers.AutoModelForCausalLM.from_pretrained(export(run_dir, tmp_path / "hf"))
    with torch.no_grad():
        got = exported(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "hf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    train.run(cfg_for(tmp_path, steps=1))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("")
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    train.run(cfg_for(tmp_path, "lora", steps=1, client_lora_r=2, server_lora_r=0))
    assert main([str(tmp_path / "lora"), str(tmp_path / "hf2")]) == 2
    assert "export it with --merge" in capsys.readouterr().err
    assert main([str(tmp_path / "lora")]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("ranks", [(4, 4), (4, 0), (0, 4)], ids=["both", "client-lora", "server-lora"])
def test_a_lora_run_exports_merged_with_the_pairs_logits(tmp_path, ranks):
    cfg = cfg_for(tmp_path, steps=3, client_lora_r=ranks[0], server_lora_r=ranks[1], server_lr=1e-2, client_lr=1e-2)
    train.run(cfg)
    assert main([str(tmp_path / "run"), str(tmp_path / "hf"), "--merge"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in n for n, _ in exported.named_parameters())
    _assert_computes_the_pairs_logits(exported, tmp_path / "run", cfg)


def test_plot_draws_a_runs_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from hosl.plot import main as plot_main

    train.run(cfg_for(tmp_path, steps=4, eval_every=2))
    assert plot_main([str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "loss"\n')
    assert plot_main([str(tmp_path / "run")]) == 2
    assert "metrics.jsonl:1: not a JSON line" in capsys.readouterr().err


def test_plot_compares_runs_on_shared_axes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from hosl.plot import curves
    from hosl.plot import main as plot_main

    runs = [tmp_path / "fo", tmp_path / "hosl"]
    train.run(cfg_for(tmp_path, "fo", method="fo", steps=4, eval_every=2))
    train.run(cfg_for(tmp_path, "hosl", steps=6, eval_every=3))
    for run in runs:  # the curves are the run's log: each step's loss and time, each evaluation's accuracy
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        c = curves(run)
        logged = [r for r in records if "loss" in r and "eval_accuracy" not in r]
        assert c["x"] == [r["steps_done"] for r in logged] and c["loss"] == [r["loss"] for r in logged]
        assert c["score"] == [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
        assert c["times"]["client"] == [r["client_s"] for r in logged]
    assert len(curves(runs[1])["x"]) == 6 and len(curves(runs[1])["score"]) == 2
    png = tmp_path / "compare.png"
    assert plot_main([*map(str, runs), str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_main([*map(str, runs)]) == 2  # several runs need OUT.png
    assert "usage: python -m hosl.plot" in capsys.readouterr().err
    lines = (runs[0] / "metrics.jsonl").read_text().replace('"eval_accuracy"', '"eval_loss"')
    (runs[0] / "metrics.jsonl").write_text(lines)
    assert plot_main([*map(str, runs), str(png)]) == 2
    assert "scored differently (eval_accuracy and eval_loss)" in capsys.readouterr().err


def test_a_lora_run_exports_as_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = cfg_for(tmp_path, steps=3, lora_r=4, server_lr=1e-2, client_lr=1e-2)
    train.run(cfg)
    out = export(tmp_path / "run", tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "base" / "config.json").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base")
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    _assert_computes_the_pairs_logits(adapted, tmp_path / "run", cfg, _batch(base.config.vocab_size))
