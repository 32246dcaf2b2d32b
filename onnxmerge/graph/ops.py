"""The two emitted forms of a codebook layer, and the numpy reference of the `ai.onnxmerge` ops.

A codebook layer (onnxmerge.passes.codebook._codebook) is a shared codebook [V', C, r] (float) and one model's code
indices (uint8 when C <= 256, else uint16; conv [V, p, n, m], fc [V, out]). It is written in one of
two forms with identical numbers:

- portable (`--emit gather`): the codebook-gather subgraph rebuilds the dense weight and the
  original Conv / Gemm / MatMul reads it. All its inputs are initializers, so onnxruntime folds it
  once at session creation: compressed on disk, dense speed at run time, any onnxruntime.

      codes -> Cast(int64) -> Reshape [V, K] -> Add(Range(0, V*C, C) as [V, 1]) -------+
      codebook -> Reshape [V'*C, r] ------------------------------------------------+-> Gather
        -> [V, K, r] -> Reshape / Transpose -> [p, V*r, n, m] or [out, V*r] -> Slice to depth d
        -> (Transpose to the stored orientation) -> Conv / Gemm / MatMul

  (the segment offsets v*C make one Gather pick codeword codes[v, k] of segment v; the index
  tensor is int64 [V, K], one entry per piece, and the offsets cost three scalars.) A codebook
  shared by segments has codes that index [V'*C, r] themselves: no Range and Add. Codes of at most
  16 values may be stored two to a byte, unpacked after the Cast by Reshape [-1, 1], Div by
  [1, 16], Mod 16, Reshape [-1] and Slice.

- native (`--emit native`): one `ai.onnxmerge::EConv` / `EFC` node per layer, whose kernel computes
  NeuralMerger's eq. 9 with lookup tables (onnxmerge.kernels):

      EConv(X [N, d, H, W], codebook, codes [V, p, n, m], B?) -> Y [N, p, Ho, Wo]
            attributes in_channels = d, kernel_shape, strides, pads, dilations (Conv's meaning)
      EFC(X [N, d], codebook, codes [V, out], B?) -> Y [N, out]       attribute in_features = d

`econv_reference` / `efc_reference` are the numpy oracle of the native ops (the lookup-table
computation itself, not the dense weight), and `run_reference` runs a native model with them in
onnx's reference evaluator. `to_portable` turns a native model back into the portable form (the codebook method's
EmitNativePass, onnxmerge.passes.codebook.emit_native, writes the native form).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import shape_inference
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from onnxmerge import kernels
from onnxmerge.errors import MergeError
from onnxmerge.kernels import DOMAIN
from onnxmerge.model.runtime import session

DOMAIN_VERSION = 1
NATIVE_OPS = ("EConv", "EFC")
CHAIN_OPS = frozenset({"Cast", "Reshape", "Range", "Add", "Gather", "Slice", "Transpose"})


# ----------------------------------------------------------------------------------------------
# numpy reference of the native ops (eq. 9)


def _tables(x: np.ndarray, codebook: np.ndarray, n_seg: int) -> np.ndarray:
    """T[..., v, c, ...] = <segment v of x along axis 1, codeword c of segment v>: the lookup tables."""
    r = codebook.shape[2]
    d = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n_seg * r - d)  # the last segment is zero-padded, as the codebook's pieces were
    xs = np.pad(x, pad).reshape(x.shape[0], n_seg, r, *x.shape[2:])
    return np.einsum("nvr...,vcr->nvc...", xs, codebook[:n_seg].astype(x.dtype))


def efc_reference(x: np.ndarray, codebook: np.ndarray, codes: np.ndarray, bias: np.ndarray | None = None, *,
                  table_bits: int = 32, fused: bool = False) -> np.ndarray:
    """y[n, o] = sum_v T[n, v, codes[v, o]] + b[o]  (E-FC, section 3.2). `table_bits` 16 or 8: integer
    tables, the arithmetic of EConv's (`econv_reference`) on a 1x1 kernel over one pixel, which E-FC is."""
    if table_bits != 32:
        return econv_reference(x[:, :, None, None], codebook, codes[:, :, None, None], bias, table_bits=table_bits,
                               fused=fused)[:, :, 0, 0]
    n_seg = codes.shape[0]
    table = _tables(x, codebook, n_seg)  # [N, V, C]
    y = table[:, np.arange(n_seg)[:, None], codes.astype(np.int64)].sum(axis=1)  # [N, V, out] -> [N, out]
    return y + bias if bias is not None else y


def econv_reference(x: np.ndarray, codebook: np.ndarray, codes: np.ndarray, bias: np.ndarray | None = None, *,
                    strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), table_bits: int = 32,
                    fused: bool = False) -> np.ndarray:
    """y[n, o, y, x] = sum_{v, i, j} T[n, v, codes[v, o, i, j], y*s + i*dil, x*s + j*dil] + b[o]  (eq. 9).

    The tables T are computed once per input pixel (V*C dot products of length r) and every output
    is a sum of table entries picked by the code indices. `table_bits` 16 or 8: the tables are
    integers with a scale per (sample, segment) (`_econv_integer_tables`); `fused` says whether the
    kernels' table sums fuse multiply and add (kernels/build.py, fused_multiply_add), which the integer
    tables' roundings depend on."""
    n_seg, p, kh, kw = codes.shape
    x = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    sh, sw = strides
    dh, dw = dilations
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1

    def windows(table):  # per kernel offset: its taps' window of the tables and codes [V, p]
        for i in range(kh):
            for j in range(kw):
                yield (table[..., i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw],
                       codes[:, :, i, j].astype(np.int64))

    if table_bits != 32:
        return _econv_integer_tables(x, codebook, codes, bias, windows, (ho, wo), table_bits, fused)
    table = _tables(x, codebook, n_seg)  # [N, V, C, H, W]
    y = np.zeros((x.shape[0], p, ho, wo), x.dtype)
    seg = np.arange(n_seg)[:, None]
    for window, picked in windows(table):
        y += window[:, seg, picked].sum(axis=1)  # [N, V, p, Ho, Wo] -> [N, p, ...]
    return y + bias.reshape(1, -1, 1, 1) if bias is not None else y


def _econv_integer_tables(xp: np.ndarray, codebook: np.ndarray, codes: np.ndarray, bias: np.ndarray | None,
                          windows, out_size: tuple[int, int], table_bits: int, fused: bool) -> np.ndarray:
    """EConv with integer tables (`table_bits` 16 or 8, Q = 2^(bits-1) - 1), the arithmetic the
    kernels compute (kernels/lookup.h, EConvLayer::seg_bound), written here from that description:

    - per segment v: B_v = max_c sum_{k < depth_v} |w_vck| (a float32 sum in order over k);
    - per sample n: s_nv = 2^e, the least power of two with B_v * max|x_n,v| <= Q * s_nv (0 if that is 0);
    - T_nvc = sum_k w_vck x_(n, v*r+k) in float32, in order over k (multiply-adds fused or not);
    - entries q = clip(rint(T / s_nv), -Q, Q); y = b + sum_v s_nv * sum_taps q, the per-segment sums
      exact integers, added to y in float32 in segment order."""
    n_seg, p = codes.shape[:2]
    r, d = codebook.shape[2], xp.shape[1]
    n = xp.shape[0]
    top = np.float32(2 ** (table_bits - 1) - 1)
    y = np.zeros((n, p, *out_size), np.float32)
    if bias is not None:
        y = y + bias.astype(np.float32).reshape(1, -1, 1, 1)
    for v in range(n_seg):
        depth = int(np.clip(d - v * r, 0, r))
        w = codebook[v, :, :depth].astype(np.float32)  # [C, depth]
        norm = np.zeros(w.shape[0], np.float32)
        for k in range(depth):
            norm = norm + np.abs(w[:, k])
        xv = xp[:, v * r: v * r + depth]  # the padding's zeros change no maximum
        xmax = np.abs(xv).reshape(n, -1).max(axis=1) if depth else np.zeros(n, np.float32)
        bound = (norm.max(initial=np.float32(0)) * xmax).astype(np.float32)
        exponent = np.frexp((bound / top).astype(np.float32))[1]
        finite = np.isfinite(bound)  # else (an infinite or NaN input) NaN outputs
        scale = np.where(bound > 0, np.ldexp(np.float32(1), exponent), np.float32(0)).astype(np.float32)
        scale = np.where(finite, scale, np.float32(np.nan)).astype(np.float32)
        inv = np.where(finite & (bound > 0), np.ldexp(np.float32(1), -exponent), np.float32(0)).astype(np.float32)
        table = np.zeros((n, w.shape[0], *xp.shape[2:]), np.float32)  # [N, C, Hp, Wp]
        for k in range(depth):
            wk, xk = w[None, :, k, None, None], xv[:, k, None]
            if fused:  # one rounding of the exact w*x + T (float64 holds the float32 product exactly)
                table = (wk.astype(np.float64) * xk.astype(np.float64) + table).astype(np.float32)
            else:
                table = table + wk * xk
        with np.errstate(invalid="ignore"):  # a sample's non-finite tables (inv 0, its scale NaN): entries 0
            q = np.clip(np.rint(table * inv[:, None, None, None]), -top, top)
        q = np.where(np.isfinite(q), q, 0).astype(np.int64)
        total = np.zeros((n, p, *out_size), np.int64)
        for window, picked in windows(q):
            total += window[:, picked[v]]
        y = y + total.astype(np.float32) * scale[:, None, None, None]
    return y


class EConv(OpRun):
    """ai.onnxmerge::EConv for onnx.reference.ReferenceEvaluator."""

    op_domain = DOMAIN

    def _run(self, x, codebook, codes, bias=None, in_channels=None, kernel_shape=None, strides=None, pads=None,
             dilations=None, table_bits=None):
        return (econv_reference(x, codebook, codes, bias, strides=strides or (1, 1), pads=pads or (0, 0, 0, 0),
                                dilations=dilations or (1, 1), table_bits=table_bits or 32),)


class EFC(OpRun):
    """ai.onnxmerge::EFC for onnx.reference.ReferenceEvaluator."""

    op_domain = DOMAIN

    def _run(self, x, codebook, codes, bias=None, in_features=None, table_bits=None):
        return (efc_reference(x, codebook, codes, bias, table_bits=table_bits or 32),)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model (native ops included) in onnx's numpy reference evaluator."""
    ev = ReferenceEvaluator(model, new_ops=[EConv, EFC])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ev.run(names, feeds)))


def float_tables(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every EConv's and EFC's tables in float (its table_bits attribute removed): the numbers
    of the portable form, up to float rounding."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == DOMAIN and any(a.name == "table_bits" for a in node.attribute):
            kept = [a for a in node.attribute if a.name != "table_bits"]
            del node.attribute[:]
            node.attribute.extend(kept)
    return out


def is_native(model: onnx.ModelProto) -> bool:
    """Whether `model` has ai.onnxmerge nodes (the codebook method's native form)."""
    return any(n.domain == DOMAIN for n in model.graph.node)


# ----------------------------------------------------------------------------------------------
# the portable form


def _const(name: str, values) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, dtype=np.int64))


def gather_weight(graph: gs.Graph, codebook: gs.Constant, codes: gs.Constant, kind: str, depth: int,
                  out_axis: int, prefix: str, shared: bool = False,
                  code_shape: tuple[int, ...] | None = None) -> gs.Variable:
    """Add the codebook-gather subgraph for one layer to `graph`; returns the dense weight tensor
    (conv [p, d, n, m]; fc [out, in] when out_axis is 0, else [in, out]). shared: the codes index
    the flattened codebook [V' * C, r] themselves (a codebook shared by segments), so the chain has
    no segment offsets (no Range). code_shape: `codes` holds two 4-bit codes per byte (code 2i in
    the low nibble of byte i, 2i + 1 in the high one) of an index tensor of that shape, unpacked
    with Div and Mod."""
    shape = tuple(code_shape or codes.values.shape)
    n_seg, r = shape[0], codebook.values.shape[2]
    k = int(np.prod(shape[1:]))

    def node(op, inputs, out_shape, dtype=np.float32, **attrs):
        out = gs.Variable(f"{prefix}/{op.lower()}_{len(chain)}", dtype=dtype, shape=list(out_shape))
        chain.append(gs.Node(op, f"{prefix}/{op}_{len(chain)}", attrs, inputs, [out]))
        return out

    chain: list[gs.Node] = []
    n_codes = codebook.values.shape[1]
    idx = node("Cast", [codes], codes.values.shape, np.int64, to=onnx.TensorProto.INT64)
    if code_shape is not None:
        idx = _unpack_nibbles(node, idx, n_seg * k, prefix)
    idx = node("Reshape", [idx, _const(f"{prefix}/pieces_shape", [n_seg, k])], [n_seg, k], np.int64)
    if not shared:
        idx = _add_offsets(node, idx, n_seg, k, n_codes, prefix)
    flat = node("Reshape", [codebook, _const(f"{prefix}/codewords_shape", [-1, r])],
                [codebook.values.shape[0] * n_codes, r])
    vec = node("Gather", [flat, idx], [n_seg, k, r], axis=0)
    if kind == "conv":
        _, p, kh, kw = shape
        w = node("Reshape", [vec, _const(f"{prefix}/pieces5", [n_seg, p, kh, kw, r])], [n_seg, p, kh, kw, r])
        w = node("Transpose", [w], [p, n_seg, r, kh, kw], perm=[1, 0, 4, 2, 3])
        w = node("Reshape", [w, _const(f"{prefix}/padded_shape", [p, n_seg * r, kh, kw])], [p, n_seg * r, kh, kw])
        out = node("Slice", [w, _const(f"{prefix}/depth_start", [0]), _const(f"{prefix}/depth_end", [depth]),
                             _const(f"{prefix}/depth_axis", [1])], [p, depth, kh, kw])
    else:
        n_out = shape[1]
        w = node("Transpose", [vec], [n_out, n_seg, r], perm=[1, 0, 2])
        w = node("Reshape", [w, _const(f"{prefix}/padded_shape", [n_out, n_seg * r])], [n_out, n_seg * r])
        out = node("Slice", [w, _const(f"{prefix}/depth_start", [0]), _const(f"{prefix}/depth_end", [depth]),
                             _const(f"{prefix}/depth_axis", [1])], [n_out, depth])
        if out_axis == 1:
            out = node("Transpose", [out], [depth, n_out], perm=[1, 0])
    graph.nodes.extend(chain)
    return out


def _unpack_nibbles(node, packed, n: int, prefix: str):
    """[ceil(n / 2)] bytes as int64 -> the n 4-bit codes: byte // [1, 16] % 16, row by row."""
    pairs = node("Reshape", [packed, _const(f"{prefix}/packed_shape", [-1, 1])], [(n + 1) // 2, 1], np.int64)
    pairs = node("Div", [pairs, _const(f"{prefix}/nibble_div", [1, 16])], [(n + 1) // 2, 2], np.int64)
    pairs = node("Mod", [pairs, _const(f"{prefix}/nibble_mod", 16)], [(n + 1) // 2, 2], np.int64)
    flat = node("Reshape", [pairs, _const(f"{prefix}/nibbles_shape", [-1])], [2 * ((n + 1) // 2)], np.int64)
    return node("Slice", [flat, _const(f"{prefix}/nibbles_start", [0]), _const(f"{prefix}/nibbles_end", [n])], [n],
                np.int64)


def _add_offsets(node, idx, n_seg: int, k: int, n_codes: int, prefix: str):
    """idx [V, K] + v * C: one Gather of the flattened codebook then picks codeword idx[v] of segment v."""
    offsets = node("Range", [_const(f"{prefix}/zero", 0), _const(f"{prefix}/offset_end", n_seg * n_codes),
                             _const(f"{prefix}/offset_step", n_codes)], [n_seg], np.int64)
    offsets = node("Reshape", [offsets, _const(f"{prefix}/offsets_shape", [n_seg, 1])], [n_seg, 1], np.int64)
    return node("Add", [idx, offsets], [n_seg, k], np.int64)


def find_chain(weight: gs.Tensor) -> tuple[gs.Constant, gs.Constant] | None:
    """(codebook, codes) when `weight` is made by a codebook-gather subgraph, else None."""
    if isinstance(weight, gs.Constant) or not weight.inputs:
        return None
    consts, stack, seen = [], [weight], set()
    while stack:
        t = stack.pop()
        if isinstance(t, gs.Constant):
            consts.append(t)
            continue
        if not t.inputs:
            return None  # reaches a graph input: not a constant subgraph
        node = t.inputs[0]
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op not in CHAIN_OPS:
            return None
        stack.extend(node.inputs)
    codebooks = [c for c in consts if c.values.dtype == np.float32 and c.values.ndim == 3]
    codes = [c for c in consts if c.values.dtype in (np.uint8, np.uint16)]
    if len(codebooks) != 1 or len(codes) != 1:
        return None
    return codebooks[0], codes[0]


# ----------------------------------------------------------------------------------------------
# converting between the forms


def shaped_graph(model: onnx.ModelProto) -> gs.Graph:
    """`model` as a gs.Graph with inferred shapes (the emitted forms need the layers' shapes)."""
    return gs.import_onnx(shape_inference.infer_shapes(model))


def export_with_domain(graph: gs.Graph, model: onnx.ModelProto, native: bool) -> onnx.ModelProto:
    """`graph` as a model with `model`'s IR version, opsets and metadata, importing the ai.onnxmerge
    domain where it holds native nodes (`native`)."""
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    for op in model.opset_import:
        if op.domain != DOMAIN:
            out.opset_import.append(op)
    if native:
        out.opset_import.add(domain=DOMAIN, version=DOMAIN_VERSION)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def to_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every EConv / EFC node by the codebook-gather subgraph and a Conv / Gemm: the same
    numbers in stock onnxruntime (float tables' numbers: integer tables are not rounded there)."""
    if not is_native(model):
        return model
    graph = shaped_graph(model)
    for node in list(graph.nodes):
        if node.domain != DOMAIN:
            continue
        if node.op not in NATIVE_OPS:
            raise MergeError(f"node {node.name!r}: unknown {DOMAIN} operator {node.op}")
        x, codebook, codes, *bias = node.inputs
        y = node.outputs[0]
        kind = "conv" if node.op == "EConv" else "fc"
        depth = int(node.attrs["in_channels" if kind == "conv" else "in_features"])
        w = gather_weight(graph, codebook, codes, kind, depth, 0, node.name)
        node.inputs.clear()
        node.outputs.clear()
        if kind == "conv":
            attrs = {k: node.attrs[k] for k in ("kernel_shape", "strides", "pads", "dilations") if k in node.attrs}
            graph.nodes.append(gs.Node("Conv", node.name, attrs, [x, w, *bias], [y]))
        else:
            graph.nodes.append(gs.Node("Gemm", node.name, {"transB": 1}, [x, w, *bias], [y]))
    return export_with_domain(graph, model, native=False)


def make_session(model: onnx.ModelProto | str | os.PathLike, threads: int | None = None
                 ) -> ort.InferenceSession:
    """A CPU session with onnxruntime's graph optimisations, as a deployment would run it
    (threads as in `onnxmerge.model.runtime.session`). A model in the codebook method's native form runs
    with onnxmerge's kernels registered, or, where they are not built, in its portable form, which
    computes the same numbers."""
    # a path is read for its nodes only, and handed to onnxruntime as a path (no serialised copy)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    native = is_native(proto)
    if native and not kernels.available():
        full = proto if proto is model else onnx.load(str(model))
        model, native = to_portable(full), False
    return session(model, threads=threads, optimize=True, native=native)
