"""mtz's fused layers (passes/mtz/fuse_runs.py): a zipped layer written as one Conv / Gemm of its
dense weight (eq. F1, built from the runs' weights by constant nodes) computes what its runs
compute, the file stores no zero block, a fused file takes further tasks like an unfused one, and
`--fuse auto` keeps what it timed faster."""

import numpy as np
import onnx
from onnx import numpy_helper
from test_mtz import LENETS, NAMES, SAMPLES, calib, outputs, paths
from test_mtz_add import THIRD, calib3, merge_ab

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.data import load_dataset
from onnxmerge.measure.metrics import parameter_bytes
from onnxmerge.model.contract import read_metadata
from onnxmerge.model.runtime import session


def _runs(model):
    """The Concat nodes of zipped layers' runs (ZippedNet.build names them mtz/<layer>/concat)."""
    return [n.name for n in model.graph.node if n.op_type == "Concat" and n.name.endswith("/concat")]


def _evaluated(model, tensors):
    """The values of constant tensors `tensors` of `model` (onnxruntime runs the subgraphs that make them)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    x = np.zeros([d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim], np.float32)
    return dict(zip(tensors, session(m).run(None, {m.graph.input[0].name: x})))


def test_fused_layers_compute_their_runs_and_a_fused_file_takes_further_tasks(tmp_path):
    (tmp_path / "runs").mkdir(), (tmp_path / "fused").mkdir()
    runs = merge_ab(tmp_path / "runs", share_ratio=0.5)
    fused = merge_ab(tmp_path / "fused", share_ratio=0.5, fuse="on")
    a, b = onnx.load(str(runs)), onnx.load(str(fused))
    concats = _runs(a)
    assert concats and not _runs(b)
    layers = [c[len("mtz/"):-len("/concat")] for c in concats]
    nodes = {n.name: n for n in b.graph.node}
    assert all(nodes[f"mtz/{layer}/fused"].op_type in ("Conv", "Gemm") for layer in layers)
    # the file stores the runs' weights, not the zero blocks: about as many parameter bytes as before
    assert parameter_bytes(b) <= 1.05 * parameter_bytes(a)
    inits = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    layout = {e["node"]: e for e in read_metadata(b).layout["layers"]}
    for layer in layers:  # eq. F1: each run's weight at its rows, zeros where no run reads
        node = nodes[f"mtz/{layer}/fused"]
        w = _evaluated(b, [node.input[1]])[node.input[1]]
        parts = [inits[name] for name, _ in layout[layer]["runs"]]
        assert w.shape[0] == sum(p.shape[0] for p in parts)
        assert np.count_nonzero(w) == sum(np.count_nonzero(p) for p in parts)
        assert sorted(np.abs(w[w != 0]).tolist()) == sorted(np.abs(np.concatenate([p[p != 0] for p in parts])).tolist())
    x = load_dataset(shipped(MODELS / "fashion_eval.npz")).x[:32]
    got, want = outputs(b, read_metadata(b), x), outputs(a, read_metadata(a), x)
    for name in NAMES:
        assert np.abs(got[name] - want[name]).max() <= 1e-5 * max(1.0, np.abs(want[name]).max()), name
    # a third model added to the fused file: the network rebuilt from its runs' weights, as from the other
    params = {"share_ratio": 0.5, "hessian_samples": SAMPLES, "fuse": "off"}
    one, two = (merge([str(f), *paths([THIRD["lenet"]])], method="mtz", names=["fashion1"], calib=calib3(),
                      params=params) for f in (runs, fused))
    w1 = {i.name: numpy_helper.to_array(i) for i in one.model.graph.initializer}
    w2 = {i.name: numpy_helper.to_array(i) for i in two.model.graph.initializer}
    assert w1.keys() == w2.keys()
    for name, w in w1.items():
        np.testing.assert_allclose(w2[name], w, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(w).max()), err_msg=name)


def test_auto_keeps_the_form_it_timed_faster():
    result = merge(paths(LENETS), method="mtz", names=NAMES, calib=calib(),
                   params={"share_ratio": 0.5, "hessian_samples": SAMPLES, "fuse": "auto"})
    record = result.info.fidelity["mtz_fuse"]
    assert record["mode"] == "auto" and record["layers"]
    names = {n.name for n in result.model.graph.node}
    for row in record["layers"]:
        assert row["fused"] == (row["fused_s"] < row["runs_s"]) == (f"mtz/{row['layer']}/fused" in names), row
    concat = set(_runs(result.model))
    assert concat == {f"mtz/{r['layer']}/concat" for r in record["layers"] if not r["fused"]}


def test_a_composition_s_codebook_weights_are_fused_too():
    """mtz+codebook: the runs' weights are gathered from codebooks (the portable form), not stored;
    the fused node's weight is built from those gathered tensors, and the model computes what its
    runs compute. `auto` times the two forms with the gathering subgraph in both."""
    params = {"share_ratio": 0.5, "hessian_samples": SAMPLES, "size": 0.2}
    made = {fuse: merge(paths(LENETS), method="mtz+codebook", names=NAMES, calib=calib(), calibrate_last=False,
                        params={**params, "fuse": fuse}) for fuse in ("off", "on", "auto")}
    runs, fused = made["off"].model, made["on"].model
    concats = _runs(runs)
    assert concats and not _runs(fused)
    assert all(r["fused"] for r in made["on"].info.fidelity["mtz_fuse"]["layers"])
    assert {f"mtz/{r['layer']}/concat" for r in made["on"].info.fidelity["mtz_fuse"]["layers"]} == set(concats)
    assert parameter_bytes(fused) <= parameter_bytes(runs)  # the codebooks and codes, no dense weight stored
    x = load_dataset(shipped(MODELS / "fashion_eval.npz")).x[:32]
    want = outputs(runs, made["off"].info, x)
    for form in ("on", "auto"):
        got = outputs(made[form].model, made[form].info, x)
        for name in NAMES:
            assert np.abs(got[name] - want[name]).max() <= 1e-5 * max(1.0, np.abs(want[name]).max()), (form, name)
    timed = made["auto"].info.fidelity["mtz_fuse"]["layers"]
    assert len(timed) == len(concats) and all(r["fused_s"] > 0 and r["runs_s"] > 0 for r in timed)
