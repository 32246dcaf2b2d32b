"""Any ONNX graph in: the architecture zoo (tests/models/zoo, written by tools/zoo.py) through every method.

The zoo holds torchvision-style ResNet, MobileNetV2/V3, EfficientNet, ShuffleNetV2, SqueezeNet, RegNet,
VGG, DenseNet, GoogLeNet, Inception-v3 and ConvNeXt-like graphs exported at opset 17, and graphs
written the old way (IR 3, opset 9, fixed batch 1, initializers as inputs, LRN, Sum, weights made by
constant subgraphs), all with random weights and one input shape. The reference is onnxruntime
running each file as it is (an old graph at its own batch of 1, one sample at a time), never
onnxmerge's own checks.

- every graph loads and `onnxmerge inspect` shows its layers and what each method does with them;
- `pack` of every pair equals both originals within 1e-5 relative;
- every method runs on a same-architecture pair (a zoo graph and a copy with re-drawn weights), its
  degenerate setting reproduces both originals within 1e-5, a lossy setting runs, and one
  calibration step runs.

All of it takes ~10 minutes on 2 cores, so by default the pairs are each graph with the next one
(every graph in two pairs) and the lossy merges with calibration run on four graphs (MobileNetV3,
EfficientNet, ShuffleNetV2, an old Inception); with ONNXMERGE_ZOO=all (set by .ci/run) every pair
and every graph. pytest's summary (-ra) lists what was skipped and why.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import MODELS
from onnxmerge.api import merge
from onnxmerge.calibration.calibrate import CalibrationConfig
from onnxmerge.cli import main
from onnxmerge.data import Dataset
from onnxmerge.model.loading import load_model

ZOO = MODELS / "zoo"
MANIFEST = json.loads((ZOO / "zoo.json").read_text())["models"]
NAMES = sorted(MANIFEST)
ALL = os.environ.get("ONNXMERGE_ZOO") == "all"
NEIGHBOURS = {(a, b) for a, b in zip(NAMES, NAMES[1:] + NAMES[:1])}
CALIBRATED = {"mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2", "inception_old"}
SKIPPED = "the whole zoo runs with ONNXMERGE_ZOO=all (as .ci/run does); skipped here"
TOL = 1e-5  # relative: max |merged - original| / max |original|

# each method's degenerate setting (shares nothing, or a codeword per distinct piece) and a lossy one
# (the codebook's with few codewords and one k-means start: the graph's coverage, not k-means, is tested)
SETTINGS = {
    "zipper": ({"share": 0}, {}),
    "codebook": ({"codewords": 4096, "heads": "codebook", "if_larger": "codebook"}, {"codewords": 16, "kmeans_init": 1}),
    "mtz": ({"share_ratio": 0.0}, {"share_ratio": 0.5, "retrain_steps": 1}),  # mtz retrains as it zips
}


def zoo_path(name: str):
    return ZOO / MANIFEST[name]["file"]


def reference(path, x: np.ndarray) -> np.ndarray:
    """The file's first output on `x`, by onnxruntime without graph optimisations; a graph with a
    fixed batch dim runs one sample at a time, at its own batch."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name, fixed = sess.get_inputs()[0].name, isinstance(sess.get_inputs()[0].shape[0], int)
    if fixed:
        return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {name: x})[0]


def merged_outputs(path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def assert_reproduces(merged, originals: list, x: np.ndarray) -> None:
    got = merged_outputs(merged, x)
    for k, path in enumerate(originals):
        want = reference(path, x)
        rel = float(np.max(np.abs(got[k] - want))) / max(float(np.max(np.abs(want))), 1e-12)
        assert rel <= TOL, f"{path.name}: relative difference {rel:.3g} > {TOL:g}"


def images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict:
    """A copy of each zoo graph with re-drawn weights: each float weight times (1 + 0.1 noise)."""
    folder = tmp_path_factory.mktemp("twins")
    out = {}
    for name in NAMES:
        model = onnx.load(str(zoo_path(name)))
        rng = np.random.default_rng(7)
        for t in model.graph.initializer:
            a = numpy_helper.to_array(t)
            if a.dtype == np.float32 and a.size > 1:
                t.CopyFrom(numpy_helper.from_array((a * (1 + 0.1 * rng.standard_normal(a.shape))).astype(np.float32),
                                                   t.name))
        out[name] = folder / f"{name}_twin.onnx"
        onnx.save(model, str(out[name]))
    return out


def test_the_zoo_covers_what_it_promises():
    assert len(MANIFEST) >= 15
    for family in ("resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "shufflenet_v2", "squeezenet",
                   "regnet", "vgg", "densenet", "googlenet", "inception"):
        assert any(name.startswith(family) for name in MANIFEST), family
    old = [m for m in MANIFEST.values() if m["ir_version"] == 3]
    assert old and all(m["opset"] == 9 for m in old)
    assert {"LRN", "Sum"} <= {op for m in old for op in m["ops"]}


@pytest.mark.parametrize("name", NAMES)
def test_graph_loads_and_inspect_shows_it(name, capsys):
    load_model(zoo_path(name))
    assert main(["inspect", "--json", str(zoo_path(name))]) == 0
    shown = json.loads(capsys.readouterr().out)["models"]
    (model,) = shown.values()
    assert model["layers"], name
    assert set(model["methods"]) >= {"zipper", "codebook", "mtz"}
    assert all(len(v) == len(model["layers"]) for v in model["methods"].values())


@pytest.mark.parametrize("a,b", list(itertools.combinations(NAMES, 2)))
def test_pack_of_every_pair_equals_the_originals(a, b, tmp_path):
    if not ALL and (a, b) not in NEIGHBOURS and (b, a) not in NEIGHBOURS:
        pytest.skip(SKIPPED)
    out = tmp_path / "packed.onnx"
    merge([zoo_path(a), zoo_path(b)], out, method="pack", progress=False)
    assert_reproduces(out, [zoo_path(a), zoo_path(b)], images())


def calib_data() -> dict:
    return {n: Dataset(images(16, seed=k), None, "random", {}) for k, n in enumerate(("a", "b"))}


@pytest.mark.parametrize("method", SETTINGS)
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_setting_reproduces_a_same_architecture_pair(name, method, twins, tmp_path):
    pair = [zoo_path(name), twins[name]]
    hessians = {"calib": calib_data()} if method == "mtz" else {}  # mtz's Hessians need samples
    out = tmp_path / "exact.onnx"
    merge(pair, out, method=method, names=["a", "b"], params=SETTINGS[method][0], progress=False, **hessians)
    assert_reproduces(out, pair, images())


@pytest.mark.parametrize("method", SETTINGS)
@pytest.mark.parametrize("name", NAMES)
def test_lossy_setting_and_one_calibration_step_run(name, method, twins, tmp_path):
    if not ALL and name not in CALIBRATED:
        pytest.skip(SKIPPED)
    out = tmp_path / "lossy.onnx"
    result = merge([zoo_path(name), twins[name]], out, method=method, names=["a", "b"], params=SETTINGS[method][1],
                   progress=False, calib=calib_data(), calibration=CalibrationConfig(steps=1, batch_size=8))
    if method == "mtz":  # its retraining after each zipped layer is its calibration
        assert result.info.fidelity["mtz"]["retrain_batches_total"] >= 1
    else:
        assert result.info.params["calibration"]["steps"] == 1
    assert all(np.isfinite(g).all() for g in merged_outputs(out, images()))
