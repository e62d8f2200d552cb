"""Models and tokenizers for the trainer: built-in configs (random init, no network) and Hugging Face
checkpoints (a local directory, a GGUF file in one, or a hub id)."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import socket
import sys
import urllib.parse
import warnings
from pathlib import Path

import torch

from hosl.tokenizers import HFTokenizer, WordTokenizer

# Built-in architectures, by name. Sizes other than vocab_size are fixed; vocab_size comes from the
# tokenizer. "tiny" is what the embedded default run trains; the larger ones have the shapes of
# real models (for memory and speed measurements; their weights are random).
BUILTIN = {
    "tiny": (
        "llama",
        dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128),
    ),
    "tiny-opt": ("opt", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=128)),
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192)),
    "smollm2-135m": (
        "llama",
        dict(
            hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
        ),
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model named cannot be built or loaded; the message says why."""


def builtin_config(name: str, vocab_size: int, max_positions: int, *, pad_token_id=0, bos_token_id=2, eos_token_id=3):
    import transformers

    if name not in BUILTIN:
        raise ModelError(f"unknown built-in model {name!r}; choose from {', '.join('builtin:' + n for n in BUILTIN)}")
    family, sizes = BUILTIN[name]
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if family == "opt":
        return transformers.OPTConfig(
            vocab_size=vocab_size, max_position_embeddings=max(max_positions, 2048),
            word_embed_proj_dim=sizes["hidden_size"], dropout=0.0, attention_dropout=0.0, **sizes, **ids,
        )  # fmt: skip
    return transformers.LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=max(max_positions, 2048), tie_word_embeddings=False,
        **sizes, **ids,
    )  # fmt: skip


def check_model_name(name: str) -> None:
    """ModelError for a --model that names a local path that is not there (before the hub is asked,
    whose answer would be about repo ids). A hub id has one slash; a path starts with /, . or ~, or
    has more."""
    if name.startswith("builtin:"):
        return
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") >= 2
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelError(f"--model {name}: no such directory")


def check_hub_reachable(name: str, gguf_file: str | None = None) -> None:
    """ModelError at once for a --model that is neither built in, a local directory nor in the local
    Hugging Face cache when the hub's host does not resolve (no network), instead of the hub
    client's minute of retries that ends in a message about repo ids."""
    if name.startswith("builtin:") or Path(name).expanduser().is_dir():
        return
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # transformers looks in the cache alone, and says so
    if isinstance(huggingface_hub.try_to_load_from_cache(name, gguf_file or "config.json"), str):
        return
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise ModelError(
            f"--model {name}: no such local directory, not in the Hugging Face cache, and the hub ({host}) "
            f"cannot be reached to download it ({exc.strerror or exc})"
        ) from None


def num_blocks(name: str, gguf_file: str | None = None) -> int | None:
    """The model's number of decoder blocks, read without building it (built-in shapes and local
    directories with a config.json; None when only loading the model would tell)."""
    if name.startswith("builtin:"):
        entry = BUILTIN.get(name.removeprefix("builtin:"))
        return entry[1]["num_hidden_layers"] if entry else None
    config = Path(name).expanduser() / "config.json"
    if gguf_file or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def build_model(name: str, tokenizer, *, seed: int, dtype: str = "float32", gguf_file: str | None = None):
    """The full causal LM in eval mode (dropout off: a ZO probe pair must see the same function).

    builtin:<name>: random init from `seed` with the tokenizer's vocabulary. Otherwise a local
    directory or hub id, through transformers' from_pretrained (gguf_file for a GGUF checkpoint).
    """
    import transformers

    torch_dtype = DTYPES[dtype]
    check_model_name(name)
    if name.startswith("builtin:"):
        config = builtin_config(name.removeprefix("builtin:"), tokenizer.vocab_size, 2048)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch_dtype)
    else:
        kwargs = {"dtype": torch_dtype}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load model {name!r}: {first}") from None
    return model.eval()


def build_tokenizer(name: str, task: str, examples=(), gguf_file: str | None = None):
    """The tokenizer for `name`. Built-in models use a word-level vocabulary: the synthetic task's own,
    or every word of the task's examples for a real task."""
    check_model_name(name)
    if name.startswith("builtin:"):
        if task == "synthetic":
            return WordTokenizer.for_task("synthetic")
        words = {w for ex in examples for text in (ex.context, *ex.candidates) for w in WordTokenizer.words(text)}
        return WordTokenizer(sorted(words))
    return HFTokenizer(hf_tokenizer(name, gguf_file))


@functools.lru_cache(maxsize=4)
def hf_tokenizer(name: str, gguf_file: str | None = None):
    """The transformers tokenizer of a local or hub model (loaded once a process: a conversational
    task renders its rows with it before the model is built)."""
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer of {name!r}: {first}") from None


def apply_lora(model, alpha: float, client_r: int, server_r: int, k: int, client_fa: bool = False):
    """LoRA adapters (peft) on the family's default target modules, rank client_r in blocks [0, k)
    and server_r in the rest; a side of rank 0 gets no adapters and trains in full, a side with
    adapters trains only them (client_fa: the client's only their B, LoRA-FA). Returns the adapted
    causal LM itself (peft's wrapper is dropped), so it splits like any other."""
    try:
        import peft
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    except ImportError:
        raise ModelError("--lora-r needs peft: pip install peft (or pip install 'hosl[lora]')") from None
    from hosl.split import split_model

    leaves = DEFAULT_TARGETS.get(getattr(model.config, "model_type", None))
    if not leaves:
        raise ModelError(f"cannot add LoRA to {type(model).__name__}: peft has no default target modules for it")
    client, server = split_model(model, k)  # which side each module and parameter is on
    pairs = ((client, client_r), (server, server_r))
    sides = [({id(m) for m in side.modules()}, r) for side, r in pairs]
    ranks: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in leaves:
            for modules, r in sides:
                if r and id(module) in modules:
                    ranks[name] = r
    full = [{id(p) for p in side.parameters()} for side, r in pairs if not r]
    if not ranks:
        return model
    config = peft.LoraConfig(
        r=max(ranks.values()), lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=list(ranks), rank_pattern={f"^{re.escape(n)}$": r for n, r in ranks.items()},
    )  # fmt: skip
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"cannot add LoRA to {type(model).__name__}: {exc}") from None
    lm = wrapped.base_model.model
    for p in lm.parameters():  # a side without adapters trains in full
        if any(id(p) in ids for ids in full):
            p.requires_grad_(True)
    if client_fa:  # LoRA-FA: the client's A matrices stay at their random init
        for name, module in split_model(lm, k)[0].named_modules():
            if name.rsplit(".", 1)[-1] == "lora_A":
                module.requires_grad_(False)
    return lm


def build(cfg, train_examples) -> tuple:
    """(tokenizer, model) of a run's config: the model of --model (a built-in one seeded and given
    the task's vocabulary from train_examples), with LoRA adapters where --client-lora-r and
    --server-lora-r ask. ModelError for a --split-layer the model has no room for. A bar on stderr
    follows the stages when loading takes more than 2 s."""
    with _stages("loading the model", 3) as stage:
        tokenizer = build_tokenizer(cfg.model, cfg.task, train_examples, cfg.gguf_file)
        stage("weights")
        model = build_model(cfg.model, tokenizer, seed=cfg.seed, dtype=cfg.dtype, gguf_file=cfg.gguf_file)
        stage("adapters" if cfg.client_lora_r or cfg.server_lora_r else "checks")
        return tokenizer, _adapt(cfg, model)


def _adapt(cfg, model):
    """The built model checked against --split-layer, with LoRA adapters where the config asks."""
    from hosl.plan import method_of

    n = model.config.num_hidden_layers
    if method_of(cfg.method).split and not 0 <= cfg.split_layer <= n:
        raise ModelError(f"--split-layer must be in [0, {n}] for {cfg.model} ({n} blocks), got {cfg.split_layer}")
    if cfg.client_lora_r or cfg.server_lora_r:
        torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: the same on both sides of a dist run
        k = min(cfg.split_layer, n)  # the full methods: --split-layer only says which blocks are the client's
        model = apply_lora(model, cfg.lora_alpha, cfg.client_lora_r, cfg.server_lora_r, k, cfg.client_lora_fa)
    return model


@contextlib.contextmanager
def _stages(what: str, total: int):
    """A bar on stderr over a slow phase's stages, shown only once the phase has taken 2 s (a
    built-in model loads in well under that). Yields a function that ends a stage and names the next."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        yield lambda name: None
        return
    bar = tqdm(total=total, desc=what, unit="stage", delay=2, leave=False, file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix_str("tokenizer", refresh=False)

    def stage(name: str) -> None:
        bar.update(1)
        bar.set_postfix_str(name, refresh=False)

    try:
        yield stage
    finally:
        bar.update(bar.total - bar.n)
        bar.close()


DTYPE_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_precision(cfg, device: torch.device):
    """The forward's precision: autocast on `device` to --dtype when it is low precision (the weights
    the ZO noise writes stay float32 masters), a no-op for float32."""
    dtype = DTYPE_AUTOCAST.get(cfg.dtype)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
