"""The warm start of progressive zippering (LoadWeightsPass): a merge started from an earlier,
calibrated merged model carries that model's weights forward, and refuses one of the wrong shape.

The earlier model is the LeNet pair zipped at share 1 and calibrated a few steps; the new merge
zips two layers from it. Its layer 1 must hold the calibrated shared weights, its layer 2 the average
of the calibrated task weights, and every layer after that the calibrated task weights; a merge
without the warm start (or a pass that did nothing) holds the trained weights instead, which
calibration has moved, so the test tells the two apart.
"""

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.calibration.calibrate import CalibrationConfig
from onnxmerge.data import load_dataset
from onnxmerge.errors import MergeError
from onnxmerge.model.contract import SHARED

NAMES = ["mnist", "fashion"]
PLAIN = {"match": "none", "repair": "off"}  # eq. 1 alone: the weights this test predicts


def paths():
    return [shipped(MODELS / "lenet_mnist.onnx"), shipped(MODELS / "lenet_fashion.onnx")]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float initializers (a model whose branches were fused also holds its Split's int64 sizes)."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT}


@pytest.fixture(scope="module")
def calibrated() -> onnx.ModelProto:
    """Zipper share 1, calibrated 4 steps on the shipped evaluation subsets (labels and teachers)."""
    calib = {"mnist": load_dataset(shipped(MODELS / "mnist_eval.npz")).take(64),
             "fashion": load_dataset(shipped(MODELS / "fashion_eval.npz")).take(64)}
    result = merge(paths(), method="zipper", names=NAMES, params={"share": 1} | PLAIN, calib=calib,
                   calibration=CalibrationConfig(steps=4, batch_size=16))
    assert result.info.params["share"] == 1 and result.info.params["calibration"]["steps"] == 4
    return result.model


def test_warm_start_carries_the_calibrated_weights_forward(calibrated):
    before = weights(merge(paths(), method="zipper", names=NAMES, params={"share": 1} | PLAIN).model)
    after = weights(calibrated)
    assert before.keys() == after.keys()
    moved = [k for k in after if not np.array_equal(before[k], after[k])]
    assert moved == list(after)  # the premise: calibration changed every weight

    warm = weights(merge(paths(), method="zipper", names=NAMES, params={"share": 2} | PLAIN, warm_start=calibrated).model)
    cold = weights(merge(paths(), method="zipper", names=NAMES, params={"share": 2} | PLAIN).model)
    assert warm.keys() == cold.keys()
    layer1 = [k for k in after if k.startswith(SHARED)]
    layer2 = [k for k in warm if k.startswith(SHARED) and k not in after]
    task_owned = [k for k in warm if not k.startswith(SHARED)]
    assert len(layer1) == 2 and len(layer2) == 2 and len(task_owned) == 12  # weight and bias per layer

    # layer 1: the calibrated shared weights, as they are (averaging equal values changes nothing)
    for k in layer1:
        np.testing.assert_array_equal(warm[k], after[k], err_msg=k)
    # layer 2, newly shared: the average of the tasks' calibrated weights (eq. 1)
    for k in layer2:
        mean = np.mean([after[f"{t}/{k[len(SHARED):]}"] for t in NAMES], axis=0)
        np.testing.assert_allclose(warm[k], mean, rtol=1e-6, atol=1e-7, err_msg=k)
    # the later layers, each task's own: the calibrated task weights
    for k in task_owned:
        np.testing.assert_array_equal(warm[k], after[k], err_msg=k)

    # and none of it is what the merge without the warm start gives
    for k in [*layer1, *layer2, *task_owned]:
        assert not np.allclose(warm[k], cold[k], rtol=0, atol=1e-7), f"{k} was not warm-started"


@pytest.mark.parametrize("name,task", [("fashion/classifier.3.weight", "fashion"),
                                       ("shared/features.0.weight", "mnist")])
def test_warm_start_refuses_a_weight_of_the_wrong_shape(calibrated, name, task):
    edited = copy.deepcopy(calibrated)
    (init,) = [i for i in edited.graph.initializer if i.name == name]
    value = numpy_helper.to_array(init)
    wrong = np.zeros((value.shape[0], value.shape[1] + 1, *value.shape[2:]), dtype=value.dtype)
    init.CopyFrom(numpy_helper.from_array(wrong, name))
    with pytest.raises(MergeError) as raised:
        merge(paths(), method="zipper", names=NAMES, params={"share": 2} | PLAIN, warm_start=edited)
    message = str(raised.value)
    assert "\n" not in message
    assert f"task {task}" in message and name in message
    assert str(tuple(wrong.shape)) in message and str(tuple(value.shape)) in message
