"""The tokenizers hosl trains with: the interface the batching in hosl.tasks needs, a word-level
tokenizer for the built-in models (no files, no network), and any Hugging Face tokenizer seen
through the same interface. hosl.models.build_tokenizer picks one for a run."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol


class Tokenizer(Protocol):
    """What the batching functions need: encode without special tokens, the pad id, and the bos id
    (None when the model reads none)."""

    pad_token_id: int
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


_WORD = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Lower-cased words and single punctuation marks over a fixed vocabulary; anything else is unk.
    Whitespace only separates, so " great" encodes like "great" inside a sentence."""

    pad_token_id = 0
    unk_token_id = 1
    bos_token_id = 2
    eos_token_id = 3
    _SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

    def __init__(self, words: Iterable[str]):
        vocab: dict[str, int] = {}
        for word in words:
            if not isinstance(word, str) or _WORD.fullmatch(word.lower()) is None:
                raise ValueError(f"a vocabulary entry must be one word or punctuation mark, got {word!r}")
            vocab.setdefault(word.lower(), len(self._SPECIALS) + len(vocab))
        self._ids = vocab

    @property
    def vocab_size(self) -> int:
        return len(self._SPECIALS) + len(self._ids)

    def vocab(self) -> dict[str, int]:
        """Every entry and its id, the special tokens first."""
        return {**{s: i for i, s in enumerate(self._SPECIALS)}, **self._ids}

    @staticmethod
    def words(text: str) -> list[str]:
        """How a text splits into vocabulary entries (lower-cased words and punctuation marks)."""
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk_token_id) for w in self.words(text)]

    def to_hf(self):
        """The same tokenizer as a transformers PreTrainedTokenizerFast (on the `tokenizers`
        library's WordLevel model), which save_pretrained writes as tokenizer.json and
        AutoTokenizer loads: lower-cased, split into words and punctuation marks as `words` splits,
        unknown entries to <unk>, and <bos> first when special tokens are added, as hosl's batching
        puts it."""
        from tokenizers import Regex, models, normalizers, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend
        from transformers import PreTrainedTokenizerFast

        backend = Backend(models.WordLevel(self.vocab(), unk_token="<unk>"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")]
        )
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", self.bos_token_id)]
        )
        names = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), self._SPECIALS))
        return PreTrainedTokenizerFast(tokenizer_object=backend, **names)

    @classmethod
    def for_task(cls, task: str = "synthetic") -> WordTokenizer:
        """The vocabulary of every word the synthetic task's sentences, prompt and answers use."""
        from hosl.tasks import TaskError, synthetic_words

        if task != "synthetic":
            raise TaskError(f"only the synthetic task has a fixed vocabulary, not {task!r}; use HFTokenizer")
        return cls(synthetic_words())


class HFTokenizer:
    """A Hugging Face tokenizer seen through the interface above. encode() never adds special tokens;
    bos_token_id is set only when the tokenizer itself starts a text with bos (OPT, Llama; not GPT-2
    or Qwen), and the batching functions prepend it. A tokenizer with no pad token pads with eos:
    padded positions are masked and never labelled, so the id is only a filler."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        bos = hf_tokenizer.bos_token_id
        probe = hf_tokenizer.encode("a", add_special_tokens=True)
        self.bos_token_id = bos if bos is not None and probe[:1] == [bos] else None
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (hf_tokenizer.eos_token_id or 0)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))
