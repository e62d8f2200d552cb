"""Tasks as prompts with answers: the six benchmark tasks (presets), the built-in synthetic task and a
run's own files (read by hosl.data), and the batching that training and evaluation need (the scoring
is in hosl.scoring, the tokenizers in hosl.tokenizers).

Every task becomes a sequence of Examples: a context (the prompt) and the candidates (a
classification task's verbalized answers, or a generation task's one completion), so that
`context + candidate` is the whole text a causal LM reads. The presets' prompts and verbalizers are MeZO's
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

A preset's data comes from local files (`data_dir`: GLUE's SST-2 TSV, SuperGLUE's JSONL) or, without
one, from the Hugging Face hub, both through `datasets`. The "synthetic" task needs neither:
it is generated in code, for the built-in word tokenizer and small models trained from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from hosl.data import (
    Example,
    Format,
    Rows,
    TaskError,
    _datasets,
    chat_renderer,
    locate_bad_bytes,
    parse_verbalizers,
    read_table,
)
from hosl.tokenizers import Tokenizer, WordTokenizer

__all__ = [
    "PRESETS",
    "TASKS",
    "Example",
    "Format",
    "TaskError",
    "encode_candidates",
    "encode_for_training",
    "load_examples",
    "load_file_examples",
    "load_run_data",
    "synthetic_words",
]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "synthetic")
SPLITS = ("train", "eval")


# --- The presets (MeZO large_models/templates.py) as Formats ---------------------------------------------
# Each names the official fields; two derive a column first. Label keys are the files' values (and the
# hub's ClassLabel names, matched without case).


def _sst2(row: dict, where: str) -> dict:
    return {**row, "sentence": row["sentence"].strip()}


def _boolq(row: dict, where: str) -> dict:
    question = row["question"]
    if not question.endswith("?"):
        question += "?"
    return {**row, "question": question[:1].upper() + question[1:]}


def _wsc(row: dict, where: str) -> dict:
    # The SuperGLUE file nests the spans under "target"; the hub's wsc.fixed has them at top level.
    spans = row["target"] if isinstance(row.get("target"), dict) else row
    missing = [f for f in ("span1_text", "span2_text") if f not in spans]
    if missing:
        raise TaskError(f"{where}: a wsc record needs field(s) {', '.join(missing)} (is this wsc data?)")
    fmt = PRESETS["wsc"]
    span1, span2 = (fmt._text(spans, f, where) for f in ("span1_text", "span2_text"))
    return {**row, "span1_text": span1, "span2_lower": span2.lower()}


_YES_NO = (("entailment", "Yes"), ("not_entailment", "No"))
PRESETS: dict[str, Format] = {
    "sst2": Format("sst2", template="{sentence} It was", verbalizers=(("0", "terrible"), ("1", "great")),
                   prepare=_sst2),
    "rte": Format("rte", template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                  verbalizers=_YES_NO),
    "cb": Format("cb", template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
                 verbalizers=(("entailment", "Yes"), ("contradiction", "No"), ("neutral", "Maybe"))),
    # MeZO's BoolQ: its default (third) template, candidates ["Yes", "No"], "Yes" when the answer is true.
    "boolq": Format("boolq", template="{passage} {question}\n", verbalizers=(("true", "Yes"), ("false", "No")),
                    prepare=_boolq),
    "wic": Format("wic", template='Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
                  "{sentence1}\n{sentence2}\n", verbalizers=(("false", "No"), ("true", "Yes"))),
    # MeZO loads wsc.fixed; the template reads only the span texts, so the original file's
    # misaligned span2_index rows make no difference here.
    "wsc": Format("wsc", template='{text}\nIn the previous sentence, does the pronoun "{span2_lower}" refer to '
                  "{span1_text}? Yes or No?\n", verbalizers=(("false", "No"), ("true", "Yes")), fields=("text",),
                  prepare=_wsc),
}  # fmt: skip
_HUB = {"sst2": ("glue", "sst2"), **{t: ("super_glue", t) for t in ("rte", "cb", "boolq", "wic")},
        "wsc": ("super_glue", "wsc.fixed")}  # fmt: skip


# --- Loading --------------------------------------------------------------------------------------------

_FILES = {"sst2": {"train": "train.tsv", "eval": "dev.tsv"}}
_JSONL = {"train": "train.jsonl", "eval": "val.jsonl"}


def _task_dir(task: str, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise TaskError(f"data dir {data_dir} does not exist or is not a directory")
    sub = data_dir / task
    return sub if sub.is_dir() else data_dir


def _load_local(task: str, split: str, data_dir: Path) -> Rows:
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
    return file_rows(path, PRESETS[task])


def _conversational(table, fmt: Format, chat) -> Format:
    """A generation format reads a `messages` column (TRL's conversational shape) when the table has
    one and not the prompt column."""
    columns = table.column_names
    if fmt.kind == "generation" and fmt.prompt_field not in columns and "messages" in columns and chat is not None:
        return dataclasses.replace(fmt, messages_field="messages", chat=chat())
    return fmt


def file_rows(path: str | Path, fmt: Format, chat=None) -> Rows:
    """A file's rows as Examples of this format, every row checked. chat(): the renderer of a
    conversational file's messages (hosl.data.chat_renderer), asked for only when it is one."""
    path = Path(path).expanduser()
    table = read_table(path)
    rows = Rows(table, _conversational(table, fmt, chat), str(path))
    try:
        rows.check()
    except UnicodeDecodeError:  # pyarrow keeps JSON strings' bytes as they are: found when read
        locate_bad_bytes(path)
        raise TaskError(f"{path}: not UTF-8") from None
    return rows


def hub_rows(name: str, config: str | None, split: str, fmt: Format, chat=None) -> Rows:
    """A dataset's split by hub name or local folder (datasets.load_dataset), every row checked."""
    datasets = _datasets()
    try:
        table = datasets.load_dataset(name, config, split=split)  # a download shows its progress
    except Exception as exc:  # no network, hub refusal, missing split: all mean the same to the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = f"{name}/{config}" if config else name
        raise TaskError(f"could not load {what} ({split}) ({reason})") from exc
    if len(table) == 0:
        raise TaskError(f"{name} {split} holds no examples")
    rows = Rows(table, _conversational(table, fmt, chat), f"{name}/{config} {split}" if config else f"{name} {split}")
    rows.check()
    return rows


def _load_hub(task: str, split: str) -> Rows:
    path, name = _HUB[task]
    hub_split = {"train": "train", "eval": "validation"}[split]
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise TaskError(
            f"{task}: no data dir given and the datasets package is not installed; pass --data-dir DIR"
            " (a folder with the task's files)"
        ) from None
    try:
        return hub_rows(path, name, hub_split, PRESETS[task])
    except TaskError as exc:
        if exc.__cause__ is None:
            raise
        raise TaskError(f"{task}: {exc}; pass --data-dir DIR") from exc.__cause__


def _sample(examples, n: int | None, seed: int, what: str):
    if n is None:
        return examples
    if n > len(examples):
        logger.info("%s: n=%d is more than its %d examples; using all of them", what, n, len(examples))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # a shuffled prefix, so a smaller n keeps a subset of a larger one
    return examples.take(order[:n])


def load_examples(
    task: str, split: str, *, data_dir: str | Path | None = None, n: int | None = None, seed: int = 0
) -> Sequence[Example]:
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
    _check_n(n)
    if task == "synthetic":
        return _synthetic(split, n if n is not None else _SYNTHETIC_SIZE[split], seed)
    if data_dir is not None:
        examples = _load_local(task, split, Path(data_dir).expanduser())
    else:
        examples = _load_hub(task, split)
    return _sample(examples, n, seed, f"{task} {split}")


def _check_n(n) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise TaskError(f"n must be a positive integer or None, got {n!r}")


def file_format(cfg) -> Format:
    """The Format of a run's own files (--train-file or --dataset): a preset's when --task names
    one, else classification when --verbalizers is given, else generation (prompt and completion)."""
    if cfg.task in PRESETS:
        return PRESETS[cfg.task]
    if cfg.verbalizers:
        template = cfg.template or "{" + cfg.text_field + "}"
        return Format("file", template=template, verbalizers=parse_verbalizers(cfg.verbalizers),
                      label_field=cfg.label_field)  # fmt: skip
    return Format("file", kind="generation", prompt_field=cfg.prompt_field, completion_field=cfg.completion_field)


def load_file_examples(cfg, split: str, n: int | None = None, seed: int = 0) -> Rows:
    """A split of the run's own data: --train-file / --eval-file, or --dataset's train / eval split."""
    _check_n(n)
    fmt = file_format(cfg)

    def chat():
        from hosl.models import hf_tokenizer

        if cfg.model.startswith("builtin:"):
            raise TaskError("a messages column needs a model whose tokenizer has a chat template; a built-in has none")
        return chat_renderer(hf_tokenizer(cfg.model, cfg.gguf_file))

    if cfg.dataset:
        name = cfg.train_split if split == "train" else cfg.eval_split
        rows = hub_rows(cfg.dataset, cfg.dataset_config, name, fmt, chat)
    else:
        rows = file_rows(cfg.train_file if split == "train" else cfg.eval_file, fmt, chat)
    return _sample(rows, n, seed, f"{rows.where}")


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
            examples.append(PRESETS["sst2"].example({"sentence": sentence, "label": str(label)}, "synthetic"))
    return examples[:n]


def synthetic_words() -> list[str]:
    """Every word the synthetic task's sentences, prompt and answers use, sorted."""
    template = PRESETS["sst2"].example({"sentence": "", "label": "0"}, "synthetic")
    prompt = template.context + "".join(template.candidates)
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


def load_run_data(cfg) -> tuple[Sequence[Example], Sequence[Example]]:
    """A run's (training, evaluation) examples: --task from --data-dir, or the run's own files
    (--train-file / --eval-file, --dataset), sampled with --seed (the evaluation draw with seed + 1).
    TaskError when either is empty."""
    if cfg.train_file or cfg.dataset:
        train = load_file_examples(cfg, "train", n=cfg.train_examples, seed=cfg.seed)
        evals = load_file_examples(cfg, "eval", n=cfg.eval_examples, seed=cfg.seed + 1)
    else:
        train = load_examples(cfg.task, "train", data_dir=cfg.data_dir, n=cfg.train_examples, seed=cfg.seed)
        evals = load_examples(cfg.task, "eval", data_dir=cfg.data_dir, n=cfg.eval_examples, seed=cfg.seed + 1)
    if not train or not evals:
        raise TaskError(f"task {cfg.task} has no {'training' if not train else 'evaluation'} examples")
    return train, evals


def check_fits(tokenizer: Tokenizer, examples: Sequence[Example], max_length: int, what: str) -> None:
    """Every generation example's prompt and completion within max_length tokens (with bos): a cut
    prompt would train on a fragment. TaskError naming the first that is not. Classification
    contexts may lose their start (MeZO's rule); their answers are checked when encoded."""
    bos = 0 if tokenizer.bos_token_id is None else 1
    for i in range(len(examples)):
        ex = examples[i]
        if not ex.generation:
            return
        n = len(tokenizer.encode(ex.context + ex.candidates[0])) + bos
        if n > max_length:
            where = getattr(examples, "where", what)
            row = examples.indices[i] if getattr(examples, "indices", None) is not None else i
            raise TaskError(f"{where}: row {row + 1} is {n} tokens, more than --max-length {max_length}")


class Batches:
    """The training batch of every step: a fresh seeded permutation per epoch, so the batch of step t
    depends only on (seed, t) and a resumed run sees the same data as an uninterrupted one."""

    def __init__(self, examples, tokenizer, cfg, stream: int = 0):
        self.examples, self.tokenizer, self.cfg = examples, tokenizer, cfg
        self.stream = stream  # a client of a many-client run walks its shard in its own order
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            seed = self.cfg.seed * 1_000_003 + epoch
            if self.stream:
                seed = int.from_bytes(
                    hashlib.blake2b(f"hosl:data:{seed}:{self.stream}".encode(), digest_size=7).digest()
                )
            g = torch.Generator().manual_seed(seed)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perms[epoch]

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        n, b = len(self.examples), self.cfg.batch_size
        picked = [self.examples[self._perm(i // n)[i % n]] for i in range(step * b, step * b + b)]
        return encode_for_training(self.tokenizer, picked, self.cfg.max_length)
