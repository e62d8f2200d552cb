"""What hosl's Triton kernels compile to on a GPU, read on any machine: no GPU needed.

Triton compiles for a GPU target it is told (here through triton.compile with a GPUTarget), down to
PTX and the cubin, on a machine without the GPU. This script compiles every Triton kernel of hosl
(hosl.kernels.noise: the dense pass and the rows pass) for every dtype it writes and every variant
it launches (passes of 1 and 2 terms with scalar terms, Q terms from memory; rows aligned to whole
128-bit vectors or not), and reads off the compiled code:

* convert_layout_in_loops: ttg.convert_layout ops inside loops (scf.for / scf.while) of the final
  TTGIR. A layout conversion that moves data goes through shared memory with barriers; inside the
  loop over a pass's terms it is paid once per term.
* convert_layout: the same, in the whole kernel (outside loops: once per program).
* barriers_in_loops / barriers: bar.sync / barrier instructions in the PTX, inside loop bodies
  (a label and the backward branch to it) and in the whole kernel.
* shared_bytes: shared memory per program (the compiled kernel's metadata).
* load_bits / store_bits: the widest global load and store, in bits (ld.global.v4.b32 is 128). The
  body of a pass moves x in these; the edge program's and the unaligned rows path's accesses are
  narrower, and the loads of the rows list (64) and of the terms (32) are the kernel's own.
* load_widths / store_widths: every width of global load and store present.

    python benchmarks/inspect_kernels.py                   # sm_90 (H100/H200), a table
    python benchmarks/inspect_kernels.py --target sm_80 --json

Run it without TRITON_INTERPRET (the interpreter does not compile). It takes about a minute on 2
cores with the default one config per variant (--all-configs: every tuning candidate).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from _common import print_table

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# (kernel, variant name, constexprs beyond the dtype's VEC)
VARIANTS = [
    ("dense", "terms=1", {"NUM_TERMS": 1, "ACCUMULATE": True}),
    ("dense", "terms=2", {"NUM_TERMS": 2, "ACCUMULATE": True}),
    ("dense", "terms=Q", {"NUM_TERMS": 0, "ACCUMULATE": True}),
    ("dense", "gaussian", {"NUM_TERMS": 1, "ACCUMULATE": False}),
    ("rows", "aligned terms=1", {"NUM_TERMS": 1, "ALIGNED": True}),
    ("rows", "aligned terms=2", {"NUM_TERMS": 2, "ALIGNED": True}),
    ("rows", "aligned terms=Q", {"NUM_TERMS": 0, "ALIGNED": True}),
    ("rows", "unaligned terms=1", {"NUM_TERMS": 1, "ALIGNED": False}),
    ("rows", "unaligned terms=Q", {"NUM_TERMS": 0, "ALIGNED": False}),
]


def parse_target(text: str):
    from triton.backends.compiler import GPUTarget

    match = re.fullmatch(r"sm_(\d+)a?", text)
    if not match:
        raise SystemExit(f"inspect_kernels: --target must look like sm_90; got {text!r}")
    return GPUTarget("cuda", int(match.group(1)), 32)


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton's signature for `kernel` as hosl launches it: x as `dtype`, the rows list int64, the
    terms int32 (or None, a constexpr, for passes of one or two terms), scales float32, the other
    scalars int32 (their values below 2**31)."""
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name == "terms_ptr":
            sig[name] = "*i32" if constexprs["NUM_TERMS"] == 0 else "constexpr"
        elif name == "rows_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + DTYPES[dtype]
        elif name.endswith("_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def loop_spans(lines: list[str], opens) -> list[tuple[int, int]]:
    """(first, last) line of each loop body in TTGIR: from a line that opens a loop to the line
    where its braces close."""
    spans = []
    for i, line in enumerate(lines):
        if not opens(line):
            continue
        depth = 0
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            if depth <= 0 and j > i:
                spans.append((i, j))
                break
    return spans


def ptx_loop_spans(lines: list[str]) -> list[tuple[int, int]]:
    """(label line, branch line) of each backward branch in PTX: a loop's body."""
    labels, spans = {}, []
    for i, line in enumerate(lines):
        label = re.match(r"^\s*(\$?[\w.]+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$?[\w.]+);", line)
        if branch and labels.get(branch.group(1), i) < i:
            spans.append((labels[branch.group(1)], i))
    return spans


def access_bits(ptx: str, op: str) -> list[int]:
    """The widths in bits of the global `op` (ld or st) instructions in the PTX."""
    widths = set()
    for match in re.finditer(rf"\b{op}\.global((?:\.[\w:]+)*)", ptx):
        parts = match.group(1).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bufs]\d+", p)), None)
        if bits is not None:
            widths.add(vec * bits)
    return sorted(widths)


def inspect_compiled(compiled) -> dict:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    lines = ttgir.splitlines()
    spans = loop_spans(lines, lambda line: re.search(r"\bscf\.(for|while)\b", line) is not None)
    in_loops = {i for a, b in spans for i in range(a, b + 1)}
    converts = [i for i, line in enumerate(lines) if "ttg.convert_layout" in line]
    plines = ptx.splitlines()
    pspans = ptx_loop_spans(plines)
    p_in_loops = {i for a, b in pspans for i in range(a, b + 1)}
    barriers = [i for i, line in enumerate(plines) if re.search(r"\b(bar\.sync|barrier\.sync|bar\.arrive)\b", line)]
    loads, stores = access_bits(ptx, "ld"), access_bits(ptx, "st")
    return {
        "convert_layout_in_loops": sum(i in in_loops for i in converts),
        "convert_layout": len(converts),
        "barriers_in_loops": sum(i in p_in_loops for i in barriers),
        "barriers": len(barriers),
        "shared_bytes": int(compiled.metadata.shared),
        "load_bits": max(loads, default=0),
        "store_bits": max(stores, default=0),
        "load_widths": loads,
        "store_widths": stores,
    }


def inspect(target_name: str = "sm_90", all_configs: bool = False) -> list[dict]:
    """One record per kernel, dtype, variant and tuning config."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("inspect_kernels: unset TRITON_INTERPRET: the interpreter compiles nothing")
    import torch
    import triton
    from hosl.kernels import noise as kernels
    from triton.compiler import ASTSource

    target = parse_target(target_name)
    configs = kernels.CONFIGS if all_configs else kernels.CONFIGS[1:2]
    records = []
    for (name, variant, extra), dtype in [(v, d) for v in VARIANTS for d in DTYPES]:
        kernel = kernels.KERNELS[name]
        vec = kernels._vec(getattr(torch, dtype))
        constexprs = {**extra, "VEC": vec if extra.get("ALIGNED", True) else 1}
        if constexprs["NUM_TERMS"]:
            constexprs["terms_ptr"] = None
        for config in configs:
            consts = {**constexprs, **config.kwargs}
            # x (and the dense kernel's body view) 16-byte aligned, as torch's allocations are.
            attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
            source = ASTSource(kernel, signature(kernel, dtype, consts), constexprs=consts, attrs=attrs)
            options = {"enable_fp_fusion": False, "num_warps": config.num_warps}
            compiled = triton.compile(source, target=target, options=options)
            records.append(
                {
                    "kernel": name,
                    "dtype": dtype,
                    "variant": variant,
                    "target": target_name,
                    "BLOCK": config.kwargs["BLOCK"],
                    "num_warps": config.num_warps,
                    **inspect_compiled(compiled),
                }
            )
            print(f"compiled {name} {dtype} {variant} BLOCK={config.kwargs['BLOCK']}", file=sys.stderr, flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="sm_90", help="GPU architecture to compile for (default sm_90)")
    parser.add_argument("--json", action="store_true", help="one JSON record per line instead of a table")
    parser.add_argument("--all-configs", action="store_true", help="every tuning candidate, not only one")
    args = parser.parse_args(argv)
    records = inspect(args.target, args.all_configs)
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    fields = ["convert_layout_in_loops", "barriers_in_loops", "shared_bytes", "load_bits", "store_bits"]
    header = ["kernel", "dtype", "variant", "BLOCK, warps", "cvt in loops", "cvt", "bar in loops", "bar"]
    header += ["shared B", "load bits", "store bits"]
    rows = []
    for r in records:
        cells = [r["kernel"], r["dtype"], r["variant"], f"{r['BLOCK']}, {r['num_warps']}"]
        cells += [r["convert_layout_in_loops"], r["convert_layout"], r["barriers_in_loops"], r["barriers"]]
        rows.append(cells + [r[f] for f in fields[2:]])
    print_table(header, rows, numeric=[False] * 4 + [True] * (len(header) - 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
