#!/usr/bin/env python3
"""The native EConv / EFC kernels over a grid of layer shapes against dense onnxruntime (issue 19),
written into BENCHMARKS.md, one section per CPU (`kernel_grid:<cpu>`): each CPU's table is kept.

Each cell is one layer with a random codebook [V, C, r] and random codes (the kernels' speed does
not depend on the values): the EConv / EFC node alone against the dense Conv / Gemm of the weight
it stands for (tools/bench/kernels.py's layer_models, the same one-node models as its per-layer
table), one thread, interleaved (compare_latency). Grid: convolutions of 8 to 512 channels in and
out with kernels 1, 3 and 5 (stride 1, same padding; the spatial size shrinks with the width so that
a sample stays under about 50 M dense MACs), fc layers 64 to 4096 wide (square), the r / C of both
presets, batch 1 and 32. Per cell: dense and native medians, the measured ratio (dense / native, > 1:
native faster), the theoretical ratio (dense MACs / lookup operations) and the share of it reached;
for convolutions with float tables also the native node with its lookups forced into either order
(`ONNXMERGE_ECONV_ORDER`, kernels/lookup.h EConvPlan::channels), in the same interleaved rounds.
Issue 19's target: at batch 1, every layer whose theoretical ratio is at least 3x reaches 60%.
`--table-precision int16|int8`: the cells with integer tables (section `kernel_grid_<precision>:<cpu>`).

    python tools/bench/kernel_grid.py                 # ~10 min, writes BENCHMARKS.md
    python tools/bench/kernel_grid.py --table-precision int8
    python tools/bench/kernel_grid.py --quick --no-write
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import cpu_header, cpu_label, cpu_section, publish, require  # noqa: E402  (tools/bench is not a package)

from kernels import layer_models  # noqa: E402

CHANNELS = (8, 16, 32, 64, 128, 256, 512)
KERNELS = (1, 3, 5)
WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)
PRESETS = {"accu": {"conv": (4, 128), "fc": (4, 64)}, "light": {"conv": (8, 64), "fc": (8, 64)}}  # (r, C)
BATCHES = (1, 32)
MAX_MACS = 50e6  # per sample: the spatial size of a conv cell shrinks to stay under it
TARGET, THEORY_MIN = 0.60, 3.0


def cell_model(kind: str, width: int, k: int, r: int, c: int, rng, table_bits: int = 32):
    """A one-node native model of one EConv / EFC layer (random codebook and codes) and its shapes."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxmerge.graph.ops import DOMAIN, DOMAIN_VERSION

    v = math.ceil(width / r)
    integer = {"table_bits": table_bits} if table_bits != 32 else {}
    codebook = rng.standard_normal((v, c, r)).astype(np.float32) / math.sqrt(width * k * k)
    bias = rng.standard_normal(width).astype(np.float32)
    if kind == "conv":
        side = int(max(4, min(32, math.sqrt(MAX_MACS / (width * width * k * k)))))
        codes = rng.integers(0, c, (v, width, k, k)).astype(np.uint8)
        attrs = {"in_channels": width, "kernel_shape": [k, k], "strides": [1, 1], "pads": [k // 2] * 4,
                 "dilations": [1, 1]} | integer
        x_shape = y_shape = [None, width, side, side]
    else:
        codes = rng.integers(0, c, (v, width)).astype(np.uint8)
        attrs, x_shape, y_shape = {"in_features": width} | integer, [None, width], [None, width]
    op = "EConv" if kind == "conv" else "EFC"
    tensors = [numpy_helper.from_array(codebook, "codebook"), numpy_helper.from_array(codes, "codes"),
               numpy_helper.from_array(bias, "B")]
    dims = lambda s: ["N", *s[1:]]  # noqa: E731
    graph = helper.make_graph([helper.make_node(op, ["X", "codebook", "codes", "B"], ["Y"], name=f"{op}_{width}_{k}",
                                                domain=DOMAIN, **attrs)], "cell",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims(y_shape))], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              ir_version=8)
    return model, {"X": x_shape, "Y": y_shape}


ORDERS = ("rows", "channels")


def planned_in(order: str, session, x_shape, variable: str):
    """`session` (one EConv node) with its plan for `x_shape` made with the lookups in `order`: the
    kernels read `variable` when they plan an input size, at its first run; the plan is kept."""
    os.environ[variable] = order
    try:
        session.run(None, {"X": np.zeros([1, *x_shape[1:]], np.float32)})
    finally:
        del os.environ[variable]
    return session


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell (at least)")
    p.add_argument("--quick", action="store_true", help="a few cells only (a look, not the table)")
    p.add_argument("--table-precision", default="fp32", choices=["fp32", "int16", "int8"],
                   help="the cells' lookup tables")
    p.add_argument("--kinds", default="conv,fc", help="which cells: conv, fc or both")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    from onnxmerge import kernels
    from onnxmerge.graph.ops import make_session
    from onnxmerge.measure.latency import candidate, compare_latency, machine_info
    from onnxmerge.passes.codebook.emit_native import TABLE_BITS

    if not require("kernel_grid", kernels=True):
        return 1
    rng = np.random.default_rng(0)
    cells = [("conv", w, k) for w in CHANNELS for k in KERNELS] + [("fc", w, 1) for w in WIDTHS]
    if args.quick:
        cells = [("conv", 32, 3), ("conv", 128, 3), ("fc", 1024, 1)]
    cells = [cell for cell in cells if cell[0] in args.kinds.split(",")]
    bits = TABLE_BITS[args.table_precision]
    rows = []
    for kind, width, k in cells:
        for preset, settings in PRESETS.items():
            r, c = settings[kind]
            model, shapes = cell_model(kind, width, k, r, c, rng, bits)
            info, native, dense = layer_models(model, model.graph.node[0], shapes)
            sessions = {"dense": make_session(dense, 1), "native": make_session(native, 1)}
            if kind == "conv" and bits == 32:
                for order in ORDERS:
                    sessions[order] = planned_in(order, make_session(native, 1), shapes["X"], kernels.ORDER_VARIABLE)
            for batch in BATCHES:
                res = compare_latency({n: candidate([s], batch) for n, s in sessions.items()}, "dense",
                                      min_rounds=5 if batch > 1 else 20, warmup=2, budget_s=args.budget, progress=False)
                n = res["native"]
                row = {"kind": kind, "width": width, "k": k, "preset": preset, "r": r, "C": c, "batch": batch,
                       "x": info["x"], "theory": info["theory"], "dense_ms": res["dense"]["median_ms"],
                       "native_ms": n["median_ms"], "ratio": n["ratio"], "q1": n["ratio_q1"], "q3": n["ratio_q3"]}
                row["reached"] = row["ratio"] / row["theory"]
                row.update({f"{order}_ms": res[order]["median_ms"] for order in ORDERS if order in res})
                rows.append(row)
                print(f"{kind:4s} {width:5d} k={k} {preset:5s} b={batch:<3d} dense {row['dense_ms']:8.3f} ms native "
                      f"{row['native_ms']:8.3f} ms ratio {row['ratio']:5.2f} theory {row['theory']:5.2f} "
                      f"reached {100 * row['reached']:4.0f}%" + "".join(f" {o} {row[f'{o}_ms']:8.3f} ms" for o in ORDERS
                                                                      if f"{o}_ms" in row), flush=True)
    machine = machine_info()
    cpu = machine["cpu"]
    eligible = [r for r in rows if r["batch"] == 1 and r["theory"] >= THEORY_MIN]
    met = [r for r in eligible if r["reached"] >= TARGET]
    tables = "" if bits == 32 else f", tables in {args.table_precision}"
    lines = [f"## Native kernels over a grid of layer shapes{tables}: {cpu_label(machine)}", *cpu_header("kernel_grid", argv),
             f"- machine: {cpu}, {machine['usable_cores']} cores, onnxruntime {machine['onnxruntime']}; kernels' "
             f"instruction set {kernels.isa()} (of {', '.join(kernels.isas())}); one thread",
             "- cells: random codebook and codes; conv: in = out channels, stride 1, same padding, input side "
             f"shrinking with width (at most {MAX_MACS / 1e6:.0f} M dense MACs per sample); fc: square",
             "- ratio = dense median / native median (> 1: native faster) [quartiles of per-round paired ratios]; "
             "theory = dense MACs / lookup operations; reached = ratio / theory",
             f"- issue 19 target: at batch 1 every layer of theory >= {THEORY_MIN:g}x reaches {100 * TARGET:.0f}%: "
             f"**{len(met)} of {len(eligible)}** such cells do", "",
             "- rows ms / channels ms: the native node with its float tables' lookups forced into each order "
             "(`ONNXMERGE_ECONV_ORDER`); native ms is the order the kernels chose (README, \"Native kernels\")", "",
             "| layer | input (per sample) | preset (r/C) | batch | dense ms | native ms | ratio [q1-q3] | theory | reached "
             "| rows ms | channels ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layer = f"conv {r['width']} k{r['k']}" if r["kind"] == "conv" else f"fc {r['width']}"
        lines.append(f"| {layer} | {r['x']} | {r['preset']} ({r['r']}/{r['C']}) | {r['batch']} | {r['dense_ms']:.3f} | "
                     f"{r['native_ms']:.3f} | {r['ratio']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}] | {r['theory']:.2f}x | "
                     f"{100 * r['reached']:.0f}% | " + " | ".join(f"{r[f'{o}_ms']:.3f}" if f"{o}_ms" in r else "-"
                                                                  for o in ORDERS) + " |")
    body = "\n".join(lines) + "\n"
    name = "kernel_grid" if bits == 32 else f"kernel_grid_{args.table_precision}"
    publish(cpu_section(name, machine), body, write=not args.no_write and not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
