"""Codebook plans that fit the layer (issue 18, item 3): a layer stays dense where its codebook and
indices would not be smaller (exact stored bytes); a codebook shared by G segments (degenerate:
the originals; lossy: against a reference of the original weights cut and clustered in numpy and
scikit-learn, nothing of onnxmerge.passes.codebook); the `size` plan meets its target on the
shipped pairs, with the stored bytes it says, and is monotone; bad values are refused."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper
from test_codebook_reference import (
    cut,
    dense_layers,
    effective_layer,
    fold_batchnorm,
    ort_run,
    rel,
    sklearn_kmeans,
    sq_dist,
    with_weights,
)

from conftest import EXAMPLES, MODELS, init, make_model, shipped
from onnxmerge.api import load_tasks, merge
from onnxmerge.data import load_dataset
from onnxmerge.errors import UsageError
from onnxmerge.measure.metrics import parameter_bytes
from onnxmerge.passes.codebook._codebook import Setting, parse_layer_params
from onnxmerge.passes.codebook.emit_native import to_native
from onnxmerge.passes.codebook.plan import Choice, allocate, hull
from onnxmerge.passes.codebook.share_codebooks import explain
from onnxmerge.passes.common import AlignLayersPass, normalise_passes
from onnxmerge.pipeline.checks import EXACT_TOL
from onnxmerge.pipeline.manager import PassManager

PAIR = {"fashion_lenet": EXAMPLES / "fashion_lenet.onnx", "digits_lenet": EXAMPLES / "digits_lenet.onnx"}
DATA = {"fashion_lenet": EXAMPLES / "fashion_eval.npz", "digits_lenet": EXAMPLES / "digits_eval.npz"}
MIXED = {"lenet_mnist": MODELS / "lenet_mnist.onnx", "vgg_fashion": MODELS / "vgg_fashion.onnx"}
TOL = 1e-5


def tiny(tmp_path, w1: np.ndarray):
    """input [N, 1] -> Gemm fc1 (w1 [out, 1]) -> Relu -> Gemm head [3, out]."""
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    rng = np.random.default_rng(0)
    out = w1.shape[0]
    inits = [init("w1", w1), init("b1", rng.standard_normal(out)), init("w2", rng.standard_normal((3, out))),
             init("b2", rng.standard_normal(3))]
    path = tmp_path / "tiny.onnx"
    onnx.save(make_model(nodes, inits, in_shape=("N", 1), out_shape=("N", 3)), str(path))
    return path


W1 = np.array([[0.5], [-1.0], [2.0], [0.25], [1.5], [-0.75], [3.0], [-2.5]], np.float32)  # 8 distinct pieces


# ----------------------------------------------------------------------------------------------
# dense where not smaller; codes packed two to a byte


def test_a_layer_whose_codebook_would_not_be_smaller_stays_dense(tmp_path):
    """fc1 [8, 1] (32 bytes): at r = 1, C = 7 its codebook (7 floats) and its 8 codes packed two to
    a byte are 32 bytes, not smaller: dense; at C = 6, 28 bytes: compressed. if_larger=codebook
    compresses anyway."""
    path = tiny(tmp_path, W1)
    even = merge([path], method="codebook", params={"r": 1, "codewords": 7})
    assert even.info.fidelity.get("codebook_layers", []) == []
    assert any("fc1 stays dense" in n and "32 vs 32 bytes" in n for n in even.info.fidelity["notes"])
    assert not any(t.name.endswith("/codes") for t in even.model.graph.initializer)
    smaller = merge([path], method="codebook", params={"r": 1, "codewords": 6})
    (layer,) = smaller.info.fidelity["codebook_layers"]
    assert (layer["layer"], layer["stored_bytes"], layer["dense_bytes"], layer["packed"]) == ("fc1", 6 * 4 + 4, 32, True)
    forced = merge([path], method="codebook", params={"r": 1, "codewords": 7, "if_larger": "codebook"})
    assert [g["stored_bytes"] for g in forced.info.fidelity["codebook_layers"]] == [32]
    # and `onnxmerge inspect` says so at the defaults (accu: fc r=4 -> 1, C=64 -> 8 pieces: 32 + 4 bytes)
    state = PassManager([*normalise_passes(), AlignLayersPass()]).run(load_tasks([path]))
    task = state.tasks[0]
    said = explain(task.graph, task.layers)
    assert said[0] == "dense: codebook + indices not smaller (36 vs 32 bytes)" and said[1].startswith("dense: the task head")


def test_packed_codes_are_half_a_byte_and_unpack_exactly(tmp_path):
    """A codeword per piece (C = 8 <= 16): the 8 codes are 4 bytes (an odd count: the last high
    nibble is padding), onnxruntime unpacks them, and the model computes the original; the native
    form keeps a byte per code."""
    for w1 in (W1, W1[:7]):
        path = tiny(tmp_path, w1)
        result = merge([path], method="codebook", params={"r": 1, "codewords": 16, "if_larger": "codebook"})
        (layer,) = result.info.fidelity["codebook_layers"]
        assert layer["packed"] and layer["exact"] and layer["codewords"] == len(w1)
        (codes,) = [t for t in result.model.graph.initializer if t.name.endswith("/codes")]
        assert list(codes.dims) == [(len(w1) + 1) // 2] and codes.data_type == onnx.TensorProto.UINT8
        assert parameter_bytes(result.model) == parameter_bytes(onnx.load(str(path))) - w1.nbytes \
            + layer["stored_bytes"]
        x = np.random.default_rng(1).standard_normal((16, 1)).astype(np.float32)
        got = ort_run(result.model, {result.info.tasks[0].inputs["input"]: x})
        want = ort_run(onnx.load(str(path)), {"input": x})["logits"]
        assert rel(got[f"{result.info.tasks[0].name}/logits"], want) <= EXACT_TOL
    native = merge([path], method="codebook", params={"r": 1, "codewords": 16, "if_larger": "codebook",
                                                      "emit": "native"})
    assert not native.info.fidelity["codebook_layers"][0]["packed"]


# ----------------------------------------------------------------------------------------------
# a codebook shared by segments


def test_parse_segments_per_codebook():
    assert parse_layer_params("fc1=8/64/4") == {"fc1": Setting(8, 64, 4)}
    assert str(Setting(8, 64, 4)) == "8/64/4" and str(Setting(8, 64)) == "8/64"
    for bad in ("fc1=8/64/0", "fc1=8/64/x", "fc1=8/64/4/2"):
        with pytest.raises(UsageError):
            parse_layer_params(bad)


def test_a_shared_codebook_with_a_codeword_per_distinct_piece_reproduces_the_originals():
    """One codebook for all of conv2's, fc1's and fc2's segments, C >= the distinct pieces of the
    whole layer: the merged model computes the originals; the layers keep the portable form."""
    paths = [shipped(p) for p in PAIR.values()]
    params = {"layer_params": "conv2=2/4096/4,fc1=4/65536/100,fc2=4/65536/30", "codewords": 4096,
              "heads": "codebook", "if_larger": "codebook"}
    result = merge(paths, method="codebook", params=params)
    by = {g["layer"]: g for g in result.info.fidelity["codebook_layers"]}
    assert all(g["exact"] for g in by.values())
    for label in ("conv2", "fc1", "fc2"):
        assert by[label]["codebooks"] == 1 and by[label]["group"] == by[label]["segments"] > 1, by[label]
    inits = {t.name: t for t in result.model.graph.initializer}
    assert list(inits["shared/fc1/codebook"].dims) == [1, by["fc1"]["codewords"], 4]
    fc1_codes = [t for t in inits.values() if t.name.endswith("/codes") and list(t.dims) == [100, 120]]
    assert by["fc1"]["codewords"] > 256 and len(fc1_codes) == 2  # indices into 1 x C > 256 codewords: uint16
    assert all(t.data_type == onnx.TensorProto.UINT16 for t in fc1_codes)
    feeds = {name: load_dataset(shipped(DATA[name])).x[:64] for name in PAIR}
    got = ort_run(result.model, {t.inputs["input"]: feeds[t.name] for t in result.info.tasks})
    for name, p in PAIR.items():
        want = ort_run(onnx.load(str(shipped(p))), {"input": feeds[name]})["logits"]
        assert rel(got[f"{name}/logits"], want) <= EXACT_TOL
    # the native kernels read codebook v for segment v: the shared layers stay portable, with the reason
    _, kept = to_native(result.model)
    shared = [k for k in kept if "shared by segments" in k]
    assert len(shared) == 6  # conv2, fc1, fc2 of both models


def test_a_lossy_shared_codebook_against_kmeans_of_the_original_weights():
    """fc1 (400 inputs, r=4: 100 segments) with a codebook per 8 segments (the last one serves 4),
    conv2 (depth 8, r=2) with one codebook: every piece of the merged weights is a codeword of its
    segments' codebook, the nearest one to the original piece, and the k-means error is close to
    scikit-learn's on the same pooled pieces; the merged model is the originals with those weights."""
    paths = {name: shipped(p) for name, p in PAIR.items()}
    folded = {name: fold_batchnorm(onnx.load(str(p))) for name, p in paths.items()}
    layers = {name: dense_layers(m) for name, m in folded.items()}
    result = merge(list(paths.values()), method="codebook",
                   params={"preset": "light", "layer_params": "conv2=2/16/4,fc1=4/32/8"})
    merged = result.model
    effective = {name: {} for name in paths}
    for li, (r, c, g) in ((1, (2, 16, 4)), (2, (4, 32, 8))):
        members = [(name, *layers[name][li]) for name in paths]
        kind = members[0][2]
        found = [effective_layer(merged, f"{name}/{node}", kind) for name, node, _, _ in members]
        book = found[0][1]
        x_cut = [cut(w, kind, r) for *_, w in members]
        e_cut = [cut(e, kind, r) for e, _, _ in found]
        n_seg = x_cut[0].shape[0]
        n_books = math.ceil(n_seg / g)
        assert book.shape == (n_books, c, r) and all(np.array_equal(b, book) for _, b, _ in found)
        ours = theirs = 0.0
        for b in range(n_books):
            segs = slice(b * g, (b + 1) * g)
            x = np.concatenate([xc[segs].reshape(-1, r) for xc in x_cut])
            e = np.concatenate([ec[segs].reshape(-1, r) for ec in e_cut])
            same = (e[:, None, :] == book[b][None]).all(-1)
            assert same.any(1).all(), f"layer {li} codebook {b}: a piece of the merged weight is not its codeword"
            dist = sq_dist(x, book[b])
            chosen, nearest = np.where(same, dist, np.inf).min(1), dist.min(1)
            assert (chosen <= nearest + 1e-5 * ((x.astype(np.float64) ** 2).sum(1) + nearest) + 1e-9).all()
            ours += chosen.sum()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs += sklearn_kmeans(x, c, seed=b)[1]
        assert ours <= 1.05 * theirs, (li, ours, theirs)
        for (name, node, _, _), (e, _, _) in zip(members, found):
            effective[name][node] = e
    feeds = {name: load_dataset(shipped(DATA[name])).x[:64] for name in paths}
    got = ort_run(merged, {t.inputs["input"]: feeds[t.name] for t in result.info.tasks})
    for name in paths:
        # the other codebook layers (conv1, fc2; test_codebook_reference checks them) as they are
        for node, kind, _ in layers[name][:-1]:
            effective[name].setdefault(node, effective_layer(merged, f"{name}/{node}", kind)[0])
        same_weights = ort_run(with_weights(folded[name], effective[name]), {"input": feeds[name]})["logits"]
        assert rel(got[f"{name}/logits"], same_weights) <= TOL


# ----------------------------------------------------------------------------------------------
# the size plan


def test_allocation_is_monotone_in_the_budget():
    rng = np.random.default_rng(0)
    hulls = []
    for _ in range(6):
        pts = [Choice(Setting(1, int(c)), int(b), float(e)) for b, e, c in
               zip(rng.integers(10, 1000, 12), rng.random(12), range(1, 13))]
        hulls.append(hull([*pts, Choice(None, 1000, 0.0)]))
    for h in hulls:  # a lower convex hull: bytes up, error down, slopes rising
        assert all(a.bytes < b.bytes and a.error > b.error for a, b in zip(h, h[1:]))
        slopes = [(b.error - a.error) / (b.bytes - a.bytes) for a, b in zip(h, h[1:])]
        assert slopes == sorted(slopes)
    totals = [sum(c.bytes for c in allocate(hulls, budget)) for budget in range(0, 7000, 50)]
    assert totals == sorted(totals)
    assert totals[-1] == 6000 and all(t <= max(b, totals[0]) for t, b in zip(totals, range(0, 7000, 50)))


def size_merge(paths, size):
    return merge([shipped(p) for p in paths], method="codebook", params={"size": size, "kmeans_init": 1})


@pytest.mark.parametrize("pair", [PAIR, MIXED], ids=["lenet-pair", "lenet-vgg"])
def test_the_plan_meets_its_size_target_with_the_bytes_it_stores(pair):
    """At sizes 0.04 and 0.15 the planned layers store at most that fraction of their dense bytes;
    the model's parameter bytes differ from the all-dense plan's (size 1) by exactly the plan's
    saving; a smaller target gives a smaller model; the plan is in the report."""
    dense = size_merge(pair.values(), 1.0)
    plan = dense.info.fidelity["codebook_plan"]
    assert all(lp["form"] == "dense" for lp in plan["layers"]) and plan["bytes"] == plan["dense_bytes"]
    base = parameter_bytes(dense.model)
    sizes = []
    for size in (0.04, 0.15):
        result = size_merge(pair.values(), size)
        plan = result.info.fidelity["codebook_plan"]
        assert plan["target_met"] and plan["bytes"] <= size * plan["dense_bytes"]
        assert parameter_bytes(result.model) == base - plan["dense_bytes"] + plan["bytes"]
        assert sum(lp["bytes"] for lp in plan["layers"]) == plan["bytes"]
        assert any(n.startswith("codebook plan:") for n in result.info.fidelity["notes"])
        sizes.append(parameter_bytes(result.model))
    assert sizes[0] < sizes[1] < base


def test_bad_sizes_are_refused(tmp_path, capsys):
    from onnxmerge.cli import main

    paths = [shipped(p) for p in PAIR.values()]
    for bad in (0, -0.5, 1.5, float("nan"), "x"):
        with pytest.raises(UsageError, match="0 < size <= 1") as info:
            merge(paths, method="codebook", params={"size": bad})
        assert "\n" not in str(info.value)
    a, b = (str(p) for p in paths)
    for flags, msg in ((["--size", "0"], "0 < size <= 1"), (["--size", "0.1", "--preset", "light"], "contradict"),
                       (["--size", "2"], "0 < size <= 1")):
        out = tmp_path / "bad.onnx"
        code = main([a, b, "-o", str(out), "--method", "codebook", *flags, "--no-latency", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_plan_keeps_fixed_layers_and_reports_them():
    result = merge([shipped(p) for p in PAIR.values()], method="codebook",
                   params={"size": 0.1, "layer_params": "fc1=8/64", "kmeans_init": 1})
    by = {lp["layer"]: lp for lp in result.info.fidelity["codebook_plan"]["layers"]}
    assert by["fc1"]["fixed"] and (by["fc1"]["r"], by["fc1"]["codewords"], by["fc1"]["group"]) == (8, 64, 1)
    assert not any(lp["fixed"] for label, lp in by.items() if label != "fc1")


def test_calibration_trains_shared_and_packed_codebooks_and_keeps_the_codes():
    """Eq. 11 through the shared (no offsets) and packed (Div / Mod) gather forms: the codewords
    change, the codes do not, and the calibrated model is what the bridge computes."""
    torch = pytest.importorskip("torch")
    from onnxmerge.calibration.bridge import OnnxModule
    from onnxmerge.calibration.calibrate import CalibrationConfig
    from onnxmerge.measure.evaluate import run_task
    from onnxmerge.model.runtime import session

    paths = [shipped(p) for p in PAIR.values()]
    calib = {name: load_dataset(shipped(p)) for name, p in DATA.items()}
    for d in calib.values():
        d.x, d.y = d.x[:96], d.y[:96]
    params = {"preset": "light", "layer_params": "conv2=2/16/4,fc1=4/32/8,fc2=1/16/1000"}
    plain = merge(paths, method="codebook", params=params)
    by = {g["layer"]: g for g in plain.info.fidelity["codebook_layers"]}
    assert by["conv2"]["packed"] and by["fc2"]["packed"] and by["fc1"]["codebooks"] == 13 and not by["fc1"]["packed"]
    tuned = merge(paths, method="codebook", params=params, calib=calib,
                  calibration=CalibrationConfig(steps=3, lr=1e-3, batch_size=32))
    before = {t.name: onnx.numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in tuned.model.graph.initializer}
    for n in (n for n in before if n.endswith("/codes")):
        np.testing.assert_array_equal(before[n], after[n])
    books = [n for n in before if n.endswith("/codebook") and ("conv2" in n or "fc1" in n or "fc2" in n)]
    assert len(books) == 3 and all(not np.array_equal(before[n], after[n]) for n in books)
    module, sess = OnnxModule(tuned.model), session(tuned.model)
    for t in tuned.info.tasks:
        x = calib[t.name].x[:8]
        with torch.no_grad():
            name = t.outputs["logits"]
            got = module({t.inputs["input"]: torch.from_numpy(x)}, [name])[name].numpy()
        assert rel(got, run_task(sess, t, x)) <= 1e-4
