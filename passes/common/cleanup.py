"""CleanupGraphPass: the stage-boundary repair of graph invariants.

Removes unused nodes and tensors, restores topological order, gives every node a unique name, and
clears intermediate shapes so that shape inference recomputes them (stale shapes after a rewrite
are a classic source of wrong models) before running onnx.checker's shape inference again.
Exact: nothing is computed differently.
"""

import onnx_graphsurgeon as gs

from onnxmerge.graph.convert import light_model
from onnxmerge.model.loading import infer_shapes
from onnxmerge.pipeline.manager import Pass, PassResult


class CleanupGraphPass(Pass):
    requires = ("combined",)

    def call(self, state) -> PassResult:
        graph = state.graph
        before = [(n.name, n.op) for n in graph.nodes]
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        seen: set[str] = set()
        for k, node in enumerate(graph.nodes):
            if not node.name or node.name in seen:
                node.name = f"{node.name or node.op}_{k}"
            seen.add(node.name)
        io = {id(t) for t in graph.inputs + graph.outputs}
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and id(tensor) not in io:
                tensor.shape, tensor.dtype = None, None
        # inferred on the graph without its weights' data (no copy of them), and the shapes and
        # types written back into the graph's tensors by name
        model, _ = light_model(graph, state.opset, state.ir_version)
        inferred = gs.import_onnx(infer_shapes(model, "merged graph")).tensors()
        for name, tensor in graph.tensors().items():
            if isinstance(tensor, gs.Variable) and name in inferred:
                tensor.shape, tensor.dtype = inferred[name].shape, inferred[name].dtype
        return PassResult(state, [(n.name, n.op) for n in state.graph.nodes] != before)
