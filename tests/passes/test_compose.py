"""Compositions (passes/compose.py): zipper shares the first layers, then codebooks compress the layers
that stay per task. Sharing nothing with a codeword per distinct piece reproduces the originals; a
lossy composition computes zipper's shared layers once (each with a codebook of its own) and plans
every layer to the size target; the pipeline is spliced as the module says."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.data import load_dataset
from onnxmerge.errors import UsageError
from onnxmerge.measure.evaluate import run_task
from onnxmerge.measure.metrics import parameter_bytes
from onnxmerge.model.runtime import session
from onnxmerge.passes import METHODS
from onnxmerge.passes.codebook.share_codebooks import ShareCodebooksPass
from onnxmerge.passes.compose import then
from onnxmerge.passes.zipper.zip_layers import ZipLayersPass
from onnxmerge.pipeline.method import CALIBRATE

FILES = ["lenet_mnist.onnx", "lenet_fashion_seed1.onnx"]  # independently initialised LeNets
NAMES = ["mnist", "fashion"]
DATA = ["mnist_eval.npz", "fashion_eval.npz"]
COMPOSED = "zipper+codebook"


def _paths():
    return [str(shipped(MODELS / f)) for f in FILES]


def _calib():
    return {n: load_dataset(shipped(MODELS / d)) for n, d in zip(NAMES, DATA)}


def test_the_pipeline_is_zipper_then_codebooks_then_one_calibration():
    steps = METHODS[COMPOSED].pipeline({"share": 2, "size": 0.1})
    kinds = [type(s) for s in steps]
    assert steps.count(CALIBRATE) == 1 and kinds.index(ZipLayersPass) < kinds.index(ShareCodebooksPass) \
        < steps.index(CALIBRATE)
    with pytest.raises(ValueError, match="both take"):
        then(METHODS["codebook"], METHODS["codebook"])


def test_sharing_nothing_with_a_codeword_per_piece_reproduces_the_originals():
    result = merge(_paths(), method=COMPOSED, names=NAMES, calib=_calib(), calibrate_last=False,
                   params={"share": 0, "codewords": 4096, "heads": "codebook", "if_larger": "codebook"})
    layers = result.info.fidelity["codebook_layers"]
    assert len(layers) == 5 and all(g["exact"] for g in layers)  # every layer of both LeNets
    sess = session(result.model)
    for task, path, ds in zip(result.info.tasks, _paths(), _calib().values()):
        got = run_task(sess, task, ds.x[:64])
        want = session(path).run(None, {"input": ds.x[:64]})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_shared_layers_are_computed_once_and_every_layer_is_planned():
    params = {"share": 2, "size": 0.1}
    composed = merge(_paths(), method=COMPOSED, names=NAMES, calib=_calib(), calibrate_last=False, params=params)
    zipped = merge(_paths(), method="zipper", names=NAMES, calib=_calib(), calibrate_last=False, params={"share": 2})
    convs = [n.name for n in composed.model.graph.node if n.op_type == "Conv"]
    assert convs == [n.name for n in zipped.model.graph.node if n.op_type == "Conv"] and len(convs) == 2
    assert all(c.startswith("shared/") for c in convs)  # zipper's two shared layers, one node each
    planned = [lp["layer"] for lp in composed.info.fidelity["codebook_plan"]["layers"]]
    assert planned == ["conv1", "conv2", "fc1", "fc2"]  # the shared layers (one node each) and the per-task ones
    assert sum("shared by an earlier pass" in n for n in composed.state.notes) == 2
    plan = composed.info.fidelity["codebook_plan"]
    assert plan["target_met"] and plan["bytes"] <= 0.1 * plan["dense_bytes"]
    assert parameter_bytes(composed.model) < 0.2 * parameter_bytes(zipped.model)


def test_a_composition_starts_from_the_first_method_s_merged_model():
    """The search starts zipper+codebook from zipper's calibrated model (warm_start): with codebooks
    that lose nothing, the composition computes that model's function, not the fresh merge's. The
    'calibration' here is noise on every weight, so that a composition that ignored the warm start
    (or loaded only some of its weights) would differ."""
    zipped = merge(_paths(), method="zipper", names=NAMES, calib=_calib(), calibrate_last=False, params={"share": 2})
    warm = zipped.model
    rng = np.random.default_rng(0)
    for init in warm.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            init.CopyFrom(numpy_helper.from_array(w + 0.05 * np.abs(w).mean() * rng.standard_normal(w.shape)
                                                  .astype(np.float32), init.name))
    exact = {"share": 2, "codewords": 4096, "heads": "codebook", "if_larger": "codebook"}
    composed = merge(_paths(), method=COMPOSED, names=NAMES, calib=_calib(), calibrate_last=False,
                     params=exact, warm_start=warm)
    fresh = merge(_paths(), method=COMPOSED, names=NAMES, calib=_calib(), calibrate_last=False, params=exact)
    assert all(g["exact"] for g in composed.info.fidelity["codebook_layers"])
    a, b, c = session(composed.model), session(warm), session(fresh.model)
    for task, ds in zip(composed.info.tasks, _calib().values()):
        got, want = run_task(a, task, ds.x[:64]), run_task(b, task, ds.x[:64])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert np.abs(run_task(c, task, ds.x[:64]) - want).max() > 1e-2 * np.abs(want).max()
    with pytest.raises(UsageError, match="cannot start from an earlier merged model"):
        merge(_paths(), method=MTZ_COMPOSED, names=NAMES, calib=_calib(), calibrate_last=False, warm_start=warm)


MTZ_COMPOSED = "mtz+codebook"


def test_mtz_then_codeword_per_piece_codebooks_reproduce_mtz():
    """Codebooks that lose nothing on mtz's zipped graph (its shared-neuron nodes and the per-task
    nodes of the rest) give mtz's own model back."""
    params = {"share_ratio": 0.5, "hessian_samples": 64}
    zipped = merge(_paths(), method="mtz", names=NAMES, calib=_calib(), calibrate_last=False, params=params)
    composed = merge(_paths(), method=MTZ_COMPOSED, names=NAMES, calib=_calib(), calibrate_last=False,
                     params={**params, "codewords": 4096, "heads": "codebook", "if_larger": "codebook"})
    layers = composed.info.fidelity["codebook_layers"]
    assert all(g["exact"] for g in layers)
    assert sum(g["layer"].endswith(".shared") for g in layers) == 4  # each zipped layer's shared-neuron node
    a, b = session(composed.model), session(zipped.model)
    for task, ds in zip(composed.info.tasks, _calib().values()):
        got, want = run_task(a, task, ds.x[:64]), run_task(b, task, ds.x[:64])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_mtz_then_codebooks_plans_the_shared_neurons_too():
    params = {"share_ratio": 0.5, "hessian_samples": 64}
    composed = merge(_paths(), method=MTZ_COMPOSED, names=NAMES, calib=_calib(), calibrate_last=False,
                     params={**params, "size": 0.2})
    # mtz alone with a node per run, as the composition's codebooks see it (mtz --fuse: its own choice)
    zipped = merge(_paths(), method="mtz", names=NAMES, calib=_calib(), calibrate_last=False,
                   params={**params, "fuse": "off"})
    planned = [lp["layer"] for lp in composed.info.fidelity["codebook_plan"]["layers"]]
    assert {f"{name}.shared" for name in ("conv1", "conv2", "fc1", "fc2")} <= set(planned)
    plan = composed.info.fidelity["codebook_plan"]
    assert plan["target_met"] and plan["bytes"] <= 0.2 * plan["dense_bytes"]
    assert parameter_bytes(composed.model) < 0.35 * parameter_bytes(zipped.model)
    # the shared neurons are still computed once: the same shared nodes as mtz alone, or, where the
    # codebooks kept a layer dense, mtz's fused node of it (--fuse on, the default)
    composed_nodes = {n.name for n in composed.model.graph.node if n.op_type in ("Conv", "Gemm")}
    shared = [n.name for n in zipped.model.graph.node if n.name.startswith("shared/") and n.op_type in ("Conv", "Gemm")]
    assert shared and all(name in composed_nodes or f"mtz/{name[len('shared/'):name.rindex('/')]}/fused" in composed_nodes
                          for name in shared)
