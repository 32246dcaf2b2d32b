"""mtz on depthwise-separable networks (a shipped MobileNet-style pair, independently initialised): each
depthwise layer follows the pairing of the channel space it reads, so the whole network is zipped.

The references are built apart from the code under test: a shared depthwise channel's kernel is
the mean of its tasks' kernels in their own (BatchNorm-folded) networks, and the merged model equals
a torch forward of the zipped network's dense weights (every layer over all columns, zero blocks
included), which checks the emitted slices, gathers, concats and grouped convolutions, also after
retraining has written its weights back."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_declined import check_exact
from test_mtz import NAMES, SAMPLES, calib, outputs, paths, zip_state

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.errors import UsageError
from onnxmerge.measure.metrics import model_stats
from onnxmerge.model.contract import MergedInfo, TaskInfo
from onnxmerge.passes import METHODS

MOBILENETS = ["mobilenet_mnist.onnx", "mobilenet_fashion_seed1.onnx"]  # independently initialised (seeds 0, 1)
DEPTHWISE = [f"/blocks/blocks.{b}/blocks.{b}.0/Conv" for b in range(5)]
POINTWISE = ["/stem/stem.0/Conv"] + [f"/blocks/blocks.{b}/blocks.{b}.3/Conv" for b in range(5)]


def _dense_forward(task, net, x):
    """A torch reference of the zipped MobileNet: each layer one dense convolution / matmul over all
    columns (zero blocks included), each depthwise layer one grouped convolution over all columns,
    the glue (Clip, pooling, Flatten) from the task's own graph; no slices, gathers or concats."""
    layers, depthwise = {zl.node: zl for zl in net.layers}, {dl.node: dl for dl in net.depthwise}
    h = torch.from_numpy(x)
    for node in task.graph.nodes:
        a = node.attrs
        if node.op == "Conv":
            zl = layers.get(node.name) or depthwise[node.name]
            p = a.get("pads", [0, 0, 0, 0])
            h = F.conv2d(F.pad(h, (p[1], p[3], p[0], p[2])), torch.tensor(zl.weight, dtype=torch.float32), torch.tensor(zl.bias, dtype=torch.float32),
                         stride=tuple(a.get("strides", [1, 1])), groups=len(zl.weight) if node.name in depthwise else 1)
        elif node.op == "Clip":
            h = h.clamp(float(node.inputs[1].values), float(node.inputs[2].values))
        elif node.op == "GlobalAveragePool":
            h = h.mean(dim=(2, 3), keepdim=True)
        elif node.op == "Flatten":
            h = h.flatten(1)
        else:
            assert node.op == "Gemm" and node.name in layers, node.op
            zl = layers[node.name]
            h = h @ torch.tensor(zl.weight, dtype=torch.float32).T + torch.tensor(zl.bias, dtype=torch.float32)
    return h.numpy()


def _zip(**kw):
    return zip_state(MOBILENETS, **kw)


@pytest.fixture(scope="module", params=[0, 2], ids=["as-merged", "retrained"])
def half(request):
    return _zip(share_ratio=0.5, retrain_steps=request.param)


def test_sharing_nothing_reproduces_both_originals_with_nothing_declined():
    result = merge(paths(MOBILENETS), method="mtz", names=NAMES, calib=calib(),
                   params={"share_ratio": 0.0, "hessian_samples": SAMPLES})
    check_exact(result, paths(MOBILENETS), np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32))
    assert "mtz_declined" not in result.state.figures
    assert result.state.figures["mtz"]["depthwise_following_pairing"] == DEPTHWISE


def test_every_pointwise_layer_is_shared_and_each_depthwise_follows(half):
    state, net = half
    rows = state.figures["mtz"]["layers"]
    assert [r["node"] for r in rows] == POINTWISE
    assert [r["shared"] for r in rows] == [8, 16, 16, 32, 32, 64]  # half of the narrower side, every layer
    assert [dl.node for dl in net.depthwise] == DEPTHWISE and not net.declined
    model = net.build()
    grouped = [n for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(grouped) == len(DEPTHWISE)  # one depthwise node over all columns each, never per task
    pack = merge(paths(MOBILENETS), method="pack", names=NAMES).model
    assert model_stats(model)["params"] < 0.9 * model_stats(pack)["params"]


def _mean_kernels(state, net):
    """Per depthwise layer, per column: the mean of its tasks' own kernels and biases."""
    own = [{n.name: n for n in task.graph.nodes} for task in state.tasks]
    return [(np.stack([np.mean([own[t][dl.node].inputs[1].values[c] for t, c in col.items()], axis=0)
                       for col in net.spaces[dl.space].columns]),
             np.array([np.mean([own[t][dl.node].inputs[2].values[c] for t, c in col.items()])
                       for col in net.spaces[dl.space].columns]))
            for dl in net.depthwise]


def test_a_shared_depthwise_channel_has_the_mean_of_its_tasks_kernels(half):
    state, net = half
    means = _mean_kernels(state, net)
    shared = sum(len(col) > 1 for dl in net.depthwise for col in net.spaces[dl.space].columns)
    assert shared == 8 + 16 + 16 + 32 + 32  # the channels the pointwise layers before them share
    if state.figures["mtz"]["retrain_steps_per_layer"] == 0:  # the merge's own kernels
        for dl, (w, b) in zip(net.depthwise, means):
            np.testing.assert_allclose(dl.weight, w, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(dl.bias, b, rtol=1e-6, atol=1e-6)
    else:  # retraining trained them, and its weights were read back into the zipped network
        assert all(not np.allclose(dl.weight, w, rtol=1e-4, atol=1e-6) for dl, (w, _) in zip(net.depthwise, means))


def test_the_merged_model_equals_a_dense_reference(half):
    state, net = half
    model = net.build()
    x = np.random.default_rng(2).standard_normal((8, 1, 28, 28)).astype(np.float32)
    got = outputs(model, _info(state), x)
    ref = _dense_forward(state.tasks[0], net, x)
    head = net.spaces[net.layers[-1].out_space].columns
    for t, task in enumerate(state.tasks):
        want = ref[:, [k for _, k in sorted((c[t], k) for k, c in enumerate(head) if t in c)]]
        np.testing.assert_allclose(got[task.name], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _info(state):
    return MergedInfo("", "mtz", {}, [TaskInfo(t.name, "", "", t.input_map, t.output_map) for t in state.tasks])


def test_explain_names_the_depthwise_layers_as_following():
    state, _ = _zip(share_ratio=0.0)
    task = state.tasks[0]
    lines = METHODS["mtz"].explain(task.graph, task.layers)
    for layer, line in zip(task.layers, lines):
        if layer.node in DEPTHWISE:
            assert line.startswith("zipped: follows")


def test_resuming_a_model_with_zipped_depthwise_layers_is_refused(tmp_path):
    ab = tmp_path / "ab.onnx"
    merge(paths(MOBILENETS), ab, method="mtz", names=NAMES, calib=calib(),
          params={"share_ratio": 0.5, "hessian_samples": SAMPLES})
    out = tmp_path / "abc.onnx"
    with pytest.raises(UsageError) as e:
        merge([str(ab), str(shipped(MODELS / "mobilenet_fashion.onnx"))], out, method="mtz",
              names=["fashion1"], calib={**calib(), "fashion1": calib()["fashion"]},
              params={"share_ratio": 0.5, "hessian_samples": SAMPLES})
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "depthwise" in message and str(ab) in message and not out.exists()
