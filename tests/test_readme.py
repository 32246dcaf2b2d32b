"""The README's examples run as written (onnx-graphsurgeon's habit): its CLI commands and its API code."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def indented_blocks() -> list[str]:
    """The README's indented code blocks (blank lines inside kept), continuation lines joined."""
    blocks, current = [], []
    for line in README.splitlines() + ["end"]:
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
        elif current:
            blocks.append("\n".join(current).replace("\\\n", " ").strip())
            current = []
    return blocks


def cli_examples() -> list[str]:
    return [b for b in indented_blocks() if b.startswith("onnxmerge ")]


def workdir(tmp_path: Path) -> Path:
    for name in ("onnxmerge", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_readme_starts_with_the_two_commands():
    first = indented_blocks()[0].splitlines()
    assert len(first) == 2
    assert first[0].startswith("pip install") and first[0].endswith("onnxmerge demo")
    assert first[1].startswith("pip install torch==2.13.0") and "pytest" in first[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci  # CI runs these very lines


def test_readme_cli_examples_run_in_order(tmp_path, monkeypatch, capsys):
    """Each `onnxmerge ...` block, in order, in one folder (eval reads what merge wrote), through the
    command line's main in this process (`python -m onnxmerge` and the console script run the same
    main: tests/test_cli_errors.py; a process each cost 3 s of imports)."""
    from onnxmerge.cli import main

    commands = cli_examples()
    assert [shlex.split(c)[1] for c in commands][:1] != ["demo"] and len(commands) >= 3
    monkeypatch.chdir(workdir(tmp_path))
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] not in ("inspect", "eval", "deploy"):
            argv += ["--latency-budget", "0.05", "-q"]  # the figures are not the point here
        if "--max-loss" in argv:
            argv += ["--time-budget", "8"]  # the search's first trials (tests/search has the rest)
        code, out = main(argv), capsys.readouterr()
        assert code == 0, (command, out.err)
        assert out.out.strip(), command
    assert (tmp_path / "merged.onnx").exists() and (tmp_path / "report.json").exists()


def test_readme_api_example_runs(tmp_path, monkeypatch):
    code = next(b for b in indented_blocks() if b.startswith("from onnxmerge.api import merge"))
    monkeypatch.chdir(workdir(tmp_path))
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "merged_api.onnx").exists()


def test_readme_lists_every_registered_method():
    from onnxmerge.passes import METHODS

    for m in METHODS.values():
        assert re.search(rf"^\| `{re.escape(m.name)}` \|.*\| {re.escape(m.summary)} \|", README, re.M), m.name
