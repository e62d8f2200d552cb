"""hosl.data and the run's own files: every format gives the same rows, bad data is one line naming the
file and row, the evaluation's loss equals transformers' own, and runs on files train, resume, replay
and export."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from test_train import cfg_for, weights

from hosl.config import TrainConfig
from hosl.data import Example, Format, TaskError, parse_verbalizers, template_fields
from hosl.models import build
from hosl.tasks import PRESETS, load_examples, load_run_data
from hosl.train import main, run

pytest.importorskip("datasets")

ROWS = [
    {"text": 'a "quoted", fine day', "label": "1"},
    {"text": "NA", "label": "0"},  # pandas would read NA as a missing value
    {"text": "two\nlines", "label": "1"},
    {"text": "null", "label": "0"},
]
GENERATION = [
    {"prompt": "the sky is", "completion": " blue"},
    {"prompt": "grass is", "completion": " green and short"},
    {"prompt": "snow is\n", "completion": "white"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    """rows in the format path's suffix names."""
    suffix = path.suffix
    if suffix == ".tsv":  # no quoting: a field holds no tab or newline
        lines = ["\t".join(rows[0]), *("\t".join(r.values()) for r in rows)]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    elif suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(list(rows[0]))
            writer.writerows([list(r.values()) for r in rows])
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def own(tmp_path, name="run", **overrides) -> TrainConfig:
    """test_train's small run on your own files, every row of them in file order."""
    return cfg_for(tmp_path, name, **{"train_examples": None, "eval_examples": None, **overrides})


# --- Formats -----------------------------------------------------------------------------------------------


def test_verbalizers_and_templates_parse_and_refuse_in_one_line():
    assert parse_verbalizers("0: terrible, 1: great") == (("0", "terrible"), ("1", "great"))
    assert parse_verbalizers('{"neg": "no, never", "pos": "yes: always"}') == (
        ("neg", "no, never"), ("pos", "yes: always"))  # fmt: skip
    for bad, said in [("0: a", "at least two"), ("0 a, 1: b", "is not label: answer"), ("0: a, 0: b", "distinct"),
                      ("0: a, 1:", "non-empty answer"), ("{bad", "not a JSON object")]:  # fmt: skip
        with pytest.raises(TaskError, match=said) as err:
            parse_verbalizers(bad)
        assert "\n" not in str(err.value)
    assert template_fields("{title}: {text} It was") == ("title", "text")
    for bad in ("It was", "{} It was", "{0}", "{a.b}", "{text"):
        with pytest.raises(TaskError, match="--template"):
            template_fields(bad)


def test_an_answer_follows_the_prompt_after_one_space_unless_it_ends_in_whitespace():
    fmt = Format("file", template="{text}", verbalizers=(("0", "no"), ("1", "yes")))
    assert fmt.example({"text": "ok ", "label": "1"}, "w") == Example("ok", (" no", " yes"), 1)
    assert fmt.example({"text": "ok\n", "label": 0}, "w") == Example("ok\n", ("no", "yes"), 0)
    with pytest.raises(TaskError, match=r"w: file label '2' has no verbalizer \(labels: 0, 1\)"):
        fmt.example({"text": "ok", "label": "2"}, "w")


def test_labels_match_as_written_as_booleans_and_as_class_names():
    fmt = Format("file", verbalizers=(("True", "yes"), ("False", "no")))
    assert [fmt.example({"text": "t", "label": v}, "w").label for v in (True, "false", "TRUE", False)] == [0, 1, 0, 1]
    named = Format("file", verbalizers=(("neg", "bad"), ("pos", "good")))
    assert named.example({"text": "t", "label": 1}, "w", label_names=["neg", "pos"]).label == 1
    numbered = Format("file", verbalizers=(("0", "bad"), ("1", "good")))
    assert numbered.example({"text": "t", "label": 1}, "w", label_names=["neg", "pos"]).label == 1
    assert numbered.example({"text": "t", "label": 1.0}, "w").label == 1


# --- Reading files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_format_gives_the_same_examples(tmp_path, suffix):
    rows = ROWS if suffix != ".tsv" else [r for r in ROWS if "\n" not in r["text"]]  # TSV has no quoting
    fmt = Format("file", template="{text} It was", verbalizers=(("0", "terrible"), ("1", "great")))
    want = [fmt.example(r, "ref") for r in rows]
    cfg = own(tmp_path, train_file=str(_write(tmp_path / f"train{suffix}", rows)),
                  eval_file=str(_write(tmp_path / f"eval{suffix}", rows[:2])), template="{text} It was",
                  verbalizers="0: terrible, 1: great")  # fmt: skip
    train, evals = load_run_data(cfg)
    assert list(train) == want and list(evals) == want[:2]
    assert cfg.task == "file"


def test_generation_rows_keep_prompt_and_completion_as_written(tmp_path):
    cfg = own(tmp_path, train_file=str(_write(tmp_path / "t.jsonl", GENERATION)),
                  eval_file=str(_write(tmp_path / "e.jsonl", GENERATION)))  # fmt: skip
    train, _ = load_run_data(cfg)
    assert list(train) == [Example(r["prompt"], (r["completion"],), 0, generation=True) for r in GENERATION]
    other = own(tmp_path, train_file=str(_write(tmp_path / "o.csv", [{"q": "x", "a": "y"}])),
                    eval_file=str(tmp_path / "o.csv"), prompt_field="q", completion_field="a")  # fmt: skip
    assert list(load_run_data(other)[0]) == [Example("x", ("y",), 0, generation=True)]


def test_a_sample_is_seeded_lazy_and_a_subset(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(50)]
    path = str(_write(tmp_path / "t.jsonl", rows))
    small = load_run_data(own(tmp_path, train_file=path, eval_file=path, train_examples=10))[0]
    big = load_run_data(own(tmp_path, train_file=path, eval_file=path, train_examples=20))[0]
    assert len(small) == 10 and list(big)[:10] == list(small)
    assert len({ex.context for ex in big}) == 20
    assert small[2:4] == [small[2], small[3]] and small[-1] == small[9]


BAD = [
    ("t.csv", "text,label\nfine,1\nshort\n", r"t.csv:3: expected 2 comma-separated fields, got 1"),
    ("t.csv", 'text,label\n"two\nlines",1\nlong,1,2\n', r"t.csv:4: expected 2 comma-separated fields, got 3"),
    ("t.tsv", "text\tlabel\nfine\t1\textra\n", r"t.tsv:2: expected 2 tab-separated fields, got 3"),
    ("t.csv", "text,text\nfine,1\n", r"t.csv:1: the header needs distinct"),
    ("t.csv", "", r"t.csv is empty"),
    ("t.csv", "text,label\n", r"t.csv holds no examples"),
    ("t.jsonl", '{"text": "a", "label": 1}\n{"text": \n', r"t.jsonl:2: not valid JSON"),
    ("t.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', r"t.jsonl:2: expected a JSON object, got list"),
    ("t.csv", b"text,label\nfine,1\ncaf\xe9,0\n", r"t.csv:3: not UTF-8 \(byte 4 of the line"),
    ("t.jsonl", b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 0}\n', r"t.jsonl:2: not UTF-8"),
    ("t.csv", "text,label\nfine,7\n", r"t.csv: row 1: file label '7' has no verbalizer \(labels: 0, 1\)"),
    ("t.jsonl", '{"text": "a", "label": 1}\n{"text": null, "label": 1}\n', r"t.jsonl: row 2: file field text must be a string, got null"),  # noqa: E501
    ("t.csv", "words,label\nfine,1\n", r"t.csv: no column text \(its columns: words, label; name the columns"),
    ("t.txt", "text,label\n", r"t.txt: unknown format .txt; use .csv, .tsv, .json, .jsonl or .parquet"),
]  # fmt: skip


@pytest.mark.parametrize("name,content,message", BAD, ids=[m[:24] for _, _, m in BAD])
def test_bad_data_is_one_line_naming_the_file_and_row(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = _write(tmp_path / "good.csv", [{"text": "ok", "label": "1"}])
    out = tmp_path / "runs" / "r"
    argv = ["--train-file", str(path), "--eval-file", str(good), "--verbalizers", "0: no, 1: yes", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists()  # nothing left behind


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--train-file", "t.jsonl"], "--eval-file is missing"),
        (["--eval-file", "t.jsonl"], "--train-file is missing"),
        (["--template", "{text}"], "--template is for your own data"),
        (["--train-file", "t.jsonl", "--eval-file", "t.jsonl", "--template", "{text}"], "give --verbalizers"),
        (["--train-file", "t.jsonl", "--eval-file", "t.jsonl", "--dataset", "d"], "not both"),
        (
            ["--task", "rte", "--train-file", "t.jsonl", "--eval-file", "t.jsonl", "--verbalizers", "0: a, 1: b"],
            "--task rte has its own template",
        ),
        (["--task", "file"], "--task file needs your data"),
        (["--train-file", "t.jsonl", "--eval-file", "t.jsonl", "--data-dir", "d"], "--data-dir is for the benchmark"),
        (["--train-file", "t.jsonl", "--eval-file", "t.jsonl", "--completion-field", ""], "--completion-field must"),
    ],
)
def test_bad_data_flags_are_one_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_a_generation_row_longer_than_max_length_is_refused(tmp_path, capsys):
    rows = [*GENERATION, {"prompt": "word " * 40, "completion": " end"}]
    path = str(_write(tmp_path / "t.jsonl", rows))
    assert main(["--train-file", path, "--eval-file", path, "--max-length", "24", "--out", str(tmp_path / "r")]) == 2
    assert "t.jsonl: row 4 is 4" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    rows = [*GENERATION, {"prompt": "a", "completion": "  "}]
    path = str(_write(tmp_path / "e.jsonl", rows))
    assert main(["--train-file", path, "--eval-file", path, "--out", str(tmp_path / "r")]) == 2
    assert "e.jsonl: row 4: the completion (completion) is empty" in capsys.readouterr().err


def test_the_sst2_preset_is_a_user_csv_with_its_template_and_verbalizers(tmp_path):
    """The preset on GLUE's TSV and the same rows as a user's CSV with the preset's template and
    verbalizers give the same examples."""
    rows = [{"sentence": "a fine film ", "label": "1"}, {"sentence": "dull", "label": "0"}]
    (tmp_path / "sst2").mkdir()
    _write(tmp_path / "sst2" / "train.tsv", rows)
    preset = load_examples("sst2", "train", data_dir=tmp_path)
    csv_path = str(_write(tmp_path / "mine.csv", [{"text": r["sentence"].strip(), "label": r["label"]} for r in rows]))
    cfg = own(tmp_path, train_file=csv_path, eval_file=csv_path, template="{text} It was",
                  verbalizers="0: terrible, 1: great")  # fmt: skip
    assert list(load_run_data(cfg)[0]) == list(preset)
    as_preset = own(tmp_path, task="sst2", train_file=str(tmp_path / "sst2" / "train.tsv"),
                        eval_file=str(tmp_path / "sst2" / "train.tsv"))  # fmt: skip
    assert list(load_run_data(as_preset)[0]) == list(preset)
    assert PRESETS["sst2"].kind == "classification"


# --- Runs on files ------------------------------------------------------------------------------------------


def _generation_files(tmp_path):
    words = ["red", "green", "blue", "black"]
    rows = [{"prompt": f"the {t} is {c} . what color is the {t} ?", "completion": f" it is {c}" * (1 + i % 3)}
            for i, t in enumerate(("car", "cup", "door", "bird", "house")) for c in words]  # fmt: skip
    return str(_write(tmp_path / "train.jsonl", rows)), str(_write(tmp_path / "eval.jsonl", rows[::3]))


def test_the_eval_loss_is_transformers_loss_on_the_completions(tmp_path):
    """--steps 0: the split run's eval loss is the unsplit model's own causal-LM loss (transformers'
    mean over the completion tokens of one batch holding every eval row), and its perplexity exp of it."""
    train, evals = _generation_files(tmp_path)
    cfg = own(tmp_path, train_file=train, eval_file=evals, steps=0, max_length=24)
    summary = run(cfg)
    from hosl.tasks import encode_for_training

    cfg = TrainConfig.from_json((tmp_path / "run" / "config.json").read_text())
    train_examples, eval_examples = load_run_data(cfg)
    tokenizer, model = build(cfg, train_examples)
    batch = encode_for_training(tokenizer, list(eval_examples), cfg.max_length)
    with torch.no_grad():
        want = model(**batch).loss.item()
    assert summary["final_eval_loss"] == pytest.approx(want, rel=1e-5)
    assert summary["final_eval_perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert "final_eval_accuracy" not in summary


def test_a_generation_run_learns_resumes_and_replays(tmp_path):
    train, evals = _generation_files(tmp_path)
    common = dict(train_file=train, eval_file=evals, max_length=24, steps=8, save_every=4, zo_estimator="cut-grad",
                  q=2, client_lr=1e-2, server_lr=1e-2)  # fmt: skip
    straight = run(own(tmp_path, "straight", **common))
    before = run(own(tmp_path, "before", **{**common, "steps": 0, "save_every": 0}))
    assert straight["final_eval_loss"] < before["final_eval_loss"] - 0.5
    assert straight["best_eval_loss"] == min(e["loss"] for e in straight["evals"])
    run(own(tmp_path, "resumed", **{**common, "steps": 4}))
    assert main(["--resume", str(tmp_path / "resumed"), "--steps", "8"]) == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["final_eval_loss"] == straight["final_eval_loss"]
    from hosl.replay import main as replay_main

    assert replay_main([str(tmp_path / "straight")]) == 0
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r and "eval_perplexity" in r for r in records)


def test_a_classification_file_run_and_a_local_dataset_folder(tmp_path):
    rows = [{"text": f"{w} {n}", "label": str(y)} for y, ws in enumerate((["awful", "dull"], ["lovely", "fine"]))
            for w in ws for n in ("day", "cup", "car", "view", "room")]  # fmt: skip
    folder = tmp_path / "mydata"
    folder.mkdir()
    _write(folder / "train.csv", rows)
    _write(folder / "validation.csv", rows[::2])
    flags = dict(template="{text} It was", verbalizers="0: terrible, 1: great", steps=2)
    by_files = run(own(tmp_path, "files", train_file=str(folder / "train.csv"),
                           eval_file=str(folder / "validation.csv"), **flags))  # fmt: skip
    by_folder = run(own(tmp_path, "folder", dataset=str(folder), **flags))
    assert 0.0 <= by_files["final_eval_accuracy"] <= 1.0
    assert by_files["final_eval_accuracy"] == by_folder["final_eval_accuracy"]
    assert by_files["task"] == "file"


def test_a_file_run_keeps_the_identity_of_a_run_saved_before_the_data_flags():
    """The data flags at their defaults are not part of a config's identity: a run saved before
    they existed resumes."""
    cfg = TrainConfig()
    assert not {"train_file", "template", "prompt_field"} & set(cfg.identity())
    assert "train_file" in TrainConfig(train_file="t.jsonl", eval_file="e.jsonl").identity()


class _ChatTokenizer:
    """A tokenizer's chat template, written out: <role>content</turn> per message."""

    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</turn>{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</turn>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_conversations_train_on_the_last_turn_as_the_chat_template_renders_it(tmp_path):
    from hosl.data import chat_renderer
    from hosl.tasks import file_format, file_rows

    rows = [{"messages": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "blue"}]},
            {"messages": [{"role": "system", "content": "brief"}, {"role": "user", "content": "grass?"},
                          {"role": "assistant", "content": "green"}]}]  # fmt: skip
    path = _write(tmp_path / "chat.jsonl", rows)
    fmt = file_format(own(tmp_path, train_file=str(path), eval_file=str(path)))
    got = list(file_rows(path, fmt, chat=lambda: chat_renderer(_ChatTokenizer())))
    assert got == [
        Example("<user>sky?</turn><assistant>", ("blue</turn>",), 0, generation=True),
        Example("<system>brief</turn><user>grass?</turn><assistant>", ("green</turn>",), 0, generation=True),
    ]
    bad = _write(tmp_path / "bad.jsonl", [rows[0], {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TaskError, match=r"bad.jsonl: row 2: the last message .* must be the assistant's, not 'user'"):
        file_rows(bad, fmt, chat=lambda: chat_renderer(_ChatTokenizer()))
    with pytest.raises(TaskError, match="needs a model whose tokenizer has a chat template"):
        chat_renderer(object())


def test_a_conversation_file_with_a_built_in_model_is_one_line(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "blue"}]}]
    path = str(_write(tmp_path / "chat.jsonl", rows))
    assert main(["--train-file", path, "--eval-file", path, "--out", str(tmp_path / "r")]) == 2
    assert "a messages column needs a model whose tokenizer has a chat template" in capsys.readouterr().err


def test_many_clients_and_export_on_your_own_files(tmp_path):
    """A generation file with three clients (each a shard, a held-out part scored by loss); its export
    reloads with transformers, whose tokenizer encodes the eval prompts as the run did and whose
    loss on the eval rows is the run's."""
    import transformers

    from hosl.export import export
    from hosl.tasks import encode_for_training

    train, evals = _generation_files(tmp_path)
    summary = run(own(tmp_path, train_file=train, eval_file=evals, clients=3, steps=3, client_eval_fraction=0.2,
                      max_length=24))  # fmt: skip
    assert summary["clients_identical"] and len(summary["client_eval_loss"]) == 3
    out = export(tmp_path / "run", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    cfg = TrainConfig.from_json((tmp_path / "run" / "config.json").read_text())
    train_examples, eval_examples = load_run_data(cfg)
    ours, _ = build(cfg, train_examples)
    assert all(
        tokenizer.encode(ex.context, add_special_tokens=False) == ours.encode(ex.context) for ex in eval_examples
    )
    batch = encode_for_training(ours, list(eval_examples), cfg.max_length)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(summary["final_eval_loss"], rel=1e-4)
