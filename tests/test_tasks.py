"""hosl.tasks: prompts vs hand-copied MeZO strings, labels vs the raw files, scores vs log_softmax and HF loss."""

import json
import random
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from _tiny_models import model

from hosl import tasks
from hosl.scoring import accuracy, candidate_scores, rank_classify
from hosl.tasks import TASKS, Example, TaskError, encode_candidates, encode_for_training, load_examples
from hosl.tokenizers import HFTokenizer, WordTokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(folder: Path, name: str, records) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".tsv"):
        path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in records), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- Templates and verbalizers ---------------------------------------------------------------------------

# (task, file, record, expected context, expected candidates, expected label), written out by hand
# from MeZO's large_models/templates.py.
HAND = [
    ("sst2", "train.tsv", ('"gripping" , a tale ', "1"), '"gripping" , a tale It was', (" terrible", " great"), 1),
    ("sst2", "train.tsv", ("dull , lifeless", "0"), "dull , lifeless It was", (" terrible", " great"), 0),
    (
        "rte", "train.jsonl",
        {"premise": "The cat sat on the mat.", "hypothesis": "A cat sat.", "label": "entailment", "idx": 0},
        'The cat sat on the mat.\nDoes this mean that "A cat sat." is true? Yes or No?\n', ("Yes", "No"), 0,
    ),
    (
        "rte", "train.jsonl",
        {"premise": "\n It rained.", "hypothesis": "It was dry.", "label": "not_entailment", "idx": 1},
        'It rained.\nDoes this mean that "It was dry." is true? Yes or No?\n', ("Yes", "No"), 1,
    ),
    (
        "cb", "train.jsonl",
        {"premise": "It rained all day.", "hypothesis": "the ground is wet", "label": "neutral", "idx": 0},
        'Suppose It rained all day. Can we infer that "the ground is wet"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"), 2,
    ),
    (
        "cb", "train.jsonl",
        {"premise": "It is sunny.", "hypothesis": "it is raining", "label": "contradiction", "idx": 1},
        'Suppose It is sunny. Can we infer that "it is raining"? Yes, No, or Maybe?\n', ("Yes", "No", "Maybe"), 1,
    ),
    (
        "boolq", "val.jsonl",
        {"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "label": True, "idx": 0},
        "Sky -- The sky is blue. Is the sky blue?\n", ("Yes", "No"), 0,
    ),
    (
        "boolq", "val.jsonl",
        {"question": "can pigs fly?", "passage": "Pig -- Pigs walk.", "label": False, "idx": 1},
        "Pig -- Pigs walk. Can pigs fly?\n", ("Yes", "No"), 1,
    ),
    (
        "wic", "train.jsonl",
        {"word": "bank", "sentence1": "He sat on the bank.", "sentence2": "She went to the bank.", "label": False,
         "start1": 14, "end1": 18, "start2": 16, "end2": 20, "idx": 0},
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
        "He sat on the bank.\nShe went to the bank.\n", ("No", "Yes"), 0,
    ),
    (
        "wsc", "train.jsonl",
        {"text": "Mark told Pete that He was late.", "label": True, "idx": 0,
         "target": {"span1_text": "Pete", "span1_index": 2, "span2_text": "He", "span2_index": 4}},
        'Mark told Pete that He was late.\nIn the previous sentence, does the pronoun "he" refer to Pete?'
        " Yes or No?\n",
        ("No", "Yes"), 1,
    ),
]  # fmt: skip


@pytest.mark.parametrize("task,name,record,context,candidates,label", HAND, ids=lambda v: v if v in TASKS else "")
def test_template_and_verbalizer(tmp_path, task, name, record, context, candidates, label):
    _write(tmp_path / task, name, [record])
    split = "train" if name.startswith("train") else "eval"
    (ex,) = load_examples(task, split, data_dir=tmp_path)
    assert ex == Example(context, candidates, label)
    # The task folder itself works as data_dir too.
    assert load_examples(task, split, data_dir=tmp_path / task) == [ex]


# --- The local files ----------------------------------------------------------------------------------------

ROWS = {
    ("sst2", "train"): 60_614, ("sst2", "eval"): 6_735,
    ("rte", "train"): 2_490, ("rte", "eval"): 277,
    ("cb", "train"): 250, ("cb", "eval"): 56,
    ("wic", "train"): 5_428, ("wic", "eval"): 638,
    ("wsc", "train"): 554, ("wsc", "eval"): 104,
    ("boolq", "eval"): 3_270,
}  # fmt: skip
# The answer each raw label must get, independent of the module's tables.
ANSWER = {
    "sst2": {"0": " terrible", "1": " great"},
    "rte": {"entailment": "Yes", "not_entailment": "No"},
    "cb": {"entailment": "Yes", "contradiction": "No", "neutral": "Maybe"},
    "boolq": {True: "Yes", False: "No"},
    "wic": {True: "Yes", False: "No"},
    "wsc": {True: "Yes", False: "No"},
}
CANDIDATES = {
    "sst2": (" terrible", " great"), "rte": ("Yes", "No"), "cb": ("Yes", "No", "Maybe"), "boolq": ("Yes", "No"),
    "wic": ("No", "Yes"), "wsc": ("No", "Yes"),
}  # fmt: skip
ENDING = {
    "sst2": " It was", "rte": " is true? Yes or No?\n", "cb": "? Yes, No, or Maybe?\n", "boolq": "?\n",
    "wic": "\n", "wsc": "? Yes or No?\n",
}  # fmt: skip
FIRST_FIELD = {"sst2": "sentence", "rte": "premise", "cb": "premise", "boolq": "passage", "wsc": "text"}

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"the shared data folder {DATA} is absent")


def _raw(task, split):
    if task == "sst2":
        lines = (DATA / "sst2" / f"{'train' if split == 'train' else 'dev'}.tsv").read_text("utf-8").splitlines()
        return [dict(zip(["sentence", "label"], line.split("\t"))) for line in lines[1:]]
    path = DATA / task / f"{'train' if split == 'train' else 'val'}.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


@needs_data
@pytest.mark.parametrize("task,split", list(ROWS), ids=lambda v: v)
def test_local_files(task, split):
    examples = load_examples(task, split, data_dir=DATA)
    raw = _raw(task, split)
    assert len(examples) == len(raw) == ROWS[task, split]
    for ex, record in zip(examples, raw):
        assert ex.candidates == CANDIDATES[task]
        assert 0 <= ex.label < len(ex.candidates)
        assert ex.candidates[ex.label] == ANSWER[task][record["label"]]
        assert ex.context.endswith(ENDING[task])
        if task in FIRST_FIELD:
            start = "Suppose " if task == "cb" else ""
            assert ex.context.startswith(start + record[FIRST_FIELD[task]].strip()[:30])
        else:
            assert f'"{record["word"]}"' in ex.context and record["sentence2"] in ex.context


@needs_data
def test_boolq_train_is_missing_locally():
    with pytest.raises(TaskError, match="only val.jsonl: split val.jsonl"):
        load_examples("boolq", "train", data_dir=DATA)


def test_boolq_train_without_the_file(tmp_path):
    _write(tmp_path / "boolq", "val.jsonl", [HAND[6][2]])
    with pytest.raises(TaskError, match="no boolq train.jsonl.*only val.jsonl") as err:
        load_examples("boolq", "train", data_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert len(load_examples("boolq", "eval", data_dir=tmp_path)) == 1


# --- Sampling ---------------------------------------------------------------------------------------------


def test_sampling_is_seeded_stable_and_without_replacement(tmp_path):
    sentences = [f"sentence {i}" for i in range(50)]
    _write(tmp_path, "train.tsv", [(s, i % 2) for i, s in enumerate(sentences)])
    every = load_examples("sst2", "train", data_dir=tmp_path)
    assert [ex.context for ex in every] == [f"{s} It was" for s in sentences]  # n=None: file order
    a = load_examples("sst2", "train", data_dir=tmp_path, n=10, seed=3)
    assert a == load_examples("sst2", "train", data_dir=tmp_path, n=10, seed=3)
    assert len({ex.context for ex in a}) == 10 and set(a) <= set(every)
    assert a != load_examples("sst2", "train", data_dir=tmp_path, n=10, seed=4)
    assert a == load_examples("sst2", "train", data_dir=tmp_path, n=20, seed=3)[:10]
    # The draw is random.Random(seed)'s shuffle of the file's rows.
    order = list(range(50))
    random.Random(3).shuffle(order)
    assert a == [every[i] for i in order[:10]]
    everything = load_examples("sst2", "train", data_dir=tmp_path, n=1000, seed=3)
    assert len(everything) == 50 and set(everything) == set(every) and everything != every


# --- Errors -----------------------------------------------------------------------------------------------


def _one_line_error(match, **kwargs):
    with pytest.raises(TaskError, match=match) as err:
        load_examples(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_names_splits_and_sizes(tmp_path):
    _one_line_error(r"unknown task 'sst-2'; choose one of sst2, rte", task="sst-2", split="train")
    _one_line_error(r"unknown split 'validation' for rte; use 'train' or 'eval'", task="rte", split="validation")
    for n in (0, -3, 2.5, True):
        _one_line_error(rf"n must be a positive integer or None, got {n!r}", task="synthetic", split="train", n=n)


def test_bad_data_dirs(tmp_path):
    missing = tmp_path / "nowhere"
    _one_line_error(f"data dir {re.escape(str(missing))} does not exist", task="rte", split="train", data_dir=missing)
    _one_line_error("no rte train file: expected .*rte/train.jsonl", task="rte", split="train", data_dir=tmp_path)
    _write(tmp_path / "wic", "train.jsonl", [HAND[8][2]])
    _one_line_error(
        r"wic/train.jsonl: no column premise, hypothesis \(its columns: word, .*; is this rte data",
        task="rte", split="train", data_dir=tmp_path / "wic",
    )  # fmt: skip
    _write(tmp_path / "rte", "train.jsonl", [dict(HAND[2][2], label="contradiction")])
    _one_line_error(
        r"train.jsonl: row 1: rte label 'contradiction' has no verbalizer \(labels: entailment, not_entailment\)",
        task="rte", split="train", data_dir=tmp_path,
    )  # fmt: skip
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "val.jsonl").write_text('{"premise": "a"\n')
    _one_line_error(r"cb/val.jsonl:1: not valid JSON", task="cb", split="eval", data_dir=tmp_path)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("text\tlabel\nfine\t1\n")
    _one_line_error(r"dev.tsv: no column sentence \(its columns: text, label; is this sst2", task="sst2", split="eval",
                    data_dir=tmp_path)  # fmt: skip
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\textra\n")
    _one_line_error(r"dev.tsv:2: expected 2 tab-separated fields, got 3", task="sst2", split="eval", data_dir=tmp_path)
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nfine\t2\n")
    _one_line_error(r"dev.tsv: row 1: sst2 label '2' has no verbalizer", task="sst2", split="eval", data_dir=tmp_path)


def test_bad_bytes_and_field_types_name_their_line(tmp_path):
    """Bytes that are not UTF-8 are reported at their own line (they used to be "after line 1" for
    line 9); a NUL byte in a field, a null or a number where a text goes are refused."""
    good = "".join(f"sentence {i}\t{i % 2}\n" for i in range(2, 9)).encode()
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_bytes(b"sentence\tlabel\n" + good + b"caf\xe9 au lait\t1\n")
    _one_line_error(r"dev.tsv:9: not UTF-8 \(byte 4 of the line", task="sst2", split="eval", data_dir=tmp_path)
    lines = [json.dumps(dict(HAND[2][2])).encode() + b"\n"] * 3
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "val.jsonl").write_bytes(b"".join(lines) + b'{"premise": "\xff"}\n')
    _one_line_error(r"val.jsonl:4: not UTF-8 \(byte 14 of the line", task="rte", split="eval", data_dir=tmp_path)
    for value, said in [(None, "null"), (3, "a number"), (["a"], "a list")]:
        _write(tmp_path / "rte", "train.jsonl", [HAND[2][2], dict(HAND[2][2], premise=value)])
        _one_line_error(rf"train.jsonl: row 2: rte field premise must be a string, got {said}", task="rte",
                        split="train", data_dir=tmp_path)  # fmt: skip
    _write(tmp_path / "rte", "train.jsonl", [dict(HAND[2][2], hypothesis="a\0b")])
    _one_line_error(
        r"train.jsonl: row 1: rte field hypothesis holds a NUL", task="rte", split="train", data_dir=tmp_path
    )
    (tmp_path / "sst2" / "dev.tsv").write_bytes(b"sentence\tlabel\nfine\t1\nbad\x00 one\t0\n")
    _one_line_error(r"dev.tsv:3: .*NUL", task="sst2", split="eval", data_dir=tmp_path)


def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    _one_line_error("datasets package is not installed; pass --data-dir", task="sst2", split="train")


def test_hub_unreachable(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nsecond line")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    _one_line_error(
        r"could not load super_glue/cb \(validation\).*Couldn't reach.*--data-dir", task="cb", split="eval"
    )


def test_hub_records_use_the_class_label_integers(monkeypatch):
    """The hub gives ClassLabel integers (named or not) and flattens WSC's spans; the eval split is
    'validation'."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def table(records, names):
        features = datasets.Dataset.from_list(records).features
        return datasets.Dataset.from_list(records, features=datasets.Features(
            {**features, "label": datasets.ClassLabel(names=names)}))  # fmt: skip

    yes_no = ["False", "True"]
    hub = {
        ("glue", "sst2"): table([{"sentence": "fine ", "label": 1, "idx": 0}], ["negative", "positive"]),
        ("super_glue", "rte"): table([dict(HAND[2][2], label=1)], ["entailment", "not_entailment"]),
        ("super_glue", "cb"): table([dict(HAND[4][2], label=2)], ["entailment", "contradiction", "neutral"]),
        ("super_glue", "boolq"): table([dict(HAND[6][2], label=1)], yes_no),
        ("super_glue", "wic"): table([dict(HAND[8][2], label=1)], yes_no),
        ("super_glue", "wsc.fixed"): table([{"text": "A B.", "span1_text": "A", "span2_text": "It", "label": 0}],
                                           yes_no),
    }  # fmt: skip

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return hub[path, name]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = {task: load_examples(task, "eval")[0] for task in ("sst2", "rte", "cb", "boolq", "wic", "wsc")}
    assert {c[2] for c in calls} == {"validation"}
    assert [ex.candidates[ex.label] for ex in got.values()] == [" great", "No", "Maybe", "Yes", "Yes", "No"]
    assert got["wsc"].context == 'A B.\nIn the previous sentence, does the pronoun "it" refer to A? Yes or No?\n'
    load_examples("sst2", "train")
    assert calls[-1] == ("glue", "sst2", "train")


# --- The presets against MeZO's templates as code, on the real files ------------------------------------


def _mezo_context(task: str, r: dict) -> str:
    """MeZO's templates (large_models/templates.py) written as code, independent of hosl's Formats."""
    if task == "sst2":
        return f"{r['sentence'].strip()} It was"
    if task == "rte":
        return f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n'
    if task == "cb":
        return f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n'
    if task == "boolq":
        q = r["question"] if r["question"].endswith("?") else r["question"] + "?"
        return f"{r['passage']} {q[:1].upper() + q[1:]}\n"
    if task == "wic":
        return (f'Does the word "{r["word"]}" have the same meaning in these two sentences? Yes, No?\n'
                f"{r['sentence1']}\n{r['sentence2']}\n")  # fmt: skip
    t = r["target"]
    return f'{r["text"]}\nIn the previous sentence, does the pronoun "{t["span2_text"].lower()}" refer to {t["span1_text"]}? Yes or No?\n'  # noqa: E501


_MEZO_ANSWERS = {
    "sst2": ((" terrible", " great"), lambda v: int(v)),
    "rte": (("Yes", "No"), ["entailment", "not_entailment"].index),
    "cb": (("Yes", "No", "Maybe"), ["entailment", "contradiction", "neutral"].index),
    "boolq": (("Yes", "No"), lambda v: 0 if v else 1),
    "wic": (("No", "Yes"), int),
    "wsc": (("No", "Yes"), int),
}


@pytest.mark.skipif(not DATA.is_dir(), reason="needs the shared SST-2 / SuperGLUE files")
@pytest.mark.parametrize("task,name", [
    (t, n) for t in ("sst2", "rte", "cb", "boolq", "wic", "wsc")
    for n in (("train.tsv", "dev.tsv") if t == "sst2" else ("train.jsonl", "val.jsonl")) if (DATA / t / n).is_file()
])  # fmt: skip
def test_presets_give_the_examples_of_the_mezo_templates(task, name):
    """Every row of the real files: the preset (a template and verbalizers as data, read through
    datasets) gives the example that MeZO's templates as code give from the raw file."""
    path = DATA / task / name
    if name.endswith(".tsv"):
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        records = [dict(zip(("sentence", "label"), line.split("\t"))) for line in lines]
    else:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    candidates, index = _MEZO_ANSWERS[task]
    expected = [Example(_mezo_context(task, r).strip(" ").lstrip(), candidates, index(r["label"])) for r in records]
    got = load_examples(task, "train" if name.startswith("train") else "eval", data_dir=DATA)
    assert len(got) == len(expected)
    assert list(got) == expected


# --- The synthetic task -----------------------------------------------------------------------------------


def _sentence(ex):
    assert ex.context.endswith(" It was")
    return ex.context[: -len(" It was")]


def test_synthetic_is_balanced_deterministic_and_disjoint():
    train = load_examples("synthetic", "train")
    test = load_examples("synthetic", "eval")
    assert (len(train), len(test)) == (2000, 200)
    assert sum(ex.label for ex in train) == 1000 and sum(ex.label for ex in test) == 100
    assert abs(2 * sum(ex.label for ex in load_examples("synthetic", "train", n=7)) - 7) == 1
    assert train == load_examples("synthetic", "train")
    assert train[:50] == load_examples("synthetic", "train", n=50)
    assert train != load_examples("synthetic", "train", seed=1)
    assert load_examples("synthetic", "eval", data_dir="/nowhere") == test  # needs no files
    assert len({_sentence(ex) for ex in train}) == 2000  # no repeats within a split
    # Large enough that two independent streams over this sentence space would share dozens.
    train = {_sentence(ex) for s in (0, 1) for ex in load_examples("synthetic", "train", n=20_000, seed=s)}
    test = {_sentence(ex) for s in (0, 1) for ex in load_examples("synthetic", "eval", n=2_000, seed=s)}
    assert len(train) > 30_000 and len(test) > 3_000
    assert not train & test


def test_synthetic_sentences_carry_one_polarity():
    for ex in load_examples("synthetic", "train") + load_examples("synthetic", "eval"):
        words = _sentence(ex).split()
        assert 4 <= len(words) <= 10
        positive = sum(w in tasks._POSITIVE for w in words)
        negative = sum(w in tasks._NEGATIVE for w in words)
        same, other = (positive, negative) if ex.label else (negative, positive)
        assert same in (2, 3) and other == 0
        assert ex.candidates == (" terrible", " great")


def test_word_tokenizer_covers_the_synthetic_task():
    tok = WordTokenizer.for_task()
    for ex in load_examples("synthetic", "eval") + load_examples("synthetic", "train", n=500):
        for c in ex.candidates:
            assert tok.unk_token_id not in tok.encode(ex.context + c)
    assert tok.encode(" great") == tok.encode("great") == [tok.encode("it was great")[-1]]
    assert tok.encode("It was") == tok.encode("it was")
    assert tok.vocab_size == 4 + len(set(tok._ids)) and min(tok._ids.values()) == 4


def test_word_tokenizer():
    tok = WordTokenizer(["good", "movie", ",", "Good"])
    assert tok.vocab_size == 7
    assert tok.encode("Good movie, zebra!\n") == [4, 5, 6, 1, 1]
    with pytest.raises(ValueError, match="one word or punctuation mark, got 'two words'"):
        WordTokenizer(["two words"])
    with pytest.raises(TaskError, match="only the synthetic task has a fixed vocabulary, not 'sst2'"):
        WordTokenizer.for_task("sst2")


class _FakeHF:
    """The part of a Hugging Face tokenizer HFTokenizer uses: words to ids, bos prepended on request."""

    def __init__(self, adds_bos, pad=0, eos=3):
        self.adds_bos, self.pad_token_id, self.eos_token_id, self.bos_token_id = adds_bos, pad, eos, 2
        self.calls = []

    def encode(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        ids = [10 + len(w) for w in text.split()]
        return [2] + ids if add_special_tokens and self.adds_bos else ids

    def __len__(self):
        return 50


def test_hf_tokenizer_adapter():
    opt_like = HFTokenizer(_FakeHF(adds_bos=True))
    assert (opt_like.bos_token_id, opt_like.pad_token_id, opt_like.vocab_size) == (2, 0, 50)
    assert opt_like.encode("ab c") == [12, 11] and opt_like.hf.calls[-1] is False
    gpt2_like = HFTokenizer(_FakeHF(adds_bos=False, pad=None))
    assert (gpt2_like.bos_token_id, gpt2_like.pad_token_id) == (None, 3)  # no bos; pads with eos
    batch = encode_for_training(opt_like, [Example("ab c", (" d",), 0)], 8)
    assert batch["input_ids"].tolist() == [[2, 12, 11, 11]]


# --- Batching ---------------------------------------------------------------------------------------------

TOK = WordTokenizer("the plot was dull and slow it very good bad yes no maybe".split())


def _ids(text):
    return TOK.encode(text)


def test_encode_for_training_labels_only_the_answer():
    examples = [
        Example("the plot was dull It was", (" bad", " very good"), 1),
        Example("slow It was", (" bad", " good"), 0),
    ]
    batch = encode_for_training(TOK, examples, max_length=16)
    rows = [[2, *_ids("the plot was dull it was very good")], [2, *_ids("slow it was bad")]]
    width = len(rows[0])
    expect_ids = [r + [0] * (width - len(r)) for r in rows]
    expect_labels = [[-100] * (width - 2) + rows[0][-2:], [-100] * 4 + rows[1][-1:] + [-100] * (width - 5)]
    assert batch["input_ids"].tolist() == expect_ids
    assert batch["attention_mask"].tolist() == [[1] * width, [1] * 5 + [0] * (width - 5)]
    assert batch["labels"].tolist() == expect_labels
    assert all(v.dtype == torch.long for v in batch.values())


def test_encode_for_training_truncates_the_context_from_the_left():
    ex = Example("the plot was dull and slow it was", (" very good",), 0)
    batch = encode_for_training(TOK, [ex], max_length=6)
    assert batch["input_ids"].tolist() == [[2, *_ids("slow it was very good")]]
    assert batch["labels"].tolist() == [[-100] * 4 + _ids("very good")]
    # bos + the answer fits in 3; 2 is too short for a 2-token answer that also needs bos.
    assert encode_for_training(TOK, [ex], max_length=3)["input_ids"].tolist() == [[2, *_ids("very good")]]
    with pytest.raises(ValueError, match=r"candidate ' very good' is 2 tokens, too long for max_length=2"):
        encode_for_training(TOK, [ex], max_length=2)


class _NoBos:
    """A word tokenizer whose model reads no bos."""

    bos_token_id = None
    pad_token_id = 0

    def encode(self, text):
        return TOK.encode(text)


def test_without_bos_one_context_token_is_kept():
    ex = Example("the plot was", (" good",), 0)
    assert encode_for_training(_NoBos(), [ex], 2)["input_ids"].tolist() == [_ids("was good")]
    with pytest.raises(ValueError, match="' very good' is 2 tokens, too long for max_length=2"):
        encode_for_training(_NoBos(), [Example("the plot was", (" very good",), 0)], 2)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2, got 1"):
        encode_for_training(TOK, [ex], 1)
    with pytest.raises(ValueError, match="no context before it"):
        encode_for_training(_NoBos(), [Example("", ("good",), 0)], 4)
    with pytest.raises(ValueError, match="candidate ' zebra' adds no tokens"):
        encode_for_training(_Drop(), [Example("it", (" zebra",), 0)], 4)


class _Drop(_NoBos):
    def encode(self, text):
        return [i for i in TOK.encode(text) if i != TOK.unk_token_id]


class _DummyPrefix:
    """SentencePiece-like: a text starts with a word-start marker and spaces become markers, so "Yes"
    alone is "▁Yes" but "Yes" after a newline, and " great" alone is "▁", "▁great" but one token
    after a word."""

    bos_token_id = 1
    pad_token_id = 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        pieces = re.findall(r"▁\w+|▁|\w+|[^\w▁]", "▁" + text.replace(" ", "▁"))
        return [self.vocab.setdefault(p, len(self.vocab) + 2) for p in pieces]


def test_answer_tokens_are_those_of_the_full_text():
    """MeZO's option length: the answer is what the full text has beyond the context's count."""
    tok = _DummyPrefix()
    assert len(tok.encode(" great")) == 2 and len(tok.encode("it was great")) == 3
    batch = encode_for_training(tok, [Example("Is it?\n", ("Yes", "No"), 0), Example("it was", (" great",), 0)], 16)
    assert batch["input_ids"].tolist() == [[1, *tok.encode("Is it?\nYes")], [1, *tok.encode("it was great"), 0, 0]]
    assert batch["labels"].tolist() == [
        [-100] * 5 + [tok.vocab["Yes"]],
        [-100] * 3 + [tok.vocab["▁great"], -100, -100],
    ]
    assert tok.vocab["Yes"] != tok.encode("Yes")[0]


def test_encode_candidates():
    examples = [
        Example("the plot was dull It was", (" bad", " very good"), 0),
        Example("slow It was\n", ("yes", "no", "maybe"), 2),
    ]
    batch, index = encode_candidates(TOK, examples, max_length=16)
    assert index.tolist() == [0, 0, 1, 1, 1]
    labelled = [[t for t in row if t != -100] for row in batch["labels"].tolist()]
    assert labelled == [_ids(c) for ex in examples for c in ex.candidates]
    gold = encode_for_training(TOK, examples, max_length=16)
    for r, e in ((0, 0), (4, 1)):  # the gold rows are the training rows
        width = int(gold["attention_mask"][e].sum())
        assert batch["input_ids"][r, :width].tolist() == gold["input_ids"][e, :width].tolist()
        assert batch["labels"][r, :width].tolist() == gold["labels"][e, :width].tolist()


# --- Scoring ----------------------------------------------------------------------------------------------


def _reference_scores(logits, labels):
    logp = torch.log_softmax(logits.double(), dim=-1)
    out = []
    for r in range(len(labels)):
        picked = [logp[r, t - 1, labels[r, t]] for t in range(1, labels.shape[1]) if labels[r, t] != -100]
        out.append(torch.stack(picked).mean())
    return torch.stack(out).float()


def test_candidate_scores_against_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g) * 3
    labels = torch.full((4, 7), -100)
    for r, (lo, hi) in enumerate([(1, 2), (3, 7), (5, 7), (2, 5)]):  # rows of different lengths
        labels[r, lo:hi] = torch.randint(0, 11, (hi - lo,), generator=g)
    scores = candidate_scores(logits, labels)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, _reference_scores(logits, labels))
    bf16 = candidate_scores(logits.bfloat16(), labels)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, _reference_scores(logits.bfloat16().float(), labels))
    labels[2] = -100
    labels[2, 0] = 3  # position 0 has nothing before it to predict it
    with pytest.raises(ValueError, match=r"rows \[2\] have no labelled token"):
        candidate_scores(logits, labels)


def test_rank_classify():
    scores = torch.tensor([-1.0, -2.0, -3.0, -0.5, -0.7, 2.0, 2.0])
    index = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert rank_classify(scores, index, 3).tolist() == [0, 1, 0]  # a tie goes to the first candidate
    with pytest.raises(ValueError, match="non-decreasing"):
        rank_classify(scores, torch.tensor([0, 1, 0, 1, 1, 2, 2]), 3)
    with pytest.raises(ValueError, match=r"examples \[3\] have no candidate rows"):
        rank_classify(scores, index, 4)
    assert accuracy(torch.tensor([0, 1, 0]), [Example("a", ("x", "y"), 0)] * 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("favoured,expected", [("gold", 1.0), ("other", 0.0)])
def test_rank_classification_end_to_end(favoured, expected):
    """Logits that put a large score on one candidate's tokens at every position of an example's rows
    decide every example for that candidate."""
    examples = load_examples("synthetic", "eval", n=10) + [
        Example("the plot was slow\n", ("yes", "no", "maybe"), 2),
        Example("the plot was good\n", ("yes", "very good", "bad"), 1),
    ]
    tok = WordTokenizer([*WordTokenizer.for_task()._ids, "yes", "no", "maybe", "very", "good", "bad"])
    batch, index = encode_candidates(tok, examples, max_length=32)
    logits = torch.zeros(*batch["input_ids"].shape, tok.vocab_size)
    for r, e in enumerate(index.tolist()):
        ex = examples[e]
        choice = ex.label if favoured == "gold" else (ex.label + 1) % len(ex.candidates)
        logits[r, :, tok.encode(ex.candidates[choice])] = 20.0
    predictions = rank_classify(candidate_scores(logits, batch["labels"]), index, len(examples))
    assert accuracy(predictions, examples) == expected


def test_labels_follow_the_hugging_face_shift():
    """A tiny causal LM's own loss on an encode_for_training batch is the token-weighted mean of
    -candidate_scores: the labels sit where the model expects them."""
    examples = load_examples("synthetic", "train", n=6)
    examples[1] = Example(examples[1].context, (" great and", " terrible"), 0)  # a two-token answer
    tok = WordTokenizer.for_task()
    batch = encode_for_training(tok, examples, max_length=24)
    lm = model("llama", vocab_size=tok.vocab_size)
    with torch.no_grad():
        out = lm(**batch)
    scores = candidate_scores(out.logits, batch["labels"])
    counts = (batch["labels"] != -100).sum(1).float()
    assert counts.tolist() == [1, 2, 1, 1, 1, 1]
    torch.testing.assert_close(out.loss, -(scores * counts).sum() / counts.sum())
