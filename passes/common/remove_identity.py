"""RemoveIdentityPass: drop Identity nodes and inference-mode Dropout.

At inference, Dropout passes its input through (its mask output must be unused, or the node is
kept). The node's output is replaced by its input everywhere; where the output is a graph output,
whose name is part of the model's interface, the producer of the input writes the output tensor
instead. A pass-through from a graph input or a constant straight to a graph output is kept.
"""

import onnx_graphsurgeon as gs

from onnxmerge.pipeline.manager import TaskPass

PASS_THROUGH = {"Identity", "Dropout"}


class RemoveIdentityPass(TaskPass):
    def rewrite(self, graph: gs.Graph, task, state) -> bool:
        modified = False
        outputs = set(id(t) for t in graph.outputs)
        for node in list(graph.nodes):
            if node.op not in PASS_THROUGH or not _mask_unused(node, outputs):
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if id(dst) in outputs:
                if not src.inputs or id(src) in outputs or src in graph.inputs:
                    continue  # keep: the output name must stay and nothing can produce it instead
                producer = src.inputs[0]
                producer.outputs[producer.outputs.index(src)] = dst
                for consumer in list(src.outputs):
                    if consumer is not node:
                        consumer.inputs[consumer.inputs.index(src)] = dst
            else:
                for consumer in list(dst.outputs):
                    consumer.inputs[consumer.inputs.index(dst)] = src
            node.inputs.clear()
            node.outputs.clear()
            modified = True
        if modified:
            graph.cleanup()
        return modified


def _mask_unused(node: gs.Node, graph_outputs: set) -> bool:
    return all(not t.outputs and id(t) not in graph_outputs for t in node.outputs[1:])
