"""LoadWeightsPass: start a merge from the weights of an earlier, calibrated merged model.

Progressive zippering (zipper paper, section 3 and Table 1) merges layer 1, calibrates, then merges
layer 2 from the calibrated model, and so on. This pass puts the earlier merged model's weights
back into the fresh task graphs, before the next merge runs on them: a task's own weight
`<task>/<name>` goes back to `<name>`, and the first `shared` layers of every task, which the earlier
model held once as `shared/<first task's name>`, take that shared value (so averaging them again
gives the same value). Not exact: it changes weights on purpose. A weight the earlier model holds
with another shape than this merge's (a model of other tasks, or edited) is refused with a
MergeError naming the task, the weight and both shapes, rather than skipped. The task's channel
order (channel matching's) is the earlier model's, as its weights are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxmerge.errors import MergeError
from onnxmerge.model.contract import SHARED, read_metadata
from onnxmerge.pipeline.manager import PassResult, TaskPass


class LoadWeightsPass(TaskPass):
    exact = False
    requires = ("separate", "aligned")

    def __init__(self, model: onnx.ModelProto | None = None, shared: int | None = None):
        """`model`: the earlier merged model, whose first `shared` layers are shared (default: the
        merge's warm start, `MergeState.warm_start`, and the `share` recorded in its metadata)."""
        self.model, self.shared = model, shared

    def call(self, state) -> PassResult:
        model = self.model if self.model is not None else state.warm_start
        if model is None:  # no warm start: the merge starts from the originals' weights
            return PassResult(state, False)
        self.weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        if self.shared is None:
            self.shared = read_metadata(model).params.get("share", 0)
        # the earlier merge may have permuted a task's channels (channel matching): its weights are
        # loaded in that order, so the task's channel order (original channel of each merged channel,
        # used by the layer loss and REPAIR) is the earlier model's
        self.orders = {t.name: dict(t.channels) for t in read_metadata(model).tasks}
        return super().call(state)

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
                constants[mine].values = self._weight(key, constants[mine], task)
        for name, const in constants.items():
            key = f"{task.name}/{name}"
            if key in self.weights:
                const.values = self._weight(key, const, task)
        task.channel_order.update(self.orders.get(task.name, {}))
        return True

    def _weight(self, key: str, const: gs.Constant, task) -> np.ndarray:
        """A copy of the earlier model's weight `key`, which replaces `const`; refused if the shapes differ."""
        value = self.weights[key]
        if value.shape != const.values.shape:
            raise MergeError(f"warm start: task {task.name}, weight {key} has shape {tuple(value.shape)} in the "
                             f"earlier model, {tuple(const.values.shape)} in this merge")
        return value.copy()
