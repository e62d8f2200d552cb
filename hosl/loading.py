"""Building one side of a saved causal LM alone (load_client, load_server): the whole model as a
skeleton on the meta device, cut as hosl.split cuts it, and only that side's tensors read from the
checkpoint, so a process never holds the other side's weights, not even while loading."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hosl.split import ClientModel, ServerModel, SplitError, _cut, _tied_names

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device as it is registered, so a
    model's skeleton costs no memory and its init functions run on meta tensors (no work).
    Buffers stay real: non-persistent ones (rotary inverse frequencies) are computed in __init__
    and are not in checkpoints."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Checkpoint:
    """Reads single tensors from a checkpoint directory without loading the rest.

    safetensors (one file or sharded with an index) is read with plain file reads straight into the
    destination tensor when the dtypes match: no memory map whose touched pages would count toward
    the process's resident set, no second copy. pytorch_model.bin is memory-mapped by torch.load.
    """

    def __init__(self, directory: Path):
        self.files: dict[str, Path] = {}
        self.entries: dict[str, tuple] = {}
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists() or single.exists():
            shards = (
                sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [single.name]
            )
            for shard in shards:
                self._read_header(directory / shard)
            return
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise SplitError(f"{directory} holds no model.safetensors(.index.json) or pytorch_model*.bin")
        for path in bins:
            for key, tensor in torch.load(path, map_location="cpu", mmap=True, weights_only=True).items():
                self.entries[key] = ("torch", tensor)

    def _read_header(self, path: Path) -> None:
        with open(path, "rb") as f:
            (size,) = torch.tensor(bytearray(f.read(8)), dtype=torch.uint8).view(torch.int64).tolist()
            header = json.loads(f.read(size))
        start = 8 + size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise SplitError(f"{path}: tensor {key} has dtype {info['dtype']}, which hosl does not read")
            lo, hi = info["data_offsets"]
            self.entries[key] = (
                "safetensors",
                path,
                _SAFETENSORS_DTYPES[info["dtype"]],
                info["shape"],
                start + lo,
                hi - lo,
            )

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def read_into(self, key: str, out: torch.Tensor) -> None:
        entry = self.entries[key]
        if entry[0] == "torch":
            src = entry[1]
            if tuple(src.shape) != tuple(out.shape):
                raise SplitError(
                    f"checkpoint tensor {key} has shape {tuple(src.shape)}, the model wants {tuple(out.shape)}"
                )
            out.copy_(src)
            return
        _, path, dtype, shape, offset, nbytes = entry
        if tuple(shape) != tuple(out.shape):
            raise SplitError(f"checkpoint tensor {key} has shape {tuple(shape)}, the model wants {tuple(out.shape)}")
        direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct else torch.empty(shape, dtype=dtype)  # one tensor's staging, on the host
        with open(path, "rb") as f:
            f.seek(offset)
            view = memoryview(target.view(torch.uint8).reshape(-1).numpy()) if nbytes else memoryview(b"")
            if f.readinto(view) != nbytes:
                raise SplitError(f"{path} is truncated inside tensor {key}")
        if target is not out:
            out.copy_(target)


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as exc:  # no network, unknown id, ...
        raise SplitError(f"{name_or_path!s} is not a local model directory and could not be fetched: {exc}") from exc


def _load_side(name_or_path, k: int, side: str, dtype: torch.dtype | None, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = _resolve(name_or_path)
    config = AutoConfig.from_pretrained(directory)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = _tied_names(model)
    buffer_names = {id(b): n for n, b in model.named_buffers()}
    client, server, clones = _cut(model, k)
    part = client if side == "client" else server
    origin = {id(clone): orig for orig, clone in clones.items()}
    checkpoint = _Checkpoint(directory)
    storage = _one_buffer(part, device)
    real: dict[int, nn.Parameter] = {}
    for module in part.modules():
        for pname, p in module._parameters.items():
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in real:
                keys = names.get(origin.get(id(p), id(p)), [])
                key = next((key for key in keys if key in checkpoint), None)
                if key is None:
                    raise SplitError(f"{directory}: no tensor for {' or '.join(keys) or pname} in the checkpoint")
                data = storage(p) if storage else torch.empty(p.shape, dtype=p.dtype, device=device)
                checkpoint.read_into(key, data)
                real[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[pname] = real[id(p)]
        for bname, b in module._buffers.items():
            key = buffer_names.get(id(b)) if b is not None else None
            if key is not None and key in checkpoint and bname not in module._non_persistent_buffers_set:
                checkpoint.read_into(key, b)
    return part.to(device).eval()  # the buffers; the parameters are there already. Eval: as from_pretrained


def _one_buffer(part: nn.Module, device):
    """When every meta parameter of `part` has one dtype: a function giving each (in the order of
    part.parameters(), which is the order the loop above meets them) its place in one contiguous
    buffer. A ZO client's FlatParams then adopts that buffer instead of copying the weights into a
    new one, which would hold the largest tensor (often the embedding) twice while it packs."""
    params = [p for p in part.parameters() if p.device.type == "meta"]
    if not params or len({p.dtype for p in params}) != 1:
        return None
    buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
    places = {}
    start = 0
    for p in params:
        places[id(p)] = buffer[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return lambda p: places[id(p)]


def load_client(name_or_path: str | Path, k: int, *, dtype: torch.dtype | None = None, device="cpu") -> ClientModel:
    """Build only the client side (embeddings and blocks 0..k-1) of a saved causal LM.

    The whole model is first built as a skeleton whose parameters are on the meta device (no
    memory); then only the client's tensors are read from the checkpoint (safetensors or
    pytorch_model.bin, in a local directory or a hub id). The server's weights are never read, so
    the process's peak memory while loading stays near the client's own weights. dtype defaults to
    the checkpoint's (config.dtype). The weights are allocated on `device` and read into place there
    (through one tensor's staging copy on the host when the device is not the CPU). Like
    from_pretrained, the result is in eval mode.
    """
    return _load_side(name_or_path, k, "client", dtype, device)


def load_server(name_or_path: str | Path, k: int, *, dtype: torch.dtype | None = None, device="cpu") -> ServerModel:
    """Build only the server side (blocks k.., final norm, head) of a saved causal LM; see load_client.
    A head tied to the input embedding is read from the embedding's tensor."""
    return _load_side(name_or_path, k, "server", dtype, device)
