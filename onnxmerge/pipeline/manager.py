"""The pass contract and the pass manager (DESIGN.md, "Flow of one merge").

A pass is a small class: its settings go in the constructor, `call(state)` returns
`PassResult(state, modified)`, and `modified` is honest (the manager dumps and verifies only what
changed). A pass declares what it needs of the state (`requires`) and what it leaves (`ensures`),
from `CONDITIONS`; the manager checks both around every pass, so a pipeline declared in the wrong
order fails naming the pass and the missing condition. A `TaskPass` rewrites each task's graph on
its own, before the tasks are combined. `exact = True` declares that the pass must not change any
task's outputs beyond float rounding, which `--verify` then checks numerically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxmerge.errors import MergeError, OnnxMergeError
from onnxmerge.pipeline import checks as verify
from onnxmerge.pipeline.state import MergeState, Task

# condition -> (what it means, whether `state` meets it)
CONDITIONS: dict[str, tuple[str, Callable[[MergeState], bool]]] = {
    "separate": ("the task graphs, not yet combined", lambda s: not s.combined),
    "aligned": ("each task's layer view and its alignment with the first (AlignLayersPass)",
                lambda s: len(s.alignments) == len(s.tasks) - 1),
    "combined": ("the one multi-task graph (CombineGraphsPass)", lambda s: s.combined),
    "exported": ("the exported, calibrated model (after the CALIBRATE step)", lambda s: s.model is not None),
}


@dataclass
class PassResult:
    state: MergeState
    modified: bool


class Pass:
    """Base class of all passes. Subclasses set `exact` and implement `call`."""

    exact: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()  # CONDITIONS the state must meet before the pass
    ensures: ClassVar[tuple[str, ...]] = ()  # CONDITIONS the state meets after it

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, state: MergeState) -> PassResult:
        raise NotImplementedError


FUSE_MODES = ("auto", "on", "off")


class FusePass(Pass):
    """A pass that fuses computation the tasks run side by side: `on`, `off`, or `auto` (kept where
    the model ran faster fused, timed on this machine)."""

    mode_option: ClassVar[str] = "fuse"  # how the refusal of an unknown mode names the option

    def __init__(self, mode: str = "on"):
        if mode not in FUSE_MODES:
            raise ValueError(f"{self.mode_option} mode {mode!r}: one of {', '.join(FUSE_MODES)}")
        self.mode = mode


class TaskPass(Pass):
    """A pass that rewrites every task's graph separately, before the graphs are combined."""

    requires = ("separate",)

    def call(self, state: MergeState) -> PassResult:
        modified = False
        for task in state.tasks:
            modified |= self.rewrite(task.graph, task, state)
        return PassResult(state, modified)

    def rewrite(self, graph: gs.Graph, task: Task, state: MergeState) -> bool:
        """Rewrite `graph` in place; return whether anything changed."""
        raise NotImplementedError


class PassManager:
    """Runs passes in order.

    verify:   after each pass that changed something, check the graph invariants (unique names,
              topological order, onnx.checker) and, for exact passes while every pass so far was
              exact, that every task still reproduces its original model's outputs
              (onnxmerge.pipeline.checks; after a lossy pass, such as mtz's, no pass can reproduce them).
    dump_dir: write the model after each pass that changed it, as NN_PassName[_task].onnx.
    """

    def __init__(self, passes: list[Pass], *, verify: bool = False, dump_dir: str | Path | None = None,
                 progress: bool = False):
        self.passes = list(passes)
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.progress = progress

    def run(self, state: MergeState) -> MergeState:

        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        done: list[str] = []
        exact = True  # every pass that changed the graph so far reproduces the originals
        bar = tqdm(self.passes, desc="passes", unit="pass", disable=not self.progress, leave=False, delay=1.0)
        for i, p in enumerate(bar):
            bar.set_postfix_str(p.name, refresh=False)
            self._check(p, p.requires, state, done, "requires")
            try:
                result = p.call(state)
            except OnnxMergeError:
                raise
            except Exception as e:
                after = ", ".join(done) or "nothing"
                raise MergeError(f"pass {p.name} failed (after {after}): {type(e).__name__}: {e}") from e
            state = result.state
            self._check(p, p.ensures, state, done, "ensures")
            done.append(p.name)
            if result.modified:
                exact &= p.exact
                if self.verify:
                    try:
                        verify.check_invariants(state)
                        if exact:
                            verify.check_exact(state)
                    except MergeError as e:
                        raise MergeError(f"--verify after pass {p.name} (after {', '.join(done[:-1]) or 'nothing'}): {e}") from None
                if self.dump_dir:
                    verify.dump(state, self.dump_dir, f"{i:02d}_{p.name}")
        return state

    @staticmethod
    def _check(p: Pass, conditions: tuple[str, ...], state: MergeState, done: list[str], what: str) -> None:
        unmet = [c for c in conditions if not CONDITIONS[c][1](state)]
        if unmet:
            after = ", ".join(done) or "nothing"
            meaning = "; ".join(f"{c}: {CONDITIONS[c][0]}" for c in unmet)
            raise MergeError(f"pass {p.name} {what} {', '.join(unmet)} (after {after}), which does not hold ({meaning})")
