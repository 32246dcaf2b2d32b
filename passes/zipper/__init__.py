"""`zipper`: Wu, Chan, Chen, "On Merging MobileNets for Efficient Multitask Inference" (EMC2 2019).

Same-architecture models share their first K layers, each shared weight the average of the tasks'
(eq. 1), computed once (zip_layers.ZipLayersPass); optionally after permuting each model's hidden
channels to match the first's (match_channels.MatchChannelsPass, weight matching as in Git
Re-Basin). A merge may start from an earlier merged model's weights (load_weights.LoadWeightsPass):
progressive zippering (onnxmerge.sweep) shares layer after layer, calibrating in between.
"""

from __future__ import annotations

from typing import Any

from onnxmerge.errors import UsageError
from onnxmerge.passes import common
from onnxmerge.passes.zipper.load_weights import LoadWeightsPass
from onnxmerge.passes.zipper.match_channels import MatchChannelsPass
from onnxmerge.passes.zipper.zip_layers import ZipLayersPass
from onnxmerge.pipeline.method import Knob, Method, Option


def _layers(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--share {text}: give a number of layers or all") from None


def _pipeline(p: dict[str, Any]) -> list:
    match = [MatchChannelsPass(layers=p["share"])] if p["match"] == "hungarian" else []
    return common.pipeline(task=[LoadWeightsPass(), *match], combined=[ZipLayersPass(p["share"], p["depthwise"])])


def _explain(graph, layers: list) -> list[str]:
    """--share all shares every layer but the task head, depthwise ones included (--depthwise shared)."""
    return ["shared (averaged)"] * (len(layers) - 1) + ["per task: the task head"]


METHOD = Method(
    name="zipper",
    paper="Wu, Chan, Chen, On Merging MobileNets for Efficient Multitask Inference (EMC2 2019)",
    summary="same-architecture models share their first K layers (weights averaged, eq. 1), computed once",
    build=_pipeline,
    sweep="share",
    explain=_explain,
    # share 1, 2, ... layers: each more is smaller and (with depthwise shared) faster
    search=Knob(lambda n: [{"share": k} for k in range(1, n)], "layers shared from the input on"),
    options={
        "share": Option("all", "layers to share from the input on (a number, or all = all but the task heads)",
                        parse=_layers),
        "depthwise": Option("shared", "shared: depthwise layers shared too (saves compute); task: each task "
                            "keeps its depthwise layers (the paper's variant; saves parameters only)",
                            choices=("shared", "task")),
        "match": Option("none", "hungarian: permute each model's channels to match the first's before averaging",
                        choices=("none", "hungarian")),
    },
)
