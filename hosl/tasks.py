"""Classification tasks as prompts with verbalized answers, and the batching that rank
classification needs (the scoring is in hosl.scoring, the tokenizers in hosl.tokenizers).

Every task becomes a list of Examples: a context (the prompt) and the verbalized candidates, so that
`context + candidate` is the whole text a causal LM reads. The prompts and verbalizers are MeZO's
(Malladi et al. 2023; github.com/princeton-nlp/MeZO, large_models/templates.py and tasks.py), with
no demonstrations, which is how MeZO fine-tunes:
  * SST-2 `"<sentence> It was"` + `" terrible"`/`" great"`: the answer is the next word, so it
    carries its leading space;
  * the SuperGLUE prompts (PromptSource-derived in MeZO) end with a newline and the answer
    (`"Yes"`, `"No"`, `"Maybe"`) starts the next line with no space;
  * BoolQ uses MeZO's default BoolQ template (its third version): passage, the question
    capitalised with a "?", a newline.

How a pair is tokenised follows MeZO's encode_prompt: the full text and the context are encoded
separately and the answer is the tokens the full text has beyond the context's count. With
tokenizers that merge across the boundary (SentencePiece's word-start marker) this is what makes
the answer tokens the ones the model reads in the full text, not those of the answer alone.

A candidate is scored by the average log-likelihood of its tokens given the context (MeZO's rank
classification); the prediction is the best-scoring candidate. Training puts the LM loss on the
gold answer's tokens only. Labels are aligned with input_ids the way Hugging Face causal LMs expect
(the model shifts them: position t-1 predicts labels[t]).

Data comes from local files (`data_dir`: GLUE's SST-2 TSV, SuperGLUE's JSONL) or, without one, from
the Hugging Face hub through the optional `datasets` package. The "synthetic" task needs neither:
it is generated in code, for the built-in word tokenizer and small models trained from scratch.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hosl.tokenizers import Tokenizer, WordTokenizer

__all__ = [
    "TASKS",
    "Example",
    "TaskError",
    "encode_candidates",
    "encode_for_training",
    "load_examples",
    "load_run_data",
    "synthetic_words",
]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "synthetic")
SPLITS = ("train", "eval")


class TaskError(ValueError):
    """A task cannot be loaded as asked (unknown name or split, missing or malformed data); the
    message is one line naming the bad value or file."""


@dataclass(frozen=True)
class Example:
    """One classification example: the prompt, the verbalized answers and the gold answer's index.
    `context + candidates[i]` is the full text for answer i."""

    context: str
    candidates: tuple[str, ...]
    label: int

    def __post_init__(self):
        if not self.candidates:
            raise ValueError(f"an Example needs at least one candidate, got {self.candidates!r}")
        if not 0 <= self.label < len(self.candidates):
            raise ValueError(f"label {self.label} is out of range for {len(self.candidates)} candidates")


# --- Templates (MeZO large_models/templates.py) ------------------------------------------------------
# Each takes a record with the official field names and returns the context. Label functions map
# a record's label (the file's strings/booleans, or the hub's ClassLabel integers) to the index of
# its verbalized answer.


def _sst2(r: dict) -> str:
    return f"{r['sentence'].strip()} It was"


def _rte(r: dict) -> str:
    return f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n'


def _cb(r: dict) -> str:
    return f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n'


def _boolq(r: dict) -> str:
    question = r["question"]
    if not question.endswith("?"):
        question += "?"
    question = question[:1].upper() + question[1:]
    return f"{r['passage']} {question}\n"


def _wic(r: dict) -> str:
    return (
        f'Does the word "{r["word"]}" have the same meaning in these two sentences? Yes, No?\n'
        f"{r['sentence1']}\n{r['sentence2']}\n"
    )


def _wsc(r: dict) -> str:
    # The SuperGLUE file nests the spans under "target"; the hub's wsc.fixed has them at top level.
    spans = r["target"] if "target" in r else r
    return (
        f"{r['text']}\nIn the previous sentence, does the pronoun "
        f'"{spans["span2_text"].lower()}" refer to {spans["span1_text"]}? Yes or No?\n'
    )


def _truth(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # the hub's ClassLabel: 0 = False, 1 = True
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise KeyError(value)


def _named(names: tuple[str, ...]) -> Callable[[Any], int]:
    """Labels given as these names, or as the hub's integers in the same order."""

    def index(value: Any) -> int:
        if isinstance(value, str) and value in names:
            return names.index(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return value
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", value) and int(value) < len(names):
            return int(value)  # SST-2's TSV (ASCII digits only: str.isdigit takes "１" and "²")
        raise KeyError(value)

    return index


@dataclass(frozen=True)
class _Task:
    template: Callable[[dict], str]
    candidates: tuple[str, ...]
    label: Callable[[Any], int]
    fields: tuple[str, ...]
    hub: tuple[str, str]  # datasets.load_dataset(path, name)


_TASKS: dict[str, _Task] = {
    "sst2": _Task(_sst2, (" terrible", " great"), _named(("0", "1")), ("sentence",), ("glue", "sst2")),
    "rte": _Task(_rte, ("Yes", "No"), _named(("entailment", "not_entailment")), ("premise", "hypothesis"),
                 ("super_glue", "rte")),
    "cb": _Task(_cb, ("Yes", "No", "Maybe"), _named(("entailment", "contradiction", "neutral")),
                ("premise", "hypothesis"), ("super_glue", "cb")),
    # MeZO's BoolQ: candidates ["Yes", "No"], "Yes" when the answer is true.
    "boolq": _Task(_boolq, ("Yes", "No"), lambda v: 0 if _truth(v) else 1, ("question", "passage"),
                   ("super_glue", "boolq")),
    "wic": _Task(_wic, ("No", "Yes"), lambda v: int(_truth(v)), ("word", "sentence1", "sentence2"),
                 ("super_glue", "wic")),
    # MeZO loads wsc.fixed; the template reads only the span texts, so the original file's
    # misaligned span2_index rows make no difference here.
    "wsc": _Task(_wsc, ("No", "Yes"), lambda v: int(_truth(v)), ("text",), ("super_glue", "wsc.fixed")),
}  # fmt: skip


def _example(task: str, record: dict, where: str) -> Example:
    spec = _TASKS[task]
    missing = [f for f in (*spec.fields, "label") if f not in record]
    if task == "wsc" and not missing:
        spans = record.get("target", record)
        missing = [f for f in ("span1_text", "span2_text") if not isinstance(spans, dict) or f not in spans]
    if missing:
        raise TaskError(f"{where}: a {task} record needs field(s) {', '.join(missing)} (is this {task} data?)")
    texts = [(f, record[f]) for f in spec.fields]
    if task == "wsc":
        spans = record.get("target", record)
        texts += [(f, spans[f]) for f in ("span1_text", "span2_text")]
    for name, value in texts:
        if not isinstance(value, str):
            raise TaskError(f"{where}: {task} field {name} must be a string, got {_json_type(value)}")
        if "\0" in value:
            raise TaskError(f"{where}: {task} field {name} holds a NUL byte")
    try:
        label = spec.label(record["label"])
    except KeyError:
        raise TaskError(f"{where}: {task} label {record['label']!r} is not a {task} label") from None
    # MeZO strips spaces around the prompt and, with no demonstrations, any leading whitespace.
    context = spec.template(record).strip(" ").lstrip()
    return Example(context, spec.candidates, label)


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)  # fmt: skip


# --- Loading --------------------------------------------------------------------------------------------

_FILES = {"sst2": {"train": "train.tsv", "eval": "dev.tsv"}}
_JSONL = {"train": "train.jsonl", "eval": "val.jsonl"}


def _task_dir(task: str, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise TaskError(f"data dir {data_dir} does not exist or is not a directory")
    sub = data_dir / task
    return sub if sub.is_dir() else data_dir


def _text_lines(path: Path):
    """The file's lines as text, line endings kept; TaskError naming the exact line (and byte in it)
    of bytes that are not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f"byte {exc.start + 1} of the line"
                raise TaskError(f"{path}:{number}: not UTF-8 ({where}: {exc.reason})") from None


def _read_tsv(path: Path) -> list[tuple[dict, str]]:
    # QUOTE_NONE: SST-2 sentences contain quote characters that are text, not CSV quoting.
    rows = csv.reader(_text_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    out = []
    try:
        header = next(rows, None)
        if header != ["sentence", "label"]:
            raise TaskError(f"{path}: expected the header sentence<TAB>label, got {header!r}")
        for line, row in enumerate(rows, start=2):
            if len(row) != 2:
                raise TaskError(f"{path}:{line}: expected 2 tab-separated fields, got {len(row)}")
            out.append(({"sentence": row[0], "label": row[1]}, f"{path}:{line}"))
    except csv.Error as exc:  # a field over the csv module's size limit, a NUL byte
        raise TaskError(f"{path}:{rows.line_num}: {exc}") from None
    return out


def _read_jsonl(path: Path) -> list[tuple[dict, str]]:
    out = []
    for line, text in enumerate(_text_lines(path), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = getattr(exc, "msg", "nested too deeply")
            raise TaskError(f"{path}:{line}: not valid JSON ({msg})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        out.append((record, f"{path}:{line}"))
    return out


def _load_local(task: str, split: str, data_dir: Path) -> list[Example]:
    folder = _task_dir(task, data_dir)
    name = _FILES.get(task, _JSONL)[split]
    path = folder / name
    if not path.is_file():
        if task == "boolq" and split == "train" and (folder / "val.jsonl").is_file():
            raise TaskError(
                f"no boolq train.jsonl in {folder}, only val.jsonl: split val.jsonl into train and eval files"
                " yourself and report that the numbers come from it (eval data is never used for training here)"
            )
        raise TaskError(f"no {task} {split} file: expected {folder / task / name} or {path}")
    rows = _read_tsv(path) if path.suffix == ".tsv" else _read_jsonl(path)
    if not rows:
        raise TaskError(f"{path} holds no examples")
    return [_example(task, record, where) for record, where in rows]


def _load_hub(task: str, split: str) -> list[Example]:
    path, name = _TASKS[task].hub
    hub_split = {"train": "train", "eval": "validation"}[split]
    try:
        import datasets
    except ImportError:
        raise TaskError(
            f"{task}: no data dir given and the datasets package is not installed; pass --data-dir DIR"
            " (a folder with the task's files)"
        ) from None
    try:
        records = datasets.load_dataset(path, name, split=hub_split)
    except Exception as exc:  # no network, hub refusal, missing script: all mean the same to the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TaskError(
            f"{task}: could not load {path}/{name} ({hub_split}) from the hub ({reason}); pass --data-dir DIR"
        ) from exc
    where = f"{path}/{name} {hub_split}"
    return [_example(task, dict(record), f"{where} row {i}") for i, record in enumerate(records)]


def load_examples(
    task: str, split: str, *, data_dir: str | Path | None = None, n: int | None = None, seed: int = 0
) -> list[Example]:
    """The examples of `task` ("train" or "eval" split) as prompts with verbalized candidates.

    data_dir: a folder holding the task's files, or a parent holding `<task>/`. SST-2 reads GLUE's
    train.tsv / dev.tsv, the SuperGLUE tasks train.jsonl / val.jsonl. Without it, the data comes
    from the hub (glue/sst2, super_glue/<task>; eval is their validation split) through the
    `datasets` package. "synthetic" reads nothing and ignores data_dir.

    n: None keeps every example in file order. Otherwise n examples drawn without replacement by
    random.Random(seed), the same for the same (seed, n); a larger n gives every example (in the
    shuffled order). A smaller n draws a prefix of a larger one's examples. For "synthetic", n is how
    many to generate (default 2000 train, 200 eval).
    """
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r} for {task}; use 'train' or 'eval'")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise TaskError(f"n must be a positive integer or None, got {n!r}")
    if task == "synthetic":
        return _synthetic(split, n if n is not None else _SYNTHETIC_SIZE[split], seed)
    if data_dir is not None:
        examples = _load_local(task, split, Path(data_dir).expanduser())
    else:
        examples = _load_hub(task, split)
    if n is None:
        return examples
    if n > len(examples):
        logger.info("%s %s: n=%d is more than its %d examples; using all of them", task, split, n, len(examples))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # a shuffled prefix, so a smaller n keeps a subset of a larger one
    return [examples[i] for i in order[:n]]


# --- The synthetic task ---------------------------------------------------------------------------------
# A sentence carries 2 or 3 sentiment words, all of one polarity, among neutral words; the label is
# that polarity. A bag-of-words signal a tiny transformer learns from scratch in seconds, with
# SST-2's prompt and verbalizer so the same code paths run as for the real task.

_POSITIVE = (
    "wonderful", "friendly", "excellent", "delightful", "pleasant", "superb", "charming", "brilliant",
    "lovely", "amazing", "fantastic", "helpful", "cheerful", "fresh", "perfect", "enjoyable",
)  # fmt: skip
_NEGATIVE = (
    "awful", "rude", "horrible", "dreadful", "unpleasant", "poor", "boring", "dull",
    "broken", "dirty", "gloomy", "stale", "disappointing", "sloppy", "noisy", "bland",
)  # fmt: skip
_NOUNS = (
    "service", "staff", "food", "room", "movie", "music", "story", "acting",
    "coffee", "view", "hotel", "show", "meal", "crew", "plot", "ending",
)  # fmt: skip
# {s}: a sentiment word, {n}: a noun. Between 4 and 10 words each.
_PATTERNS = (
    "{s} and {s} {n}",
    "{s} {n} {s} {n}",
    "{s} {n} and {s} {n}",
    "really {s} and {s} {n}",
    "the {n} was {s} and {s}",
    "a {s} {n} with {s} {n}",
    "{n} {s} {n} {s} {n} {s}",
    "{s} {n} {s} {n} and {s} {n}",
    "we found the {n} {s} and {s}",
    "the {n} was {s} and the {n} {s}",
    "honestly the {n} was {s} and {s} overall",
    "it was a {s} {n} with a {s} {n}",
    "the {n} seemed {s} and the {n} {s} too",
    "the {n} and the {n} were {s} and {s} today",
)
_SYNTHETIC_SIZE = {"train": 2000, "eval": 200}
_EVAL_SHARE = 8  # one sentence in 8 (by a hash of its text) may appear in eval, the rest in train


def _synthetic_split(sentence: str) -> str:
    """Which split a sentence belongs to: a fixed function of its text, so the splits are disjoint
    whatever the seeds."""
    return "eval" if zlib.crc32(sentence.encode()) % _EVAL_SHARE == 0 else "train"


def _synthetic(split: str, n: int, seed: int) -> list[Example]:
    # A string seed is hashed with SHA-512 by random.seed: stable across runs and Python versions.
    rng = random.Random(f"hosl.tasks.synthetic/{split}/{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < n:
        order = [0, 1]
        rng.shuffle(order)  # balanced pairs in random order: any prefix is balanced to within one
        for label in order:
            while True:
                attempts += 1
                if attempts > 100 * n + 1000:
                    raise TaskError(f"synthetic {split}: could not generate {n} distinct sentences; ask for fewer")
                words = iter(rng.sample(_POSITIVE if label else _NEGATIVE, 3))
                nouns = iter(rng.sample(_NOUNS, 3))
                pattern = rng.choice(_PATTERNS)
                sentence = " ".join(
                    next(words) if w == "{s}" else next(nouns) if w == "{n}" else w for w in pattern.split()
                )
                if sentence not in seen and _synthetic_split(sentence) == split:
                    break
            seen.add(sentence)
            examples.append(Example(_sst2({"sentence": sentence}), _TASKS["sst2"].candidates, label))
    return examples[:n]


def synthetic_words() -> list[str]:
    """Every word the synthetic task's sentences, prompt and answers use, sorted."""
    prompt = _sst2({"sentence": ""}) + "".join(_TASKS["sst2"].candidates)
    fillers = {w for p in _PATTERNS for w in p.split() if not w.startswith("{")}
    return sorted(set(_POSITIVE) | set(_NEGATIVE) | set(_NOUNS) | fillers | set(WordTokenizer.words(prompt)))


# --- Batching -------------------------------------------------------------------------------------------


def _row(tokenizer: Tokenizer, context: str, context_ids: list[int], answer: str, max_length: int):
    """bos + context tail + answer tokens, and how many answer tokens end the row."""
    full = tokenizer.encode(context + answer)
    n_answer = len(full) - len(context_ids)  # MeZO's option length
    if n_answer <= 0:
        raise ValueError(f"candidate {answer!r} adds no tokens to its context")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    room = max_length - len(bos) - n_answer
    if room < (0 if bos else 1):  # something must precede the answer's first token to predict it
        raise ValueError(f"candidate {answer!r} is {n_answer} tokens, too long for max_length={max_length}")
    prefix = full[:-n_answer][max(0, len(full) - n_answer - room) :]  # cut the context from the left
    ids = bos + prefix + full[-n_answer:]
    if len(ids) == n_answer:
        raise ValueError(f"candidate {answer!r} has no context before it and the tokenizer has no bos")
    return ids, n_answer


def _collate(rows: list[tuple[list[int], int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (ids, n_answer) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, : len(ids)] = 1
        labels[r, len(ids) - n_answer : len(ids)] = input_ids[r, len(ids) - n_answer : len(ids)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check(examples: Sequence[Example], max_length: int) -> None:
    if not examples:
        raise ValueError("no examples to encode")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


def encode_for_training(tokenizer: Tokenizer, examples: Sequence[Example], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels, each (batch, longest row): bos (if any) + context + gold
    answer, right-padded. labels hold the answer's token ids at their own positions and -100
    elsewhere (the loss is on the answer only). A context too long loses its start; an answer
    that cannot fit with one token before it is a ValueError."""
    _check(examples, max_length)
    rows = []
    for ex in examples:
        rows.append(_row(tokenizer, ex.context, tokenizer.encode(ex.context), ex.candidates[ex.label], max_length))
    return _collate(rows, tokenizer.pad_token_id)


def encode_candidates(
    tokenizer: Tokenizer, examples: Sequence[Example], max_length: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every (example, candidate) pair as one row laid out as in encode_for_training, labels on that
    candidate's tokens; and the example index of each row (an example's rows are consecutive, in
    candidate order)."""
    _check(examples, max_length)
    rows, index = [], []
    for i, ex in enumerate(examples):
        context_ids = tokenizer.encode(ex.context)
        for answer in ex.candidates:
            rows.append(_row(tokenizer, ex.context, context_ids, answer, max_length))
            index.append(i)
    return _collate(rows, tokenizer.pad_token_id), torch.tensor(index, dtype=torch.long)


def load_run_data(cfg) -> tuple[list[Example], list[Example]]:
    """A run's (training, evaluation) examples: --task from --data-dir, sampled with --seed (the
    evaluation draw with seed + 1). TaskError when either is empty."""
    train = load_examples(cfg.task, "train", data_dir=cfg.data_dir, n=cfg.train_examples, seed=cfg.seed)
    evals = load_examples(cfg.task, "eval", data_dir=cfg.data_dir, n=cfg.eval_examples, seed=cfg.seed + 1)
    if not train or not evals:
        raise TaskError(f"task {cfg.task} has no {'training' if not train else 'evaluation'} examples")
    return train, evals
