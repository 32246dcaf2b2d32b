"""mtz against references that share no code with passes/mtz (issue 16, point 4).

1. Hidden layers: two LeNet-5s (MNIST, Fashion-MNIST) zipped with some neurons of every hidden layer
   shared and no retraining; for each layer, plain numpy from the paper's equations, on that layer's
   input in the merged model (the network zipped so far): the layer-wise Hessians (eqs. 7-8, with the
   documented damping), each shared neuron's merged weights (eqs. 10-11) and cost (eq. 12), and
   the weights the neuron keeps from the task-specific inputs; and the pairs' total cost is the
   least of any pairing (a linear program, not an assignment solver).
2. A model zipped with a copy of itself whose hidden channels are permuted, every neuron shared: the
   pairing must find the permutation and eqs. 10-11 must give back the same weights, so the merged
   model computes the original for both tasks.

Only the merged ONNX model, its metadata (onnxmerge.layout: which channel of each task a column
holds), the report figures and the public merge API are read.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from scipy.optimize import linprog

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.data import load_dataset

LENETS = ["lenet_mnist.onnx", "lenet_fashion.onnx"]
NAMES = ["mnist", "fashion"]
EVAL = ["mnist_eval.npz", "fashion_eval.npz"]
HIDDEN = ["conv1", "conv2", "fc1", "fc2"]  # LeNet-5's layers but the head (onnxmerge inspect)
SHARE = {"conv1": 3, "conv2": 5, "fc1": 30, "fc2": 20}
SAMPLES = 64  # calibration samples per task: the Hessians use them all (mtz's hessian_samples)
DAMPING = 1e-2  # README: each Hessian is damped by `damping` times its mean diagonal
MAX_PATCHES = 65536  # README: a convolution's Hessian uses at most this many patches per task


def path(name):
    return str(shipped(MODELS / name))


def calib(n=SAMPLES, sets=EVAL):
    return {t: load_dataset(shipped(MODELS / s)).take(n) for t, s in zip(NAMES, sets)}


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ----------------------------------------------------------------------------- the originals


def original_layers(file):
    """Each Conv / Gemm layer's (weight [out, in, ...], bias) of the original model in graph order,
    float64, a BatchNormalization after a Conv folded into it."""
    model = onnx.load(file)
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    layers = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            w = inits[n.input[1]]
            b = inits[n.input[2]] if len(n.input) > 2 else np.zeros(len(w))
            (bn,) = readers[n.output[0]]
            assert bn.op_type == "BatchNormalization"
            gamma, beta, mean, var = (inits[x] for x in bn.input[1:5])
            scale = gamma / np.sqrt(var + attrs(bn).get("epsilon", 1e-5))
            layers.append((w * scale[:, None, None, None], (b - mean) * scale + beta))
        elif n.op_type == "Gemm":
            a = attrs(n)
            assert a.get("transB") == 1 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
            layers.append((inits[n.input[1]], inits[n.input[2]]))
    return layers


# ----------------------------------------------------------------------------- the merged model


class Merged:
    """A merged mtz model of a chain (LeNet): layer k reads column space k and writes space k + 1.

    layout["spaces"][s][t][c] is the column of space s that holds task t's channel c, so a column
    holding a channel of both tasks is a shared neuron; layout["layers"][k]["runs"] names the
    (weight, bias) initializers of layer k's nodes."""

    def __init__(self, model):
        self.model = model
        meta = {p.key: p.value for p in model.metadata_props}
        self.layout = json.loads(meta["onnxmerge.layout"])
        self.tasks = json.loads(meta["onnxmerge.tasks"])
        assert len(self.layout["spaces"]) == len(self.layout["layers"]) + 1
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)

    def channels(self, s):
        """{column: {task: channel}} of space s."""
        out = {}
        for t, cols in enumerate(self.layout["spaces"][s]):
            for c, k in enumerate(cols):
                out.setdefault(k, {})[t] = c
        return out

    def layer(self, k):
        """Layer k as one dense weight [columns of space k + 1, input features, ...] and bias, the
        tensor its nodes read (before any Slice / Gather) and the nodes' attributes."""
        by_weight = {n.input[1]: n for n in self.model.graph.node if n.op_type in ("Conv", "Gemm")}
        runs = self.layout["layers"][k]["runs"]
        if runs[0][0] not in by_weight:  # written as one node (mtz --fuse) whose weight is computed from the
            # runs' weights (constant nodes): that weight and bias evaluated, the dense weight itself
            (node,) = {id(r): r for r in self.readers[runs[0][0]]}.values()
            while node.op_type not in ("Conv", "Gemm"):
                (node,) = {id(r): r for r in self.readers[node.output[0]]}.values()
            x = np.zeros([d.dim_value or 1 for d in self.model.graph.input[0].type.tensor_type.shape.dim], np.float32)
            got = self.activations([node.input[1], node.input[2]], x)
            return got[node.input[1]], got[node.input[2]], node.input[0], attrs(node)
        nodes = [by_weight[w] for w, _ in runs]
        if len(nodes) > 1:  # the nodes' outputs are joined, in row order, by one Concat
            (cat,) = {id(r): r for n in nodes for r in self.readers[n.output[0]]}.values()
            assert cat.op_type == "Concat"
            nodes = sorted(nodes, key=lambda n: list(cat.input).index(n.output[0]))
        sources, reads = set(), []
        for n in nodes:
            src, prod = n.input[0], self.producer.get(n.input[0])
            w = self.inits[n.input[1]]
            if prod is not None and prod.op_type == "Slice":
                starts, ends, axes = (self.inits[i] for i in prod.input[1:4])
                assert axes.tolist() == [1]
                src, needed = prod.input[0], np.arange(int(starts[0]), int(ends[0]))
            elif prod is not None and prod.op_type == "Gather":
                assert attrs(prod).get("axis") == 1
                src, needed = prod.input[0], self.inits[prod.input[1]].astype(np.int64)
            else:
                needed = np.arange(w.shape[1])
            assert len(needed) == w.shape[1]
            sources.add(src)
            reads.append(needed)
        (source,) = sources
        total = max(int(r.max()) + 1 for r in reads)
        ws = [self.inits[n.input[1]] for n in nodes]
        weight = np.zeros((sum(len(w) for w in ws), total, *ws[0].shape[2:]))
        bias = np.zeros(len(weight))
        row = 0
        for n, w, needed in zip(nodes, ws, reads):
            weight[row:row + len(w), needed] = w
            bias[row:row + len(w)] = self.inits[n.input[2]]
            row += len(w)
        return weight, bias, source, attrs(nodes[0])

    def activations(self, tensors, x):
        """The values of tensors `tensors` on input x."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        del model.graph.output[:]
        model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
        return dict(zip(tensors, session(model).run(None, {model.graph.input[0].name: x})))


# ----------------------------------------------------------------------------- eqs. 7-12 in numpy


def patches(x, kernel, strides, pads):
    """im2col: one row per (sample, output position), columns in the order of weight[o].ravel()
    (channel, kernel row, kernel column)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (top, left, bottom, right) = kernel, strides, pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    out = np.empty((n, oh, ow, c, kh, kw))
    for i in range(kh):
        for j in range(kw):
            out[..., i, j] = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw].transpose(0, 2, 3, 1)
    return out.reshape(n * oh * ow, c * kh * kw)


def damped_hessian(rows):
    """Eqs. 7-8: the mean of [x; 1][x; 1]^T over the layer's input rows x, plus DAMPING times its
    mean diagonal on the diagonal."""
    y = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
    h = y.T @ y / len(y)
    return h + DAMPING * np.mean(np.diag(h)) * np.eye(len(h))


def merge_pair(ha, hb, a, b):
    """Eqs. 10-11 (alpha = 1): w = (H_A + H_B)^-1 (H_A a + H_B b), and eq. 12's cost
    1/2 (a - b)^T (H_A^-1 + H_B^-1)^-1 (a - b)."""
    w = np.linalg.solve(ha + hb, ha @ a + hb @ b)
    d = a - b
    return w, 0.5 * d @ np.linalg.solve(np.linalg.inv(ha) + np.linalg.inv(hb), d)


def cost_matrix(ha, hb, wa, wb):
    """Eq. 12 for every pair (rows of wa, rows of wb)."""
    m = np.linalg.inv(np.linalg.inv(ha) + np.linalg.inv(hb))
    qa = np.einsum("id,de,ie->i", wa, m, wa)
    qb = np.einsum("jd,de,je->j", wb, m, wb)
    return 0.5 * (qa[:, None] + qb[None, :] - 2 * wa @ m @ wb.T)


def least_total(cost, n):
    """The least total cost of n disjoint pairs, as a linear program over pair weights in [0, 1]
    (each neuron in at most one pair, n pairs in all): a min-cost flow, so its optimum is a pairing."""
    na, nb = cost.shape
    rows = np.zeros((na + nb, na * nb))
    for i in range(na):
        rows[i, i * nb:(i + 1) * nb] = 1
    for j in range(nb):
        rows[na + j, j::nb] = 1
    res = linprog(cost.ravel(), A_ub=rows, b_ub=np.ones(na + nb), A_eq=np.ones((1, na * nb)), b_eq=[n],
                  bounds=(0, 1), method="highs")
    assert res.status == 0
    return res.fun


# ----------------------------------------------------------------------------- 1. hidden layers


@pytest.fixture(scope="module")
def zipped():
    data = calib()
    result = merge([path(f) for f in LENETS], method="mtz", names=NAMES, calib=data,
                   params={"layer_share": ",".join(f"{k}={v}" for k, v in SHARE.items()), "share_ratio": 0.0,
                           "hessian_samples": SAMPLES, "retrain_steps": 0, "damping": DAMPING, "alpha": 1.0})
    merged = Merged(result.model)
    layers = [merged.layer(k) for k in range(len(HIDDEN))]
    inputs = {t: merged.activations([src for _, _, src, _ in layers], data[t].x) for t in NAMES}
    originals = [original_layers(path(f)) for f in LENETS]
    return merged, layers, inputs, originals, result.state.figures["mtz"]["layers"]


@pytest.mark.parametrize("k", range(len(HIDDEN)), ids=HIDDEN)
def test_shared_neurons_equal_an_independent_eqs_7_to_12(zipped, k):
    merged, layers, inputs, originals, report = zipped
    weight, bias, source, node = layers[k]
    ins, outs = merged.channels(k), merged.channels(k + 1)
    both = [c for c in sorted(ins) if len(ins[c]) == 2]  # input columns the tasks share
    own = [[c for c in sorted(ins) if set(ins[c]) == {t}] for t in range(2)]  # task-specific inputs
    conv = weight.ndim == 4
    unit = 1 if conv else weight.shape[1] // len(ins)  # input features per column (fc1: 5 x 5)
    assert weight.shape[1] == len(ins) * unit

    def feats(cols):
        return np.asarray([c * unit + u for c in cols for u in range(unit)], dtype=np.int64)

    def task_rows(t, w, b, cols):
        """Task t's original weights [out, features of `cols` (flattened), bias] in column order."""
        chans = [ins[c][t] for c in cols]
        if conv:
            part = w[:, chans].reshape(len(w), -1)
        else:
            part = w.reshape(len(w), -1, unit)[:, chans].reshape(len(w), -1)
        return np.concatenate([part, b[:, None]], axis=1)

    hs = []
    for t, name in enumerate(NAMES):
        x = inputs[name][source].astype(np.float64)
        if conv:
            assert node.get("dilations", [1, 1]) == [1, 1] and node.get("group", 1) == 1
            rows = patches(x[:, both], weight.shape[2:], node.get("strides", [1, 1]), node.get("pads", [0, 0, 0, 0]))
            assert len(rows) <= MAX_PATCHES  # so that the production's Hessian is not subsampled
        else:
            rows = x.reshape(len(x), -1)[:, feats(both)]
        hs.append(damped_hessian(rows))
    wa, wb = (task_rows(t, *originals[t][k], both) for t in range(2))

    shared = [c for c in sorted(outs) if len(outs[c]) == 2]
    assert len(shared) == SHARE[HIDDEN[k]] == report[k]["shared"]
    costs = []
    for r in shared:
        i, j = outs[r][0], outs[r][1]
        want, cost = merge_pair(hs[0], hs[1], wa[i], wb[j])
        costs.append(cost)
        got = np.concatenate([weight[r][feats(both)].reshape(-1), [bias[r]]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max(),
                                   err_msg=f"{HIDDEN[k]}: merged weights of mnist {i} + fashion {j} (eq. 10)")
        for t, ch in ((0, i), (1, j)):  # each model's weights from its own inputs are kept
            if own[t]:
                keep = task_rows(t, *originals[t][k], own[t])[ch, :-1]
                np.testing.assert_allclose(weight[r][feats(own[t])].reshape(-1), keep, rtol=0,
                                           atol=1e-5 * np.abs(keep).max(),
                                           err_msg=f"{HIDDEN[k]}: {NAMES[t]}-only inputs of a shared neuron")
    for r in sorted(outs):  # a neuron of one task is that task's original neuron on its inputs
        if len(outs[r]) == 1:
            (t, ch), = outs[r].items()
            cols = sorted(both + own[t])
            keep = task_rows(t, *originals[t][k], cols)[ch]
            got = np.concatenate([weight[r][feats(cols)].reshape(-1), [bias[r]]])
            np.testing.assert_allclose(got, keep, rtol=0, atol=1e-5 * np.abs(keep).max())
    # eq. 12: the chosen pairs' total is the report's and no pairing of as many pairs costs less
    total = float(np.sum(costs))
    assert total == pytest.approx(report[k]["cost_optimal"], rel=1e-4)
    assert total <= least_total(cost_matrix(hs[0], hs[1], wa, wb), len(shared)) * (1 + 1e-6) + 1e-12


# ----------------------------------------------------------------------------- 2. a permuted copy


def permuted_copy(file, rng):
    """The model with the channels of every hidden layer permuted (rows of a layer, its bias and
    BatchNormalization, columns of the next layer): the same function. Returns it and the
    permutations: the copy's channel c is the original's perms[k][c]."""
    model = onnx.load(file)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    perms = []
    for layer, nxt in zip(layers[:-1], layers[1:]):  # the head keeps its rows
        out = len(inits[layer.input[1]])
        p = rng.permutation(out)
        perms.append(p)
        names = list(layer.input[1:3])
        bn = [r for r in readers[layer.output[0]] if r.op_type == "BatchNormalization"]
        names += [i for b in bn for i in b.input[1:5]]
        for name in names:
            inits[name] = inits[name][p]
        w = inits[nxt.input[1]]  # [out, in, ...]; a Gemm after a flatten reads out x (h * w) columns
        inits[nxt.input[1]] = w.reshape(len(w), out, -1)[:, p].reshape(w.shape)
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(inits[init.name], init.name))
    return model, perms


def test_zipping_a_model_with_a_permuted_copy_of_itself_is_exact(tmp_path):
    copy, perms = permuted_copy(path(LENETS[0]), np.random.default_rng(0))
    assert all((p != np.arange(len(p))).any() for p in perms)
    onnx.save(copy, str(tmp_path / "copy.onnx"))
    x = np.concatenate([load_dataset(shipped(MODELS / s)).x[:64] for s in EVAL])
    ref = session(onnx.load(path(LENETS[0]))).run(None, {"input": x})[0]
    assert np.abs(session(copy).run(None, {"input": x})[0] - ref).max() <= 1e-5 * np.abs(ref).max()
    # different calibration data per task, so that the two sides' Hessians differ
    result = merge([path(LENETS[0]), str(tmp_path / "copy.onnx")], method="mtz", names=NAMES, calib=calib(),
                   params={"share_ratio": 1.0, "hessian_samples": SAMPLES, "retrain_steps": 0})
    merged = Merged(result.model)
    for k, p in enumerate(perms):  # every neuron shared, with its own copy
        cols = merged.channels(k + 1)
        assert len(cols) == len(p)
        assert all(p[c[1]] == c[0] for c in cols.values()), f"layer {k}: the pairs are not the permutation"
    sess = session(result.model)
    for task in merged.tasks:
        got = sess.run([task["outputs"]["logits"]], {task["inputs"]["input"]: x})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), task["name"]
