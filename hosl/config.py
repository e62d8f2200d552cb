"""The run configuration: one dataclass, checked on construction, saved as JSON, and the command
line generated from it (kebab-case flags with the fields' help texts; `--config FILE` loads a saved
config and explicit flags override it).

The defaults are the embedded default run: `python -m hosl.train` with no flags trains a built-in
model on the built-in synthetic task with HOSL, needs no network and ends in about a minute on two
CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hosl.estimators import ESTIMATORS, estimator_of
from hosl.plan import FO, METHODS, SPLIT_METHODS, ZO, method_of  # noqa: F401  (re-exported)
from hosl.zo import INPLACE, PROBE_WRITES, SCRATCH


class UsageError(ValueError):
    """Bad input from the command line or the run directory: one line, exit status 2."""


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Everything a run depends on. Fields in RUN_ONLY may change on --resume; the rest may not."""

    # -- method, model and data --------------------------------------------------------------------------
    method: str = field(
        default="hosl",
        metadata=_help(
            "hosl: ZO client, FO server (the paper). fo: FO on both sides (split learning). zo: ZO on both sides "
            "with shared seeds (MeZO over the split). fo-full, zo-full: the unsplit model, FO and MeZO",
            choices=tuple(METHODS),
        ),
    )
    model: str = field(
        default="builtin:tiny",
        metadata=_help(
            "a local model directory, a hub id, or builtin:<name>, a random init with no network "
            "(tiny, tiny-opt, opt-125m, opt-1.3b, smollm2-135m)"
        ),
    )
    gguf_file: str | None = field(default=None, metadata=_help("a GGUF file inside --model's directory to load"))
    task: str = field(
        default="synthetic",
        metadata=_help(
            "sst2, rte, cb, boolq, wsc, wic, synthetic (built in), or file (your own data: --train-file or --dataset)"
        ),
    )
    data_dir: str | None = field(
        default=None, metadata=_help("local task files (GLUE TSV or SuperGLUE JSONL); default: the datasets hub")
    )
    train_file: str | None = field(
        default=None, metadata=_help("your training data: a .csv, .tsv, .json, .jsonl or .parquet file")
    )
    eval_file: str | None = field(default=None, metadata=_help("your evaluation data, in the same shape"))
    dataset: str | None = field(
        default=None, metadata=_help("your data as a datasets hub name or local dataset folder (instead of files)")
    )
    dataset_config: str | None = field(default=None, metadata=_help("--dataset's configuration name"))
    train_split: str = field(default="train", metadata=_help("--dataset's training split"))
    eval_split: str = field(default="validation", metadata=_help("--dataset's evaluation split"))
    template: str | None = field(
        default=None,
        metadata=_help("classification: the prompt, a format string over the columns (default: {TEXT_FIELD})"),
    )
    verbalizers: str | None = field(
        default=None,
        metadata=_help(
            "classification: each label's answer, '0: terrible, 1: great' or a JSON object; without it your "
            "data is generation (prompt and completion columns)"
        ),
    )
    text_field: str = field(default="text", metadata=_help("classification: the text column"))
    label_field: str = field(default="label", metadata=_help("classification: the label column"))
    prompt_field: str = field(default="prompt", metadata=_help("generation: the prompt column"))
    completion_field: str = field(
        default="completion", metadata=_help("generation: the completion column (the loss is on it)")
    )
    train_examples: int | None = field(default=None, metadata=_help("sample this many training examples (seeded)"))
    eval_examples: int | None = field(default=None, metadata=_help("sample this many evaluation examples (seeded)"))
    max_length: int = field(default=64, metadata=_help("tokens per example; longer contexts lose their start"))
    split_layer: int = field(default=1, metadata=_help("the client holds the embeddings and blocks [0, k)"))
    client_train_blocks: int = field(
        default=0,
        metadata=_help(
            "the client trains only its last N blocks; its embeddings and the blocks below stay frozen, and a ZO "
            "client runs those once a step instead of once a forward (0: the whole client trains)"
        ),
    )
    dtype: str = field(
        default="float32",
        metadata=_help(
            "model dtype; bfloat16/float16 keep float32 masters of the ZO weights unless --zo-master none",
            choices=("float32", "bfloat16", "float16"),
        ),
    )

    # -- LoRA --------------------------------------------------------------------------------------------
    lora_r: int = field(
        default=0, metadata=_help("LoRA rank (0: full fine-tuning); with LoRA only the adapters train, on each side")
    )
    client_lora_r: int | None = field(
        default=None,
        metadata=_help("the client's LoRA rank (0: full fine-tuning of the client)", default_text="--lora-r"),
    )
    server_lora_r: int | None = field(
        default=None,
        metadata=_help("the server's LoRA rank (0: full fine-tuning of the server)", default_text="--lora-r"),
    )
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling numerator (scale = alpha / r)"))
    client_lora_fa: bool = field(
        default=False,
        metadata=_help(
            "LoRA-FA on the client: each adapter's A stays at its random init and only B trains (B starts at 0, so "
            "a ZO probe along A would move nothing; along B every direction moves the model)"
        ),
    )

    # -- the zeroth-order client -------------------------------------------------------------------------
    q: int | None = field(
        default=None,
        metadata=_help(
            "ZO probes per step (1 to 64)", default_text="8 for the cut-grad estimators, 1 for central and forward"
        ),
    )
    mu: float = field(default=1e-3, metadata=_help("ZO perturbation scale"))
    zo_step: str | None = field(
        default=None,
        metadata=_help(
            "sgd: ZO-SGD, each probe's direction moved by -lr g / Q; normalized: by -lr g / (Q rms(g)), the rms over "
            "the step's Q directional derivatives (every client's in a round), so --client-lr is the size of the "
            "step itself, whatever the size of the model's gradient",
            choices=("sgd", "normalized"),
            default_text="normalized for hosl, sgd for zo and zo-full",
        ),
    )
    zo_estimator: str | None = field(
        default=None,
        metadata=_help(
            "; ".join(f"{e.name}: {e.blurb}" for e in ESTIMATORS.values())
            + " (the cut-grad estimators need hosl: dL/dh is the server's gradient at the clean h)",
            choices=tuple(ESTIMATORS),
            default_text="cut-grad-one-sided for hosl, central for zo and zo-full",
        ),
    )
    zo_embedding: str = field(
        default="rows",
        metadata=_help(
            "rows: ZO noise and updates only on the embedding-table rows the step's batch looks up; all: on every row",
            choices=("rows", "all"),
        ),
    )
    zo_probes: str | None = field(
        default=None,
        metadata=_help(
            "inplace: a probe writes w + mu z into the weights and the next pass undoes it (float32 rounding "
            "stays behind); scratch: each module's weights are perturbed in a scratch copy just before it runs "
            "and copied back, so the weights stay w exactly (what many clients need)",
            choices=PROBE_WRITES,
            default_text="inplace for one client; scratch for --clients > 1, --zo-master none, --client-batch-probes",
        ),
    )
    zo_noise: str | None = field(
        default=None,
        metadata=_help(
            "the ZO directions: gaussian, z ~ N(0, I); rademacher, each weight's direction +1 or -1 (SPSA's), the "
            "same E[z z^T] = I from one random bit a weight, so a noise pass needs no Box-Muller (2.8x-8x faster)",
            choices=("gaussian", "rademacher"),
            default_text="rademacher for hosl, gaussian for zo and zo-full",
        ),
    )
    zo_master: str = field(
        default="float32",
        metadata=_help(
            "float32: a bfloat16/float16 model's ZO weights train in a float32 master copy; none: they stay in "
            "the model's dtype (half the memory) and each update is rounded stochastically from the seeded stream "
            "(needs scratch probes)",
            choices=("float32", "none"),
        ),
    )
    client_micro_batch: int = field(
        default=0,
        metadata=_help(
            "a ZO client runs each forward over slices of this many rows into one activation, so it holds one "
            "slice's transients instead of the batch's (0: the whole batch at once)"
        ),
    )
    client_batch_probes: bool = field(
        default=False,
        metadata=_help(
            "hosl with cut-grad or cut-grad-one-sided on a client whose ZO weights are all in linear layers (a "
            "client LoRA): the step's probe forwards run as one forward over (probes x batch) rows, each block "
            "with its probe's weights (the same g to float tolerance); with --client-micro-batch, as many probes "
            "at a time as fit its rows"
        ),
    )
    server_batch_probes: bool = field(
        default=False,
        metadata=_help(
            "hosl with central or forward: the server runs a step's probe uploads as one stacked forward once "
            "they have all arrived, not one forward each (the same losses to float tolerance)"
        ),
    )
    server_micro_batch: int = field(
        default=0,
        metadata=_help(
            "the server runs each forward, and its backward, over slices of this many rows (the gradients summed "
            "over the slices), so it holds one slice's activations instead of the batch's (0: the whole batch)"
        ),
    )
    server_grad: str = field(
        default="clean",
        metadata=_help(
            "hosl: the server's FO step on a clean upload (clean, the paper) or on the first +mu probe (probe)",
            choices=("clean", "probe"),
        ),
    )

    # -- optimisation ------------------------------------------------------------------------------------
    client_lr: float | None = field(
        default=None,
        metadata=_help(
            "client learning rate (the ZO step's, see --zo-step; the FO optimiser's for fo; both sides' for zo)",
            default_text="5e-3 for hosl, 1e-4 for the other methods",
        ),
    )
    server_lr: float = field(default=1e-3, metadata=_help("server learning rate (and the whole model's for fo-full)"))
    lr_scheduler: str = field(
        default="constant",
        metadata=_help(
            "both sides' rate over --steps, after --warmup-steps of linear warmup (transformers' schedules)",
            choices=("constant", "linear", "cosine"),
        ),
    )
    warmup_steps: int = field(default=0, metadata=_help("steps of linear warmup from 0 (the first step's rate is 0)"))
    optimizer: str = field(
        default="adamw", metadata=_help("first-order optimiser (server; client too for fo)", choices=("sgd", "adamw"))
    )
    momentum: float = field(default=0.0, metadata=_help("SGD momentum (0: none, as in the paper)"))
    client_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "fo: each client block keeps only its input in the forward and recomputes its activations in the "
            "backward (torch.utils.checkpoint), the memory-frugal first-order client; the same gradients"
        ),
    )
    client_fused_step: bool = field(
        default=False,
        metadata=_help(
            "fo: the client's optimiser steps each parameter as soon as its gradient is complete in the backward "
            "and frees that gradient, so no gradient buffer is held; a non-finite gradient then stops the run"
        ),
    )
    weight_decay: float = field(
        default=0.0, metadata=_help("decoupled weight decay, not on biases and norms (ZO and FO alike)")
    )
    batch_size: int = field(default=16, metadata=_help("examples per step"))
    steps: int = field(default=300, metadata=_help("training steps"))
    seed: int = field(default=0, metadata=_help("run seed: data order, model init (builtin), ZO noise"))
    max_skipped: int = field(
        default=10, metadata=_help("stop after this many consecutive skipped steps (non-finite; 0: never)")
    )

    # -- evaluation, logs and checkpoints ----------------------------------------------------------------
    eval_every: int = field(default=0, metadata=_help("evaluate every N steps (0: only at the end)"))
    eval_batch_size: int = field(default=32, metadata=_help("examples per evaluation batch"))
    log_every: int = field(default=10, metadata=_help("write a metrics line every N steps"))
    save_every: int = field(default=0, metadata=_help("checkpoint every N steps (0: only the final weights)"))
    save_total_limit: int = field(
        default=1, metadata=_help("checkpoints kept (the newest; an older one is deleted only after a newer is whole)")
    )
    report_to: str | None = field(
        default=None,
        metadata=_help(
            "also write the metrics for tensorboard, in RUN_DIR/tensorboard (needs pip install 'hosl[tensorboard]')",
            choices=(None, "tensorboard"),
        ),
    )
    out: str | None = field(default=None, metadata=_help("run directory (default: runs/<method>-<task>-<time>)"))
    resume: str | None = field(default=None, metadata=_help("continue the run in this directory from its checkpoint"))

    # -- many clients ------------------------------------------------------------------------------------
    clients: int = field(
        default=1,
        metadata=_help(
            "edge clients sharing one client model, each with its own shard of the training data "
            "(split-federated HOSL, hosl.clients; --steps counts rounds)"
        ),
    )
    clients_per_round: int | None = field(
        default=None, metadata=_help("clients sampled per round (seeded)", default_text="--clients")
    )
    partition: str = field(
        default="iid",
        metadata=_help(
            "how the training examples are shared out among the clients: iid, or dirichlet (label skew, --alpha)",
            choices=("iid", "dirichlet"),
        ),
    )
    alpha: float = field(
        default=0.5,
        metadata=_help("concentration of --partition dirichlet: small values give each client few labels"),
    )

    client_eval_fraction: float = field(
        default=0.0,
        metadata=_help(
            "hold out this fraction of each client's shard and report the final model's accuracy on each "
            "client's part (client_eval_accuracy in the summary), beside the shared evaluation set"
        ),
    )
    relay: str = field(
        default="all",
        metadata=_help(
            "all: every round's update goes to every client; sampled: to the round's clients (and the lead), "
            "the others catch up from the server's log of rounds when next sampled and after the last round",
            choices=("all", "sampled"),
        ),
    )
    on_client_loss: str = field(
        default="continue",
        metadata=_help(
            "a client (not the lead) that fails or stays silent past --timeout: drop it and go on, or end the run",
            choices=("continue", "fail"),
        ),
    )
    min_clients: int = field(default=1, metadata=_help("end the run when fewer clients than this are left"))
    client_id: int = field(
        default=0,
        metadata=_help(
            "grpc: which of the --clients this process is (0 to --clients - 1); it joins the server's rounds, "
            "late or again, whenever it starts"
        ),
    )

    # -- transport and device ----------------------------------------------------------------------------
    transport: str = field(
        default="local",
        metadata=_help(
            "local: one process; dist: torchrun, rank 0 server, rank 1 client; grpc: this client dials --server "
            "(python -m hosl.serve), TLS by default",
            choices=("local", "dist", "grpc"),
        ),
    )
    server: str | None = field(default=None, metadata=_help("grpc: the server's HOST:PORT, which the client dials"))
    link_rtt_ms: float = field(
        default=0.0, metadata=_help("local: emulate a network of this round-trip time between the sides (ms)")
    )
    link_mbit: float = field(
        default=0.0, metadata=_help("local: emulate a network of this bandwidth each way (Mbit/s; 0: unlimited)")
    )
    listen: str | None = field(
        default=None, metadata=_help("hosl.serve: the HOST:PORT to listen on (port 0: a free one)")
    )
    tls_ca: str | None = field(
        default=None,
        metadata=_help("grpc client: the CA certificate (PEM) the server's must chain to (default: the system's)"),
    )
    tls_cert: str | None = field(
        default=None, metadata=_help("grpc: this side's certificate (PEM): the server's, or a client's for mutual TLS")
    )
    tls_key: str | None = field(default=None, metadata=_help("grpc: the private key (PEM) of --tls-cert"))
    tls_client_ca: str | None = field(
        default=None, metadata=_help("hosl.serve: require client certificates issued by this CA (mutual TLS)")
    )
    compression: str | None = field(
        default=None,
        metadata=_help("activation compression on the link", choices=(None, "fp16", "bf16", "int8")),
    )
    device: str = field(
        default="cpu",
        metadata=_help(
            "where this process computes: cpu, cuda or cuda:N (the ZO noise is the same bits on every device)"
        ),
    )
    auth_token_file: str | None = field(
        default=None,
        metadata=_help(
            "dist: a file holding the shared secret both sides prove they hold (hosl.auth); else $HOSL_AUTH_TOKEN"
        ),
    )
    insecure: bool = field(
        default=False,
        metadata=_help(
            "dist: run without a shared secret (any peer that reaches the port may join); grpc: also plain text, "
            "without TLS; refused otherwise"
        ),
    )
    threads: int = field(
        default=0,
        metadata=_help(
            "torch threads each side computes with, set in the thread it runs on "
            "(0: torch's own count, which torchrun makes 1 per process)"
        ),
    )
    client_threads: int | None = field(
        default=None, metadata=_help("the client's torch threads (0: torch's own count)", default_text="--threads")
    )
    server_threads: int | None = field(
        default=None, metadata=_help("the server's torch threads (0: torch's own count)", default_text="--threads")
    )
    timeout: float = field(default=300.0, metadata=_help("seconds to wait for the peer before failing"))
    sync_probes: bool = field(
        default=False,
        metadata=_help(
            "make the client wait for each probe's loss before the next, and cut-grad for dL/dh before its "
            "probes (for benchmarks; the same bits)"
        ),
    )

    def __post_init__(self):
        method = METHODS.get(self.method)  # an unknown method: check() names it
        for name in ("zo_estimator", "client_lr", "zo_step", "zo_noise"):
            if method is not None and getattr(self, name) is None:
                setattr(self, name, getattr(method, name))
        if self.q is None:
            self.q = ESTIMATORS[self.zo_estimator].q if self.zo_estimator in ESTIMATORS else 1
        if self.clients_per_round is None:
            self.clients_per_round = self.clients
        if self.zo_probes is None:
            self.zo_probes = self._default("zo_probes")
        for name, both in PER_SIDE.items():
            if getattr(self, name) is None:
                setattr(self, name, getattr(self, both))
        self.check()

    def check(self) -> None:
        """ValueError naming the first bad value."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if "default_text" in f.metadata and value is None:
                raise ValueError(f"{_flag(f.name)} needs a value (its default depends on --method)")
            if choices is not None and value not in choices:
                raise ValueError(f"{_flag(f.name)} must be one of {_fmt_choices(choices)}, got {value!r}")
        positive = {"max_length": 1, "batch_size": 1, "steps": 0, "eval_batch_size": 1, "log_every": 1,
                    "save_total_limit": 1}  # fmt: skip
        for name, low in positive.items():
            if getattr(self, name) < low:
                raise ValueError(f"{_flag(name)} must be >= {low}, got {getattr(self, name)}")
        for name in (
            "eval_every",
            "save_every",
            "max_skipped",
            "split_layer",
            "client_train_blocks",
            "client_micro_batch",
            "server_micro_batch",
            "lora_r",
            "client_lora_r",
            "server_lora_r",
            "threads",
            "client_threads",
            "server_threads",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("train_examples", "eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {self.clients}")
        if not 1 <= self.clients_per_round <= self.clients:
            raise ValueError(
                f"--clients-per-round must be in [1, --clients {self.clients}], got {self.clients_per_round}"
            )
        if not 1 <= self.min_clients <= self.clients:
            raise ValueError(f"--min-clients must be in [1, --clients {self.clients}], got {self.min_clients}")
        if not (math.isfinite(self.client_eval_fraction) and 0 <= self.client_eval_fraction < 1):
            raise ValueError(f"--client-eval-fraction must be in [0, 1), got {self.client_eval_fraction}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha must be a finite number > 0, got {self.alpha}")
        if self.clients > 1:
            self._check_many_clients()
        if not 1 <= self.q <= 64:
            raise ValueError(f"--q must be in [1, 64], got {self.q}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"--lora-alpha must be a finite number > 0, got {self.lora_alpha}")
        if method_of(self.method).split and self.client_train_blocks > self.split_layer:
            raise ValueError(
                f"--client-train-blocks {self.client_train_blocks} is more than the client's --split-layer "
                f"{self.split_layer} blocks"
            )
        if self.client_lora_fa and not self.client_lora_r:
            raise ValueError("--client-lora-fa needs client adapters: --client-lora-r (or --lora-r) > 0")
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"--mu must be a finite number > 0, got {self.mu}")
        for name in ("client_lr", "server_lr", "weight_decay", "momentum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        if self.momentum >= 1:
            raise ValueError(f"--momentum must be < 1, got {self.momentum}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        self._check_data()
        if self.task == "synthetic" and self.data_dir is not None:
            raise ValueError(
                f"--data-dir {self.data_dir} is not read by --task synthetic (the built-in task): name the task "
                "its files hold (--task sst2, rte, cb, boolq, wsc or wic)"
            )
        if estimator_of(self.zo_estimator).local and not method_of(self.method).hybrid:
            hybrid = " or ".join(n for n, m in METHODS.items() if m.hybrid)
            raise ValueError(
                f"--zo-estimator {self.zo_estimator} needs --method {hybrid} (a first-order server), got {self.method}"
            )
        if estimator_of(self.zo_estimator).local and self.server_grad != "clean":
            raise ValueError(
                f"--zo-estimator {self.zo_estimator} uploads no probes: --server-grad probe has none to use"
            )
        self._check_used()
        if self.zo_master == "none" and self.dtype == "float32":
            raise ValueError("--zo-master none keeps bfloat16 or float16 weights without a master: it needs --dtype "
                             "bfloat16 or float16 (float32 weights are their own master)")  # fmt: skip
        if self.client_batch_probes and 0 < self.client_train_blocks < self.split_layer:
            raise ValueError(
                "--client-batch-probes runs every block on (probes x batch) rows: it cannot start from the frozen "
                "blocks' output that --client-train-blocks keeps; drop one"
            )
        if self.client_batch_probes and self.zo_probes != SCRATCH:
            raise ValueError("--client-batch-probes needs --zo-probes scratch: its probes never write the weights")
        if self.zo_master == "none" and self.zo_probes != SCRATCH:
            raise ValueError(
                "--zo-master none needs --zo-probes scratch: an in-place +mu / -mu does not undo in low precision"
            )
        if self.server_batch_probes and self.sync_probes:
            raise ValueError(
                "--server-batch-probes answers after a step's last upload: --sync-probes would wait forever"
            )
        if self.transport == "dist" and not (self.out or self.resume):
            raise ValueError("--transport dist needs --out: each side keeps its files there (one machine: the same)")
        if self.transport in ("dist", "grpc") and not method_of(self.method).split:
            raise ValueError(
                f"--transport {self.transport} needs a split method ({', '.join(SPLIT_METHODS)}), got {self.method}"
            )
        if not 0 <= self.client_id < self.clients:
            raise ValueError(f"--client-id must be in [0, --clients {self.clients}), got {self.client_id}")
        if self.client_id and self.transport != "grpc":
            raise ValueError("--client-id is for --transport grpc (local and dist number their clients themselves)")
        if self.transport == "grpc" and self.clients > 1 and self.relay != "all":
            raise ValueError("--transport grpc sends every round to every client: drop --relay sampled")
        for name in ("link_rtt_ms", "link_mbit"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value}")
            if value and self.transport != "local":
                raise ValueError(
                    f"{_flag(name)} emulates a network in a local run; --transport {self.transport} has one"
                )
        if self.transport != "grpc":
            given = [n for n in ("server", "tls_ca", "tls_client_ca") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{_flag(given[0])} is for --transport grpc")

    def _check_many_clients(self) -> None:
        method = method_of(self.method)
        what = f"--clients {self.clients}"
        if not method.hybrid:
            hybrid = " or ".join(n for n, m in METHODS.items() if m.hybrid)
            raise ValueError(f"{what} needs --method {hybrid} (ZO clients kept in sync by seeds), got {self.method}")
        if self.zo_probes != SCRATCH:
            raise ValueError(
                f"{what} needs --zo-probes scratch: in-place probes leave each client its own rounding residue"
            )
        if (self.save_every or self.resume) and self.transport != "grpc":
            raise ValueError(
                f"{what}: checkpoints and --resume are for one client, or hosl.serve's over --transport grpc; "
                "drop --save-every"
            )
        if self.transport == "grpc" and self.server and (self.save_every or self.resume):
            raise ValueError(
                f"{what}: a grpc client keeps no checkpoint (hosl.serve keeps the run's, with --save-every): started "
                "again with a new --out, a client catches up from the server's log of rounds"
            )

    def _check_used(self) -> None:
        """ValueError for an option the method does not read, set to anything but what it resolves
        to by default (a saved config holds the resolved defaults, and loads)."""
        method = method_of(self.method)
        zo_side, fo_side = ZO in method.orders, FO in method.orders
        ignored = {
            "q": not zo_side,
            "mu": not zo_side,
            "zo_step": not zo_side,
            "zo_estimator": not zo_side,
            "zo_embedding": not zo_side,
            "zo_probes": not zo_side,
            "zo_noise": not zo_side,
            "zo_master": not zo_side,
            "server_grad": not method.hybrid,
            "optimizer": not fo_side,
            "momentum": not fo_side or self.optimizer != "sgd",
            "client_lr": "client_lr" not in method.rates,
            "server_lr": "server_lr" not in method.rates,
            "compression": not method.split,
            "client_train_blocks": not method.split,
            "client_threads": not method.split,
            "server_threads": not method.split,
            "sync_probes": not method.split,
            "client_micro_batch": not (method.split and method.client.order == ZO),
            "client_checkpointing": not (method.split and method.client.order == FO),
            "client_fused_step": not (method.split and method.client.order == FO),
            "server_micro_batch": not method.split,
            "server_batch_probes": not method.hybrid or estimator_of(self.zo_estimator).local,
            "client_batch_probes": not (
                method.hybrid and estimator_of(self.zo_estimator).local and not estimator_of(self.zo_estimator).exact
            ),
            "clients_per_round": self.clients == 1,
            "partition": self.clients == 1,
            "alpha": self.clients == 1 or self.partition != "dirichlet",
            "client_eval_fraction": self.clients == 1,
            "relay": self.clients_per_round == self.clients,
            "on_client_loss": self.clients == 1,
            "min_clients": self.clients == 1,
        }
        for name in (n for n, unused in ignored.items() if unused):
            value, default = getattr(self, name), self._default(name)
            if value != default:
                given = f"{_flag(name)} {_fmt_value(value)}"
                if name == "server_batch_probes" and method.hybrid:
                    raise ValueError(
                        f"{given} needs --zo-estimator central or forward ({self.zo_estimator} uploads no probes)"
                    )
                if name == "client_batch_probes" and method.hybrid:
                    raise ValueError(f"{given} needs --zo-estimator cut-grad or cut-grad-one-sided")
                if name == "momentum" and fo_side:
                    raise ValueError(f"{given} needs --optimizer sgd (--optimizer {self.optimizer} has no momentum)")
                if name in ("clients_per_round", "partition", "client_eval_fraction", "on_client_loss", "min_clients"):
                    raise ValueError(f"{given} needs --clients > 1 (this run has one client)")
                if name == "relay":
                    raise ValueError(f"{given} needs --clients-per-round below --clients (every client is sampled)")
                if name == "alpha":
                    raise ValueError(
                        f"{given} needs --partition dirichlet" + (" and --clients > 1" * (self.clients == 1))
                    )
                raise ValueError(f"{given} is not used by --method {self.method} ({method.blurb}): drop it")

    def _default(self, name: str):
        """What a field becomes when it is not given, for this config's method."""
        if name == "clients_per_round":
            return self.clients
        if name in PER_SIDE:
            return getattr(self, PER_SIDE[name])
        if name == "zo_probes":
            return SCRATCH if self.clients > 1 or self.zo_master == "none" or self.client_batch_probes else INPLACE
        method = METHODS[self.method]
        if name in ("zo_estimator", "client_lr", "zo_step", "zo_noise"):
            return getattr(method, name)
        if name == "q":
            return ESTIMATORS[method.zo_estimator].q

        return next(f.default for f in dataclasses.fields(self) if f.name == name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a config file holds a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        # A config saved before --zo-embedding existed ran dense noise: resuming it must go on so.
        data.setdefault("zo_embedding", "all")
        data.setdefault("zo_step", "sgd")  # and before --zo-step, ZO-SGD
        data.setdefault("zo_noise", "gaussian")  # and before --zo-noise, Gaussian directions
        for f in dataclasses.fields(cls):
            if f.name in data and not _json_fits(data[f.name], f.type):
                raise ValueError(f"{f.name} must be {_TYPE_WORDS.get(f.type, f.type)}, got {data[f.name]!r}")
        return cls(**data)

    def _check_data(self) -> None:
        """The data flags: your own files or dataset (task file, or a preset read from them), or a
        benchmark task; the format flags only with your own data."""
        from hosl.data import parse_verbalizers, template_fields

        own = self.train_file or self.eval_file or self.dataset
        if own and self.task == "synthetic":
            self.task = "file"  # the default task, with your data given
        if not own:
            if self.task == "file":
                raise ValueError("--task file needs your data: --train-file and --eval-file, or --dataset")
            given = [n for n in _OWN_DATA_FORMAT if getattr(self, n) != self._default(n)]
            given += [
                n for n in ("dataset_config", "train_split", "eval_split") if getattr(self, n) != self._default(n)
            ]
            if given:
                raise ValueError(f"{_flag(given[0])} is for your own data (--train-file or --dataset)")
            return
        if self.dataset and (self.train_file or self.eval_file):
            raise ValueError("give your data as --train-file and --eval-file, or as --dataset, not both")
        if not self.dataset and not (self.train_file and self.eval_file):
            missing = "--eval-file" if self.train_file else "--train-file"
            raise ValueError(
                f"your own data needs --train-file and --eval-file (the held-out rows): {missing} is missing"
            )
        if self.data_dir is not None:
            raise ValueError("--data-dir is for the benchmark tasks' files; your own are --train-file and --eval-file")
        if self.task != "file":
            given = [n for n in _OWN_DATA_FORMAT if getattr(self, n) != self._default(n)]
            if given:
                raise ValueError(f"{_flag(given[0])}: --task {self.task} has its own template and verbalizers")
            return
        if self.template is not None and self.verbalizers is None:
            raise ValueError("--template is a classification prompt: give --verbalizers (each label's answer) too")
        if self.verbalizers is not None:
            parse_verbalizers(self.verbalizers)
            template_fields(self.template or "{" + self.text_field + "}")
        for name in _OWN_DATA_FORMAT[2:]:
            if not getattr(self, name):
                raise ValueError(f"{_flag(name)} must name a column")

    def identity(self, legacy: bool = False, era: int | None = None) -> dict:
        """The fields that define the run, which its checkpoints are verified against: everything
        but RUN_ONLY and RESUMABLE. The data fields added with your own files are left out at their
        defaults. legacy: the identity of the versions before RESUMABLE existed (and before the
        token file's path left it), which their checkpoints' manifests hold. era: as a version
        before ADDED[era] wrote it (the fields added since left out where they hold the value runs
        had before them); legacy implies era 0."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        left_out = RUN_ONLY - {"auth_token_file"} if legacy else RUN_ONLY | RESUMABLE
        era = 0 if legacy else len(ADDED) if era is None else era
        before = {name: value for added in ADDED[era:] for name, value in added.items()}
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in left_out
            and not (k in _ADDED_WITH_FILES and v == defaults[k])
            and not (k in before and v == before[k])
        }

    def hash(self) -> str:
        """What the two sides of a run compare in HELLO: the identity and the RESUMABLE fields."""
        both = {**self.identity(), **{k: getattr(self, k) for k in sorted(RESUMABLE)}}
        return hashlib.sha256(json.dumps(both, sort_keys=True).encode()).hexdigest()[:16]


_OWN_DATA_FORMAT = ("template", "verbalizers", "text_field", "label_field", "prompt_field", "completion_field")
_ADDED_WITH_FILES = frozenset(
    {"train_file", "eval_file", "dataset", "dataset_config", "train_split", "eval_split", *_OWN_DATA_FORMAT}
)

_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "str | None": "a string or null", "int | None": "an integer or null",
               "float | None": "a number or null"}  # fmt: skip


def _json_fits(value, annotation: str) -> bool:
    """Whether a JSON value can be a field of this (string) annotation: ints are not booleans,
    a float field takes ints too."""
    kinds = {k.strip() for k in str(annotation).split("|")}
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    return False


# A side's own setting and the flag that sets both sides, its default.
PER_SIDE = {
    "client_lora_r": "lora_r",
    "server_lora_r": "lora_r",
    "client_threads": "threads",
    "server_threads": "threads",
}

# May differ between a run and its resumption, and between the two sides of a dist run: where it is
# written, how long it runs and how often it evaluates, logs and saves, how long it waits, where and
# on how many threads it computes. None of these changes the method; the device and the thread count
# change only the rounding of the forward's reductions (the ZO noise is the same bits everywhere), so
# bit-identical resumption holds on the same device with the same threads.
RUN_ONLY = frozenset(
    {
        "steps",
        "eval_every",
        "log_every",
        "save_every",
        "save_total_limit",
        "out",
        "resume",
        "timeout",
        "transport",
        "link_rtt_ms",
        "link_mbit",
        "client_id",
        "server",
        "listen",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "insecure",
        "device",
        "threads",
        "client_threads",
        "server_threads",
        "report_to",
        "auth_token_file",  # the secret is proven in HELLO; where a side reads it from is its own affair
    }  # fmt: skip
)

# May change on --resume, from the checkpoint on, but not between the two sides of a run (HELLO
# compares them): the rates, mu and the rate schedule. The client's rate and mu of every step are in
# zo_log.jsonl, so replay reproduces a run resumed with new ones.
RESUMABLE = frozenset({"client_lr", "server_lr", "mu", "lr_scheduler", "warmup_steps"})
# Fields that define a run, added after runs had been saved: one dict a version, oldest first, each
# field with the value every run had before it existed. A checkpoint saved before a version verifies
# against the identity without them (TrainConfig.identity's era; hosl.checkpoint.check_config).
ADDED = ({"zo_step": "sgd", "client_lora_fa": False}, {"client_train_blocks": 0}, {"zo_noise": "gaussian"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fmt_value(value) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt_choices(choices) -> str:
    return ", ".join("none" if c is None else str(c) for c in choices)


def _base_type(name: str):
    """(type, optional) of a TrainConfig field: int, float, str, bool, or one of them `| None`."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _converter(name: str, kind, optional: bool):
    def convert(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


class _Parser(argparse.ArgumentParser):
    """One line per error (ValueError: the trainer prints it, exit status 2), and negative numbers in
    scientific notation taken as values (argparse reads --mu -1e-3 as a missing value)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        raise ValueError(f"{message} (see --help)")


# The sections of TrainConfig, in the order its fields are declared; --help groups its flags by them.
SECTIONS = {
    "method, model and data": [
        "method", "model", "gguf_file", "task", "data_dir", "train_file", "eval_file", "dataset", "dataset_config",
        "train_split", "eval_split", "template", "verbalizers", "text_field", "label_field", "prompt_field",
        "completion_field", "train_examples", "eval_examples", "max_length",
        "split_layer", "client_train_blocks", "dtype",
    ],
    "LoRA": ["lora_r", "client_lora_r", "server_lora_r", "lora_alpha", "client_lora_fa"],
    "the zeroth-order client": ["q", "mu", "zo_step", "zo_estimator", "zo_embedding", "zo_probes", "zo_noise",
                                "zo_master",
                                "client_micro_batch", "client_batch_probes", "server_batch_probes",
                                "server_micro_batch",
                                "server_grad"],
    "optimisation": [
        "client_lr", "server_lr", "lr_scheduler", "warmup_steps", "optimizer", "momentum", "client_checkpointing",
        "client_fused_step", "weight_decay",
        "batch_size", "steps", "seed", "max_skipped",
    ],
    "evaluation, logs and checkpoints": [
        "eval_every", "eval_batch_size", "log_every", "save_every", "save_total_limit", "report_to", "out", "resume",
    ],
    "many clients": ["clients", "clients_per_round", "partition", "alpha", "client_eval_fraction", "relay",
                     "on_client_loss", "min_clients", "client_id"],
    "transport and device": ["transport", "server", "link_rtt_ms", "link_mbit", "listen", "tls_ca", "tls_cert",
                             "tls_key", "tls_client_ca",
                             "compression", "device", "auth_token_file", "insecure", "threads",
                             "client_threads", "server_threads", "timeout", "sync_probes"],
}  # fmt: skip

_EXAMPLES = """examples:
  python -m hosl.train                                   # the embedded default: a minute on 2 CPU cores
  python -m hosl.train --model path/to/model --task sst2 --data-dir data --split-layer 3 --steps 1000 \\
      --save-every 100 --out runs/sst2
  python -m hosl.train --resume runs/sst2 --steps 2000   # continue from its newest checkpoint
  torchrun --nproc-per-node 2 -m hosl.train --transport dist --auth-token-file token --out runs/sst2-dist"""


def build_parser(prog: str = "python -m hosl.train") -> argparse.ArgumentParser:
    """Flags for every TrainConfig field, plus --config FILE, in groups. Unset flags stay unset (None
    in the namespace is "not given"), so a config file's values survive unless a flag overrides them."""
    parser = _Parser(
        prog=prog,
        usage=f"{prog} [flags]",
        allow_abbrev=False,  # --step must not quietly mean --steps
        description="Train a causal LM split between a zeroth-order client and a first-order server (HOSL).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="load a saved config.json; flags given here override it")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in SECTIONS.items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, fields[name])
    return parser


def _add_flag(group, f) -> None:
    kind, optional = _base_type(f.name)
    help_text = f.metadata["help"]
    default = f.metadata.get("default_text", f.default)
    if default is not None:  # an unset default is said by the help text itself, or needs no words
        help_text += f" (default: {default})"
    choices = f.metadata.get("choices")
    metavar = None if choices is None else "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
    if kind is bool:
        group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, dest=f.name, help=help_text)
    else:
        group.add_argument(
            _flag(f.name), dest=f.name, type=_converter(f.name, kind, optional), metavar=metavar, help=help_text
        )


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line. Raises SystemExit(2) with one line for bad flags, and
    ValueError for bad values or files (the trainer turns those into one line and exit status 2)."""
    args = vars(build_parser().parse_args(argv))
    base: dict = {}
    path = args.pop("config", None)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read --config {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"--config {path}: not UTF-8 (byte {exc.start})") from None
        try:
            base = dataclasses.asdict(TrainConfig.from_json(text))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--config {path}: {exc}") from None
    base.update(args)
    return TrainConfig(**base)
