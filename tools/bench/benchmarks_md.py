"""BENCHMARKS.md sections: each benchmark script owns the text between its two markers."""

from __future__ import annotations

import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from onnxmerge.model.saving import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEach section below is written by the script it names; rerun the script "
          "to update it instead of editing the figures.\n")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def read_section(path: Path, name: str) -> str | None:
    """The text of section `name` of `path` (markers included), or None where it has none."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else ""
    if begin not in text or end not in text:
        return None
    return text[text.index(begin):text.index(end) + len(end)]


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section `name` of `path` (or append it) with `body`, writing atomically."""
    begin, end = markers(name)
    text = f"{begin}\n{body.strip()}\n{end}"
    old = path.read_text() if path.exists() else HEADER
    if begin in old and end in old:
        new = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    write_text_atomic(path, new)


def publish(name: str, body: str, write: bool = True) -> None:
    """Print a benchmark's section and, with `write` (the scripts' --no-write turns it off), put it into
    BENCHMARKS.md as section `name`."""
    print(body, flush=True)
    if write:
        write_section(BENCHMARKS, name, body)
        print(f"updated section {name} of {BENCHMARKS}", flush=True)


def cpu_header(script: str, argv: list[str]) -> list[str]:
    """The lines under a per-CPU section's heading (cpu_section): who writes it, the date, the command."""
    return ["", f"Written by `tools/bench/{script}.py`; one section per CPU (rerun on a CPU to update its own).", "",
            f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- command: `python {shlex.join([f'tools/bench/{script}.py', *argv])}`"]


def cpu_label(machine: dict) -> str:
    """The CPU as the per-CPU sections name it (machine_info's): its model name and widest vector set."""
    return f"{machine['cpu']} ({machine['vector']})"


def cpu_section(name: str, machine: dict) -> str:
    """The name of `name`'s section for one CPU (`name:<slug of cpu_label>`), where each CPU's figures
    are kept."""
    return f"{name}:" + re.sub(r"[^a-z0-9]+", "-", cpu_label(machine).lower()).strip("-")


def require(script: str, *, kernels: bool = False, data: bool = False) -> bool:
    """Whether what `script` needs is here: onnxmerge's native kernels built, ../shared/data found;
    where not, one line on stderr saying what is missing."""
    from onnxmerge import kernels as native
    from onnxmerge.data import shared_data_dir

    why = ([native.unavailable_reason()] if kernels and not native.available() else []) + \
        (["../shared/data not found (set ONNXMERGE_DATA)"] if data and shared_data_dir() is None else [])
    for line in why:
        print(f"{script}: {line}", file=sys.stderr)
    return not why
