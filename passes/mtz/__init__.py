"""`mtz`: He, Zhou, Thiele, "Multi-Task Zipping via Layer-wise Neuron Sharing" (NeurIPS 2018).

Neuron pairs chosen by the layer-wise Hessian functional difference (eq. 12; _hessian) share merged
incoming weights (eqs. 10-11), layer by layer with light retraining, on the method's own view of
the network (_zipped.ZippedNet; zip_neurons.ZipNeuronsPass). After the merge, a layer of several
runs is written as one node (fuse_runs.FuseRunsPass). A model it merged, given
first, takes further tasks (_resume: its layout in the metadata).
"""

from __future__ import annotations

from typing import Any

from onnxmerge.errors import OnnxMergeError
from onnxmerge.passes import common
from onnxmerge.passes.mtz._zipped import ZippedNet
from onnxmerge.passes.mtz.fuse_runs import FuseRunsPass
from onnxmerge.passes.mtz.zip_neurons import ZipNeuronsPass, parse_counts
from onnxmerge.pipeline.manager import FUSE_MODES
from onnxmerge.pipeline.method import Knob, Method, Option, count, number, positive


def _pipeline(p: dict[str, Any]) -> list:
    zip_neurons = ZipNeuronsPass(p["share_ratio"], parse_counts(p["layer_share"]), p["threshold"], p["alpha"],
                                 p["hessian_samples"], p["retrain_steps"], p["pairing"], p["damping"], p["mtz_seed"],
                                 p["tolerance"])
    return common.pipeline(combined=[zip_neurons], after=[FuseRunsPass(p["fuse"])])


def _explain(graph, layers: list) -> list[str]:
    """The analysis of a merge (ZippedNet) of the model with itself: the layers it zips, the heads,
    and the layers it declines with the reason."""
    try:
        net = ZippedNet(["a", "b"], [graph, graph], [layers, layers], graph.inputs[0].name, [{}, {}], 17, 8)
    except OnnxMergeError as e:
        return [f"declined: {e}"] * len(layers)
    zipped = {zl.node for zl in net.layers}
    following = {dl.node for dl in net.depthwise}
    heads = {zl.node for zl in net.layers if net.spaces[zl.out_space].head}
    declined = {d["node"]: d["reason"] for d in net.declined}
    return ["per task: the task head" if l.node in heads else "zipped" if l.node in zipped
            else "zipped: follows the pairing of its input's channels" if l.node in following
            else f"declined: {declined.get(l.node, 'runs per task')}" for l in layers]


METHOD = Method(
    name="mtz",
    paper="He, Zhou, Thiele, Multi-Task Zipping via Layer-wise Neuron Sharing (NeurIPS 2018)",
    summary="neuron pairs chosen by the layer-wise Hessian functional difference (eq. 12) share merged "
            "incoming weights (eqs. 10-11), layer by layer with light retraining",
    build=_pipeline,
    explain=_explain,
    extends_merged=True,
    validation="tolerance",
    one_input=True,
    # eighths of each layer's neurons shared: fine enough for a budget, three bisection steps
    search=Knob(lambda n: [{"share_ratio": k / 8} for k in range(1, 9)], "share ratio", saves=("size", "latency")),
    options={
        "share_ratio": Option(1.0, "fraction of each layer's neurons to share (of the narrower model's; "
                              "task heads never)", parse=number("share-ratio", "a fraction between 0 and 1")),
        "layer_share": Option("", "per-layer counts of shared neurons, e.g. 'fc1=300,fc2=100' (convK / fcK "
                              "or node names); the other layers follow --share-ratio or --threshold"),
        "threshold": Option(None, "share every pair whose functional difference (eq. 12) is under this "
                            "(instead of --share-ratio)", parse=number("threshold")),
        "alpha": Option(1.0, "weight of the added model's error against the others' (eq. 5)", parse=number("alpha")),
        "hessian_samples": Option(256, "calibration samples per task for the layer-wise Hessians",
                                  parse=positive("hessian-samples")),
        "retrain_steps": Option(0, "retraining steps after each zipped layer, each one batch of every task (needs --calib)",
                                parse=count("retrain-steps")),
        "pairing": Option("optimal", "optimal: minimum-cost assignment; greedy: cheapest pair first (the "
                          "authors' code); random: the random-sharing baseline", choices=("optimal", "greedy", "random")),
        "damping": Option(1e-2, "Hessian damping, as a fraction of the mean diagonal", parse=number("damping")),
        "mtz_seed": Option(0, "seed of the Hessian sample and random pairing", parse=int),
        "fuse": Option("on", "write a zipped layer as one Conv / Gemm (its dense weight, zero blocks included) "
                       "instead of one node per run of same-task neurons: on, off, or auto where that runs faster "
                       "here (each layer timed both ways, batch 1, one thread; the bytes then follow the timings)",
                       choices=FUSE_MODES),
        "tolerance": Option(None, "adaptive: per layer, the most pairs (up to --share-ratio) whose merge, after "
                            "--retrain-steps, keeps each task within this many accuracy points of its original on "
                            "labelled held-out samples (--validation, else a fifth of --calib)", parse=number("tolerance")),
    },
    # zip_neurons: a threshold replaces the share ratio's counts; --tolerance bisects each layer's count
    # up to the share ratio, so it ignores a threshold and per-layer counts
    conflicts=(("threshold", "share_ratio", "--threshold picks the pairs, so the share ratio would be ignored"),
               ("tolerance", "threshold", "--tolerance picks each layer's number of pairs; give one of them"),
               ("tolerance", "layer_share", "--tolerance picks each layer's number of pairs; give one of them")),
)
