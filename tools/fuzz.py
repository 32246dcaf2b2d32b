#!/usr/bin/env python3
"""A fuzzer for the merge command: mutated real models and data in, one clean outcome out.

    python tools/fuzz.py --cases 2000 --seed 1            # or --minutes 30; --jobs 2 on a free machine
    python tools/fuzz.py --replay build/fuzz/corpus       # rerun the saved crashing cases

Each case takes the shipped models (onnxmerge/examples, tests/models, tests/models/zoo) and their data, applies one to
three mutations (structure-aware on the ModelProto, byte-level on the file, on the --calib/--data
.npz files, or on the command line), and runs `onnxmerge.cli.main` on them in a worker process with
a per-case timeout and a memory limit. The outcome is one of:

    OK           exit 0, and the written model loads, passes onnx.checker (full check) and runs in
                 onnxruntime on a random input with finite outputs (or non-finite where an original
                 model gives non-finite outputs on the same input)
    CLEAN-ERROR  exit 1 or 2 with exactly one line `onnxmerge: error: ...` (not an internal error)
    CRASH        an internal error, an uncaught exception, a traceback, an error that says "this is
                 a bug", output other than one error line, another exit status, an overwritten input,
                 a hang past --timeout, or a dead worker (a segfault in onnx / onnxruntime C++)
    INVALID      exit 0, but the written model fails one of OK's checks
    LEFTOVER     a partial output or temporary file left behind (after an error: anything at all)

Every case is reproducible from (--seed, case index). Each CRASH / INVALID / LEFTOVER case is saved
under --corpus (a folder per crash class, a few examples each): the mutated files, the argv and the
message in case.json. Fixed cases become regression tests in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OUTCOMES = ("OK", "CLEAN-ERROR", "CRASH", "INVALID", "LEFTOVER")
BAD = ("CRASH", "INVALID", "LEFTOVER")
OUT_DIR = "out"  # the case folder's output folder: empty after an error, the merged model after success
OUTPUT = f"{OUT_DIR}/merged.onnx"
REPORT = f"{OUT_DIR}/report.json"

# ------------------------------------------------------------------------------------------------
# seeds: small real models (one merge well under a second) and their data, by input size


@dataclass(frozen=True)
class Seed:
    path: str  # relative to the repository root
    family: str  # architectures of one family can be zipped together
    sample: str  # the input's sample shape, CxHxW: the key of its data in DATA


def _zoo_seeds() -> tuple:
    """The architecture zoo (tests/models/zoo, tools/zoo.py): 3x32x32 graphs of every common CNN
    family and graphs written the old way; each its own family (a copy of itself zips with it)."""
    manifest = json.loads((ROOT / "tests/models/zoo/zoo.json").read_text())["models"]
    return tuple(Seed(f"tests/models/zoo/{m['file']}", name, "3x32x32") for name, m in sorted(manifest.items()))


SEEDS = (
    Seed("tests/models/lenet_mnist.onnx", "lenet", "1x28x28"),
    Seed("tests/models/lenet_fashion.onnx", "lenet", "1x28x28"),
    Seed("onnxmerge/examples/fashion_lenet.onnx", "lenet", "1x28x28"),
    Seed("onnxmerge/examples/digits_lenet.onnx", "lenet", "1x32x32"),
    Seed("tests/models/mobilenet_mnist.onnx", "mobilenet", "1x28x28"),
    Seed("tests/models/mobilenet_fashion.onnx", "mobilenet", "1x28x28"),
    Seed("tests/models/resnet_mnist.onnx", "resnet", "1x28x28"),
    Seed("tests/models/resnet_fashion.onnx", "resnet", "1x28x28"),
    *_zoo_seeds(),
)
# data files by sample shape; None: seeded random images with random labels of 10 classes (the zoo's
# graphs have random weights, so no real data means more to them)
DATA = {"1x28x28": ("tests/models/mnist_eval.npz", "tests/models/fashion_eval.npz",
                    "onnxmerge/examples/fashion_calib.npz"),
        "1x32x32": ("onnxmerge/examples/digits_calib.npz", "onnxmerge/examples/digits_eval.npz"),
        "3x32x32": None}
DATA_SAMPLES = 32  # per data file: enough for calibration batches and Hessians, small enough to be fast


@dataclass
class Corpus:
    """The seeds, parsed once: model protos and bytes, and the data sets (first DATA_SAMPLES samples)."""

    models: list[onnx.ModelProto]
    raw: list[bytes]
    data: dict[int, list[dict]]

    @classmethod
    def load(cls) -> "Corpus":
        raw = [(ROOT / s.path).read_bytes() for s in SEEDS]
        models = [onnx.load_from_string(b) for b in raw]
        data = {}
        for sample, files in DATA.items():
            if files is None:
                rng = np.random.default_rng(0)
                shape = tuple(int(d) for d in sample.split("x"))
                data[sample] = [{"x": rng.standard_normal((DATA_SAMPLES, *shape)).astype(np.float32),
                                 "y": rng.integers(0, 10, DATA_SAMPLES).astype(np.int64)}]
                continue
            data[sample] = []
            for f in files:
                with np.load(ROOT / f, allow_pickle=False) as z:
                    data[sample].append({k: (z[k] if z[k].ndim == 0 else z[k][:DATA_SAMPLES]) for k in z.files})
        return cls(models, raw, data)


# ------------------------------------------------------------------------------------------------
# structure-aware mutators: each edits a ModelProto in place and returns what it did, or None when it
# does not apply to this model (the caller then picks another)

STRUCTURE, BYTES, DATA_MUT, ARGV = {}, {}, {}, {}


def mutator(table: dict):
    def register(fn):
        table[fn.__name__] = fn
        return fn
    return register


def _node(m, r):
    return r.randrange(len(m.graph.node)) if m.graph.node else None


def _tensor_names(m) -> list[str]:
    g = m.graph
    return [*(i.name for i in g.input), *(t.name for t in g.initializer), *(o for n in g.node for o in n.output if o)]


def _rename(m, old: str, new: str) -> None:
    """Rename a tensor everywhere: node inputs and outputs, graph inputs, outputs, value infos, initializers."""
    g = m.graph
    for n in g.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
    for v in [*g.input, *g.output, *g.value_info, *g.initializer]:
        if v.name == old:
            v.name = new


INTS = (-2, -1, 0, 1, 2, 3, 5, 7, 64, 2**31, 2**40)
FLOATS = (float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-30, 1e30, 0.5, 2.0)
ATTRS = {  # attribute name -> kind of value (i: int, f: float, l: list of ints, s: string)
    "kernel_shape": "l", "strides": "l", "pads": "l", "dilations": "l", "group": "i", "axis": "i",
    "transA": "i", "transB": "i", "alpha": "f", "beta": "f", "epsilon": "f", "momentum": "f",
    "auto_pad": "s", "ceil_mode": "i", "count_include_pad": "i", "storage_order": "i", "mode": "s",
    "allowzero": "i", "keepdims": "i", "min": "f", "max": "f", "ratio": "f", "training_mode": "i",
}
STRINGS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", "constant", "reflect", "BOGUS", "")


def _attr_value(r, kind: str):
    if kind == "i":
        return r.choice(INTS)
    if kind == "f":
        return r.choice(FLOATS)
    if kind == "s":
        return r.choice(STRINGS)
    return [r.choice(INTS[:9]) for _ in range(r.choice((0, 1, 2, 2, 3, 4, 4, 5)))]


def _attribute(name: str, value) -> onnx.AttributeProto:
    """An attribute; a list is always INTS (an empty one has no type to infer)."""
    if isinstance(value, list):
        return helper.make_attribute(name, value, attr_type=onnx.AttributeProto.INTS)
    return helper.make_attribute(name, value)


@mutator(STRUCTURE)
def delete_node(m, r):
    i = _node(m, r)
    if i is None:
        return None
    name = m.graph.node[i].name
    del m.graph.node[i]
    return f"deleted node {name}"


@mutator(STRUCTURE)
def duplicate_node(m, r):
    i = _node(m, r)
    if i is None:
        return None
    copy = onnx.NodeProto()
    copy.CopyFrom(m.graph.node[i])
    fresh = r.random() < 0.5  # fresh outputs: a dangling branch; else two producers of one tensor
    if fresh:
        copy.output[:] = [f"{o}_dup" for o in copy.output]
        copy.name += "_dup"
    m.graph.node.insert(r.randrange(len(m.graph.node) + 1), copy)
    return f"duplicated node {copy.name} ({'fresh' if fresh else 'same'} outputs)"


@mutator(STRUCTURE)
def reorder_nodes(m, r):
    nodes = list(m.graph.node)
    if len(nodes) < 2:
        return None
    how = r.choice(("swap", "reverse", "shuffle"))
    if how == "swap":
        i, j = r.sample(range(len(nodes)), 2)
        nodes[i], nodes[j] = nodes[j], nodes[i]
    elif how == "reverse":
        nodes.reverse()
    else:
        r.shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return f"reordered nodes ({how})"


@mutator(STRUCTURE)
def rewire_input(m, r):
    i = _node(m, r)
    if i is None or not m.graph.node[i].input:
        return None
    node = m.graph.node[i]
    j = r.randrange(len(node.input))
    target = r.choice([*_tensor_names(m), "", "no_such_tensor"])
    node.input[j] = target
    return f"node {node.name} input {j} <- {target!r}"


@mutator(STRUCTURE)
def change_op_type(m, r):
    i = _node(m, r)
    if i is None:
        return None
    ops = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "MaxPool", "AveragePool",
           "GlobalAveragePool", "Flatten", "Reshape", "Add", "Concat", "Softmax", "Pad", "Dropout", "Identity",
           "BatchNormalization", "Constant", "Erf", "Mul", "ConvTranspose", "conv", "")
    node = m.graph.node[i]
    old, node.op_type = node.op_type, r.choice(ops)
    if r.random() < 0.1:
        node.domain = r.choice(("ai.onnx", "com.microsoft", "ai.onnxmerge", "x"))
    return f"node {node.name}: {old} -> {node.domain + '::' if node.domain else ''}{node.op_type}"


@mutator(STRUCTURE)
def mutate_attribute(m, r):
    i = _node(m, r)
    if i is None:
        return None
    node = m.graph.node[i]
    action = r.choice(("remove", "add", "modify", "modify", "retype")) if node.attribute else "add"
    if action == "add":
        name = r.choice(list(ATTRS))
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*keep, _attribute(name, _attr_value(r, ATTRS[name]))])
        return f"node {node.name}: set {name}"
    k = r.randrange(len(node.attribute))
    a = node.attribute[k]
    if action == "remove":
        del node.attribute[k]
        return f"node {node.name}: removed {a.name}"
    if action == "retype":  # the right name with a value of the wrong kind
        kind = r.choice([x for x in "ifls" if x != ATTRS.get(a.name, "?")])
        node.attribute[k].CopyFrom(_attribute(a.name, _attr_value(r, kind)))
        return f"node {node.name}: {a.name} retyped to {kind}"
    if a.type == onnx.AttributeProto.INTS and a.ints and r.random() < 0.5:
        values = list(a.ints)
        values[r.randrange(len(values))] = r.choice(INTS)
        if r.random() < 0.3:
            values = values[:-1] if r.random() < 0.5 else values + [r.choice(INTS[:9])]
        new = _attribute(a.name, values)
    else:
        new = _attribute(a.name, _attr_value(r, ATTRS.get(a.name, r.choice("ifl"))))
    node.attribute[k].CopyFrom(new)
    return f"node {node.name}: {a.name} modified"


def _value_info(m, r):
    pool = [*m.graph.input, *m.graph.output]
    return r.choice(pool) if pool else None


@mutator(STRUCTURE)
def mutate_io_shape(m, r):
    v = _value_info(m, r)
    if v is None:
        return None
    shape = v.type.tensor_type.shape
    dims = shape.dim
    action = r.choice(("value", "value", "drop", "add", "symbolic", "clear"))
    if action == "clear":
        v.type.tensor_type.ClearField("shape")
    elif action == "add" or not dims:
        dims.insert(r.randrange(len(dims) + 1), onnx.TensorShapeProto.Dimension(dim_value=r.choice((1, 2, 3, 28))))
    else:
        k = r.randrange(len(dims))
        if action == "drop":
            del dims[k]
        elif action == "symbolic":
            dims[k].Clear()
            if r.random() < 0.8:
                dims[k].dim_param = r.choice(("N", "H", "batch", "s", "x y"))
        else:
            dims[k].Clear()
            dims[k].dim_value = r.choice((0, 1, 2, 3, 7, 10, 27, 29, 32, 64, -1))
    return f"{v.name}: shape {action}"


@mutator(STRUCTURE)
def mutate_elem_type(m, r):
    v = _value_info(m, r)
    if v is None:
        return None
    v.type.tensor_type.elem_type = r.choice((0, 2, 3, 6, 7, 9, 10, 11, 16, 8))
    return f"{v.name}: elem_type {v.type.tensor_type.elem_type}"


@mutator(STRUCTURE)
def add_value_info(m, r):
    """A wrong shape annotation for an intermediate tensor (strict shape inference must notice)."""
    names = [o for n in m.graph.node for o in n.output]
    if not names:
        return None
    name = r.choice(names)
    dims = [r.choice((1, 3, 7, "N")) for _ in range(r.choice((1, 2, 4)))]
    m.graph.value_info.append(helper.make_tensor_value_info(name, r.choice((1, 1, 7)), dims))
    return f"value_info {name} {dims}"


def _init(m, r):
    return r.randrange(len(m.graph.initializer)) if m.graph.initializer else None


def _set_array(m, k: int, array: np.ndarray) -> None:
    t = m.graph.initializer[k]
    m.graph.initializer[k].CopyFrom(numpy_helper.from_array(array, t.name))


@mutator(STRUCTURE)
def resize_initializer(m, r):
    k = _init(m, r)
    if k is None:
        return None
    a = numpy_helper.to_array(m.graph.initializer[k])
    if a.ndim == 0:
        return None
    axis = r.randrange(a.ndim)
    n = max(0, a.shape[axis] + r.choice((-1, 1, 2, -a.shape[axis])))
    idx = np.arange(n) % max(1, a.shape[axis])
    b = np.take(a, idx, axis=axis) if a.shape[axis] else np.zeros([*a.shape[:axis], n, *a.shape[axis + 1:]], a.dtype)
    _set_array(m, k, b)
    return f"initializer {m.graph.initializer[k].name}: {a.shape} -> {b.shape}"


@mutator(STRUCTURE)
def reshape_initializer(m, r):
    k = _init(m, r)
    if k is None:
        return None
    a = numpy_helper.to_array(m.graph.initializer[k])
    how = r.choice(("transpose", "flatten", "unsqueeze", "squeeze"))
    b = {"transpose": lambda: a.T.copy(), "flatten": lambda: a.reshape(-1),
         "unsqueeze": lambda: a[None], "squeeze": lambda: np.squeeze(a)}[how]()
    _set_array(m, k, np.ascontiguousarray(b))
    return f"initializer {m.graph.initializer[k].name}: {how} {a.shape} -> {b.shape}"


@mutator(STRUCTURE)
def initializer_dtype(m, r):
    k = _init(m, r)
    if k is None:
        return None
    a = numpy_helper.to_array(m.graph.initializer[k])
    dtype = r.choice((np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_))
    _set_array(m, k, a.astype(dtype))
    return f"initializer {m.graph.initializer[k].name}: {a.dtype} -> {np.dtype(dtype)}"


@mutator(STRUCTURE)
def initializer_values(m, r):
    """Non-finite, zero, tiny or huge values in a weight."""
    k = _init(m, r)
    if k is None:
        return None
    a = numpy_helper.to_array(m.graph.initializer[k]).copy()
    if a.dtype.kind != "f" or a.size == 0:
        return None
    how = r.choice(("nan", "inf", "zero", "scale"))
    flat = a.reshape(-1)
    if how in ("nan", "inf"):
        picks = np.random.default_rng(r.getrandbits(32)).choice(flat.size, size=min(flat.size, r.choice((1, 3, 100))))
        flat[picks] = np.nan if how == "nan" else r.choice((np.inf, -np.inf))
    elif how == "zero":
        flat[:] = 0
    else:
        flat *= r.choice((1e-30, 1e6, -1.0))
    _set_array(m, k, a)
    return f"initializer {m.graph.initializer[k].name}: {how}"


@mutator(STRUCTURE)
def corrupt_initializer_data(m, r):
    """Dims that disagree with the stored data, or data in the wrong field."""
    k = _init(m, r)
    if k is None:
        return None
    t = m.graph.initializer[k]
    how = r.choice(("dims", "truncate", "empty", "double_store"))
    if how == "dims" and t.dims:
        t.dims[r.randrange(len(t.dims))] += r.choice((-1, 1, 1000))
    elif how == "truncate" and t.raw_data:
        t.raw_data = t.raw_data[: len(t.raw_data) - r.choice((1, 4, len(t.raw_data)))]
    elif how == "empty":
        t.ClearField("raw_data")
        t.ClearField("float_data")
    else:  # the values both as raw_data and as float_data
        t.float_data.extend([1.0] * min(4, max(1, len(t.raw_data) // 4)))
    return f"initializer {t.name}: {how}"


@mutator(STRUCTURE)
def external_data(m, r):
    """An initializer stored 'outside the file', where there is nothing or something outside the folder."""
    k = _init(m, r)
    if k is None:
        return None
    t = m.graph.initializer[k]
    location = r.choice(("missing.bin", "../escape.bin", "/etc/hostname", "weights.bin", ""))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=location)
    if r.random() < 0.5:
        t.external_data.add(key="length", value=str(r.choice((4, 10**9))))
    return f"initializer {t.name}: external data at {location!r}"


@mutator(STRUCTURE)
def remove_initializer(m, r):
    k = _init(m, r)
    if k is None:
        return None
    name = m.graph.initializer[k].name
    if r.random() < 0.5:
        del m.graph.initializer[k]
        return f"removed initializer {name}"
    m.graph.initializer.append(m.graph.initializer[k])
    return f"duplicated initializer {name}"


@mutator(STRUCTURE)
def initializer_as_input(m, r):
    """A weight that is also a graph input (allowed by ONNX: a default the caller may override)."""
    k = _init(m, r)
    if k is None:
        return None
    t = m.graph.initializer[k]
    m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return f"initializer {t.name} also a graph input"


@mutator(STRUCTURE)
def rename_collide(m, r):
    """Rename a tensor to the name of another (a collision), or to an odd or merge-like name."""
    names = _tensor_names(m)
    if not names:
        return None
    old = r.choice(names)
    task_like = [f"t{k}/{o.name}" for k in range(3) for o in m.graph.output] + [f"t{k}/input" for k in range(3)]
    new = r.choice([*names, *task_like, "", "a b", "x:0", "ü" * 3, "n" * 300, "shared/x"])
    _rename(m, old, new)
    return f"renamed tensor {old!r} -> {new!r}"


@mutator(STRUCTURE)
def rename_node(m, r):
    i = _node(m, r)
    if i is None:
        return None
    others = [n.name for n in m.graph.node]
    m.graph.node[i].name = r.choice([*others, "", "t0/conv", "shared/x"])
    return f"node #{i} renamed {m.graph.node[i].name!r}"


@mutator(STRUCTURE)
def change_versions(m, r):
    what = r.choice(("opset", "opset", "ir", "imports"))
    if what == "opset":
        v = r.choice((1, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23, 24, 99, 0))
        for imp in m.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = v
        return f"opset {v}"
    if what == "ir":
        m.ir_version = r.choice((0, 1, 3, 4, 5, 6, 7, 9, 10, 11, 12, 99))
        return f"ir_version {m.ir_version}"
    if r.random() < 0.5:
        del m.opset_import[:]
        return "no opset_import"
    m.opset_import.add(domain=r.choice(("ai.onnx", "com.microsoft", "x", "")), version=r.choice((1, 17)))
    return "extra opset_import"


@mutator(STRUCTURE)
def mutate_graph_io(m, r):
    g = m.graph
    action = r.choice(("remove_output", "remove_all_outputs", "add_output", "remove_input", "add_input"))
    if action == "remove_output" and g.output:
        del g.output[r.randrange(len(g.output))]
    elif action == "remove_all_outputs":
        del g.output[:]
    elif action == "add_output":
        names = [o for n in g.node for o in n.output]
        if not names:
            return None
        name = r.choice(names)
        g.output.append(helper.make_tensor_value_info(name, 1, None) if r.random() < 0.5
                        else helper.make_empty_tensor_value_info(name))
    elif action == "remove_input" and g.input:
        del g.input[r.randrange(len(g.input))]
    else:
        g.input.append(helper.make_tensor_value_info(r.choice(("extra", "input2")), 1, ["N", r.choice((1, 4))]))
    return action


@mutator(STRUCTURE)
def insert_node(m, r):
    """A shape-preserving node after a tensor, its consumers rewired to it: a valid, unusual graph."""
    g = m.graph
    names = [*(i.name for i in g.input), *(o for n in g.node for o in n.output)]
    if not names:
        return None
    src = r.choice(names)
    op = r.choice(("Relu", "Sigmoid", "Tanh", "Identity", "Dropout", "LeakyRelu", "Softmax", "Add", "Clip", "Pad",
                   "BatchNormalization"))
    new = f"{src}__{op.lower()}"
    extra, inits = [], []
    if op == "Add":
        extra = [src]
    elif op == "Pad":
        inits = [numpy_helper.from_array(np.zeros(8, np.int64), f"{new}_pads")]
    elif op == "BatchNormalization":
        c = r.choice((1, 4, 6, 8, 16))
        rng = np.random.default_rng(r.getrandbits(32))
        inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), f"{new}_{k}")
                 for k in ("scale", "bias", "mean", "var")]
    for node in g.node:
        node.input[:] = [new if x == src else x for x in node.input]
    for o in g.output:
        if o.name == src:
            o.name = new
    node = helper.make_node(op, [src, *extra, *(t.name for t in inits)], [new], name=f"fuzz_{op.lower()}")
    pos = next((k + 1 for k, n in enumerate(g.node) if src in n.output), 0)
    g.node.insert(pos, node)
    g.initializer.extend(inits)
    return f"inserted {op} after {src}"


@mutator(STRUCTURE)
def mutate_constant(m, r):
    consts = [n for n in m.graph.node if n.op_type == "Constant"]
    if not consts:
        return None
    node = r.choice(consts)
    value = r.choice((np.array(np.nan, np.float32), np.zeros((2, 2), np.float32), np.array(6, np.int64),
                      np.array([], np.float32), np.array(-1e30, np.float32)))
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
    return f"Constant {node.name}: {value.dtype} {value.shape}"


@mutator(STRUCTURE)
def junk_metadata(m, r):
    """Metadata that looks like a merged model's, on an input."""
    m.metadata_props.add(key=r.choice(("onnxmerge.tasks", "onnxmerge.method", "x")), value=r.choice(("[", "{}", "")))
    return "junk metadata"


@mutator(STRUCTURE)
def convert_opset(m, r):
    """The same model in another opset, by onnx's version converter: valid, as another exporter writes it."""
    from onnx import version_converter

    target = r.choice((11, 13, 14, 15, 16, 18, 19, 20, 21))
    m.CopyFrom(version_converter.convert_version(m, target))
    return f"converted to opset {target}"


@mutator(STRUCTURE)
def rename_tensor(m, r):
    """A consistent rename to a unique but odd name (the model stays valid)."""
    names = _tensor_names(m)
    if not names:
        return None
    old = r.choice(names)
    odd = ("a b", "x:0", "ü/ß", "n" * 200, "t0_logits", "shared", "input.1", "0", "-")
    new = f"{r.choice(odd)}~{r.randrange(99)}"
    if new in names:
        return None
    _rename(m, old, new)
    return f"renamed tensor {old!r} -> {new!r}"


@mutator(STRUCTURE)
def batch_dim_name(m, r):
    """The batch dim under another name, or a fixed size, on the inputs and outputs alike."""
    name = r.choice(("batch", "b", "", "unk__0", "N"))
    for v in [*m.graph.input, *m.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            if name:
                dims[0].dim_param = name
    return f"batch dim named {name!r}"


# mutations after which the model is still valid ONNX: they reach past the loading checks
VALID = ("insert_node", "rename_tensor", "convert_opset", "initializer_as_input", "batch_dim_name",
         "junk_metadata", "mutate_constant", "initializer_values")


def mutate_structure(model: onnx.ModelProto, r: random.Random, count: int) -> tuple[list[str], list[str]]:
    """Apply `count` structure mutators that apply; (mutator names, what each did)."""
    names, notes = [], []
    tries = 0
    while len(names) < count and tries < 20:
        tries += 1
        # the valid-model mutations three times as often as the others: most of the others stop at load
        name = r.choices(list(STRUCTURE), weights=[3 if n in VALID else 1 for n in STRUCTURE])[0]
        try:
            note = STRUCTURE[name](model, r)
        except Exception:  # noqa: BLE001 - a mutation that an earlier one made impossible: pick another
            note = None
        if note is not None:
            names.append(name)
            notes.append(note)
    return names, notes


# ------------------------------------------------------------------------------------------------
# byte-level mutators: on the serialized file. Positions favour the graph's structure: the nodes come
# first in the file and the graph inputs, outputs and opset imports last; the weights lie in between.


def _position(data: bytes, r: random.Random) -> int:
    n = max(1, len(data))
    zone = r.choice(("head", "tail", "anywhere"))
    if zone == "head":
        return r.randrange(min(n, 2048))
    if zone == "tail":
        return max(0, n - 1 - r.randrange(min(n, 1024)))
    return r.randrange(n)


@mutator(BYTES)
def bit_flip(data, r, other):
    b = bytearray(data)
    for _ in range(r.choice((1, 1, 2, 4, 8))):
        b[min(_position(data, r), len(b) - 1)] ^= 1 << r.randrange(8)
    return bytes(b), "bit flips"


@mutator(BYTES)
def byte_insert(data, r, other):
    p = _position(data, r)
    chunk = bytes(r.getrandbits(8) for _ in range(r.choice((1, 2, 8, 16))))
    return data[:p] + chunk + data[p:], f"inserted {len(chunk)} bytes at {p}"


@mutator(BYTES)
def byte_delete(data, r, other):
    p, n = _position(data, r), r.choice((1, 2, 8, 16))
    return data[:p] + data[p + n:], f"deleted {n} bytes at {p}"


@mutator(BYTES)
def byte_set(data, r, other):
    b = bytearray(data)
    p = min(_position(data, r), len(b) - 1)
    b[p] = r.choice((0x00, 0xFF, 0x7F, 0x80, 0x01))
    return bytes(b), f"byte {p} = {b[p]:#x}"


@mutator(BYTES)
def truncate(data, r, other):
    n = r.choice((0, 1, 16, r.randrange(len(data) + 1), len(data) - 1))
    return data[:n], f"truncated to {n} bytes"


@mutator(BYTES)
def splice(data, r, other):
    p, q = _position(data, r), _position(other, r)
    return data[:p] + other[q:], f"spliced at {p} with another model from {q}"


@mutator(BYTES)
def duplicate_chunk(data, r, other):
    p = _position(data, r)
    n = r.choice((4, 64, 1024))
    return data[:p] + data[p:p + n] * 2 + data[p + n:], f"doubled {n} bytes at {p}"


# ------------------------------------------------------------------------------------------------
# data mutators: on a {x, y, preprocessing} dict before it is written as .npz (or on the file)


@mutator(DATA_MUT)
def data_shape(d, r):
    x = d["x"]
    how = r.choice(("crop", "channels", "flatten", "scalar", "transpose", "one_dim"))
    d["x"] = {"crop": lambda: x[..., 1:, :], "channels": lambda: np.concatenate([x, x], 1),
              "flatten": lambda: x.reshape(len(x), -1), "scalar": lambda: np.array(1.0, np.float32),
              "transpose": lambda: x.transpose(0, 2, 3, 1), "one_dim": lambda: x.reshape(-1)}[how]()
    return f"x {how} -> {d['x'].shape}"


@mutator(DATA_MUT)
def data_dtype(d, r):
    dtype = r.choice((np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64, "U1"))
    d["x"] = d["x"].astype(dtype)
    return f"x as {np.dtype(dtype)}"


@mutator(DATA_MUT)
def data_values(d, r):
    how = r.choice(("nan", "inf", "huge"))
    x = d["x"].copy()
    x.reshape(-1)[:: r.choice((1, 7, 1000))] = {"nan": np.nan, "inf": np.inf, "huge": 3e38}[how]
    d["x"] = x
    return f"x {how}"


@mutator(DATA_MUT)
def data_empty(d, r):
    d["x"], d["y"] = d["x"][:0], d["y"][:0]
    if r.random() < 0.5:
        d["x"], d["y"] = d["x"][:1], d["y"][:1]
        return "one sample"
    return "no samples"


@mutator(DATA_MUT)
def data_labels(d, r):
    y = d["y"].copy()
    how = r.choice(("range", "negative", "float", "fraction", "2d", "length", "drop", "huge"))
    if how == "range":
        y[0] = 10 + r.randrange(1000)
    elif how == "negative":
        y[-1] = -1
    elif how == "huge":
        y[0] = 2**62
    elif how == "float":
        y = y.astype(np.float32)
    elif how == "fraction":
        y = y.astype(np.float32) + 0.5
    elif how == "2d":
        y = y[:, None]
    elif how == "length":
        y = y[:-1]
    else:
        del d["y"]
        return "no labels"
    d["y"] = y
    return f"labels {how}"


@mutator(DATA_MUT)
def data_fields(d, r):
    how = r.choice(("no_x", "preprocessing_text", "preprocessing_list", "object"))
    if how == "no_x":
        d["images"] = d.pop("x")
    elif how == "preprocessing_text":
        d["preprocessing"] = np.array("not json")
    elif how == "preprocessing_list":
        d["preprocessing"] = np.array("[1, 2]")
    else:
        d["x"] = np.array([d["x"][0], "a"], dtype=object)
    return f"fields {how}"


def npz_bytes(d: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **d)
    return buf.getvalue()


@mutator(DATA_MUT)
def data_file_bytes(d, r):
    """Not a .npz, or a truncated one (marked for mutate_data, which writes the bytes)."""
    d["__bytes__"] = r.choice(("text", "truncate"))
    return f"file {d['__bytes__']}"


def mutate_data(d: dict, r: random.Random, count: int) -> tuple[bytes, list[str], list[str]]:
    names, notes = [], []
    for _ in range(count):
        name = r.choice(list(DATA_MUT))
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # casting NaN to int on purpose
                notes.append(DATA_MUT[name](d, r))
            names.append(name)
        except Exception:  # noqa: BLE001 - a mutation that an earlier one ruled out
            continue
    how = d.pop("__bytes__", None)
    data = npz_bytes(d)
    if how == "text":
        data = b"x,y\n1,2\n"
    elif how == "truncate":
        data = data[: r.randrange(len(data))]
    return data, names, notes


# ------------------------------------------------------------------------------------------------
# command-line mutators: odd values of the merge command's own flags


@mutator(ARGV)
def argv_opset(argv, r):
    argv += ["--opset", str(r.choice((1, 7, 11, 13, 16, 17, 18, 21, 22, 23, 99, 0, -1)))]


@mutator(ARGV)
def argv_align(argv, r):
    argv += ["--align", r.choice(("0=0,1=1", "0=1,1=0", "5=5", "x", "0=0,0=1", "-1=0", "", "0=0,2=1", "1=1"))]


@mutator(ARGV)
def argv_names(argv, r):
    i = argv.index("--names")
    argv[i + 1] = r.choice(("t0,t0", "t0", "1a,t1", "t0,t1,t2", "t/0,t1", " , ", "input,logits", "shared,t1"))


@mutator(ARGV)
def argv_flags(argv, r):
    argv += r.choice((["--separate-inputs"], ["--verify"], ["--report", REPORT], ["--report", OUTPUT]))


def method_argv(method: str, r: random.Random) -> list[str]:
    """Tiny but valid settings of each method, so that one merge takes well under a second."""
    if method == "zipper":
        argv = ["--share", r.choice(("0", "1", "2", "3", "all")), "--depthwise", r.choice(("shared", "task"))]
        return argv + (["--match", "hungarian"] if r.random() < 0.2 else [])
    if method == "codebook":
        argv = ["--preset", "light", "--kmeans-init", "1"]
        if r.random() < 0.3:
            argv += ["--r", r.choice(("1", "2", "8")), "--codewords", r.choice(("2", "16", "64"))]
        return argv + (["--heads", "codebook"] if r.random() < 0.3 else [])
    if method == "mtz":
        argv = ["--hessian-samples", "16", "--share-ratio", r.choice(("0", "0.5", "1")),
                "--pairing", r.choice(("optimal", "greedy", "random"))]
        return argv + (["--retrain-steps", "1"] if r.random() < 0.2 else [])
    return []


# ------------------------------------------------------------------------------------------------
# one case


@dataclass
class Case:
    seed: int
    index: int
    files: dict[str, bytes]  # file name in the case folder -> content
    argv: list[str]  # relative to the case folder
    mutators: list[str] = field(default_factory=list)  # "kind:name" of each mutation applied
    notes: list[str] = field(default_factory=list)
    method: str = "pack"


def make_case(corpus: Corpus, seed: int, index: int) -> Case:
    """The case number `index` of a run with `seed`: reproducible from the two alone."""
    r = random.Random(f"{seed}/{index}")
    method = r.choices(("pack", "codebook", "zipper", "mtz"), weights=(3, 3, 3, 1))[0]
    count = 1 if method == "codebook" and r.random() < 0.05 else r.choices((2, 3), weights=(9, 1))[0]
    first = r.randrange(len(SEEDS))
    same = [k for k, s in enumerate(SEEDS) if s.family == SEEDS[first].family]
    picks = [first] + [r.choice(same if r.random() < 0.8 else range(len(SEEDS))) for _ in range(count - 1)]
    models = [onnx.ModelProto() for _ in picks]
    for m, k in zip(models, picks):
        m.CopyFrom(corpus.models[k])
    raw: list[bytes | None] = [None] * count
    kind = r.choices(("none", "structure", "bytes", "data", "argv"), weights=(2, 60, 20, 12, 6))[0]
    names, notes = [], []
    target = r.randrange(count)
    if kind == "structure":
        names, notes = mutate_structure(models[target], r, r.choice((1, 1, 2, 3)))
    elif kind == "bytes":
        data = corpus.raw[picks[target]]
        for _ in range(r.choice((1, 1, 2))):
            if not data:  # truncated to nothing: no byte left to mutate
                break
            name = r.choice(list(BYTES))
            data, note = BYTES[name](data, r, corpus.raw[r.randrange(len(SEEDS))])
            names.append(name)
            notes.append(note)
        raw[target] = data
    files = {}
    for k, m in enumerate(models):
        files[f"m{k}.onnx"] = raw[k] if raw[k] is not None else m.SerializeToString()
    tasks = [f"t{k}" for k in range(count)]
    argv = [*files, "-o", OUTPUT, "--method", method, "--names", ",".join(tasks), "-q", "--no-latency",
            *method_argv(method, r)]
    want_calib = method == "mtz" or r.random() < 0.1
    want_data = kind == "data" or r.random() < 0.15
    # the data file that a data mutation hits: one task's --data file, or its --calib file
    hit = ("--calib" if want_calib and (not want_data or r.random() < 0.5) else "--data", r.randrange(count))
    for flag, wanted in (("--calib", want_calib), ("--data", want_data)):
        if not wanted:
            continue
        for k, p in enumerate(picks):
            d = dict(r.choice(corpus.data[SEEDS[p].sample]))
            name = f"{flag[2:]}{k}.npz"
            if kind == "data" and (flag, k) == hit:
                files[name], dn, dnotes = mutate_data(d, r, r.choice((1, 1, 2)))
                names, notes = names + dn, notes + [f"{name}: {n}" for n in dnotes]
            else:
                files[name] = npz_bytes(d)
            argv += [flag, f"{tasks[k]}={name}"]
    if want_calib and method != "mtz":
        argv += ["--steps", "2", "--batch-size", "8"]
    if kind == "argv":
        for _ in range(r.choice((1, 2))):
            name = r.choice(list(ARGV))
            ARGV[name](argv, r)
            names.append(name)
            notes.append(" ".join(argv[-2:]))
    kinds = {**{n: "structure" for n in STRUCTURE}, **{n: "bytes" for n in BYTES}, **{n: "data" for n in DATA_MUT},
             **{n: "argv" for n in ARGV}}
    return Case(seed, index, files, argv, [f"{kinds[n]}:{n}" for n in names] or ["none"], notes, method)


# ------------------------------------------------------------------------------------------------
# the worker: runs one case in its folder and classifies the outcome


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0][:300] if text else ""


def _location(tb: str) -> str:
    """The innermost frame of onnxmerge's own code in a traceback: 'file:function'."""
    tb = tb.split("The above exception was the direct cause")[0]  # a wrapped exception: its cause
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', tb)
    ours = [(f, fn) for f, fn in frames if "/onnxmerge/" in f or "/passes/" in f or "/kernels/" in f]
    f, fn = (ours or frames or [("?", "?")])[-1]
    short = f.split("/onnxmerge/")[-1] if "/onnxmerge/" in f else "/".join(Path(f).parts[-2:])
    return f"{short}:{fn}"


def _debug_rerun(argv: list[str]) -> str:
    """Rerun a case with --debug to find where an internal error comes from (its traceback)."""
    from onnxmerge.cli import main

    shutil.rmtree(OUT_DIR, ignore_errors=True)
    os.mkdir(OUT_DIR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*argv, "--debug"])
        except BaseException:  # noqa: BLE001 - the traceback is what we are after
            return traceback.format_exc()
    return ""


def _feeds(sess, batch_default: int = 2) -> dict:
    """Random feeds for a session: batch 2 where the batch dim is free, else the fixed one."""
    from onnxmerge.model.runtime import random_feeds

    fixed = {a.shape[0] for a in sess.get_inputs() if a.shape and isinstance(a.shape[0], int)}
    return random_feeds(sess, fixed.pop() if len(fixed) == 1 else batch_default, seed=0)


def check_written(path: Path) -> str | None:
    """What is wrong with a model the merge wrote (None: nothing): it must load, pass onnx.checker's
    full check, open in onnxruntime and give finite outputs on a random input wherever the original
    model gives finite outputs on that input."""
    from onnxmerge.model.contract import read_metadata
    from onnxmerge.model.runtime import session

    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"does not load: {_first_line(e)}"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        return f"onnx.checker: {_first_line(e)}"
    try:
        sess = session(str(path), optimize=True)
        feeds = _feeds(sess)
        outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime: {type(e).__name__}: {_first_line(e)}"
    bad = [name for name, v in outputs.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
    if not bad:
        return None
    try:  # non-finite outputs are faithful where the original gives them too
        info = read_metadata(model, str(path))
        for task in info.tasks:
            mine = {o: m for o, m in task.outputs.items() if m in bad}
            if not mine:
                continue
            ref = session(task.source, optimize=True)
            want = dict(zip([o.name for o in ref.get_outputs()],
                            ref.run(None, {o: feeds[m] for o, m in task.inputs.items()})))
            bad = [b for b in bad if b not in mine.values() or all(
                np.all(np.isfinite(want[o])) for o, m in mine.items() if m == b)]
    except Exception as e:  # noqa: BLE001
        return f"non-finite outputs {bad}, and the originals do not run on the same input ({_first_line(e)})"
    return f"non-finite outputs where the original's are finite: {', '.join(bad)}" if bad else None


def classify(rc, stderr: str, uncaught: str | None, leftovers: list[str], changed: list[str],
             written_problem: str | None, location: str = "") -> tuple[str, str]:
    """(outcome, class) of a finished case; the class groups crashes of one cause."""
    if uncaught:
        return "CRASH", f"uncaught {uncaught} at {location}"
    if changed:
        return "CRASH", "input overwritten"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if rc == 0:
        if leftovers:
            return "LEFTOVER", f"extra files after success: {_pattern(leftovers)}"
        if written_problem:
            return "INVALID", f"invalid model written: {re.sub(r'[0-9]+', 'N', written_problem)[:100]}"
        return "OK", ""
    if rc not in (1, 2):
        return "CRASH", f"exit status {rc}"
    internal = [line for line in lines if line.startswith("onnxmerge: internal error")]
    if internal:
        kind = internal[0].split(":")[2].strip() if internal[0].count(":") >= 2 else "?"
        return "CRASH", f"internal error {kind} at {location}"
    errors = [line for line in lines if line.startswith("onnxmerge: error: ")]
    if "Traceback" in stderr or len(errors) != 1 or len(lines) != 1:
        return "CRASH", "error output is not one line"
    wrapped = WRAPPED.search(errors[0])
    if wrapped:  # the pass manager words an unexpected exception in a pass as an error: still a bug
        return "CRASH", f"{wrapped.group(2)} in pass {wrapped.group(1)} at {location}"
    if "this is a bug" in errors[0]:
        return "CRASH", "reported bug: " + re.sub(r"[0-9.e+-]{2,}|'[^']*'", "_", errors[0][18:])[:100]
    if leftovers:
        return "LEFTOVER", f"files left after an error: {_pattern(leftovers)}"
    return "CLEAN-ERROR", ""


# how PassManager reports an exception that is not an onnxmerge error: "pass X failed (after ...): Type: ..."
WRAPPED = re.compile(r"pass (\w+) failed \(after [^)]*\): (\w+(?:Error|Exception|Warning)|\w+): ")


def _pattern(files: list[str]) -> str:
    return ", ".join(sorted({re.sub(r"[0-9a-z_]{6,}", "*", f) for f in files}))


@contextlib.contextmanager
def _native_stderr():
    """Collect what C and C++ code (onnxruntime's logger, say) writes to file descriptor 2 meanwhile:
    a user of the command line sees it on the terminal, next to onnxmerge's own messages."""
    sys.stderr.flush()
    saved = os.dup(2)
    collected = {"text": ""}
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield collected
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            collected["text"] = f.read().decode(errors="replace")


def run_case(case_dir: str, argv: list[str]) -> dict:
    """Run one case in `case_dir` (the worker's side): the outcome, its class and the message."""
    from onnxmerge.cli import main

    os.chdir(case_dir)
    here = Path(".")
    inputs = sorted(p.name for p in here.iterdir() if p.is_file())
    before = {p: _sha(here / p) for p in inputs}
    out, err = io.StringIO(), io.StringIO()
    rc, uncaught, tb = None, None, ""
    started = time.perf_counter()
    with _native_stderr() as native, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except BaseException as e:  # noqa: BLE001 - whatever escapes main is the finding
            uncaught, tb = type(e).__name__, traceback.format_exc()
    seconds = time.perf_counter() - started
    changed = [p for p in inputs if not (here / p).is_file() or _sha(here / p) != before[p]]
    expected = {OUTPUT, REPORT} if rc == 0 else set()
    after = sorted(str(p) for p in here.rglob("*") if p.is_file())
    leftovers = [p for p in after if p not in before and p not in expected]
    problem = check_written(here / OUTPUT) if rc == 0 and (here / OUTPUT).is_file() else None
    if rc == 0 and not (here / OUTPUT).is_file():
        problem = "exit 0 but no output file"
    stderr = native["text"] + err.getvalue()
    location = _location(tb) if tb else ""
    if rc == 1 and ("onnxmerge: internal error" in stderr or WRAPPED.search(stderr)):
        tb = _debug_rerun(argv)
        location = _location(tb)
    outcome, klass = classify(rc, stderr, uncaught, leftovers, changed, problem, location)
    message = _first_line(stderr.strip().splitlines()[-1]) if stderr.strip() else ""
    return {"outcome": outcome, "class": klass, "rc": rc, "message": problem or message,
            "stderr": stderr[-2000:], "traceback": tb[-4000:], "seconds": round(seconds, 3), "leftovers": leftovers}


def _worker(conn, log_path: str, memory_gb: float) -> None:
    """The worker process: C-level output to a log, a memory limit, then cases until told to stop."""
    import resource

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if memory_gb > 0:  # a huge allocation fails in the worker instead of exhausting the machine
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import onnxmerge.cli  # noqa: F401 - imported once, before the first case is timed

    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(run_case(**job))
        except BaseException as e:  # noqa: BLE001 - a failure of the fuzzer's own checks
            conn.send({"outcome": "CRASH", "class": f"fuzzer check failed: {type(e).__name__}", "rc": None,
                       "message": _first_line(e), "traceback": traceback.format_exc()[-4000:], "seconds": 0,
                       "leftovers": []})


class Worker:
    """A worker process that is restarted when it dies or hangs."""

    def __init__(self, ctx, log_path: Path, memory_gb: float):
        self.ctx, self.log_path, self.memory_gb = ctx, log_path, memory_gb
        self.job = None  # (case, case_dir, started)
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, str(self.log_path), self.memory_gb), daemon=True)
        self.proc.start()
        child.close()
        # the per-case timeout starts with the first case, not with the imports
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError(f"the fuzz worker did not start (see {self.log_path})")

    def submit(self, case: Case, case_dir: Path) -> None:
        self.job = (case, case_dir, time.monotonic())
        self.conn.send({"case_dir": str(case_dir), "argv": case.argv})

    def restart(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()
        self._start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------------------------------------
# the run: cases through the workers, results into the summary and the corpus


class Stats:
    def __init__(self):
        self.outcomes = Counter()
        self.by_mutator = defaultdict(Counter)
        self.by_method = defaultdict(Counter)
        self.classes = Counter()
        self.examples = {}
        self.errors = Counter()  # the kinds of clean error: how deep the cases get

    def add(self, case: Case, result: dict, saved: Path | None) -> None:
        outcome = result["outcome"]
        self.outcomes[outcome] += 1
        self.by_method[case.method][outcome] += 1
        for m in set(case.mutators):
            self.by_mutator[m][outcome] += 1
        if outcome == "CLEAN-ERROR":
            self.errors[_error_kind(result["message"])] += 1
        if outcome in BAD:
            key = f"{outcome}: {result['class']}"
            self.classes[key] += 1
            self.examples.setdefault(key, (f"seed {case.seed} case {case.index}", result["message"], saved))

    def table(self) -> str:
        total = sum(self.outcomes.values())
        lines = [f"cases: {total}   " + "   ".join(f"{o}: {self.outcomes[o]}" for o in OUTCOMES), ""]
        header = f"{'':28}{'cases':>7}" + "".join(f"{o:>13}" for o in OUTCOMES)
        for title, rows in (("mutator", self.by_mutator), ("method", self.by_method)):
            lines += [f"{title:28}" + header[28:]]
            for name in sorted(rows):
                c = rows[name]
                lines.append(f"{name:28}{sum(c.values()):>7}" + "".join(f"{c[o]:>13}" for o in OUTCOMES))
            lines.append("")
        lines.append("most common clean errors (file names, quoted names and numbers dropped):")
        lines += [f"  {n:5}  {kind}" for kind, n in self.errors.most_common(15)]
        lines.append("")
        lines.append(f"bad outcome classes: {len(self.classes)}")
        for key, n in self.classes.most_common():
            where, message, saved = self.examples[key]
            lines.append(f"  {n:5}  {key}\n         e.g. {where}: {message}")
            if saved:
                lines.append(f"         saved in {saved}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"outcomes": dict(self.outcomes), "classes": dict(self.classes),
                "clean_errors": dict(self.errors.most_common(40)),
                "by_mutator": {k: dict(v) for k, v in self.by_mutator.items()},
                "by_method": {k: dict(v) for k, v in self.by_method.items()}}


def _error_kind(message: str) -> str:
    """A clean error message without its specifics, to count errors of one kind together."""
    text = message.removeprefix("onnxmerge: error: ")
    text = re.sub(r"^[\w./-]+\.(onnx|npz): ", "", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\([^()]*\)|[0-9]+", "_", text)
    return text[:90]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:80] or "case"


def save_case(corpus_dir: Path, case: Case, case_dir: Path, result: dict, per_class: int) -> Path | None:
    """Keep a bad case: its input files, argv and outcome (at most `per_class` examples per class)."""
    folder = corpus_dir / _slug(f"{result['outcome']} {result['class']}")
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.iterdir())) >= per_class:
        return None
    dest = folder / f"seed{case.seed}_case{case.index}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for name, data in case.files.items():
        (dest / name).write_bytes(data)
    (dest / "case.json").write_text(json.dumps({
        "seed": case.seed, "index": case.index, "argv": case.argv, "method": case.method,
        "mutators": case.mutators, "notes": case.notes, **result}, indent=2))
    return dest


def prepare(case: Case, work: Path) -> Path:
    case_dir = work / f"case{case.index}"
    shutil.rmtree(case_dir, ignore_errors=True)
    (case_dir / OUT_DIR).mkdir(parents=True)
    for name, data in case.files.items():
        (case_dir / name).write_bytes(data)
    return case_dir


def run(cases, total: int | None, args) -> Stats:
    """Run `cases` (an iterator of Case) through --jobs workers; stop at --minutes."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")  # a fresh interpreter: no onnxruntime threads inherited over fork
    work = Path(tempfile.mkdtemp(prefix="onnxmerge-fuzz-"))
    corpus_dir = Path(args.corpus)
    workers = [Worker(ctx, work / f"worker{k}.log", args.memory_gb) for k in range(args.jobs)]
    stats, deadline = Stats(), time.monotonic() + args.minutes * 60 if args.minutes else None
    bar = tqdm(total=total, unit="case", disable=args.quiet, dynamic_ncols=True)
    cases = iter(cases)
    exhausted = False

    def finish(w: Worker, result: dict) -> None:
        case, case_dir, _ = w.job
        w.job = None
        saved = save_case(corpus_dir, case, case_dir, result, args.per_class) if result["outcome"] in BAD else None
        stats.add(case, result, saved)
        if args.replay or (args.verbose and result["outcome"] in BAD):
            tqdm.write(f"case {case.index} ({', '.join(case.mutators)}): {result['outcome']} {result['class']}: "
                       f"{result['message']}")
        shutil.rmtree(case_dir, ignore_errors=True)
        bar.update(1)
        bar.set_postfix({o: stats.outcomes[o] for o in BAD})

    try:
        while True:
            for w in workers:
                if w.job is None and not exhausted:
                    case = next(cases, None) if deadline is None or time.monotonic() < deadline else None
                    if case is None:
                        exhausted = True
                    else:
                        w.submit(case, prepare(case, work))
            busy = [w for w in workers if w.job is not None]
            if not busy:
                break
            ready = mp.connection.wait([x for w in busy for x in (w.conn, w.proc.sentinel)], timeout=1.0)
            for w in busy:
                if w.conn in ready:
                    try:
                        finish(w, w.conn.recv())
                        continue
                    except (EOFError, OSError):
                        pass
                if w.proc.sentinel in ready or not w.proc.is_alive():
                    code = w.proc.exitcode
                    log = w.log_path.read_text(errors="replace")[-2000:] if w.log_path.exists() else ""
                    finish(w, {"outcome": "CRASH", "class": f"worker died (exit code {code})", "rc": None,
                               "message": _first_line(log.strip().splitlines()[-1]) if log.strip() else "",
                               "traceback": log, "seconds": None, "leftovers": []})
                    w.restart()
                elif time.monotonic() - w.job[2] > args.timeout:
                    finish(w, {"outcome": "CRASH", "class": f"hang (over {args.timeout:g} s)", "rc": None,
                               "message": "timed out", "traceback": "", "seconds": args.timeout, "leftovers": []})
                    w.restart()
    finally:
        bar.close()
        for w in workers:
            w.stop()
        shutil.rmtree(work, ignore_errors=True)
    return stats


def replay_cases(folder: Path):
    """The saved cases under `folder` (each a folder with case.json and its files)."""
    for meta in sorted(folder.rglob("case.json")):
        info = json.loads(meta.read_text())
        files = {p.name: p.read_bytes() for p in meta.parent.iterdir() if p.name != "case.json"}
        yield Case(info["seed"], info["index"], files, info["argv"], info["mutators"], info["notes"],
                   info.get("method", "pack"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, help="number of cases (default: 2000, or unbounded with --minutes)")
    p.add_argument("--minutes", type=float, help="stop starting new cases after this many minutes")
    p.add_argument("--seed", type=int, default=0, help="run seed: case i of seed s is always the same case")
    p.add_argument("--start", type=int, default=0, help="first case index (to run a long series in chunks)")
    p.add_argument("--only", type=int, nargs="+", metavar="INDEX", help="run only these case indices")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    p.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit per worker (0: none)")
    p.add_argument("--corpus", default=str(ROOT / "build" / "fuzz" / "corpus"), help="where bad cases are saved")
    p.add_argument("--per-class", type=int, default=5, help="examples saved per bad outcome class")
    p.add_argument("--replay", metavar="DIR", help="rerun the cases saved under DIR instead of new ones")
    p.add_argument("--summary", metavar="JSON", help="also write the counts as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print each bad case as it happens")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per worker: the machine is shared
        os.environ.setdefault(var, "1")
    started = time.monotonic()
    if args.replay:
        cases = list(replay_cases(Path(args.replay)))
        args.corpus = str(Path(args.corpus).with_name(Path(args.corpus).name + "_replay"))
        total = len(cases)
    else:
        corpus = Corpus.load()
        if args.only:
            indices = args.only
        elif args.cases is None and args.minutes:
            indices = iter(range(args.start, sys.maxsize))
        else:
            indices = range(args.start, args.start + (args.cases or 2000))
        total = len(indices) if hasattr(indices, "__len__") else None
        cases = (make_case(corpus, args.seed, i) for i in indices)
    stats = run(cases, total, args)
    elapsed = time.monotonic() - started
    print(f"\nonnxmerge fuzz: seed {args.seed}, {sum(stats.outcomes.values())} cases in {elapsed:.0f} s")
    print(stats.table())
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps({"seed": args.seed, "seconds": round(elapsed), **stats.to_dict()},
                                                 indent=2))
    return 1 if any(stats.outcomes[o] for o in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
