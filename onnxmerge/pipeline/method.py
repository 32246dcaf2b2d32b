"""The method registry: each merging method is one entry (mergekit's habit).

An entry has the method's CLI name, its paper, a one-line summary, its default parameters and a
function that builds its passes (which run on the combined graph) from the parameters. The CLI's
`--method` choices, `onnxmerge methods` and the README's table come from here, so adding a method
touches this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from onnxmerge.errors import UsageError
from onnxmerge.pipeline.manager import Pass


@dataclass(frozen=True)
class Option:
    """A method parameter; the CLI flag `--<name with dashes>` is generated from it."""

    default: Any
    help: str
    choices: tuple | None = None
    parse: Callable[[str], Any] = str


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    summary: str
    build: Callable[[dict[str, Any]], list[Pass]]  # passes: stage "task" ones run before combining
    options: dict[str, Option] = field(default_factory=dict)
    exact: bool = False  # whether the method reproduces the originals to float rounding
    single: bool = False  # whether it also works on one model alone (compressing it)
    # pairs of parameters that contradict each other (one would be silently ignored), with why
    conflicts: tuple[tuple[str, str, str], ...] = ()

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def passes(self, params: dict[str, Any]) -> list[Pass]:
        return self.build(self.parameters(params))

    def parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.options)
        if unknown:
            raise UsageError(f"method {self.name} takes no parameter(s) {', '.join(sorted(unknown))}")
        for k, v in params.items():
            choices = self.options[k].choices
            if choices and v not in choices:
                raise UsageError(f"--{k.replace('_', '-')} {v}: choose from {', '.join(map(str, choices))}")
        for a, b, why in self.conflicts:  # set = given and not the default (params may hold the defaults)
            if all(params.get(k, self.options[k].default) != self.options[k].default for k in (a, b)):
                raise UsageError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} contradict each other: {why}")
        return {**self.defaults, **params}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name == "auto":
        return pick_auto()
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r} (known: auto, {', '.join(METHODS)})") from None


def pick_auto() -> Method:
    """`--method auto`: the best registered method. Only `pack` exists so far."""
    return METHODS["pack"]


register(Method(
    name="pack",
    paper="none: the baseline that later methods are measured against (as onnx.compose.merge_models, side by side)",
    summary="all models in one graph and one session, sharing nothing but the input",
    build=lambda params: [],
    exact=True,
))


def _layers(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--share {text}: give a number of layers or all") from None


def _zipper_passes(p: dict[str, Any]) -> list[Pass]:
    from onnxmerge.passes.zipper.zip_layers import ZipLayersPass

    passes: list[Pass] = []
    if p["match"] == "hungarian":
        from onnxmerge.passes.zipper.match_channels import MatchChannelsPass

        passes.append(MatchChannelsPass(layers=p["share"]))
    return passes + [ZipLayersPass(p["share"], p["depthwise"])]


register(Method(
    name="zipper",
    paper="Wu, Chan, Chen, On Merging MobileNets for Efficient Multitask Inference (EMC2 2019)",
    summary="same-architecture models share their first K layers (weights averaged, eq. 1), computed once",
    build=_zipper_passes,
    options={
        "share": Option("all", "layers to share from the input on (a number, or all = all but the task heads)",
                        parse=_layers),
        "depthwise": Option("shared", "shared: depthwise layers shared too (saves compute); task: each task "
                            "keeps its depthwise layers (the paper's variant; saves parameters only)",
                            choices=("shared", "task")),
        "match": Option("none", "hungarian: permute each model's channels to match the first's before averaging",
                        choices=("none", "hungarian")),
    },
))


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise UsageError(f"--{flag} {text}: give a whole number of at least 1")
        return value
    return parse


def _codebook_passes(p: dict[str, Any]) -> list[Pass]:
    from onnxmerge.passes.codebook._codebook import index_dtype, parse_layer_params
    from onnxmerge.passes.codebook.share_codebooks import ShareCodebooksPass

    if p["codewords"] is not None:
        index_dtype(p["codewords"])  # refuse an impossible C before any work
    return [ShareCodebooksPass(p["preset"], p["r"], p["codewords"], parse_layer_params(p["layer_params"]),
                               p["heads"], p["kmeans_init"], seed=p["kmeans_seed"])]


register(Method(
    name="codebook",
    paper="Chou et al., Unifying and Merging Well-trained Deep Neural Networks for Inference Stage (IJCAI 2018, NeuralMerger)",
    summary="aligned layers share k-means codebooks of 1x1xr kernel pieces (eqs. 4-8); code indices per model",
    build=_codebook_passes,
    single=True,  # one model alone: compressed with codebooks of its own (the paper's Table 3 baseline)
    options={
        "preset": Option("accu", "r and C per layer kind: accu (conv 4/128, fc 4/64) or light (conv 8/64, fc 8/64)",
                         choices=("accu", "light")),
        "r": Option(None, "segment length along depth for every layer (overrides the preset)", parse=_positive("r")),
        "codewords": Option(None, "codewords C per segment for every layer (overrides the preset; uint8 indices "
                            "up to 256, uint16 beyond)", parse=_positive("codewords")),
        "layer_params": Option("", "per-layer R/C, e.g. 'conv2=8/128,fc1=8/64' (layers of the first model, "
                               "convK / fcK or node names)"),
        "heads": Option("keep", "keep: each model's last layer stays dense; codebook: compress it too",
                        choices=("keep", "codebook")),
        "emit": Option("gather", "gather: portable codebook-gather subgraph; native: ai.onnxmerge EConv/EFC nodes "
                       "(need onnxmerge.kernels in the session)", choices=("gather", "native")),
        "kmeans_init": Option(3, "k-means initialisations per segment (the lowest error is kept)",
                              parse=_positive("kmeans-init")),
        "kmeans_seed": Option(0, "k-means seed", parse=int),
    },
))


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--share-ratio {text}: give a fraction between 0 and 1") from None


def _number(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--{flag} {text}: give a number") from None
    return parse


def _count(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise UsageError(f"--{flag} {text}: give a whole number of at least 0")
        return value
    return parse


def _mtz_passes(p: dict[str, Any]) -> list[Pass]:
    from onnxmerge.passes.mtz.zip_neurons import ZipNeuronsPass, parse_counts

    return [ZipNeuronsPass(p["share_ratio"], parse_counts(p["layer_share"]), p["threshold"], p["alpha"],
                           p["hessian_samples"], p["retrain_steps"], p["pairing"], p["damping"], p["mtz_seed"],
                           p["tolerance"])]


register(Method(
    name="mtz",
    paper="He, Zhou, Thiele, Multi-Task Zipping via Layer-wise Neuron Sharing (NeurIPS 2018)",
    summary="neuron pairs chosen by the layer-wise Hessian functional difference (eq. 12) share merged "
            "incoming weights (eqs. 10-11), layer by layer with light retraining",
    build=_mtz_passes,
    options={
        "share_ratio": Option(1.0, "fraction of each layer's neurons to share (of the narrower model's; "
                              "task heads never)", parse=_fraction),
        "layer_share": Option("", "per-layer counts of shared neurons, e.g. 'fc1=300,fc2=100' (convK / fcK "
                              "or node names); the other layers follow --share-ratio or --threshold"),
        "threshold": Option(None, "share every pair whose functional difference (eq. 12) is under this "
                            "(instead of --share-ratio)", parse=_number("threshold")),
        "alpha": Option(1.0, "weight of the added model's error against the others' (eq. 5)", parse=_number("alpha")),
        "hessian_samples": Option(256, "calibration samples per task for the layer-wise Hessians",
                                  parse=_positive("hessian-samples")),
        "retrain_steps": Option(0, "retraining steps after each zipped layer, each one batch of every task (needs --calib)",
                                parse=_count("retrain-steps")),
        "pairing": Option("optimal", "optimal: minimum-cost assignment; greedy: cheapest pair first (the "
                          "authors' code); random: the random-sharing baseline", choices=("optimal", "greedy", "random")),
        "damping": Option(1e-2, "Hessian damping, as a fraction of the mean diagonal", parse=_number("damping")),
        "mtz_seed": Option(0, "seed of the Hessian sample and random pairing", parse=int),
        "tolerance": Option(None, "adaptive: per layer, the most pairs (up to --share-ratio) whose merge, after "
                            "--retrain-steps, keeps each task within this many accuracy points of its original on "
                            "labelled held-out samples (--validation, else a fifth of --calib)", parse=_number("tolerance")),
    },
    # zip_neurons: a threshold replaces the share ratio's counts; --tolerance bisects each layer's count
    # up to the share ratio, so it ignores a threshold and per-layer counts
    conflicts=(("threshold", "share_ratio", "--threshold picks the pairs, so the share ratio would be ignored"),
               ("tolerance", "threshold", "--tolerance picks each layer's number of pairs; give one of them"),
               ("tolerance", "layer_share", "--tolerance picks each layer's number of pairs; give one of them")),
))
