"""`--target-opset`: a merged model taken down to an older opset (and its IR version) computes what it
computed as merged, by every method; what cannot go down is refused in one line naming the operators;
`inspect` and the metadata say what a runtime needs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import EXAMPLES, MODELS, make_model, shipped
from onnxmerge import kernels
from onnxmerge.api import merge
from onnxmerge.cli import main
from onnxmerge.data import load_dataset
from onnxmerge.errors import MergeError
from onnxmerge.model import downgrade
from onnxmerge.model.contract import read_metadata
from onnxmerge.model.runtime import session

EXAMPLE = [shipped(EXAMPLES / "fashion_lenet.onnx"), shipped(EXAMPLES / "digits_lenet.onnx")]
LENETS = [shipped(MODELS / "lenet_mnist.onnx"), shipped(MODELS / "lenet_fashion_seed1.onnx")]
CALIB = {"lenet_mnist": shipped(MODELS / "mnist_eval.npz"), "lenet_fashion_seed1": shipped(MODELS / "fashion_eval.npz")}
MERGES = [("pack", EXAMPLE, {}), ("codebook", EXAMPLE, {"preset": "light"}), ("codebook", EXAMPLE, {"size": 0.1}),
          ("zipper", LENETS, {"share": 2}), ("mtz", LENETS, {"share_ratio": 0.5, "hessian_samples": 64}),
          ("zipper+codebook", LENETS, {"share": 2, "size": 0.1})]
if kernels.available():
    MERGES.append(("codebook", EXAMPLE, {"preset": "light", "emit": "native"}))


def _outputs(model, x: dict) -> list[np.ndarray]:
    native = any(n.domain == kernels.DOMAIN for n in model.graph.node)
    return session(model, native=native).run(None, x)


@pytest.mark.parametrize("method,files,params", MERGES, ids=lambda v: str(v) if not isinstance(v, list) else "")
def test_every_method_s_merge_goes_down_to_opset_13_and_computes_the_same(method, files, params):
    calib = {p.stem: load_dataset(CALIB[p.stem]) for p in files} if files is LENETS else None
    kw = {"method": method, "params": params, "calib": calib, "calibrate_last": False}
    merged = merge(files, **kw).model
    down = merge(files, target_opset=13, **kw)
    assert downgrade.default_opset(down.model) == 13 and down.model.ir_version == 7
    assert down.info.fidelity["target_opset"]["opset"] == 13
    assert downgrade.oldest_onnxruntime(down.model) == "1.6"
    assert read_metadata(down.model).method == method  # the metadata survives
    rng = np.random.default_rng(0)
    x = {i.name: rng.standard_normal([3, *[d.dim_value for d in i.type.tensor_type.shape.dim[1:]]]).astype(np.float32)
         for i in merged.graph.input}
    for got, want in zip(_outputs(down.model, x), _outputs(merged, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("target", [11, 12])
def test_fused_branches_go_below_opset_13_with_the_split_attribute(target):
    """The tasks' fused branches end in a Split whose sizes are an input (opset 13): below 13 they
    become its `split` attribute, and the model computes what it computed."""
    pair = [shipped(MODELS / "mobilenet_mnist.onnx"), shipped(MODELS / "mobilenet_fashion.onnx")]
    merged = merge(pair, method="pack").model
    assert [len(n.input) for n in merged.graph.node if n.op_type == "Split"] == [2]
    down = merge(pair, method="pack", target_opset=target)
    assert down.info.fidelity["target_opset"]["how"] == "relabelled"
    split, = [n for n in down.model.graph.node if n.op_type == "Split"]
    assert len(split.input) == 1 and [a.name for a in split.attribute if a.name == "split"] == ["split"]
    x = {"input": np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)}
    for got, want in zip(_outputs(down.model, x), _outputs(merged, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _layer_norm_model() -> onnx.ModelProto:
    """A model with LayerNormalization, an operator of opset 17."""
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("LayerNormalization", ["f", "scale", "bias"], ["n"]),
             helper.make_node("Gemm", ["n", "w", "b"], ["logits"], transB=1)]
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, v.shape, v.ravel()) for n, v in
             (("scale", np.ones(64)), ("bias", np.zeros(64)), ("w", rng.standard_normal((4, 64))), ("b", np.zeros(4)))]
    return make_model(nodes, inits)


def test_an_operator_newer_than_the_target_is_refused_by_name():
    with pytest.raises(MergeError) as e:
        downgrade.to_opset(_layer_norm_model(), 13, "m.onnx")
    assert len(str(e.value).splitlines()) == 1 and "LayerNormalization (from opset 17)" in str(e.value)
    assert str(e.value).startswith("m.onnx: cannot go down to opset 13")


def test_a_node_using_what_the_old_version_lacks_is_refused_by_name():
    """Reshape with allowzero=1 (opset 14) has no opset-13 form: neither relabelling nor the converter."""
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["logits"], allowzero=1)]
    model = make_model(nodes, [helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])], out_shape=("N", 64))
    with pytest.raises(MergeError) as e:
        downgrade.to_opset(model, 13, "m.onnx")
    assert len(str(e.value).splitlines()) == 1 and "Reshape (13 -> 14)" in str(e.value)


def test_a_conversion_whose_outputs_differ_is_refused():
    model = merge(EXAMPLE, method="pack").model
    with pytest.raises(MergeError, match="outputs differ by 0.5"):
        downgrade.to_opset(model, 13, "m.onnx", compare=lambda a, b: 0.5)


def test_the_oldest_runtime_follows_onnxruntime_s_table():
    def stamped(opset, ir):
        m = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = ir
        return m

    assert [downgrade.oldest_onnxruntime(stamped(o, i)) for o, i in ((11, 6), (13, 7), (14, 7), (17, 8), (19, 9),
                                                                      (21, 10))] == ["1.0", "1.6", "1.8", "1.12",
                                                                                     "1.16", "1.18"]
    assert downgrade.oldest_onnxruntime(stamped(13, 8)).startswith("1.9")  # IR 8 needs 1.9
    assert downgrade.oldest_onnxruntime(stamped(23, 11)).startswith("newer than 1.18")


def test_cli_writes_the_old_opset_or_refuses_in_one_line(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = [*map(str, EXAMPLE), "-o", str(out), "--method", "codebook", "--preset", "light", "--target-opset", "13",
            "--no-latency", "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    assert downgrade.default_opset(onnx.load(str(out))) == 13
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    runtime = next(iter(json.loads(capsys.readouterr().out)["models"].values()))["runtime"]
    assert runtime == {"opset": 13, "ir_version": 7, "custom_domains": {}, "oldest_onnxruntime": "1.6"}
    for i in range(2):
        onnx.save(_layer_norm_model(), str(tmp_path / f"ln{i}.onnx"))
    bad = tmp_path / "bad.onnx"
    assert main([str(tmp_path / "ln0.onnx"), str(tmp_path / "ln1.onnx"), "-o", str(bad), "--target-opset", "13",
                 "--no-latency", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LayerNormalization" in err[0] and not bad.exists()
