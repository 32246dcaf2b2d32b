"""FoldConstantsPass: evaluate every subgraph whose inputs are all constant.

Constant nodes become initializers, and shape arithmetic that exporters emit (Shape -> Gather ->
Concat -> Reshape on static dims) collapses into constants. Uses onnx-graphsurgeon's folding, which
evaluates with onnxruntime. Exact: folding evaluates the same operators on the same values.
"""

import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxmerge.pipeline.manager import TaskPass


class FoldConstantsPass(TaskPass):
    def rewrite(self, graph: gs.Graph, task, state) -> bool:
        before = _signature(graph)
        # graphsurgeon folds in onnxruntime sessions of its own, whose optimiser warns on stderr about
        # nodes it leaves alone (UnsqueezeElimination, ...): not the user's concern
        ort.set_default_logger_severity(3)
        graph.fold_constants(error_ok=False).cleanup()
        return _signature(graph) != before


def _signature(graph: gs.Graph) -> tuple:
    return tuple((n.op, tuple(t.name for t in n.inputs)) for n in graph.nodes)
