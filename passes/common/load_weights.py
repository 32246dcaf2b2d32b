"""LoadWeightsPass: start a merge from the weights of an earlier, calibrated merged model.

Progressive zippering (zipper paper, section 3 and Table 1) merges layer 1, calibrates, then merges
layer 2 from the calibrated model, and so on. This pass puts the earlier merged model's weights
back into the fresh task graphs, before the next merge runs on them: a task's own weight
`<task>/<name>` goes back to `<name>`, and the first `shared` layers of every task, which the earlier
model held once as `shared/<first task's name>`, take that shared value (so averaging them again
gives the same value). Not exact: it changes weights on purpose.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxmerge.errors import MergeError
from onnxmerge.pipeline.manager import TaskPass
from onnxmerge.passes.zipper.zip_layers import SHARED



class LoadWeightsPass(TaskPass):
    exact = False

    def __init__(self, model: onnx.ModelProto, shared: int):
        self.weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.shared = shared

    def rewrite(self, graph: gs.Graph, task, state) -> bool:
        first = state.tasks[0]
        constants = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
        for i in range(self.shared):
            for attr in ("weight", "bias"):
                mine, firsts = getattr(task.layers[i], attr), getattr(first.layers[i], attr)
                if mine is None:
                    continue
                key = SHARED + firsts
                if key not in self.weights:  # kept per task (depthwise layers with depthwise="task")
                    key = f"{task.name}/{mine}"
                if key not in self.weights:
                    raise MergeError(f"warm start: the earlier model has no weight for layer {i} of {task.name}")
                constants[mine].values = self.weights[key].copy()
        for name, const in constants.items():
            key = f"{task.name}/{name}"
            if key in self.weights and const.values.shape == self.weights[key].shape:
                const.values = self.weights[key].copy()
        return True
