"""Tasks as tables: rows read through `datasets` (csv, tsv, json, jsonl, parquet files, or a dataset
by hub name or local folder) and turned into Examples by a Format.

A Format is the whole task definition, as data:
  * classification: a template (a format string over the row's columns, "{text} It was") and
    verbalizers (label value -> answer, in candidate order). An answer follows the prompt after one
    space unless the prompt ends in whitespace (MeZO's SST-2 answers are " great" after "It was";
    its SuperGLUE prompts end in a newline and the answer starts the next line). Evaluation ranks
    the answers (hosl.scoring).
  * generation (TRL's prompt-completion shape): a prompt column and a completion column, joined as
    they are; the loss is on the completion's tokens, evaluation is the eval completions' mean loss
    per token and its perplexity.

The six benchmark tasks of hosl.tasks are Formats too (presets), with two that derive a column
first (BoolQ's question, WSC's nested spans): `prepare`.

The rows stay in `datasets`' memory-mapped Arrow files: Rows is a Sequence that builds an Example
when it is indexed. Every row is checked once when the file is read (one pass, nothing kept), so a
bad row is refused before a run starts, with the file, the row and what is wrong.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Example",
    "Format",
    "Rows",
    "TaskError",
    "chat_renderer",
    "parse_verbalizers",
    "read_table",
    "template_fields",
]

logger = logging.getLogger(__name__)

KINDS = ("classification", "generation")
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class TaskError(ValueError):
    """A task cannot be loaded as asked (unknown name or split, missing or malformed data); the
    message is one line naming the bad value or file."""


@dataclass(frozen=True)
class Example:
    """One example: the prompt, the answers and the gold answer's index. `context + candidates[i]`
    is the full text for answer i. A generation example has one candidate, its completion."""

    context: str
    candidates: tuple[str, ...]
    label: int
    generation: bool = False

    def __post_init__(self):
        if not self.candidates:
            raise ValueError(f"an Example needs at least one candidate, got {self.candidates!r}")
        if not 0 <= self.label < len(self.candidates):
            raise ValueError(f"label {self.label} is out of range for {len(self.candidates)} candidates")
        if self.generation and len(self.candidates) != 1:
            raise ValueError("a generation example has one candidate, its completion")


def template_fields(template: str) -> tuple[str, ...]:
    """The columns a template names, in order, each once; TaskError for a template that names none
    or uses positions ("{}", "{0}") or attributes."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TaskError(f"--template {template!r}: {exc}") from None
    names: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".["):
            raise TaskError(f"--template {template!r}: name a column in each {{}}, as in {{text}} (got {{{name}}})")
        if name not in names:
            names.append(name)
    if not names:
        raise TaskError(f"--template {template!r} names no column; put one in braces, as in {{text}}")
    return tuple(names)


def parse_verbalizers(text: str) -> tuple[tuple[str, str], ...]:
    """--verbalizers as (label value, answer) pairs in candidate order: "0: terrible, 1: great", or a
    JSON object {"0": "terrible", "1": "great"} (for answers holding a comma or a colon)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"--verbalizers: not a JSON object ({exc.msg})") from None
        if not isinstance(pairs, dict) or not all(isinstance(v, str) for v in pairs.values()):
            raise TaskError("--verbalizers: a JSON object of label -> answer text")
        items = [(str(k), v) for k, v in pairs.items()]
    else:
        items = []
        for part in text.split(","):
            label, sep, answer = part.partition(":")
            if not sep:
                raise TaskError(
                    f"--verbalizers: {part.strip()!r} is not label: answer (as in '0: terrible, 1: great')"
                )
            items.append((label.strip(), answer.strip()))
    if len(items) < 2:
        raise TaskError(f"--verbalizers: give at least two labels' answers, got {len(items)}")
    labels = [k for k, _ in items]
    if any(not k for k in labels) or len({k.casefold() for k in labels}) != len(labels):
        raise TaskError(f"--verbalizers: labels must be distinct and not empty, got {labels}")
    if any(not a for _, a in items):
        raise TaskError(f"--verbalizers: every label needs a non-empty answer, got {dict(items)}")
    return tuple(items)


def _label_keys(value: Any, names: Sequence[str] | None) -> list[str]:
    """What a label value may be called in the verbalizers, in the order they are tried: booleans as
    true/false, a ClassLabel integer as its class name and then as its number, other integers and
    strings as written."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, int):
        return ([names[value]] if names and 0 <= value < len(names) else []) + [str(value)]
    if isinstance(value, float) and value.is_integer():
        return [str(int(value))]
    if isinstance(value, str):
        return [value.strip()]
    return []


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)  # fmt: skip


@dataclass(frozen=True)
class Format:
    """How a table's row becomes an Example (see the module docstring). `name` is the task's name
    in messages; `fields` the text columns every row must hold (default: the template's)."""

    name: str
    kind: str = "classification"
    template: str = "{text}"
    verbalizers: tuple[tuple[str, str], ...] = ()
    label_field: str = "label"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    fields: tuple[str, ...] = ()
    prepare: Callable[[dict, str], dict] | None = None  # presets: columns derived from the row's
    messages_field: str | None = None  # generation from conversations, rendered by `chat`
    chat: Callable[[list], tuple[str, str]] | None = None  # messages -> (prompt, completion)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "classification":
            if len(self.verbalizers) < 2:
                raise TaskError(f"{self.name}: a classification task needs at least two verbalizers")
            if not self.fields:
                object.__setattr__(self, "fields", template_fields(self.template))

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a table must have."""
        if self.kind == "generation":
            return (self.messages_field,) if self.messages_field else (self.prompt_field, self.completion_field)
        return (*self.fields, self.label_field)

    def _text(self, row: dict, name: str, where: str) -> str:
        value = row.get(name)
        if not isinstance(value, str):
            raise TaskError(f"{where}: {self.name} field {name} must be a string, got {_type_name(value)}")
        if "\0" in value:
            raise TaskError(f"{where}: {self.name} field {name} holds a NUL byte")
        return value

    def _conversation(self, messages: Any, where: str) -> tuple[str, str]:
        """A conversation (TRL's `messages`: a list of {"role", "content"}, the last the assistant's)
        as the prompt (every turn before the last, and the template's opening of the assistant's
        turn) and the completion (the last turn as the template renders it)."""
        field = self.messages_field
        if not isinstance(messages, list) or not messages:
            raise TaskError(f"{where}: {field} must be a non-empty list of messages, got {_type_name(messages)}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TaskError(f"{where}: {field}[{i}] must be an object with a role and a text content")
            if "\0" in m["content"]:
                raise TaskError(f"{where}: {field}[{i}] holds a NUL byte")
        if messages[-1]["role"] != "assistant":
            raise TaskError(f"{where}: the last message is the one trained on and must be the assistant's, "
                            f"not {messages[-1]['role']!r}")  # fmt: skip
        # Arrow gives every message the union of all messages' keys (None where absent): keep the two.
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return self.chat(messages)
        except Exception as exc:  # the template's own errors (jinja's, the tokenizer's)
            raise TaskError(f"{where}: the chat template cannot render it ({exc})") from None

    def example(self, row: dict, where: str, label_names: Sequence[str] | None = None) -> Example:
        missing = [f for f in self.columns if f not in row]
        if missing:
            what = "see --help for the fields" if self.name == "file" else f"is this {self.name} data?"
            raise TaskError(f"{where}: a {self.name} record needs field(s) {', '.join(missing)} ({what})")
        if self.kind == "generation" and self.messages_field:
            prompt, completion = self._conversation(row[self.messages_field], where)
        elif self.kind == "generation":
            prompt = self._text(row, self.prompt_field, where)
            completion = self._text(row, self.completion_field, where)
        if self.kind == "generation":
            if not completion.strip():
                raise TaskError(f"{where}: the completion ({self.completion_field}) is empty")
            return Example(prompt, (completion,), 0, generation=True)
        for name in self.fields:
            self._text(row, name, where)
        if self.prepare is not None:
            row = self.prepare(row, where)
        answers = dict(self.verbalizers)
        folded = {k.casefold(): k for k in answers}  # True/true, Entailment/entailment
        keys = _label_keys(row[self.label_field], label_names)
        key = next((k for k in keys if k in answers), None) or next(
            (folded[k.casefold()] for k in keys if k.casefold() in folded), None
        )
        if key is None:
            value = row[self.label_field]
            raise TaskError(f"{where}: {self.name} label {value!r} has no verbalizer (labels: {', '.join(answers)})")
        # MeZO strips spaces around the prompt and, with no demonstrations, any leading whitespace.
        context = self.template.format_map(row).strip(" ").lstrip()
        glue = "" if not context or context[-1].isspace() else " "
        labels = [k for k, _ in self.verbalizers]
        return Example(context, tuple(glue + a for _, a in self.verbalizers), labels.index(key))


# --- Reading tables -------------------------------------------------------------------------------------


def _datasets():
    try:
        import datasets
    except ImportError:
        raise TaskError("reading task files needs the datasets package: pip install datasets") from None
    return datasets


def _text_lines(path: Path):
    """The file's lines as text; TaskError naming the exact line (and byte in it) of bytes that are
    not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TaskError(
                    f"{path}:{number}: not UTF-8 (byte {exc.start + 1} of the line: {exc.reason})"
                ) from None


def _locate(path: Path, fmt: str) -> None:
    """After `datasets` failed on a text file: the first line that is not UTF-8, not JSON or not a
    JSON object (jsonl), as a TaskError."""
    if fmt == "parquet":
        return
    suffix = path.suffix.lower()
    for number, text in _text_lines(path):
        if suffix == ".jsonl" and text.strip():
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise TaskError(
                    f"{path}:{number}: not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})"
                ) from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")


def _delimited(path: Path, delimiter: str, quoting: int) -> list[str]:
    """The header of a csv or tsv file, after one strict pass over it: UTF-8, and every record with
    as many fields as the header (pandas would fill a short row or shift a long one)."""
    lines = _text_lines(path)
    reader = csv.reader((text for _, text in lines), delimiter=delimiter, quoting=quoting)
    header, count = None, 0
    try:
        for record in reader:
            count += 1
            if header is None:
                header = record
                if not header or any(not h.strip() for h in header) or len(set(header)) != len(header):
                    raise TaskError(f"{path}:1: the header needs distinct, non-empty column names, got {header!r}")
            elif record and len(record) != len(header):
                kind = "tab-separated" if delimiter == "\t" else "comma-separated"
                raise TaskError(f"{path}:{reader.line_num}: expected {len(header)} {kind} fields, got {len(record)}")
            elif any("\0" in field for field in record):
                raise TaskError(f"{path}:{reader.line_num}: a field holds a NUL byte")
    except csv.Error as exc:  # a field over the csv module's size limit, a NUL byte, a quote left open
        raise TaskError(f"{path}:{reader.line_num}: {exc}") from None
    if header is None:
        raise TaskError(f"{path} is empty (a csv or tsv file starts with a header of column names)")
    if count == 1:
        raise TaskError(f"{path} holds no examples")
    return header


@contextlib.contextmanager
def _quiet(datasets):
    """datasets logs a builder's failure as an ERROR line before raising it, and draws a progress bar
    per split: the one line the user gets is the TaskError."""
    log = logging.getLogger(datasets.__name__)
    level, bars = log.level, datasets.is_progress_bar_enabled()
    log.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()  # a local file's Arrow cache is written in moments
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def read_table(path: str | Path):
    """A file's rows as a `datasets.Dataset` (memory-mapped Arrow): .csv (quoted as Python's csv
    module does), .tsv (tab-separated, no quoting: quotes are text, as in GLUE's files), .json
    (JSON Lines or one array of objects), .jsonl, .parquet. csv and tsv columns are read as text.
    TaskError naming the file (and the line, when it can be found) when it cannot be read."""
    path = Path(path).expanduser()
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TaskError(
            f"{path}: unknown format {path.suffix or '(no suffix)'}; use .csv, .tsv, .json, .jsonl or .parquet"
        )
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    datasets = _datasets()
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        tsv = path.suffix.lower() == ".tsv"
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if tsv else (",", csv.QUOTE_MINIMAL)
        header = _delimited(path, delimiter, quoting)
        features = datasets.Features({h: datasets.Value("string") for h in header})
        kwargs = {"sep": delimiter, "quoting": quoting, "keep_default_na": False, "features": features,
                  "index_col": False}  # fmt: skip
    try:
        with _quiet(datasets):
            table = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # the builders raise many types; all mean: this file cannot be read
        _locate(path, fmt)
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise TaskError(f"{path}: cannot be read as {path.suffix.lstrip('.')} ({reason})") from None
    if len(table) == 0:
        raise TaskError(f"{path} holds no examples")
    return table


def label_names(table, field: str) -> list[str] | None:
    """The class names of a ClassLabel column (hub datasets store labels as their integers)."""
    feature = getattr(table, "features", {}).get(field)
    return list(feature.names) if hasattr(feature, "names") else None


class Rows(Sequence):
    """A table's rows as Examples, built when indexed; `indices` picks and orders rows (a sample).
    Slicing gives a list."""

    def __init__(self, table, fmt: Format, where: str, indices: Sequence[int] | None = None):
        self.table, self.format, self.where = table, fmt, where
        self.indices = indices
        self._names = label_names(table, fmt.label_field)

    def __len__(self) -> int:
        return len(self.table) if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = self.indices[i] if self.indices is not None else i % len(self)
        return self.format.example(self.table[row], f"{self.where}: row {row + 1}", self._names)

    def __eq__(self, other) -> bool:  # as the list of its Examples
        if isinstance(other, (list, tuple, Rows)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def take(self, indices: Sequence[int]) -> Rows:
        """These rows (positions in this sequence), in this order."""
        base = range(len(self.table)) if self.indices is None else self.indices
        return Rows(self.table, self.format, self.where, [base[i] for i in indices])

    def check(self) -> None:
        """Every row built once (nothing kept): the first bad row's TaskError."""
        missing = [c for c in self.format.columns if c not in self.table.column_names]
        if missing:
            columns = ", ".join(self.table.column_names)
            if self.format.name != "file":
                hint = f"is this {self.format.name} data?"
            elif self.format.kind == "generation":
                hint = "generation reads --prompt-field and --completion-field; classification needs --verbalizers"
            else:
                hint = "name the columns with --template, --text-field and --label-field"
            raise TaskError(f"{self.where}: no column {', '.join(missing)} (its columns: {columns}; {hint})")
        n = 0
        for batch in self.table.iter(batch_size=1024):
            columns = list(batch)
            for j in range(len(batch[columns[0]]) if columns else 0):
                self.format.example({c: batch[c][j] for c in columns}, f"{self.where}: row {n + 1}", self._names)
                n += 1


def locate_bad_bytes(path: Path) -> None:
    """The first line of a text file that is not UTF-8, as a TaskError (nothing when there is none)."""
    for _ in _text_lines(path):
        pass


def chat_renderer(hf_tokenizer) -> Callable[[list], tuple[str, str]]:
    """messages -> (prompt, completion) through a Hugging Face tokenizer's chat template: the prompt
    is the conversation before its last turn with the assistant's turn opened
    (add_generation_prompt), the completion what the whole conversation adds to it (the last turn
    and its end-of-turn marker). TaskError for a tokenizer without a template."""
    if not getattr(hf_tokenizer, "chat_template", None):
        raise TaskError("a messages column needs a model whose tokenizer has a chat template; this one has none")

    def render(messages: list) -> tuple[str, str]:
        prompt = hf_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = hf_tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the whole conversation does not start with its rendered prompt")
        return prompt, full[len(prompt) :]

    return render
