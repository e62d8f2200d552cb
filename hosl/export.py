"""`python -m hosl.export RUN_DIR OUT_DIR`: a trained run as one Hugging Face model directory.

The client's and the server's weights are joined back into the unsplit model, which is written with
`save_pretrained` (config.json and model.safetensors) beside its tokenizer, so that
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it and computes what the split
pair computed. The weights are the run's final ones, or, for a run that has not finished, those of
its newest checkpoint; either is verified against its manifest first (hosl.checkpoint).

A head tied to the input embedding is copied for the server when the model is cut, and the two
train apart: the export then holds both, untied (config.tie_word_embeddings = False), the embedding
as the client trained it and the head as the server did. A model read from a GGUF file is written as
float32 safetensors. A built-in model's word-level tokenizer is written as a transformers one
(tokenizer.json, on the tokenizers library's WordLevel model), which AutoTokenizer loads and which
encodes every text as the run did.

A LoRA run exports either way. With --merge, each adapter is merged into the weight it adapts
(W + (alpha/r) BA) and the model is written without peft. Without it, as a PEFT adapter directory
(adapter_config.json, adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, OUT_DIR)`
loads onto the base model: --model's, or for a built-in model the untrained one, written to
OUT_DIR/base since it exists nowhere else. An adapter carries only adapter weights, so this needs
adapters on both sides (a side without them trains its base weights); else use --merge.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hosl import checkpoint
from hosl.config import TrainConfig
from hosl.plan import method_of


class ExportError(ValueError):
    """A run that cannot be exported as asked: one line, exit status 2."""


def _weights_dir(run_dir: Path) -> Path:
    """Where the weights to export are: the run directory once finished, else its newest checkpoint."""
    if (run_dir / "summary.json").exists():
        from hosl.replay import verify_run

        verify_run(run_dir)
        return run_dir
    point = checkpoint.latest(run_dir, run_dir / "config.json")
    if point is None:
        raise ExportError(f"{run_dir}: neither final weights (the run has not finished) nor a checkpoint")
    return point.path


def _merge_lora(model: torch.nn.Module) -> None:
    """Merge every LoRA layer of model into its base layer and put the base layer in its place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.get_base_layer())
    model.__dict__.pop("peft_config", None)  # peft's marks on the model; save_pretrained would follow them
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False


def export(run_dir: str | Path, out_dir: str | Path, *, merge: bool = False) -> Path:
    """Write RUN_DIR's model to OUT_DIR (new or empty) as a save_pretrained directory; returns OUT_DIR.
    merge: merge a LoRA run's adapters into the weights (needed for LoRA runs)."""
    from safetensors.torch import load_file

    from hosl.checkpoint import load_tensors
    from hosl.models import build
    from hosl.split import split_model
    from hosl.tasks import load_run_data

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.json").is_file():
        raise ExportError(f"{run_dir}: no config.json (not a hosl run directory?)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty")
    cfg = TrainConfig.from_json((run_dir / "config.json").read_text(encoding="utf-8"))
    lora = bool(cfg.client_lora_r or cfg.server_lora_r)
    if lora and not merge and not (cfg.client_lora_r and cfg.server_lora_r):
        raise ExportError(
            "this LoRA run trained one side's base weights, which a PEFT adapter cannot carry: export it with --merge"
        )
    source = _weights_dir(run_dir)
    examples = load_run_data(cfg)[0] if cfg.model.startswith("builtin:") else []  # a built-in vocabulary
    tokenizer, model = build(cfg, examples)
    if lora and not merge:
        return _export_adapter(cfg, model, tokenizer, source, out_dir)
    if method_of(cfg.method).split:
        client, server = split_model(model, cfg.split_layer)  # the sides share the model's tensors
        load_tensors(client, load_file(source / "client.safetensors"))
        load_tensors(server, load_file(source / "server.safetensors"))
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        trained_head = server.lm.get_output_embeddings().weight
        if head is not None and head.weight is embedding.weight:  # tied in the model, apart in the run
            head.weight = torch.nn.Parameter(trained_head.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model, "_tied_weights_keys"):
                model._tied_weights_keys = []
    else:
        load_tensors(model, load_file(source / "model.safetensors"))
    if lora:
        _merge_lora(model)
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF file: dequantised to float32 on load
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    _save_tokenizer(tokenizer, out_dir)
    return out_dir


def _export_adapter(cfg: TrainConfig, model, tokenizer, source: Path, out_dir: Path) -> Path:
    """A PEFT adapter directory of a run with adapters on both sides (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    from hosl.checkpoint import load_tensors
    from hosl.split import split_model

    config = model.peft_config["default"]
    base_path = cfg.model
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.startswith("builtin:"):  # the base, before any adapter trained: no weight but the adapters changes
        _, base = _build_base(cfg)
        base.save_pretrained(out_dir / "base", safe_serialization=True)
        base_path = str(out_dir / "base")
    client, server = split_model(model, cfg.split_layer, check=False)
    load_tensors(client, load_file(source / "client.safetensors"))
    load_tensors(server, load_file(source / "server.safetensors"))
    adapters = {
        "base_model.model." + name.replace(".default", ""): p.detach().contiguous()
        for name, p in model.named_parameters()
        if "lora_" in name
    }
    save_file(adapters, out_dir / "adapter_model.safetensors")
    config.base_model_name_or_path = base_path
    config.save_pretrained(str(out_dir))
    _save_tokenizer(tokenizer, out_dir)
    return out_dir


def _build_base(cfg: TrainConfig):
    import dataclasses

    from hosl.models import build
    from hosl.tasks import load_run_data

    plain = dataclasses.replace(cfg, lora_r=0, client_lora_r=0, server_lora_r=0)
    return build(plain, load_run_data(plain)[0])


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    (tokenizer.hf if hasattr(tokenizer, "hf") else tokenizer.to_hf()).save_pretrained(out_dir)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    merge = "--merge" in argv
    argv = [a for a in argv if a != "--merge"]
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        print("usage: python -m hosl.export RUN_DIR OUT_DIR [--merge]", file=sys.stderr)
        return 2
    try:
        out = export(*argv, merge=merge)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {argv[0]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
