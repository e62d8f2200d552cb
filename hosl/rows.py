"""Which rows of a ZO side's embedding tables a step's loss can see (--zo-embedding rows).

A lookup table's row enters the loss only if the step's batch looks it up, so noise on any other
row adds variance to the update and random-walks a row the data never touched. The tables are the
side's trainable nn.Embedding weights (token and learned position tables) that no output head on the
same side shares (a tied head reads every row).

Which rows a table gives is recorded, not guessed: the clean forward that opens a step (cut-grad,
forward, and central with the server's step on the clean upload) runs under LookupRecorder, a torch
function mode that notes the indices of every F.embedding call on a table. A schedule with no clean
forward takes the token table's rows from the batch's input ids and leaves the other tables dense.
The rows go into the replay log, so replay never needs to know how they were found.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from hosl import zo


def embedding_tables(model: torch.nn.Module) -> list[str]:
    """Names of model's nn.Embedding weights that no output head of model shares, in module order."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    tied = getattr(head, "weight", None)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not tied}
    return [n for n, p in model.named_parameters() if id(p) in tables]


def input_embedding(model: torch.nn.Module) -> torch.Tensor | None:
    """The token-embedding weight of a causal LM or of a split side holding one (`.stack`)."""
    stack = getattr(model, "stack", model)
    get_in = getattr(stack, "get_input_embeddings", None)
    table = get_in() if callable(get_in) else None
    return table.weight if isinstance(table, torch.nn.Embedding) else None


class LookupRecorder(TorchFunctionMode):
    """Within the context, records the distinct indices each of `params`' row-sparse tables is looked
    up at through torch.nn.functional.embedding (which nn.Embedding and its subclasses call)."""

    def __init__(self, params: zo.ZOParams):
        super().__init__()
        self._index = {id(p): i for i, p in enumerate(params.table_params)}
        self.seen: list[list[torch.Tensor]] = [[] for _ in params.table_params]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.embedding:
            indices = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            i = self._index.get(id(weight))
            if i is not None:
                self.seen[i].append(torch.unique(indices.detach().reshape(-1)).cpu())
        return func(*args, **kwargs)


def step_rows(params: zo.ZOParams, batch, recorder: LookupRecorder | None = None, token_table=None) -> list | None:
    """The rows each row-sparse table of `params` gets this step (None: no row-sparse table). An
    entry is an index tensor, or None for a table that stays dense this step: one the recorder saw no
    lookup of (it may be read some other way), or, with no recorder, any table but `token_table`
    (the token embedding's weight), which gets the batch's input ids."""
    if not params.tables:
        return None
    rows: list[torch.Tensor | None] = []
    for i, p in enumerate(params.table_params):
        if recorder is not None:
            seen = recorder.seen[i]
            rows.append(torch.unique(torch.cat(seen)) if seen else None)
        elif p is token_table:
            rows.append(torch.unique(batch["input_ids"]).cpu())
        else:
            rows.append(None)
    return rows
