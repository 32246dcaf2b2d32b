"""`pack`: every model in one graph and one session, sharing nothing but the input.

The baseline every other method is measured against (as onnx.compose.merge_models, side by side);
its pipeline is the common one with no rewrite of its own and BatchNorm left unfolded (onnxruntime fuses
it as it does in the originals), so it reproduces the originals exactly.
"""

from onnxmerge.passes import common
from onnxmerge.pipeline.method import Method

METHOD = Method(
    name="pack",
    paper="none: the baseline that later methods are measured against (as onnx.compose.merge_models, side by side)",
    summary="all models in one graph and one session, sharing nothing but the input",
    build=lambda params: common.pipeline(fold_batchnorm=False),
    exact=True,
    rewrites_layers=False,
)
