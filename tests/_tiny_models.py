"""Tiny causal LMs of each supported family, built from configs (random weights, no hub)."""

import torch
import transformers

VOCAB = 97
LAYERS = 4
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(
    _COMMON, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64,
)  # fmt: skip


def config(family: str, **overrides):
    """A config for `family` with 4 blocks of width 32; overrides win."""
    if family == "opt":
        kw = dict(
            _COMMON, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=64, word_embed_proj_dim=32,
        )  # fmt: skip
        return transformers.OPTConfig(**{**kw, **overrides})
    if family == "gpt2":
        kw = dict(_COMMON, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64)
        return transformers.GPT2Config(**{**kw, **overrides})
    gqa = dict(num_key_value_heads=2)
    extra = {
        "gpt_neox": ("GPTNeoXConfig", {}),
        "llama": ("LlamaConfig", gqa),
        "mistral": ("MistralConfig", dict(gqa, sliding_window=3)),  # smaller than the test sequences
        "qwen2": ("Qwen2Config", gqa),
        "qwen3": ("Qwen3Config", dict(gqa, head_dim=8)),
        "gemma": ("GemmaConfig", dict(gqa, head_dim=8)),
        "gemma2": ("Gemma2Config", dict(gqa, head_dim=8, sliding_window=3)),  # alternating sliding/full
        "phi": ("PhiConfig", {}),
        "phi3": ("Phi3Config", gqa),
        "olmo": ("OlmoConfig", gqa),  # a final norm without parameters
        "olmo2": ("Olmo2Config", gqa),
        "granite": ("GraniteConfig", dict(gqa, embedding_multiplier=2.0, logits_scaling=4.0)),
        "starcoder2": ("Starcoder2Config", dict(gqa, sliding_window=3)),
    }
    cls, kw = extra[family]
    return getattr(transformers, cls)(**{**_DECODER, **kw, **overrides})


FAMILIES = ["opt", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3",
            "olmo", "olmo2", "granite", "starcoder2"]  # fmt: skip


def model(family: str, seed: int = 0, **overrides):
    """A tiny causal LM in eval mode with fixed random weights."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config(family, **overrides)).eval()


def batch(seed: int = 0, batch: int = 3, seq: int = 9, padding: str = "right"):
    """input_ids, attention_mask and labels with ragged lengths padded on one side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pad in enumerate(range(0, 2 * batch, 2)):
        if pad:
            if padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, seq - pad :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels
