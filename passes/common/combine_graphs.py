"""CombineGraphsPass: put every task's graph into one graph, sharing nothing but (maybe) the input.

Every node and tensor name is prefixed with `<task>/` (inputs, outputs, initializers, value infos),
so no two tasks can collide. When all tasks take inputs of the same count, element types and shapes
(symbolic dims agree with any symbolic dim), they share one set of inputs, named as the first task's;
`separate_inputs=True` keeps `<task>/<name>` inputs instead. Outputs are `<task>/<original name>`.
This is the `pack` baseline on its own; the merging methods then share layers inside it.
Exact: each task's subgraph is unchanged.
"""

import onnx_graphsurgeon as gs

from onnxmerge.pipeline.manager import Pass, PassResult


class CombineGraphsPass(Pass):
    requires = ("separate",)
    ensures = ("combined",)

    def __init__(self, separate_inputs: bool = False):
        self.separate_inputs = separate_inputs

    def call(self, state) -> PassResult:
        graphs = [t.graph.copy() for t in state.tasks]
        share = not (self.separate_inputs or state.separate_inputs) and len(graphs) > 1 and all(
            _signature(g) == _signature(graphs[0]) for g in graphs[1:])
        shared_inputs = [gs.Variable(t.name, t.dtype, t.shape) for t in graphs[0].inputs] if share else []
        nodes, inputs, outputs = [], list(shared_inputs), []
        for task, graph in zip(state.tasks, graphs):
            prefix = f"{task.name}/"
            task.input_map, task.output_map = {}, {}
            originals = [t.name for t in graph.inputs]
            for tensor in graph.tensors().values():
                tensor.name = prefix + tensor.name
            for k, node in enumerate(graph.nodes):
                node.name = prefix + (node.name or f"{node.op}_{k}")
            for k, tensor in enumerate(list(graph.inputs)):
                if share:
                    _replace_uses(tensor, shared_inputs[k])
                    task.input_map[originals[k]] = shared_inputs[k].name
                else:
                    inputs.append(tensor)
                    task.input_map[originals[k]] = tensor.name
            task.layer_map = {l.output: prefix + l.output for l in task.layers}
            for tensor in graph.outputs:
                task.output_map[tensor.name[len(prefix):]] = tensor.name
                outputs.append(tensor)
            nodes.extend(graph.nodes)
        state.graph = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, name="onnxmerge", opset=state.opset)
        state.graph.cleanup().toposort()
        state.shared_input = share
        return PassResult(state, True)


def _signature(graph: gs.Graph) -> list:
    return [(t.dtype, tuple(d if isinstance(d, int) else None for d in (t.shape or ()))) for t in graph.inputs]


def _replace_uses(old: gs.Variable, new: gs.Variable) -> None:
    for consumer in list(old.outputs):
        for k, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[k] = new
