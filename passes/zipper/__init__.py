"""`zipper`: Wu, Chan, Chen, "On Merging MobileNets for Efficient Multitask Inference" (EMC2 2019).

Same-architecture models share their first K layers, each shared weight the average of the tasks'
(eq. 1), computed once (zip_layers.ZipLayersPass); by default after permuting each model's hidden
channels to match the first's (match_channels.MatchChannelsPass: activation matching on --calib as in
ZipIt! and Git Re-Basin, else weight matching), and followed by REPAIR (repair.RepairPass: the shared
layers' channel statistics set to the originals' average, R1-R2) before calibration. A merge may start from an earlier merged model's weights (load_weights.LoadWeightsPass):
progressive zippering (onnxmerge.sweep) shares layer after layer, calibrating in between.
"""

from __future__ import annotations

from typing import Any

from onnxmerge.errors import UsageError
from onnxmerge.passes import common
from onnxmerge.passes.zipper.load_weights import LoadWeightsPass
from onnxmerge.passes.zipper.match_channels import MatchChannelsPass
from onnxmerge.passes.zipper.repair import RepairPass
from onnxmerge.passes.zipper.zip_layers import ZipLayersPass
from onnxmerge.pipeline.method import Knob, Method, Option


def _layers(text: str) -> int | str:
    if text == "all":
        return text
    try:
        layers = int(text)
    except ValueError:
        raise UsageError(f"--share {text}: give a number of layers or all") from None
    if layers < 0:  # refused here, before any pass reads it
        raise UsageError(f"--share {text}: give a number of layers >= 0, or all")
    return layers


# --match: which similarity pairs the channels (hungarian: the earlier name of weight matching)
_SIMILARITY = {"auto": "auto", "activations": "activations", "weights": "weights", "hungarian": "weights"}


def _pipeline(p: dict[str, Any]) -> list:
    match = [MatchChannelsPass(layers=p["share"], similarity=_SIMILARITY[p["match"]])] if p["match"] != "none" else []
    repair = [RepairPass()] if p["repair"] == "on" else []
    return common.pipeline(task=[LoadWeightsPass(), *match],
                           combined=[ZipLayersPass(p["share"], p["depthwise"]), *repair])


def _explain(graph, layers: list) -> list[str]:
    """--share all shares every layer but the task head, depthwise ones included (--depthwise shared)."""
    return ["shared (averaged)"] * (len(layers) - 1) + ["per task: the task head"]


METHOD = Method(
    name="zipper",
    paper="Wu, Chan, Chen, On Merging MobileNets for Efficient Multitask Inference (EMC2 2019)",
    summary="same-architecture models share their first K layers (weights averaged, eq. 1), computed once",
    build=_pipeline,
    sweep="share",
    warm=True,
    one_input=True,
    explain=_explain,
    # share 1, 2, ... layers: each more is smaller and (with depthwise shared) faster
    # the shared layers' work is done once: latency first (their parameters are halved, not more)
    search=Knob(lambda n: [{"share": k} for k in range(1, n)], "layers shared from the input on",
                saves=("latency", "size")),
    options={
        "share": Option("all", "layers to share from the input on (a number, or all = all but the task heads)",
                        parse=_layers),
        "depthwise": Option("shared", "shared: depthwise layers shared too (saves compute); task: each task "
                            "keeps its depthwise layers (the paper's variant; saves parameters only)",
                            choices=("shared", "task")),
        # independently trained nets order their channels arbitrarily: averaging unmatched channels
        # (the paper's setting, none) loses most of the accuracy at a few shared layers (issue 18)
        "match": Option("auto", "permute each model's channels to match the first's before averaging "
                        "(Hungarian assignment per layer): activations = correlation of the channels' outputs "
                        "on --calib (ZipIt!, Git Re-Basin), weights = filter similarity (Git Re-Basin weight "
                        "matching; hungarian is its old name), auto = activations with --calib, else weights; "
                        "none = the paper's plain average",
                        choices=("auto", "activations", "weights", "hungarian", "none")),
        "repair": Option("on", "on: after averaging, rescale and shift each shared layer's output channels to "
                         "the originals' average mean and std on --calib (REPAIR; needs --calib)",
                         choices=("on", "off")),
    },
)
