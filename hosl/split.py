"""Cut a Hugging Face causal LM after decoder block k: a client (embeddings and blocks 0..k-1) and a
server (blocks k.., final norm, head, loss) that together compute what the unsplit model computes.

How the cut is found, from the model's own structure rather than a list of classes:
  * the blocks are the ModuleList with one entry per layer (config.num_hidden_layers); its parent
    is the *stack* (LlamaModel, GPT2Model, OPTDecoder, ...), whose forward embeds, loops over the
    blocks and applies the final norm;
  * the stack's other children are sorted by where its forward first uses them: before the loop
    over the blocks, those with parameters belong to the client (token and position embeddings,
    OPT's project_in) and the parameter-free ones (rotary tables) run on both sides; after it, every
    one belongs to the server (final norm, with or without parameters as in OLMo, OPT's project_out).

How each side runs, through the family's own code (so masks, positions and rotary embeddings are
whatever the family computes, for any padding):
  * the client runs a copy of the stack whose block list is blocks[:k] and whose post-loop
    modules are identities: its output is exactly the input of block k;
  * the server runs a copy of the whole causal LM (so head, logit scaling and loss are the
    family's) with blocks[k:], called with inputs_embeds=h; its client-owned modules are
    parameter-free stubs, and the first module after the cut (block k, or the final norm when
    k equals the number of blocks) takes h as its input in place of whatever the embedding
    stage computed. That replacement is what makes families that transform inputs_embeds
    (OPT's project_in; GPT-2 and OPT add positions and, in training, dropout) come out right.
  * Each side gets its own copy of the config with the layer count (and per-layer lists such as
    `layer_types`) cut to its blocks, because some families pick a block's mask by its index in
    the loop.

What split_model does to the model you pass: nothing to its structure. The two sides are new
module trees built from shallow copies of the containers; they share the parameter tensors (no
weight is copied) except a head tied to the input embedding, which the server gets as its own
copy (the client owns the embedding; the tie cannot cross the network). Training either side
therefore changes the shared tensors in the original model too, and so do .train()/.eval() on a
side (they set the shared blocks' flags); the original model's own tie is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import re
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Activation",
    "ClientModel",
    "FrozenPrefix",
    "ServerModel",
    "SplitError",
    "SplitSummary",
    "labelled_forward",
    "labelled_positions",
    "check_split",
    "client_blocks",
    "split_model",
    "split_summary",
    "train_last_blocks",
]


class SplitError(ValueError):
    """The model cannot be cut as asked; the message names the model and says why."""


@dataclass
class Activation:
    """What crosses the cut upward: the hidden states entering block k, and what the server needs
    to rebuild the family's masks and positions (the attention mask and position ids exactly as
    the caller gave them; None stays None, so the server computes the same defaults)."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (what a boundary frame carries)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Activation:
        unknown = set(tensors) - {f.name for f in fields(cls)}
        if "hidden" not in tensors or unknown:
            raise ValueError(f"an Activation needs 'hidden' and only its own fields; got {sorted(tensors)}")
        return cls(**tensors)

    def to(self, device: torch.device | str) -> Activation:
        return Activation(**{k: v.to(device) for k, v in self.tensors().items()})

    def detach(self, requires_grad: bool = False) -> Activation:
        """A copy whose hidden is a new leaf (what a server receives); requires_grad for FO clients."""
        hidden = self.hidden.detach().requires_grad_(requires_grad)
        return Activation(hidden, self.attention_mask, self.position_ids)


@dataclass
class _Cut:
    """Where a model is cut: the path from the top module to the stack, and the stack's parts."""

    stack_path: list[str]  # attribute names from the causal LM down to the stack ([] if it is the top)
    blocks_name: str
    num_blocks: int
    pre: list[str]  # stack children with parameters used before the block loop (client), in use order
    post: list[str]  # stack children used after it (server), with or without parameters, in use order


def _num_layers(config) -> int | None:
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def _find_cut(model: nn.Module) -> _Cut:
    name = type(model).__name__
    n = _num_layers(getattr(model, "config", None))
    if n is None:
        raise SplitError(f"cannot split {name}: it has no config.num_hidden_layers (not a transformers causal LM?)")
    lists = [
        (qual, mod)
        for qual, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n and len({type(b) for b in mod}) == 1
    ]
    if len(lists) != 1:
        found = ", ".join(q for q, _ in lists) or "none"
        raise SplitError(
            f"cannot split {name}: expected exactly one ModuleList of its {n} decoder blocks, found {found}"
        )
    qual = lists[0][0]
    stack_path, blocks_name = qual.split(".")[:-1], qual.split(".")[-1]
    stack = model.get_submodule(".".join(stack_path))
    if "inputs_embeds" not in inspect.signature(stack.forward).parameters:
        raise SplitError(f"cannot split {name}: {type(stack).__name__}.forward takes no inputs_embeds")
    try:
        source = inspect.getsource(inspect.unwrap(type(stack).forward))
    except (OSError, TypeError) as exc:
        raise SplitError(f"cannot split {name}: the source of {type(stack).__name__}.forward is unavailable") from exc
    loop = re.search(rf"\bfor\b[^\n]*\bin\b[^\n]*self\.{blocks_name}\b", source)
    if loop is None:
        raise SplitError(f"cannot split {name}: {type(stack).__name__}.forward has no loop over self.{blocks_name}")
    pre, post = [], []
    for child, mod in stack.named_children():
        if child == blocks_name:
            continue
        has_params = next(mod.parameters(), None) is not None
        use = re.search(rf"self\.{child}\b", source)
        if use is None:
            if not has_params:
                continue  # unused and stateless: nothing to place
            raise SplitError(
                f"cannot split {name}: {type(stack).__name__}.{child} has parameters but its forward never uses it"
            )
        if use.start() > loop.start():
            post.append((use.start(), child))  # with parameters or without (OLMo's norm): the server's alone
        elif has_params:
            pre.append((use.start(), child))  # parameter-free ones before the loop (rotary tables) run on both sides
    # In the order the forward uses them: the server's entry module is the first post-loop one.
    return _Cut(stack_path, blocks_name, n, [c for _, c in sorted(pre)], [c for _, c in sorted(post)])


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing parameters, buffers and submodules with `module`, with its own
    child/parameter/buffer/hook tables, so replacing a child of the copy leaves `module` alone."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new.__dict__["_hosl_copy"] = True
    for attr, value in vars(module).items():
        if attr.endswith("hooks") or attr.endswith("hooks_with_kwargs") or attr.endswith("hooks_always_called"):
            new.__dict__[attr] = copy.copy(value)
    return new


def _cut_config(config, lo: int, hi: int):
    """A config copy for blocks lo..hi-1: layer count and per-layer lists cut to match."""
    cfg = copy.deepcopy(config)
    n = config.num_hidden_layers
    for key in ("layer_types",):
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, key, type(value)(value[lo:hi]))
    cfg.num_hidden_layers = hi - lo
    return cfg


class _Absent(nn.Module):
    """Stands where the other side's module was. Its output is never used (the server's entry
    module replaces the embedding stage's result by h), so a scalar zero keeps the family's
    arithmetic (`inputs_embeds + positions`) well-formed without holding a weight."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        ref = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return torch.zeros((), device=ref.device if ref is not None else None)

    def extra_repr(self) -> str:
        return f"{self.name}: held by the other side"


def _entry(module: nn.Module, server: ServerModel) -> nn.Module:
    """A copy of the first server module whose hidden-states input is the received activation."""
    new = _shallow(module)
    forward = type(module).forward

    def entry_forward(*args, **kwargs):
        h = server._incoming
        if h is None:
            raise RuntimeError("the server's first block ran outside ServerModel.forward")
        if args:
            args = (h, *args[1:])
        else:
            kwargs["hidden_states"] = h
        return forward(new, *args, **kwargs)

    new.forward = entry_forward
    return new


class ClientModel(nn.Module):
    """Embeddings and blocks 0..k-1. `client(input_ids=..., attention_mask=...)` -> Activation."""

    def __init__(self, stack: nn.Module, k: int, source: str):
        super().__init__()
        self.stack = stack
        self.k = k
        self.source = source

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> Activation:
        out = self.stack(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        )
        return Activation(out.last_hidden_state, attention_mask, position_ids)

    def extra_repr(self) -> str:
        return f"{self.source}: embeddings + blocks [0, {self.k})"


class ServerModel(nn.Module):
    """Blocks k.., final norm, head and loss. `server(h)` -> output with .logits; with labels, .loss."""

    def __init__(self, lm: nn.Module, k: int, num_blocks: int, hidden_size: int, source: str):
        super().__init__()
        self.lm = lm
        self.k = k
        self.num_blocks = num_blocks
        self.hidden_size = hidden_size
        self.source = source
        self._incoming: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """The head's rows: the token ids a label may name."""
        return self.lm.get_output_embeddings().weight.shape[0]

    def forward(self, h: Activation, labels: torch.Tensor | None = None, *, labelled_only: bool = False, **kwargs):
        """The model's output for activation h. With labelled_only (which needs labels), the head runs
        only at the positions whose logits predict a labelled token (labelled_positions): .logits is
        (batch, len(positions), vocab) and .loss the same mean next-token loss over the labelled
        tokens as the full head's. A classification answer is a few tokens a row, so this skips
        most of the head's work and its (batch, length, vocab) logits."""
        if not isinstance(h, Activation):
            raise TypeError(f"ServerModel takes a hosl.Activation, got {type(h).__name__}")
        if h.hidden.dim() != 3 or h.hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"activation hidden must be (batch, seq, {self.hidden_size}), got {tuple(h.hidden.shape)}"
            )
        self._incoming = h.hidden
        try:
            if labelled_only:
                return labelled_forward(self.lm, labels, inputs_embeds=h.hidden, attention_mask=h.attention_mask,
                                        position_ids=h.position_ids, use_cache=False, **kwargs)  # fmt: skip
            return self.lm(
                inputs_embeds=h.hidden,
                attention_mask=h.attention_mask,
                position_ids=h.position_ids,
                labels=labels,
                use_cache=False,
                **kwargs,
            )
        finally:
            self._incoming = None

    def extra_repr(self) -> str:
        return f"{self.source}: blocks [{self.k}, {self.num_blocks}) + final norm + head"


def client_blocks(client: ClientModel) -> list[nn.Module]:
    """The client's k blocks, in the order its forward runs them."""
    lists = [m for m in client.stack.children() if isinstance(m, nn.ModuleList) and len(m) == client.k]
    if client.k and len(lists) != 1:
        raise SplitError(f"{client.source}'s client has no single list of its {client.k} blocks")
    return list(lists[0]) if client.k else []


def checkpoint_blocks(client: ClientModel) -> int:
    """Makes each of the client's blocks keep only its input in the forward and recompute its
    activations in the backward (torch.utils.checkpoint, non-reentrant): a first-order client's saved
    activations shrink to one block's inputs per block plus the one block being recomputed. The
    recomputation repeats the forward, so the gradients are the same. Returns the blocks wrapped."""
    blocks = client_blocks(client)
    for block in blocks:
        if not isinstance(block.forward, functools.partial):  # already wrapped: once is enough
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


def train_last_blocks(client: ClientModel, n: int) -> int:
    """--client-train-blocks n: every client weight outside its last n blocks (its embeddings and
    blocks [0, k - n)) stops training. n = 0 changes nothing. Returns the frozen blocks' count."""
    if not n:
        return 0
    blocks = client_blocks(client)
    if n > len(blocks):
        raise SplitError(f"the client has {len(blocks)} blocks: it cannot train its last {n}")
    kept = {id(p) for block in blocks[len(blocks) - n :] for p in block.parameters()}
    for p in client.parameters():
        if id(p) not in kept:
            p.requires_grad_(False)
    return len(blocks) - n


class FrozenPrefix:
    """A zeroth-order client's frozen blocks [0, j) (--client-train-blocks) run once a step. Inside
    `with prefix.step():` the step's first forward runs them and keeps block j - 1's output (one per
    slice of rows: `prefix.rows` names the slice a forward runs); every later forward of the step
    gets that output back from each of those blocks, so its work starts at block j. No probe moves
    a frozen weight, so the kept output is what they would compute again, bit for bit. Outside a
    step (evaluation) the blocks run as usual."""

    def __init__(self, client: ClientModel, j: int):
        blocks = client_blocks(client)
        if not 0 < j <= len(blocks):
            raise SplitError(f"a frozen prefix of {j} blocks does not fit a client of {len(blocks)}")
        self.rows = None  # the key of the rows the next forward runs (None: the whole batch)
        self._outputs: dict | None = None  # block j - 1's outputs of this step, by rows; None outside a step
        for i, block in enumerate(blocks[:j]):
            block.forward = self._wrap(block.forward, keep=i == j - 1)

    def _wrap(self, forward, keep: bool):
        def run(*args, **kwargs):
            if self._outputs is None:
                return forward(*args, **kwargs)
            kept = self._outputs.get(self.rows)
            if kept is not None:
                return kept
            out = forward(*args, **kwargs)
            if keep:
                self._outputs[self.rows] = out
            return out

        return run

    @contextlib.contextmanager
    def step(self):
        self._outputs, self.rows = {}, None
        try:
            yield self
        finally:
            self._outputs, self.rows = None, None


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions t whose logits predict a labelled token (labels[:, t + 1] != -100 in
    some row), ascending: the only rows of the head that a loss or a rank-classification score reads."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()


def labelled_forward(lm: nn.Module, labels: torch.Tensor, **inputs):
    """`lm(**inputs)` with the head run only at labelled_positions(labels) (transformers'
    logits_to_keep), and .loss the mean next-token cross-entropy over the labelled tokens, in float32:
    transformers' causal-LM loss, computed from the logits it reads."""
    if labels is None:
        raise ValueError("labelled_only needs labels")
    keep = labelled_positions(labels)
    out = lm(logits_to_keep=keep, **inputs)
    targets = labels[:, keep + 1]
    out.loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return out


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter goes by (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _cut(model: nn.Module, k: int) -> tuple[ClientModel, ServerModel, dict[int, nn.Parameter]]:
    """The two sides, and the server's copies of tied parameters by the id of the original."""
    cut = _find_cut(model)
    n = cut.num_blocks
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
        raise SplitError(f"split layer must be an integer in [0, {n}] for {type(model).__name__}, got {k!r}")
    source = type(model).__name__
    stack = model.get_submodule(".".join(cut.stack_path))
    blocks = getattr(stack, cut.blocks_name)

    client_stack = _shallow(stack)
    client_stack.config = _cut_config(stack.config, 0, k)
    setattr(client_stack, cut.blocks_name, nn.ModuleList(list(blocks[:k])))
    for child in cut.post:
        setattr(client_stack, child, nn.Identity())
    client = ClientModel(client_stack, k, source)
    client.training = stack.training  # the wrapper's own flag only: train()/eval() would recurse

    # The server: a copy of every container on the path from the causal LM down to the stack.
    lm = _shallow(model)
    lm.config = _cut_config(model.config, k, n)
    parent = lm
    for part in cut.stack_path:
        child = _shallow(getattr(parent, part))
        child.config = lm.config if hasattr(child, "config") else None
        setattr(parent, part, child)
        parent = child
    server_stack = parent
    server = ServerModel(lm, k, n, model.config.hidden_size, source)
    server.training = model.training
    for child in cut.pre:
        setattr(server_stack, child, _Absent(child))
    server_blocks = list(blocks[k:])
    if server_blocks:
        server_blocks[0] = _entry(server_blocks[0], server)
    setattr(server_stack, cut.blocks_name, nn.ModuleList(server_blocks))
    if not server_blocks:
        if cut.post:
            setattr(server_stack, cut.post[0], _entry(getattr(server_stack, cut.post[0]), server))
        else:
            head_name = _child_name(lm, model.get_output_embeddings())
            setattr(lm, head_name, _entry(getattr(lm, head_name), server))

    # Untie a head shared with the client's input embedding: the server gets its own copy. The
    # modules on the way to it are copied first, so the original model keeps its tie.
    client_ids = {id(p) for p in client.parameters()}
    clones: dict[int, nn.Parameter] = {}
    for qual, p in list(lm.named_parameters(remove_duplicate=False)):
        if id(p) not in client_ids:
            continue
        if id(p) not in clones:
            clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        *path, pname = qual.split(".")
        holder = lm
        for part in path:
            holder = _own_child(holder, part)
        holder._parameters[pname] = clones[id(p)]
    return client, server, clones


def _own_child(parent: nn.Module, name: str) -> nn.Module:
    """parent.name, replaced by a copy of its own unless it already is one."""
    child = getattr(parent, name)
    if not getattr(child, "_hosl_copy", False):
        child = _shallow(child)
        setattr(parent, name, child)
    return child


def _child_name(parent: nn.Module, module: nn.Module | None) -> str:
    for name, child in parent.named_children():
        if child is module:
            return name
    raise SplitError(f"cannot split {type(parent).__name__}: its output embedding is not a direct child")


def split_model(model: nn.Module, k: int, *, check: bool = True) -> tuple[ClientModel, ServerModel]:
    """Cut a transformers causal LM after decoder block k (0 <= k <= number of blocks).

    Returns (client, server): `h = client(input_ids=..., attention_mask=...)` is a hosl.Activation
    and `server(h, labels=...)` the model's output (.logits, and .loss with labels). The sides share
    parameter tensors with `model`; a head tied to the input embedding is copied for the server.
    The model's own structure is not changed (see the module docstring).

    check: compare the pair with the unsplit model on a short input first (check_split) and raise
    SplitError when they disagree.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"split_model takes a torch.nn.Module, got {type(model).__name__}")
    client, server, _ = _cut(model, k)
    if check:
        check_split(model, client, server)
    return client, server


@torch.no_grad()
def check_split(model: nn.Module, client: ClientModel, server: ServerModel, *, seq: int = 8) -> float:
    """The largest difference between the pair's logits and the unsplit model's on a short input (two
    rows, the second padded), computed in eval mode (the modes are restored after); SplitError,
    naming the family and the difference, above float rounding: a cut that lost a module (a
    parameter-free norm, say) must not train silently. Skipped (returns 0.0) for weights on the meta
    device."""
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":
        return 0.0
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (2, seq), generator=g).to(first.device)
    mask = torch.ones_like(ids)
    mask[1, seq // 2 :] = 0
    modes = {m: m.training for m in (*model.modules(), *client.modules(), *server.modules())}
    try:
        for m in (model, client, server):
            m.eval()
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        got = server(client(input_ids=ids, attention_mask=mask)).logits.float()
    finally:
        for m, training in modes.items():
            m.training = training
    real = mask.bool()
    diff = float((got[real] - want[real]).abs().max())
    low = first.dtype in (torch.float16, torch.bfloat16)
    tolerance = (2**-8 if low else 2**-16) * max(1.0, float(want[real].abs().max()))
    if not diff <= tolerance:  # nan fails too
        raise SplitError(
            f"the split of {type(model).__name__} at k = {client.k} disagrees with the unsplit model: logits differ "
            f"by up to {diff:.3g} (tolerance {tolerance:.3g}); this family's structure is not cut right"
        )
    return diff


@dataclass
class SideSummary:
    params: int  # distinct parameter elements
    trainable: int  # of which requires_grad
    bytes: int
    blocks: tuple[int, int]  # [first, end) decoder blocks


@dataclass
class SplitSummary:
    client: SideSummary
    server: SideSummary
    shared: int = 0  # parameter elements held by both sides (0 for a clean cut)
    names: dict = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        rows = [("side", "blocks", "params", "trainable", "MiB")]
        for side in ("client", "server"):
            s = getattr(self, side)
            rows.append(
                (
                    side,
                    f"[{s.blocks[0]}, {s.blocks[1]})",
                    f"{s.params:,}",
                    f"{s.trainable:,}",
                    f"{s.bytes / 2**20:.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        if self.shared:
            lines.append(f"warning: {self.shared:,} parameter elements are held by both sides")
        return "\n".join(lines)


def _distinct(module: nn.Module) -> list[torch.Tensor]:
    return list({id(p): p for p in module.parameters()}.values())


def split_summary(client: ClientModel, server: ServerModel) -> SplitSummary:
    """Parameter counts per side (distinct tensors), how many require grad, bytes, and the blocks held."""

    def side(module, blocks):
        ps = _distinct(module)
        return SideSummary(
            params=sum(p.numel() for p in ps),
            trainable=sum(p.numel() for p in ps if p.requires_grad),
            bytes=sum(p.numel() * p.element_size() for p in ps),
            blocks=blocks,
        )

    client_ids = {id(p) for p in client.parameters()}
    shared = sum(p.numel() for p in _distinct(server) if id(p) in client_ids)
    return SplitSummary(side(client, (0, client.k)), side(server, (server.k, server.num_blocks)), shared)


# --- Building one side alone -------------------------------------------------------------------------
