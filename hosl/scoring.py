"""Rank classification (MeZO's): a candidate's score is the average log-likelihood of its tokens
given the context, the prediction is the best-scoring candidate of each example, and accuracy
compares predictions with the examples' labels. The server computes the scores of a split run
(from the logits at the labelled positions only); the trainer ranks them."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from hosl.tasks import encode_candidates, encode_for_training


def candidate_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the mean log-probability of its labelled tokens (logits[:, t-1] predicts labels[:, t]),
    in float32: MeZO's rank-classification score.

    Only the labelled positions go through log_softmax: a full (rows, length, vocab) float32 copy
    would cost gigabytes for a large vocabulary, and the answers are a few tokens a row."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (rows, length, vocab) and labels (rows, length); got {tuple(logits.shape)}"
            f" and {tuple(labels.shape)}"
        )
    return target_scores(logits[:, :-1], labels[:, 1:])


def target_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the mean log-probability under logits[:, i] of targets[:, i] over the targets that are
    not -100, in float32. candidate_scores is this on the shifted pairs; with the logits of a head
    run only at the labelled positions (hosl.split.labelled_forward) the targets are
    labels[:, positions + 1]."""
    mask = targets != -100
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        raise ValueError(f"rows {(counts == 0).nonzero().flatten().tolist()} have no labelled token after the first")
    picked = logits[mask].float().log_softmax(dim=-1)  # (labelled tokens, vocab)
    token_logp = picked.gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    rows = mask.nonzero()[:, 0]
    total = torch.zeros(len(targets), dtype=torch.float32, device=logits.device).index_add_(0, rows, token_logp)
    return total / counts.to(torch.float32)


def rank_classify(scores: torch.Tensor, example_index: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Per example, the index (among its own rows, i.e. its candidate index) of its best-scoring row;
    ties go to the first candidate."""
    if scores.dim() != 1 or example_index.shape != scores.shape:
        raise ValueError(
            f"scores and example_index must be 1-D of one length; got {tuple(scores.shape)}"
            f" and {tuple(example_index.shape)}"
        )
    example_index = example_index.to(device=scores.device, dtype=torch.long)
    if len(example_index) and (example_index[1:] < example_index[:-1]).any():
        raise ValueError("example_index must be non-decreasing: an example's rows are consecutive")
    if len(example_index) and (example_index[0] < 0 or example_index[-1] >= num_examples):
        raise ValueError(f"example_index must lie in [0, {num_examples}), got {example_index.tolist()}")
    counts = torch.bincount(example_index, minlength=num_examples)
    if (counts == 0).any():
        raise ValueError(f"examples {(counts == 0).nonzero().flatten().tolist()} have no candidate rows")
    if num_examples == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.stack([chunk.argmax() for chunk in scores.split(counts.tolist())])


def accuracy(predictions: torch.Tensor | Sequence[int], examples: Sequence) -> float:
    """The fraction of examples whose predicted candidate index is the gold label."""
    predictions = [int(p) for p in predictions]
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"need one prediction per example, got {len(predictions)} for {len(examples)} examples")
    return sum(p == ex.label for p, ex in zip(predictions, examples)) / len(examples)


def evaluate(trainer, tokenizer, examples, cfg, step: int) -> dict:
    """A trainer's (SplitClient, RoundClient, FullModel: its scores()) score on `examples`, in
    batches of cfg.eval_batch_size: {"accuracy": ...} for a classification task (rank
    classification), {"loss": ..., "perplexity": ...} for a generation task (the mean loss per
    completion token, from the same per-row scores the server computes)."""
    generation = examples[0].generation
    predictions, total, tokens = [], 0.0, 0
    starts = range(0, len(examples), cfg.eval_batch_size)
    try:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="eval", unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        pass
    for start in starts:
        chunk = examples[start : start + cfg.eval_batch_size]
        if generation:
            batch = encode_for_training(tokenizer, chunk, cfg.max_length)
            counts = (batch["labels"] != -100).sum(dim=1)
            total += float((trainer.scores(step, batch).double() * counts).sum())
            tokens += int(counts.sum())
        else:
            batch, index = encode_candidates(tokenizer, chunk, cfg.max_length)
            scores = trainer.scores(step, batch)
            predictions.append(rank_classify(scores, index, len(chunk)))
    if generation:
        loss = -total / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return {"accuracy": accuracy(torch.cat(predictions), examples)}
