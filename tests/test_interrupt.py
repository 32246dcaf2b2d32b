"""Ctrl-C and SIGTERM: no partial output, no temporary file; calibration checkpoints and --resume.

The command runs as a real process and gets a real signal once its calibration has written its
first checkpoint (the marker that it is training). The resumed run must end with the weights an
uninterrupted run ends with, bit for bit: the checkpoint restores the weights, Adam's state, the
schedule, the data order and the random number generators.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from conftest import EXAMPLES, conv_bn_model, shipped
from onnxmerge.api import merge
from onnxmerge.cli import main
from onnxmerge.model import saving

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("fashion_lenet", "digits_lenet")
STEPS = 360  # long enough to be interrupted after the first checkpoint on a loaded machine (120 finished first
# once, with a benchmark on both cores), short enough to finish
EVERY = 5


def calib_args() -> list[str]:
    args = []
    for task, name in zip(TASKS, ("fashion", "digits")):
        args += ["--calib", f"{task}={shipped(EXAMPLES / f'{name}_calib.npz')}"]
    # no early stopping: the pack model starts at its best, which it would keep (weights unchanged);
    # resuming with early stopping's state is tested in tests/calibration
    return args + ["--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "32", "--eval-every", "0",
                   "--no-latency", "-q"]


def example_models() -> list[str]:
    return [str(shipped(EXAMPLES / f"{t}.onnx")) for t in TASKS]


def start(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the machine is shared: one thread per process
    return subprocess.Popen([sys.executable, "-m", "onnxmerge", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)


def sigint_default() -> None:
    """In the child, SIGINT's default action, as in a terminal: a shell that starts the tests in the
    background ignores SIGINT, the child inherits that, and an ignored SIGINT is (rightly) not acted on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when_training(proc: subprocess.Popen, checkpoint: Path, sig: int) -> tuple[int, str]:
    """Wait for the first checkpoint (calibration is running), send `sig`, return (code, stderr)."""
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert proc.poll() is None, f"the command ended before training: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_interrupted(code: int, err: str, expected: int, folder: Path, output: Path, checkpoint: Path):
    assert code == expected, err
    assert err.strip().splitlines() == ["onnxmerge: interrupted"], err
    assert not output.exists()
    assert checkpoint.is_file()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary left


def weights(path: Path) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("merged") / "merged.onnx"
    merge(example_models(), path, method="pack", names=list(TASKS))
    return path


def test_sigint_during_calibration_then_resume_equals_uninterrupted(merged, tmp_path, capsys):
    out, ckpt = tmp_path / "cal.onnx", tmp_path / "cal.onnx.ckpt"
    argv = ["calibrate", str(merged), "-o", str(out), *calib_args()]
    code, err = interrupt_when_training(start(argv), ckpt, signal.SIGINT)
    assert_interrupted(code, err, 130, tmp_path, out, ckpt)
    import torch

    saved = torch.load(ckpt, weights_only=True)
    assert EVERY <= saved["step"] < STEPS  # stopped mid-calibration, at a step boundary

    resumed = start([*argv, "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert out.is_file() and not ckpt.exists()  # removed once the calibrated model is written

    reference = tmp_path / "reference.onnx"  # uninterrupted, on one thread like the processes above
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["calibrate", str(merged), "-o", str(reference), *calib_args()]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    got, want = weights(out), weights(reference)
    assert got.keys() == want.keys()
    assert [name for name in want if got[name] != want[name]] == []  # bit for bit
    assert got != weights(merged)  # calibration did change the weights


def test_sigterm_during_merge_calibration(tmp_path):
    out, ckpt = tmp_path / "m.onnx", tmp_path / "m.onnx.ckpt"
    # pack: --method auto with labelled --calib would search the methods instead of calibrating once
    argv = [*example_models(), "-o", str(out), "--names", ",".join(TASKS), "--method", "pack", *calib_args()]
    code, err = interrupt_when_training(start(argv), ckpt, signal.SIGTERM)
    assert_interrupted(code, err, 143, tmp_path, out, ckpt)


def test_checkpoint_refusals(merged, tmp_path, capsys):
    out, ckpt = tmp_path / "cal.onnx", tmp_path / "cal.onnx.ckpt"
    base = ["calibrate", str(merged), "-o", str(out), *calib_args()]
    assert main([*base, "--resume"]) == 2  # nothing to resume
    assert capsys.readouterr().err.strip() == f"onnxmerge: error: {ckpt}: no checkpoint to resume from (--resume)"

    ckpt.write_bytes(b"not a checkpoint")
    assert main(base) == 2  # a fresh run does not overwrite a checkpoint
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"onnxmerge: error: {ckpt}: a calibration checkpoint is already there")
    assert main([*base, "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"onnxmerge: error: {ckpt}: not a calibration checkpoint")
    assert not out.exists()


def test_checkpoint_of_other_settings_is_refused(merged, tmp_path, capsys):
    """A checkpoint (here the first one, at step EVERY, after which the run is stopped by an
    exception) is refused by a run with another learning rate, in one line, and kept."""
    out, ckpt = tmp_path / "cal.onnx", tmp_path / "cal.onnx.ckpt"
    from onnxmerge.calibration import calibrate as cal

    real = cal._Trainer.save

    def save_then_stop(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    cal._Trainer.save = save_then_stop
    try:
        assert main(["calibrate", str(merged), "-o", str(out), *calib_args()]) == 130
    finally:
        cal._Trainer.save = real
    assert ckpt.is_file() and not out.exists()
    capsys.readouterr()
    code = main(["calibrate", str(merged), "-o", str(out), *calib_args(), "--lr", "0.0002", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "the checkpoint is of another calibration" in err[0] and str(ckpt) in err[0]
    assert ckpt.is_file()


def test_save_atomic_interrupted_mid_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    model = conv_bn_model(seed=0)

    def interrupted(model, path, *a, **k):
        Path(path).write_bytes(b"half a model")  # the write had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saving.save_atomic(model, out)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"earlier output")  # an existing output stays as it was
    with pytest.raises(KeyboardInterrupt):
        saving.save_atomic(model, out)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and out.read_bytes() == b"earlier output"


def test_write_atomic_interrupted_leaves_nothing(tmp_path):
    def interrupted(tmp: Path):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        saving.write_atomic(tmp_path / "report.json", interrupted)
    assert list(tmp_path.iterdir()) == []
