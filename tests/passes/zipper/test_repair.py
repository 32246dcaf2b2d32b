"""RepairPass (REPAIR, R1-R2) and zipper's default channel matching on a channel-permuted copy."""

import numpy as np
import onnx
import pytest

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.calibration.calibrate import CalibrationConfig
from onnxmerge.data import load_dataset
from onnxmerge.measure.evaluate import run_task
from onnxmerge.model.runtime import session
from onnxmerge.pipeline.checks import task_model

NAMES = ["mnist", "fashion"]
NO_STEPS = CalibrationConfig(steps=0)  # --calib feeds matching and REPAIR; no training


def calib(n: int = 96) -> dict:
    return {"mnist": load_dataset(shipped(MODELS / "mnist_eval.npz")).take(n),
            "fashion": load_dataset(shipped(MODELS / "fashion_eval.npz")).take(n)}


def layer_outputs(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    sess = session(m)
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))


def numpy_stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (axis 1), over samples and positions: written out separately from the pass's."""
    c = z.shape[1]
    flat = np.transpose(z.astype(np.float64), (1, 0, *range(2, z.ndim))).reshape(c, -1)
    mean = flat.sum(axis=1) / flat.shape[1]
    return mean, np.sqrt(((flat - mean[:, None]) ** 2).sum(axis=1) / flat.shape[1])


@pytest.mark.parametrize("match", ["none", "auto"])
def test_repair_sets_the_shared_layers_statistics_to_the_originals_average(match):
    """On the calibration batch, each shared layer's per-channel mean and std equal the average of
    the two originals' at the matched channels (R1), within float32 rounding; without REPAIR they
    do not (so the check can fail)."""
    k, data = 4, calib()
    x = np.concatenate([data[t].x for t in NAMES]).astype(np.float32)  # the pass's batch: every sample, in task order
    pair = [shipped(MODELS / f"mobilenet_{t}.onnx") for t in NAMES]
    params = {"share": k, "match": match}
    repaired = merge(pair, method="zipper", names=NAMES, params=params, calib=data, calibration=NO_STEPS)
    plain = merge(pair, method="zipper", names=NAMES, params=params | {"repair": "off"}, calib=data,
                  calibration=NO_STEPS)
    first = repaired.info.tasks[0]
    keys = list(first.layers)[:k]  # original layer output -> merged tensor, in layer order
    targets = []
    for task, path in zip(repaired.info.tasks, pair):
        outs = layer_outputs(onnx.load(str(path)), keys, x)
        stats = []
        for key in keys:
            mean, std = numpy_stats(outs[key])
            order = task.channels.get(key)
            stats.append((mean, std) if order is None else (mean[order], std[order]))
        targets.append(stats)
    worst_plain = 0.0
    for result, check in ((repaired, True), (plain, False)):
        merged_keys = [result.info.tasks[0].layers[key] for key in keys]
        outs = layer_outputs(result.model, merged_keys, x)
        for i, name in enumerate(merged_keys):
            mean, std = numpy_stats(outs[name])
            want_mean = (targets[0][i][0] + targets[1][i][0]) / 2
            want_std = (targets[0][i][1] + targets[1][i][1]) / 2
            scale = max(1.0, float(np.abs(want_mean).max()), float(want_std.max()))
            err = max(np.abs(mean - want_mean).max(), np.abs(std - want_std).max()) / scale
            if check:
                assert err < 1e-4, (i, err)
            else:
                worst_plain = max(worst_plain, err)
    assert worst_plain > 1e-2  # averaging alone leaves the statistics off: the check above is not vacuous


def test_matching_by_default_undoes_a_channel_permutation_at_share_all(tmp_path):
    """B = A with its hidden channels shuffled. With the defaults (activation matching on --calib,
    then REPAIR), zipping every layer averages A with itself and reproduces A for both tasks within
    1e-5; --match none averages unrelated channels and does not."""
    from test_match_channels import prepared, shuffle_hidden_channels

    a = shipped(MODELS / "mobilenet_mnist.onnx")
    state = prepared(a, a)
    shuffle_hidden_channels(state, seed=5)
    shuffled = tmp_path / "shuffled.onnx"
    onnx.save(task_model(state.tasks[1], state), str(shuffled))
    data = calib(64)
    x = data["mnist"].x[:32].astype(np.float32)
    ref = session(onnx.load(str(a))).run(None, {"input": x})[0]
    matched = merge([a, shuffled], method="zipper", names=NAMES, calib=data, calibration=NO_STEPS)
    assert matched.info.params["match"] == "auto"
    assert any("activations" in n for n in matched.state.notes)
    plain = merge([a, shuffled], method="zipper", names=NAMES, params={"match": "none"}, calib=data,
                  calibration=NO_STEPS)
    for result, close in ((matched, True), (plain, False)):
        sess = session(result.model)
        for task in result.info.tasks:
            got = run_task(sess, task, x)
            err = np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref))))
            assert (err <= 1e-5) if close else (err > 1e-2), (task.name, err)


def test_repair_needs_calibration_data_and_is_off_at_share_zero():
    pair = [shipped(MODELS / f"lenet_{t}.onnx") for t in NAMES]
    result = merge(pair, method="zipper", names=NAMES, params={"share": 2, "match": "none"})
    assert any("REPAIR skipped" in n for n in result.state.notes)
    result = merge(pair, method="zipper", names=NAMES, params={"share": 0}, calib=calib(32), calibration=NO_STEPS,
                   verify_passes=True)
    assert not any("REPAIR" in n for n in result.state.notes)



def test_calibration_data_of_two_shapes_is_refused_as_zipper_refuses_such_models():
    """Models of two input shapes (28x28 and 32x32 LeNets) cannot share an input: with --calib the
    default matching must not fail first on the data (it falls back to weights), and zipper's own
    refusal is what the user sees."""
    from conftest import EXAMPLES
    from onnxmerge.errors import UsageError

    models = [shipped(EXAMPLES / "fashion_lenet.onnx"), shipped(EXAMPLES / "digits_lenet.onnx")]
    data = {"fashion": load_dataset(shipped(EXAMPLES / "fashion_calib.npz")).take(64),
            "digits": load_dataset(shipped(EXAMPLES / "digits_calib.npz")).take(64)}
    with pytest.raises(UsageError, match="same shape and type"):
        merge(models, method="zipper", names=["fashion", "digits"], calib=data, calibration=NO_STEPS)
