"""Shared fixtures: tiny synthetic models for pass unit tests, and the shipped real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

TESTS = Path(__file__).parent
MODELS = TESTS / "models"
EXAMPLES = TESTS.parent / "onnxmerge" / "examples"


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def make_model(nodes, inits, in_shape=("N", 1, 8, 8), out_shape=("N", 4), opset=17, inputs=None,
               outputs=None) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))]
    outputs = outputs or [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_bn_model(seed: int = 0, channels: int = 3, with_dropout: bool = True) -> onnx.ModelProto:
    """input(N,1,8,8) -> Conv3x3 -> BN -> Relu -> MaxPool -> Flatten -> Gemm -> BN1d -> Dropout -> Identity."""
    rng = np.random.default_rng(seed)
    c = channels
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["g2"], name="fc", transB=1),
        helper.make_node("BatchNormalization", ["g2", "g3", "be3", "m3", "v3"], ["n2"], name="bn2"),
    ]
    if with_dropout:
        nodes += [helper.make_node("Dropout", ["n2"], ["d2"], name="drop"),
                  helper.make_node("Identity", ["d2"], ["logits"], name="ident")]
    else:
        nodes[-1].output[0] = "logits"
    inits = [
        init("w1", rng.standard_normal((c, 1, 3, 3))), init("b1", rng.standard_normal(c)),
        init("g1", rng.uniform(0.5, 1.5, c)), init("be1", rng.standard_normal(c)),
        init("m1", rng.standard_normal(c)), init("v1", rng.uniform(0.5, 2, c)),
        init("w2", rng.standard_normal((4, c * 16))), init("b2", rng.standard_normal(4)),
        init("g3", rng.uniform(0.5, 1.5, 4)), init("be3", rng.standard_normal(4)),
        init("m3", rng.standard_normal(4)), init("v3", rng.uniform(0.5, 2, 4)),
    ]
    return make_model(nodes, inits)


@pytest.fixture
def tiny_pair(tmp_path) -> list[Path]:
    paths = []
    for k in range(2):
        p = tmp_path / f"tiny{k}.onnx"
        onnx.save(conv_bn_model(seed=k), str(p))
        paths.append(p)
    return paths


def shipped(path: Path) -> Path:
    """A model or data file that ships with the repository; a test fails loudly if it is missing."""
    assert path.exists(), f"{path} is missing: run tools/train_models.py"
    return path


def pytest_sessionstart(session):
    """With ONNXMERGE_REQUIRE_KERNELS set (CI where onnxruntime's headers are present), missing native
    kernels fail the run instead of skipping every kernel test."""
    import os

    from onnxmerge import kernels

    if os.environ.get("ONNXMERGE_REQUIRE_KERNELS") and not kernels.available():
        pytest.exit(f"ONNXMERGE_REQUIRE_KERNELS is set, but {kernels.unavailable_reason()}", returncode=1)



def isa_params() -> list:
    """Every instruction set the kernels are built with on this machine's architecture, as pytest
    parameters: those this CPU does not run are skipped, saying so, rather than left out unseen
    (an AVX2-only CPU cannot check the AVX-512 kernels; CI's CPU may)."""
    from onnxmerge import kernels
    from onnxmerge.kernels import build

    if not kernels.available():
        return []
    runs = kernels.isas()
    return [pytest.param(isa, marks=() if isa in runs else pytest.mark.skip(
                reason=f"this CPU does not run the {isa} kernels (built, checked on a CPU that runs them)"))
            for isa in build.isas()]


@pytest.fixture(scope="session")
def aarch64_library(tmp_path_factory) -> Path:
    """`python kernels/build.py --target aarch64 -o DIR`, once a session (a cross-compile of the whole
    library takes seconds): the custom-op library a board loads, which tests/kernels/test_kernels_cross.py
    checks and tests/test_deploy.py deploys."""
    import subprocess
    import sys

    from onnxmerge.kernels import build

    require_aarch64("headers")
    out = tmp_path_factory.mktemp("aarch64-library")
    done = subprocess.run([sys.executable, str(Path(build.__file__)), "--target", "aarch64", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out / build.LIBRARY_NAME


def require_aarch64(*needs: str, missing: tuple[str, ...] = ()) -> None:
    """Skip, saying what this machine lacks for an aarch64 check, or fail where ONNXMERGE_REQUIRE_CROSS
    is set (CI, which installs the tools). The cross compiler is always needed; `needs` adds "qemu"
    (qemu-user), "headers" (onnxruntime's, for the custom-op library), "kernels" (this machine's
    built kernels); `missing`: other phrases the caller found."""
    import os
    import shutil

    from onnxmerge import kernels
    from onnxmerge.kernels import build

    tools = [build.compiler_for("aarch64"), *(["qemu-aarch64"] if "qemu" in needs else [])]
    lacking = [f"{t} not installed (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)"
               for t in tools if shutil.which(t) is None]
    if "headers" in needs and build.find_include_dir() is None:
        lacking.append("onnxruntime's C/C++ headers not found (ONNXRUNTIME_INCLUDE_DIR)")
    if "kernels" in needs and not kernels.available():
        lacking.append(kernels.unavailable_reason())
    lacking += missing
    if lacking:
        if os.environ.get("ONNXMERGE_REQUIRE_CROSS"):
            pytest.fail(f"ONNXMERGE_REQUIRE_CROSS is set, but: {'; '.join(lacking)}")
        pytest.skip("; ".join(lacking))
