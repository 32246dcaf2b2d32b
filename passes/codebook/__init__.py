"""`codebook`: Chou et al., "Unifying and Merging Well-trained Deep Neural Networks for Inference
Stage" (IJCAI 2018, NeuralMerger).

Aligned layers share k-means codebooks of 1x1xr kernel pieces (eqs. 4-8; _kmeans, _codebook); each
model keeps its code indices (share_codebooks.ShareCodebooksPass, the portable codebook-gather form).
After calibration, `--emit native` rewrites the layers into lookup-table EConv / EFC nodes (eq. 9;
emit_native.EmitNativePass).
"""

from __future__ import annotations

from typing import Any

from onnxmerge.errors import UsageError
from onnxmerge.passes import common
from onnxmerge.passes.codebook._codebook import index_dtype, parse_layer_params
from onnxmerge.passes.codebook.emit_native import TABLE_BITS, EmitNativePass
from onnxmerge.passes.codebook.plan import parse_size
from onnxmerge.passes.codebook.share_codebooks import ShareCodebooksPass, explain
from onnxmerge.pipeline.method import Knob, Method, Option, positive


def _pipeline(p: dict[str, Any]) -> list:
    if p["codewords"] is not None:
        index_dtype(p["codewords"])  # refuse an impossible C before any work
    if p["table_precision"] != "fp32" and p["emit"] == "gather":
        raise UsageError(f"--table-precision {p['table_precision']}: the native form's tables (--emit native or "
                         "auto); --emit gather computes fp32 weights")
    share = ShareCodebooksPass(p["preset"], p["r"], p["codewords"], parse_layer_params(p["layer_params"]),
                               p["heads"], p["kmeans_init"], seed=p["kmeans_seed"],
                               size=None if p["size"] is None else parse_size(p["size"]), if_larger=p["if_larger"],
                               # the kernels read a byte per index; auto keeps 4-bit codes packed (portable)
                               pack=p["emit"] != "native")
    emit = ([EmitNativePass(p["emit"] == "auto", p["target_batch"], p["target_threads"], p["table_precision"])]
            if p["emit"] != "gather" else [])
    return common.pipeline(combined=[share], after=emit)


# --max-loss's ladder of --size: each about 0.84x the one before (two steps per halving), so that
# the bisection ends within about 16% of the smallest size within the budget for one trial more
# than a ladder of halvings would take
SEARCH_SIZES = (0.3, 0.25, 0.2, 0.17, 0.14, 0.12, 0.1, 0.085, 0.07, 0.06, 0.05, 0.042, 0.035, 0.03, 0.025)

METHOD = Method(
    name="codebook",
    paper="Chou et al., Unifying and Merging Well-trained Deep Neural Networks for Inference Stage (IJCAI 2018, NeuralMerger)",
    summary="aligned layers share k-means codebooks of 1x1xr kernel pieces (eqs. 4-8); code indices per model",
    build=_pipeline,
    explain=explain,
    single=True,  # one model alone: compressed with codebooks of its own (the paper's Table 3 baseline)
    # size targets (SEARCH_SIZES): the plan's bytes fall monotonically along them
    search=Knob(lambda n: [{"size": s} for s in SEARCH_SIZES], "size target (fraction of the dense bytes)",
                saves=("size",)),  # the portable form does the dense layers' work
    conflicts=(("size", "preset", "--size chooses r and C for every layer"),
               ("size", "r", "--size chooses r for every layer"),
               ("size", "codewords", "--size chooses C for every layer")),
    options={
        "preset": Option("accu", "r and C per layer kind: accu (conv 4/128, fc 4/64) or light (conv 8/64, fc 8/64)",
                         choices=("accu", "light")),
        "r": Option(None, "segment length along depth for every layer (overrides the preset)", parse=positive("r")),
        "codewords": Option(None, "codewords C per segment for every layer (overrides the preset; uint8 indices "
                            "up to 256, uint16 beyond)", parse=positive("codewords")),
        "layer_params": Option("", "per-layer R/C or R/C/G, e.g. 'conv2=8/128,fc1=8/64/4' (layers of the first "
                               "model, convK / fcK or node names; G: one codebook for every G segments)"),
        "size": Option(None, "size target: plan every layer (r, C, one codebook per segment or per G segments, or "
                       "dense) to store at most this fraction (0 < size <= 1) of the planned layers' dense bytes "
                       "with the least k-means error; smaller -> smaller model (monotone); replaces the preset",
                       parse=parse_size),
        "if_larger": Option("dense", "a layer whose codebook + indices would not be smaller than its dense weight: "
                            "dense keeps it dense, codebook compresses it anyway", choices=("dense", "codebook")),
        "heads": Option("keep", "keep: each model's last layer stays dense; codebook: compress it too",
                        choices=("keep", "codebook")),
        "emit": Option("gather", "gather: portable codebook-gather subgraph; native: ai.onnxmerge EConv/EFC nodes "
                       "(need onnxmerge.kernels in the session); auto: native only for the layers whose node "
                       "ran faster than the dense layer on this machine at --target-batch and --target-threads, "
                       "and only while the whole model runs faster than its portable form (timed when the merge "
                       "is compiled; 4-bit codes stay packed and portable)",
                       choices=("gather", "native", "auto")),
        "target_batch": Option(1, "--emit auto: the batch size the merged model is deployed with",
                               parse=positive("target-batch")),
        "target_threads": Option(1, "--emit auto: the intra-op threads the merged model is deployed with",
                                 parse=positive("target-threads")),
        "table_precision": Option("fp32", "native EConv nodes' lookup tables (with int8 EFC's too): fp32, or int16 / "
                                  "int8 entries with a power-of-two scale per sample and segment (a quarter of the "
                                  "bytes for int8, faster lookups, a rounding whose accuracy cost the evaluation "
                                  "measures; the portable form computes fp32 tables)",
                                  choices=tuple(TABLE_BITS)),
        "kmeans_init": Option(3, "k-means initialisations per segment (the lowest error is kept)",
                              parse=positive("kmeans-init")),
        "kmeans_seed": Option(0, "k-means seed", parse=int),
    },
)
