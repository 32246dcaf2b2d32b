"""AlignLayersPass: compute each task's layer view and align every task's layers with the first's.

Identity for equal architectures, dynamic programming over the compatibility score otherwise
(onnxmerge.graph.alignment), or the user's pairs. Analysis only: the graphs do not change.
"""

from onnxmerge.graph.alignment import Alignment, align
from onnxmerge.graph.layers import layer_view
from onnxmerge.pipeline.manager import Pass, PassResult


class AlignLayersPass(Pass):
    requires = ("separate",)
    ensures = ("aligned",)

    def __init__(self, pairs: list[tuple[int, int]] | None = None):
        self.pairs = pairs  # user-given mapping between the first two tasks (default: the merge's --align)

    def call(self, state) -> PassResult:
        for task in state.tasks:
            task.layers = layer_view(task.graph, task.name)
        first = state.tasks[0]
        pairs = self.pairs if self.pairs is not None else state.align
        state.alignments = []
        for i, other in enumerate(state.tasks[1:]):
            if pairs is not None and i == 0:
                al = Alignment.of(first.name, first.layers, other.name, other.layers, pairs, "user")
            else:
                al = align(first.name, first.layers, other.name, other.layers)
            state.alignments.append(al)
        return PassResult(state, False)
