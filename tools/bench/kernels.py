#!/usr/bin/env python3
"""Speed of onnxmerge's native EConv / EFC kernels on the paper LeNet pair, written into
BENCHMARKS.md, one section per CPU (`kernels:<cpu>`).

The paper LeNet pair (build/bench_models/paper_lenet_fsdd.onnx and paper_lenet_fashion32.onnx,
trained by tools/train_models.py when missing) is merged with the codebook method
(`--emit native`, no calibration: timing only) at each preset, then:

- per layer: every EConv / EFC node of the merged model is cut out as a one-node model (same
  codebook, codes, bias and attributes; batch dim symbolic) and timed against the equivalent dense
  one-node Conv / Gemm whose weight is `onnxmerge.passes.codebook._codebook.reconstruct(...)` (stock onnxruntime,
  MLAS). ratio = dense median / native median (> 1: the native kernel is faster). The theoretical
  ratio is dense MACs / lookup ops (lookup ops as `onnxmerge.graph.macs._macs_lookup`:
  N*pixels_in*V*C*r + prod(Y)*kh*kw*V), and "reached" = measured ratio / theoretical ratio.
- whole model: the merged native model (kernels registered) and the merged portable model
  (`to_portable`: dense Conv / Gemm rebuilt at session creation) against the two originals in
  separate sessions run one after another (onnxmerge.measure.latency.latency_table, interleaved in one
  process); speed-up = originals' median / merged median.

Both at one thread and onnxruntime's default threads, batch 1 and 32. Only ratios taken side by side
mean anything on a shared machine. Issue 6 targets (single thread, batch 1, native merged vs
originals): >= 1.3x at accu, >= 1.8x at light; beyond the paper: 2.5x at light.

    python tools/bench/kernels.py                        # full run (~5 min), writes BENCHMARKS.md
    python tools/bench/kernels.py --budget 0.3 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks_md import BENCHMARKS, cpu_label, cpu_section, require, write_section  # noqa: E402  (tools/bench is not a package)

MODELS = {"digits": "paper_lenet_fsdd", "fashion": "paper_lenet_fashion32"}
TARGETS = {"accu": 1.3, "light": 1.8}  # issue 6: single thread, batch 1, native merged vs originals
BEYOND = {"light": 2.5}
THREADS = (1, None)
BATCHES = (1, 32)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="accu,light", help="comma-separated codebook presets")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per timing cell (at least)")
    p.add_argument("--min-rounds", type=int, default=20, help="rounds per timing cell at least")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs of each candidate per cell")
    p.add_argument("--benchmarks", type=Path, default=BENCHMARKS, help="file to update")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# one-node models


def _value(name: str, shape: list[int | None]):
    from onnx import TensorProto, helper

    dims = ["N" if i == 0 else d for i, d in enumerate(shape)]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def layer_models(merged, node, shapes: dict) -> tuple[dict, object, object]:
    """(info, native one-node model, dense one-node model) for EConv / EFC `node` of `merged`."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxmerge.graph.ops import DOMAIN, DOMAIN_VERSION
    from onnxmerge.passes.codebook._codebook import reconstruct

    init = {t.name: t for t in merged.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    codebook = numpy_helper.to_array(init[node.input[1]])
    codes = numpy_helper.to_array(init[node.input[2]])
    bias = numpy_helper.to_array(init[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
    x_shape, y_shape = shapes[node.input[0]], shapes[node.output[0]]
    conv = node.op_type == "EConv"
    kind = "conv" if conv else "fc"
    depth = int(attrs["in_channels" if conv else "in_features"])
    weight = reconstruct(codebook, codes, kind, depth).astype(np.float32)

    tensors = [numpy_helper.from_array(codebook, "codebook"), numpy_helper.from_array(codes, "codes")]
    inputs = ["X", "codebook", "codes"]
    dense_tensors, dense_inputs = [numpy_helper.from_array(weight, "W")], ["X", "W"]
    if bias is not None:
        tensors.append(numpy_helper.from_array(bias, "B"))
        dense_tensors.append(numpy_helper.from_array(bias, "B"))
        inputs.append("B")
        dense_inputs.append("B")
    x, y = _value("X", x_shape), _value("Y", y_shape)
    native = helper.make_model(
        helper.make_graph([helper.make_node(node.op_type, inputs, ["Y"], domain=DOMAIN, **attrs)],
                          "native", [x], [y], tensors),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        ir_version=merged.ir_version)
    if conv:
        conv_attrs = {k: attrs[k] for k in ("kernel_shape", "strides", "pads", "dilations") if k in attrs}
        dense_node = helper.make_node("Conv", dense_inputs, ["Y"], **conv_attrs)
    else:
        dense_node = helper.make_node("Gemm", dense_inputs, ["Y"], transB=1)
    dense = helper.make_model(helper.make_graph([dense_node], "dense", [x], [y], dense_tensors),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=merged.ir_version)
    onnx.checker.check_model(dense)

    # operation counts per sample (the ratio does not depend on the batch)
    n_seg, c, r = codes.shape[0], codebook.shape[1], codebook.shape[2]
    per_output = math.prod(codes.shape[2:])  # kernel offsets, 1 for EFC
    pixels_in = math.prod(x_shape[2:])
    y_elems = math.prod(y_shape[1:])
    lookup = pixels_in * n_seg * c * r + y_elems * per_output * n_seg
    dense_macs = y_elems * depth * per_output  # conv: p*Ho*Wo*d*kh*kw; fc: out*d
    info = {"node": node.name, "op": node.op_type, "x": x_shape[1:], "y": y_shape[1:],
            "V": n_seg, "C": c, "r": r, "dense_macs": dense_macs, "lookup_ops": lookup,
            "theory": dense_macs / lookup}
    return info, native, dense


def time_layers(merged, args) -> list[dict]:
    from onnxmerge.graph.macs import _shapes
    from onnxmerge.graph.ops import DOMAIN, make_session, to_portable
    from onnxmerge.measure.latency import candidate, compare_latency
    from onnxmerge.model.runtime import random_feeds

    # shapes from the portable form (the same tensors): shape inference cannot see through EConv / EFC
    shapes = _shapes(to_portable(merged))
    rows = []
    for node in merged.graph.node:
        if node.domain != DOMAIN:
            continue
        info, native, dense = layer_models(merged, node, shapes)
        for th in THREADS:
            sessions = {"dense": make_session(dense, th), "native": make_session(native, th)}
            if th == THREADS[0]:  # the two one-node models compute the same numbers
                feeds = random_feeds(sessions["dense"], 2)
                want, got = (sessions[k].run(None, feeds)[0] for k in ("dense", "native"))
                info["max_abs_diff"] = float(np.abs(want - got).max())
                if not np.allclose(want, got, rtol=1e-3, atol=1e-3 * float(np.abs(want).max())):
                    raise SystemExit(f"kernels: {node.name}: native and dense one-node models differ "
                                     f"(max abs diff {info['max_abs_diff']:.3g})")
            for batch in BATCHES:
                cands = {name: candidate([s], batch) for name, s in sessions.items()}
                res = compare_latency(cands, "dense", min_rounds=args.min_rounds, warmup=args.warmup,
                                      budget_s=args.budget, progress=False)
                n = res["native"]
                rows.append({**info, "threads": "default" if th is None else th, "batch": batch,
                             "dense_ms": res["dense"]["median_ms"], "native_ms": n["median_ms"],
                             "ratio": n["ratio"], "ratio_q1": n["ratio_q1"], "ratio_q3": n["ratio_q3"],
                             "reached": n["ratio"] / info["theory"], "runs": n["runs"]})
                print(f"  {info['node']:<40} {info['op']:<5} threads={rows[-1]['threads']!s:<7} "
                      f"batch={batch:<3} dense {rows[-1]['dense_ms']:8.3f} ms  native "
                      f"{rows[-1]['native_ms']:8.3f} ms  ratio {n['ratio']:.2f}x "
                      f"(theory {info['theory']:.2f}x)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# tables


def layer_table(rows: list[dict]) -> str:
    head = ["layer", "op", "x -> y (per sample)", "V x C x r", "theory (dense MACs / lookup ops)",
            "threads", "batch", "dense ms", "native ms", "measured ratio", "q1-q3", "reached"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['node']}`", r["op"], f"{r['x']} -> {r['y']}", f"{r['V']} x {r['C']} x {r['r']}",
                 f"{r['theory']:.2f}x ({r['dense_macs']:,} / {r['lookup_ops']:,})", r["threads"], r["batch"],
                 f"{r['dense_ms']:.3f}", f"{r['native_ms']:.3f}", f"{r['ratio']:.2f}x",
                 f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}", f"{100 * r['reached']:.0f}%"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def model_table(rows: list[dict]) -> str:
    head = ["threads", "batch", "originals ms", "native merged ms", "native speed-up",
            "native q1-q3", "portable merged ms", "portable speed-up", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, p = r["merged"], r["pack"]
        cells = [r["threads"], r["batch"], f"{r['originals']['median_ms']:.3f}", f"{m['median_ms']:.3f}",
                 f"{m['ratio']:.2f}x", f"{m['ratio_q1']:.2f}-{m['ratio_q3']:.2f}", f"{p['median_ms']:.3f}",
                 f"{p['ratio']:.2f}x", m["runs"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    out = []
    for preset, res in results.items():
        row = next(r for r in res["model"] if r["threads"] == 1 and r["batch"] == 1)
        got = row["merged"]["ratio"]
        port = row["pack"]["ratio"]
        if preset in TARGETS:
            t = TARGETS[preset]
            out.append(f"- `{preset}`: native merged vs originals at one thread, batch 1: {got:.2f}x "
                       f"against the target {t}x: **{'met' if got >= t else 'not met'}** "
                       f"(portable merged: {port:.2f}x).")
        else:
            out.append(f"- `{preset}`: native merged vs originals at one thread, batch 1: {got:.2f}x "
                       f"(no issue target for this preset; portable merged: {port:.2f}x).")
        if preset in BEYOND:
            t = BEYOND[preset]
            out.append(f"- `{preset}`, beyond-paper target {t}x: **{'met' if got >= t else 'not met'}** "
                       f"({got:.2f}x).")
    return out


def section(results, machine, command, args, isa) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"## Native EConv / EFC kernels: per layer against dense, whole model against the originals, {cpu_label(machine)}",
        "",
        "Written by `tools/bench/kernels.py`; one section per CPU (rerun on a CPU to update its own).",
        "",
        f"- date: {when}",
        f"- command: `{command}`",
        f"- machine: {machine['cpu']}, {machine['usable_cores']} usable of {machine['logical_cores']} "
        f"logical cores (shared, noisy), {machine['platform']}; Python {machine['python']}, onnxruntime "
        f"{machine['onnxruntime']}, onnx {machine['onnx']}, numpy {machine['numpy']}",
        "- models: `build/bench_models/paper_lenet_fsdd.onnx` (digits) + `paper_lenet_fashion32.onnx` "
        "(fashion) merged with `method=\"codebook\"`, `emit=\"native\"`, no calibration (timing only)",
        f"- how: each cell times its candidates interleaved, round by round, in one process "
        f"(onnxmerge.measure.latency.compare_latency; at least {args.min_rounds} rounds and {args.budget:g} s per "
        "cell, random inputs); ratios are medians' ratios, q1-q3 the quartiles of the per-round paired "
        "ratios. Absolute times follow the machine's load; read the ratios. threads `1`: one intra-op "
        "thread; `default`: onnxruntime's default.",
        "- per layer: each EConv / EFC node alone (same codebook, codes, bias, attributes) against a "
        "one-node dense Conv / Gemm with the reconstructed weight (MLAS). measured ratio = dense median "
        "/ native median (> 1: native faster); theory = dense MACs / lookup ops per sample, lookup ops "
        "= pixels_in*V*C*r + prod(Y)*kh*kw*V (`onnxmerge.graph.macs._macs_lookup`); reached = measured / "
        "theory. The digits and fashion nodes of a layer have the same shapes (one shared codebook, own "
        "codes); both are listed. Before timing, each pair is checked to give the same outputs.",
        "- whole model: native merged model (kernels registered) and portable merged model "
        "(`to_portable`: dense weights rebuilt at session creation, stock onnxruntime) against the two "
        "originals in separate sessions run one after another (`onnxmerge.measure.latency.latency_table`); "
        "speed-up = originals' median / merged median (> 1: merged faster).",
        "",
        "### Targets (issue 6: one thread, batch 1, native merged vs originals)",
        "",
        *verdicts(results),
        "",
        f"Kernels: instruction set `{isa}` (the best this CPU runs; `kernels.isas()`), "
        "codebook and codes packed when the session creates the kernel, tables built per segment group "
        "and row tile sized for L2, lookups as contiguous vector adds (EConv) or, for EFC at batch 1 on "
        "AVX-512, permutes across registers; work items on onnxruntime's intra-op thread pool. Layers "
        "whose lookup takes at least the dense operations (the one-channel first convolutions, r = 1, "
        "and the 10-way heads) stay dense Conv / Gemm in the native model (`to_native`), so they are not "
        "in the per-layer tables. The theoretical ratio bounds what the lookup formulation can give on a "
        "layer; `reached` says how much of it the kernels get. With `default` threads every session "
        "has its own spinning thread pool on this 2-core machine, which costs the kernels' many short "
        "parallel sections more than MLAS's few long ones: read those rows as an upper bound of the cost.",
    ]
    for preset, res in results.items():
        parts += ["", f"### Preset `{preset}`", "",
                  f"Whole model (params {res['stats']['originals_params']:,} in the originals vs "
                  f"{res['stats']['merged_params']:,} merged):", "",
                  model_table(res["model"]), "", "Per layer:", "", layer_table(res["layers"])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    import onnx
    from train_models import ensure_bench_models

    from onnxmerge import kernels
    from onnxmerge.api import merge
    from onnxmerge.graph.ops import to_portable
    from onnxmerge.measure.latency import latency_table, machine_info
    from onnxmerge.measure.metrics import model_stats

    if not require("kernels", kernels=True):
        return 1
    paths = ensure_bench_models(list(MODELS.values()))
    originals = {task: str(paths[name]) for task, name in MODELS.items()}
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    results = {}
    for preset in presets:
        print(f"preset {preset}: merging", flush=True)
        merged = merge(list(originals.values()), method="codebook", names=list(originals),
                       params={"preset": preset, "emit": "native"}).model
        portable = to_portable(merged)
        print(f"preset {preset}: per layer", flush=True)
        layers = time_layers(merged, args)
        print(f"preset {preset}: whole model", flush=True)
        model_rows = latency_table(merged, originals, pack=portable, batch_sizes=BATCHES, threads=THREADS,
                                   budget_s=args.budget, min_rounds=args.min_rounds, warmup=args.warmup,
                                   progress=not args.no_progress)
        for r in model_rows:
            print(f"  threads={r['threads']!s:<7} batch={r['batch']:<3} originals "
                  f"{r['originals']['median_ms']:8.3f} ms  native merged {r['merged']['median_ms']:8.3f} ms "
                  f"({r['merged']['ratio']:.2f}x)  portable merged {r['pack']['median_ms']:8.3f} ms "
                  f"({r['pack']['ratio']:.2f}x)", flush=True)
        stats = {"originals_params": sum(model_stats(onnx.load(p))["params"] for p in originals.values()),
                 "merged_params": model_stats(merged)["params"]}
        results[preset] = {"layers": layers, "model": model_rows, "stats": stats}

    machine = machine_info()
    command = "python " + shlex.join(["tools/bench/kernels.py", *argv])
    print("\n".join(verdicts(results)))
    print(f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores, "
          f"onnxruntime {machine['onnxruntime']}")
    if not args.no_write:
        write_section(args.benchmarks, cpu_section("kernels", machine), section(results, machine, command, args, kernels.isa()))
        print(f"updated {args.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
