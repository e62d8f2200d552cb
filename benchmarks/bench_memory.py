"""Client peak memory of fo, hosl and zo against the client's floor, with the client in its own process.

Setting: an OPT-125M-shaped model (transformers' OPTConfig defaults: 12 layers, hidden 768, vocab
50272; random weights, saved once as safetensors under --work), split after layer k in {1, 3, 6},
batch 16 and 64, sequence 128 (--quick: an 8-layer hidden-256 model, batch 4 and 16, sequence 32).
--model opt-1.3b takes OPT-1.3B's shape; --model smollm2-135m SmolLM2-135M's (a Llama: 30 blocks of
hidden 576), cut after block 27 as in bench_client's smollm2 suite.

Each measurement is two fresh processes joined by hosl's dist transport (gloo over loopback), as in
a real split run: rank 1 loads only the client side with hosl.load_client and runs a SplitClient
(two torch threads) for --steps training steps on random tokens, with the loss on the last token;
rank 0 stands in for the server: it speaks the protocol and answers every activation (a loss; for
fo, a dL/dh of the activation's shape) without running the server's blocks, which would take
minutes per measurement here and does not change what the client holds.

The client's number is its process's high-water mark (VmHWM) minus its resident size (VmRSS) once
torch, transformers and hosl are imported and their code has run once on a toy OPT (forward,
backward, AdamW step, inference forward: the libraries' code pages then count as the
interpreter's), before the link and the model exist: what the split run adds to the process.
With --device cuda the client computes on the GPU and its number is the CUDA caching allocator's
peak of allocated bytes (torch.cuda.max_memory_allocated), reset before the model loads: what the
paper's GPU figures count. The CUDA context and library code are not tensors and are left out; the
allocator's peak reserved bytes are recorded beside it. Frames cross the link as host bytes, so on
the GPU the link's buffers are host memory (recorded as host_link_bytes, not in the GPU's parts).

Methods (rows):
* fo: first-order split learning, client AdamW (the trainer's default optimiser);
* fo-sgd: the same with plain SGD, which has no optimiser state: the least an FO client can hold;
* hosl: ZO client (Q = 1, central: a clean forward and two probes per step), under no_grad;
* zo: the client of MeZO over the split: two probes per step, no clean forward;
* hosl-no-master (with --dtype bfloat16 or float16): the hosl client with its weights kept in that
  dtype and no float32 master (--zo-master none, scratch probes, stochastically rounded updates);
  hosl in that setting is the default, a float32 master of the ZO weights;
* floor: no link and no training: the client's weights and one forward in inference mode, in a
  process of its own. This is the least any client of this split can hold.
On request (--methods, beside floor and fo, which are always measured):
* fo-ckpt: fo with --client-checkpointing, each client block recomputed in the backward;
* fo-sgd-ckpt-fused: fo-sgd with --client-checkpointing and --client-fused-step (each parameter
  stepped and its gradient freed as soon as it is complete): the memory-frugal first-order client;
* fo-ckpt-fused: the same with AdamW, as bench_client's fo-ckpt runs it;
* hosl-top9, fo-top9 (k >= 9): the client's last 9 blocks alone train (--client-train-blocks 9), by
  hosl's default estimator (its frozen blocks' output kept for the step) or by fo;
* hosl-cut-grad, hosl-one-sided, hosl-jvp: hosl's client with each cut-grad estimator at Q = 1.

Accounted, beside each measurement (bytes; read from the live objects, not estimated):
* weights: the client's distinct parameters and buffers;
* gradients: the .grad tensors when the optimiser steps (fo);
* optimizer_state: the tensors in the optimiser's state after its step (fo);
* saved_activations: tensors autograd saved for the backward in the client's forward, counted once
  per storage, parameters left out (fo; 0 for the ZO clients, whose forward runs under no_grad);
* link_buffers: the largest total of encoded frames held by unfinished sends, plus the receive
  buffer (which grows to the largest frame received: for fo, dL/dh); CPU only;
* transient (floor only): floor minus weights, the largest transient of one inference forward.
What the parts leave of the measurement (allocator slack, the process group's own buffers, the
largest transient of the training forward) is reported as unaccounted.

    python benchmarks/bench_memory.py --quick   # a small model: a few minutes
    python benchmarks/bench_memory.py           # about 15 minutes on 2 cores
    python benchmarks/bench_memory.py --device cuda --jobs 6   # on a GPU, six measurements at once
    python benchmarks/bench_memory.py --dtype bfloat16 --batches 16 --ks 3 6   # the float32 master or none
    python benchmarks/bench_memory.py --model smollm2-135m --methods hosl hosl-one-sided fo-ckpt fo-ckpt-fused

Each measurement runs in processes of its own and reads only their peaks, so --jobs N of them may
run at once without changing the numbers (on a small machine it only slows each one down).

Writes benchmarks/results/bench_memory.jsonl (--quick: bench_memory_quick.jsonl; the other settings
add _opt-1.3b, _smollm2-135m, _default_malloc, _cuda, _micro8, _bfloat16 to the name), one record per
(method, split_layer, batch_size), and the plot benchmarks/results/memory.png (memory against split
layer, one line per method, one panel per batch size); prints the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from pathlib import Path

from _common import (
    MIB,
    REPO,
    Recorder,
    bench_parser,
    environment,
    fmt_bytes,
    log,
    print_table,
    proc_status,
    pyplot,
    reset_peak,
    run_workers,
    save_figure,
)

FULL = dict(model=dict(), ks=[1, 3, 6], batches=[16, 64], seq=128)
# OPT-1.3B's shape (--model opt-1.3b): a second size; its random checkpoint takes 5 GiB of disk.
OPT_1_3B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, word_embed_proj_dim=2048)
# SmolLM2-135M's shape (--model smollm2-135m: a Llama, 30 blocks of hidden 576, grouped-query attention),
# cut after block 27 as in bench_client's smollm2 suite.
SMOLLM2_135M = dict(
    model=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
               tie_word_embeddings=True),
    ks=[27], batches=[16, 64], seq=128,
)  # fmt: skip
QUICK = dict(
    model=dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, ffn_dim=1024, vocab_size=8192,
               word_embed_proj_dim=256),
    ks=[1, 3, 6], batches=[4, 16], seq=32,
)  # fmt: skip
METHODS = ["floor", "hosl", "zo", "fo-sgd", "fo"]
# Rows measured on request (--methods): fo with --client-checkpointing, and hosl's client with each
# cut-grad estimator at Q = 1 (cut-grad and one-sided hold dL/dh and a second activation; the JVP
# holds dL/dh and a forward-mode pass's primal and tangent).
EXTRA = {
    "fo-ckpt": {"client_checkpointing": True},
    "fo-sgd-ckpt-fused": {"client_checkpointing": True, "client_fused_step": True},
    "fo-ckpt-fused": {"client_checkpointing": True, "client_fused_step": True},  # bench_client's fo-ckpt
    "hosl-cut-grad": {"zo_estimator": "cut-grad"},
    "hosl-one-sided": {"zo_estimator": "cut-grad-one-sided"},
    "hosl-jvp": {"zo_estimator": "cut-grad-jvp"},
    # the client's last 9 blocks alone (--client-train-blocks 9; SmolLM2's k = 27): hosl's default
    # estimator, which keeps the frozen blocks' output for the step, and its first-order twin
    "hosl-top9": {"zo_estimator": "cut-grad-one-sided", "client_train_blocks": 9},
    "fo-top9": {"client_train_blocks": 9},
}
MARKERS = {
    "floor": "", "hosl": "o", "hosl-no-master": "D", "zo": "x", "fo-sgd": "s", "fo": "^", "fo-ckpt": "v",
    "fo-sgd-ckpt-fused": "<", "fo-ckpt-fused": ">",
    "hosl-cut-grad": "P", "hosl-one-sided": "p", "hosl-jvp": "*", "hosl-top9": "h", "fo-top9": "H",
}  # fmt: skip


def methods_for(dtype: str) -> list[str]:
    """The rows of a run: with low-precision weights, hosl also without its float32 master."""
    return METHODS if dtype == "float32" else [*METHODS[:2], "hosl-no-master", *METHODS[2:]]


# --------------------------------------------------------------------------------------------------
# The worker processes.


def worker(spec: dict) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline: part of the interpreter's cost)

    import hosl
    from hosl.config import TrainConfig
    from hosl.plan import method_of
    from hosl.roles import SplitClient, SplitServer

    role, method, k, batch_size, seq = spec["role"], spec["method"], spec["k"], spec["batch"], spec["seq"]
    device = torch.device(spec.get("device", "cpu"))
    dtype_name = spec.get("dtype", "float32")
    dtype = getattr(torch, dtype_name)
    family = json.loads((Path(spec["checkpoint"]) / "config.json").read_text())["model_type"]
    peak = Peak(device if role == "client" else torch.device("cpu"), family)  # the stand-in server computes nothing
    torch.manual_seed(0)
    out: dict = {"baseline_bytes": peak.baseline}

    if method == "floor":
        client = hosl.load_client(spec["checkpoint"], k, dtype=dtype, device=device)
        out["weights"] = module_bytes(client)
        ids = torch.randint(4, client.stack.config.vocab_size, (batch_size, seq), device=device)
        micro = spec.get("micro_batch") or batch_size
        with torch.inference_mode():  # the activation sent, and one slice's transients at a time
            hidden = None
            for lo in range(0, batch_size, micro):
                part = client(input_ids=ids[lo : lo + micro], attention_mask=torch.ones_like(ids[lo : lo + micro]))
                if hidden is None:
                    hidden = part.hidden.new_empty((batch_size, *part.hidden.shape[1:]))
                hidden[lo : lo + micro] = part.hidden
                del part
        out.update(peak.read())
        print(json.dumps(out), flush=True)
        return

    from hosl.transport import dist_link

    split_method = "fo" if method.startswith("fo") else "hosl" if method.startswith("hosl") else method
    low = {"dtype": dtype_name} | ({"zo_master": "none"} if method == "hosl-no-master" else {})
    optimizer = "sgd" if method.startswith("fo-sgd") else "adamw"
    # hosl's loss-difference step (central): the client holds one activation at a time. (cut-grad
    # also holds dL/dh and one probe's activation: two activations more, measured by --methods'
    # hosl-cut-grad rows.)
    rates = {rate: 1e-5 for rate in method_of(split_method).rates}  # the config refuses a rate the method ignores
    cfg = TrainConfig(
        method=split_method, split_layer=k, q=1, batch_size=batch_size, max_length=seq, optimizer=optimizer,
        mu=1e-3, timeout=600.0, **{"zo_estimator": "central", **EXTRA.get(method, {})}, **rates, **low,
        **({"client_micro_batch": spec.get("micro_batch", 0)} if split_method != "fo" else {}),
    )  # fmt: skip
    link = dist_link(timeout=cfg.timeout)
    if role == "server":
        SplitServer(cfg, stub_server(spec), link).serve()
        link.close()
        print("{}", flush=True)
        return

    out["link_init_bytes"] = proc_status("VmRSS") - peak.host_baseline
    model = hosl.load_client(spec["checkpoint"], k, dtype=dtype, device=device)
    client = SplitClient(cfg, model, link)
    out["weights"] = module_bytes(model)  # after packing: a float32 master replaces low-precision weights
    held = watch_link(link)
    parts = {"gradients": 0, "optimizer_state": 0}
    if client.optimizer is not None:
        watch_optimizer(client.optimizer, parts)
    saved = SavedBytes({p.data_ptr() for p in model.parameters()})
    client.hello()
    vocab = model.stack.config.vocab_size
    for step in range(spec["steps"]):
        ids = torch.randint(4, vocab, (batch_size, seq))
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            client.train_step(step, batch)
        saved.step_done()
    out.update(peak.read())
    client.stop()
    link.close()
    link_bytes = held["peak"] + link._scratch.numel()  # host memory: frames are CPU bytes on every device
    out.update(parts, saved_activations=saved.peak, link_buffers=link_bytes if device.type == "cpu" else 0)
    out["host_link_bytes"] = link_bytes
    print(json.dumps(out), flush=True)


def stub_server(spec):
    """A server side with no blocks, for hosl.roles.SplitServer: one scalar weight and a loss that
    reads the activation, so the trainer's own server role answers every frame the plan names
    (LOSS, or GRAD for fo: dL/dh of the activation's shape) in microseconds. What the client holds
    does not depend on how the server gets its answers, and a real server would cost minutes per
    measurement on a small machine."""
    import types

    import torch
    import transformers

    class StubServer(torch.nn.Module):
        def __init__(self, hidden_size: int, vocab_size: int):
            super().__init__()
            self.hidden_size, self.vocab_size = hidden_size, vocab_size  # what SplitServer reads of a server model
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, h, labels=None, labelled_only=False):
            return types.SimpleNamespace(loss=h.hidden.float().mean() * self.scale, logits=None)

    config = transformers.AutoConfig.from_pretrained(spec["checkpoint"])
    return StubServer(config.hidden_size, config.vocab_size)


class Peak:
    """The client's peak from here on. CPU: the process's VmHWM minus its VmRSS now, after a toy
    warm-up (the libraries' code pages count as the interpreter's). CUDA: the caching allocator's
    peak of allocated bytes, from a reset here (before the model loads: the CUDA context and
    the libraries' kernels are not tensors and do not count), and its peak reserved beside it."""

    def __init__(self, device, family: str = "opt"):
        import torch

        self.device = device
        if device.type == "cuda":
            torch.zeros(1, device=device)  # the context
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            warm_up(family)
        self.host_baseline = proc_status("VmRSS")
        if device.type == "cpu":
            self.baseline = self.host_baseline
            reset_peak()  # where not allowed, the peak since the start stays: the toy warm-up adds a few KiB

    def read(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {
                "peak_bytes": torch.cuda.max_memory_allocated(self.device) - self.baseline,
                "reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        return {"peak_bytes": proc_status("VmHWM") - self.baseline}


def warm_up(family: str = "opt") -> None:
    """Loads the code every measured process runs (transformers' modules of the model family, torch's
    CPU kernels for the forward, the backward and AdamW, the thread pool) on a toy model of that
    family (OPT or Llama) of a few KiB, so that the baseline holds the libraries' pages and the
    measurement holds only what the split run allocates."""
    import gc

    import torch
    import transformers

    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.OPTConfig(
            vocab_size=64, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, num_attention_heads=2,
            ffn_dim=32, max_position_embeddings=64, dropout=0.0,
        )  # fmt: skip
        model = transformers.OPTForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(4, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        model(input_ids=ids)
    with torch.inference_mode():
        model(input_ids=ids)
    del model, opt
    gc.collect()


def module_bytes(module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward (parameters left out)."""

    def __init__(self, param_ptrs: set[int]):
        self.params = param_ptrs
        self.storages: dict[int, int] = {}
        self.peak = 0

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def unpack(self, t):
        return t

    def step_done(self):
        self.peak = max(self.peak, sum(self.storages.values()))
        self.storages.clear()


def watch_link(link) -> dict:
    """Tracks the most bytes the dist link holds in unfinished sends (the encoded frames it keeps alive)."""
    held = {"peak": 0}
    send = link.send

    def counted(frame):
        send(frame)
        held["peak"] = max(held["peak"], link.held_bytes)

    link.send = counted
    return held


def watch_optimizer(optimizer, parts: dict) -> None:
    if hasattr(optimizer, "optimizers"):  # a fused step (--client-fused-step): one optimiser per parameter
        for one in optimizer.optimizers:
            watch_optimizer(one, parts)  # gradients: the largest one held when its parameter steps
        state: dict[int, int] = {}  # every parameter's optimiser state, summed

        def total(one, *_):
            state[id(one)] = sum(v.nbytes for s in one.state.values() for v in s.values() if hasattr(v, "nbytes"))
            parts["optimizer_state"] = max(parts["optimizer_state"], sum(state.values()))

        for one in optimizer.optimizers:
            one.register_step_post_hook(total)
        return
    step = optimizer.step

    def counted(*args, **kwargs):
        grads = sum(p.grad.nbytes for g in optimizer.param_groups for p in g["params"] if p.grad is not None)
        result = step(*args, **kwargs)
        state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if hasattr(v, "nbytes"))
        parts["gradients"] = max(parts["gradients"], grads)
        parts["optimizer_state"] = max(parts["optimizer_state"], state)
        return result

    optimizer.step = counted


# --------------------------------------------------------------------------------------------------
# The parent: one checkpoint, then a pair of processes (or one, for the floor) per measurement.


def make_checkpoint(directory: Path, sizes: dict, family: str = "opt") -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch
    import transformers

    log(f"writing a random {family} checkpoint to {directory}")
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes)).eval()
    else:
        config = transformers.OPTConfig(dropout=0.0, attention_dropout=0.0, **sizes)
        model = transformers.OPTForCausalLM(config).eval()
    model.save_pretrained(directory)
    return directory


MEASURE = {
    "cpu": "VmHWM - VmRSS after imports and a toy warm-up",
    "cuda": "torch.cuda.max_memory_allocated from a reset before the model loads",
}

# glibc's malloc raises its mmap threshold (up to 32 MiB) each time a block that large is freed, and
# later blocks of that size then come from the heap, whose freed pages stay resident. A fixed
# threshold returns every block over it to the system when freed, so the resident set follows the
# live tensors. A memory-tight client should run so too; --malloc default measures glibc as it ships.
MALLOC = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "default": {}}


def measure(
    method: str,
    k: int,
    batch: int,
    seq: int,
    checkpoint: Path,
    steps: int,
    malloc: str = "mmap",
    device="cpu",
    micro_batch: int = 0,
    dtype: str = "float32",
) -> tuple[dict, dict | None]:
    """(client result, server stand-in's result or None for the floor). micro_batch: the floor's and
    the ZO clients' forwards over slices of that many rows (--client-micro-batch)."""
    spec = dict(method=method, k=k, batch=batch, seq=seq, checkpoint=str(checkpoint), steps=steps, device=device,
                micro_batch=micro_batch, dtype=dtype)  # fmt: skip
    env = MALLOC[malloc]
    if method == "floor":
        return run_workers(__file__, spec, ["client"], threads=2, extra_env=env)[0], None
    server, client = run_workers(__file__, spec, ["server", "client"], threads=2, extra_env=env)
    return client, server


def plot(records, batches, ks, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for method in dict.fromkeys(r["method"] for r in records):
            ys = [
                next(r["measured_bytes"] for r in records if r["method"] == method and r["split_layer"] == k
                     and r["batch_size"] == b) / MIB
                for k in ks
            ]  # fmt: skip
            ax.plot(ks, ys, marker=MARKERS[method], label=method, linestyle="--" if method == "floor" else "-")
        r0 = records[0]
        on = f" on {r0['device_name']}" if r0.get("device") == "cuda" else ""
        ax.set_title(f"{r0['model']} client peak{on}, batch {b}, seq {r0['seq_len']}", fontsize=10)
        ax.set_xlabel("split layer k (blocks on the client)")
        ax.set_ylabel("MiB allocated (CUDA allocator peak)" if on else "MiB above the bare interpreter")
        ax.set_xticks(ks)
        ax.set_ylim(bottom=0)
        ax.legend()
    save_figure(fig, path)


def main(argv=None):
    parser = bench_parser(
        __doc__, "a small model and batches (a few minutes)", out="directory for the records and the plot"
    )
    parser.add_argument("--steps", type=int, default=2, help="training steps per measurement (2)")
    parser.add_argument(
        "--malloc", default="mmap", choices=list(MALLOC), help="mmap: MALLOC_MMAP_THRESHOLD_=131072 (default)"
    )
    parser.add_argument(
        "--model", default="opt-125m", choices=["opt-125m", "opt-1.3b", "smollm2-135m"], help="the shape (opt-125m)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (16 64; --quick: 4 16)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="split layers (1 3 6)")
    parser.add_argument("--work", default=None, help="where the random checkpoint goes (runs/bench_memory)")
    parser.add_argument("--report", metavar="JSONL", help="print the table and plot of saved records; measure nothing")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where the client runs (cpu; cuda: allocator peak)"
    )
    parser.add_argument(
        "--client-micro-batch", dest="micro_batch", type=int, default=0,
        help="the floor's and the ZO clients' forwards over slices of this many rows (0: the whole batch)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="the client's weights (float32; a low one adds hosl-no-master beside hosl's float32 master)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="measurements at once, each in its own processes (1)")
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=[*METHODS, "hosl-no-master", *EXTRA],
        help=f"the rows to measure, with floor and fo always (default: {' '.join(METHODS)}, and hosl-no-master "
        "with --dtype)",
    )  # fmt: skip
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.report:
        path = Path(args.report)
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return report(records, path.with_name(path.stem.replace("bench_memory", "memory") + ".png"))

    setting = dict(QUICK if args.quick else FULL)
    name = "opt_quick" if args.quick else args.model
    if args.model == "opt-1.3b" and not args.quick:
        setting["model"] = OPT_1_3B
    if args.model == "smollm2-135m" and not args.quick:
        setting = dict(SMOLLM2_135M)
    setting["batches"] = args.batches or setting["batches"]
    setting["ks"] = args.ks or setting["ks"]
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.micro_batch < 0:
        parser.error(f"--client-micro-batch must be >= 0, got {args.micro_batch}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device here")
    device = torch.device(args.device)
    suffix = (
        ("_quick" if args.quick else "" if args.model == "opt-125m" else f"_{args.model}")
        + ("_default_malloc" if args.malloc == "default" else "")
        + ("_cuda" if args.device == "cuda" else "")
        + (f"_micro{args.micro_batch}" if args.micro_batch else "")
        + (f"_{args.dtype}" if args.dtype != "float32" else "")
    )
    work = Path(args.work or REPO / "runs" / "bench_memory")
    family = "llama" if name.startswith("smollm2") else "opt"
    checkpoint = make_checkpoint(work / f"{name}-random", setting["model"], family)
    rec = Recorder(args.out / f"bench_memory{suffix}.jsonl", environment())

    seq = setting["seq"]
    # Each measurement is its own processes and reads its own peak, so --jobs of them may run at once
    # (on a small machine that only slows each down; the numbers do not depend on it). Every row is
    # read against floor and fo, which are always measured.
    methods = list(dict.fromkeys(["floor", *(args.methods or methods_for(args.dtype)), "fo"]))
    settings = [(batch, k, method) for batch in setting["batches"] for k in setting["ks"] for method in methods]

    def one(job):
        batch, k, method = job
        start = time.perf_counter()
        client, _ = measure(
            method, k, batch, seq, checkpoint, args.steps, args.malloc, args.device, args.micro_batch, args.dtype
        )
        log(f"batch {batch} k {k} {method:6s} {fmt_bytes(client['peak_bytes']):>10s}  "
            f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
        return client

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(settings, pool.map(one, settings)))
    records = []
    for (batch, k, method), client in results.items():
        peak = client["peak_bytes"]
        floor = results[(batch, k, "floor")]["peak_bytes"]
        parts = {
            name: client.get(name, 0)
            for name in ("weights", "gradients", "optimizer_state", "saved_activations", "link_buffers")
        }
        if method == "floor":
            parts["transient"] = peak - parts["weights"]
        extra = {"malloc": " ".join(f"{k}={v}" for k, v in MALLOC[args.malloc].items()) or "glibc default"}
        if device.type == "cuda":
            extra = {"reserved_bytes": client["reserved_bytes"], "host_link_bytes": client.get("host_link_bytes")}
        records.append(
            rec.add(
                device,
                bench="client_peak",
                model=name,
                method=method,
                split_layer=k,
                batch_size=batch,
                seq_len=seq,
                steps=args.steps,
                measured_bytes=peak,
                baseline_bytes=client["baseline_bytes"],
                floor_bytes=floor,
                over_floor=peak / floor,
                fo_over_this=results[(batch, k, "fo")]["peak_bytes"] / peak,
                accounted=parts,
                unaccounted_bytes=peak - sum(parts.values()),
                link_init_bytes=client.get("link_init_bytes"),
                client_threads=2,
                client_micro_batch=args.micro_batch,
                dtype=args.dtype,
                measure=MEASURE[device.type],
                **extra,
            )
        )

    report(records, args.out / f"memory{suffix}.png")


def report(records, png: Path) -> None:
    """The table (and the plot) of a run's records."""
    r0 = records[0]
    if r0.get("device") == "cuda":
        where = f"on {r0['device_name']}: CUDA allocator peak from before the model loads"
    else:
        where = f"above the bare interpreter, malloc: {r0.get('malloc', 'glibc default')}"
    micro = (
        f"; floor and ZO clients in slices of {r0['client_micro_batch']} rows" if r0.get("client_micro_batch") else ""
    )
    print(
        f"\n{r0.get('model', 'opt-125m')}: client peak {where}; sequence {r0['seq_len']}, {r0['steps']} steps{micro}"
        f"; weights in {r0.get('dtype', 'float32')}\n"
    )
    header = ["batch", "k", "method", "measured", "over floor", "fo / this", "weights", "grads", "optim", "saved act",
              "link", "fwd transient", "rest"]  # fmt: skip
    table = []
    for r in records:
        a = r["accounted"]
        floor = next(
            f
            for f in records
            if f["method"] == "floor" and (f["split_layer"], f["batch_size"]) == (r["split_layer"], r["batch_size"])
        )
        # The inference forward's transient, as the floor measured it: what the ZO clients' forwards
        # (under no_grad) hold too. fo's forward keeps its activations instead (saved act).
        zo_like = r["method"] in ("floor", "hosl", "hosl-no-master", "zo")
        transient = floor["measured_bytes"] - floor["accounted"]["weights"] if zo_like else 0
        parts = sum(v for key, v in a.items() if key != "transient") + transient
        cells = [
            fmt_bytes(r["measured_bytes"]), f"{r['over_floor']:.2f}", f"{r['fo_over_this']:.2f}",
            fmt_bytes(a["weights"]), fmt_bytes(a["gradients"]), fmt_bytes(a["optimizer_state"]),
            fmt_bytes(a["saved_activations"]), fmt_bytes(a["link_buffers"]), fmt_bytes(transient) if zo_like else "-",
            fmt_bytes(r["measured_bytes"] - parts),
        ]  # fmt: skip
        table.append([r["batch_size"], r["split_layer"], r["method"], *cells])
    print_table(header, table, numeric=[True, True, False] + [True] * 10)
    batches = list(dict.fromkeys(r["batch_size"] for r in records))
    ks = list(dict.fromkeys(r["split_layer"] for r in records))
    plot(records, batches, ks, png)
    print(f"\nplot: {png.relative_to(REPO) if png.is_relative_to(REPO) else png}")


if __name__ == "__main__":
    main()
