"""The kernels' arithmetic built for aarch64 (NEON and generic paths) and run under qemu-user, against
the numpy oracle computed here on the host; and the same program built for this machine, on each
instruction set this CPU runs. The program is kernels/standalone.cc (no onnxruntime: none of the
target's architecture runs here), built statically by kernels/build.py; the layers are the random
shapes of the native kernel tests (tests/kernels/random_layers.py).

The aarch64 tests need Debian's g++-aarch64-linux-gnu and qemu-user (`.ci/run` installs them); they
are skipped with that reason elsewhere, and fail instead where ONNXMERGE_REQUIRE_CROSS is set (CI).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import require_aarch64
from onnxmerge.kernels import build as kernel_build
from random_layers import TOL, econv_config, efc_config, reference, rel

SEEDS = range(30)
QEMU = "qemu-aarch64"


def write_layer(folder: Path, op: str, x, codebook, codes, bias, attrs) -> None:
    """The layer in standalone.cc's file format."""
    folder.mkdir(parents=True)
    code_bytes, has_bias = codes.dtype.itemsize, int(bias is not None)
    vc, c, r = codebook.shape
    if op == "EConv":
        n, d, h, w = x.shape
        v, p, kh, kw = codes.shape
        fields = ["econv", n, d, h, w, p, kh, kw, v, vc, c, r, *attrs["strides"], *attrs["pads"], *attrs["dilations"],
                  code_bytes, has_bias, attrs.get("table_bits", 32)]
    else:
        (n, d), (v, out) = x.shape, codes.shape
        fields = ["efc", n, d, out, v, vc, c, r, code_bytes, has_bias, attrs.get("table_bits", 32)]
    (folder / "layer.txt").write_text(" ".join(map(str, fields)) + "\n")
    x.astype("<f4").tofile(folder / "x.f32")
    codebook.astype("<f4").tofile(folder / "codebook.f32")
    codes.astype("<u1" if code_bytes == 1 else "<u2").tofile(folder / ("codes.u8" if code_bytes == 1 else "codes.u16"))
    if bias is not None:
        bias.astype("<f4").tofile(folder / "bias.f32")


def layers() -> list[tuple[str, tuple]]:
    """The random layers, and EConv and EFC layers of 16- and 8-bit tables."""
    integer = [(op, config(s, bits)) for s in range(10) for bits in (16, 8)
               for op, config in (("EConv", econv_config), ("EFC", efc_config))]
    return [("EConv", econv_config(s)) for s in SEEDS] + [("EFC", efc_config(s)) for s in SEEDS] + integer


def check_program(command: list[str], isa: str, tmp_path: Path, runs: list[str] | None = None) -> list[str]:
    """Run every random layer through the program on `isa` ("": its own choice); each output within
    TOL of the oracle (the integer tables' roundings as the instruction set that ran makes them).
    Returns the instruction set each layer ran."""
    folders = []
    for k, (op, config) in enumerate(layers()):
        folders.append(tmp_path / f"{isa or 'auto'}-{k}")
        write_layer(folders[-1], op, *config)
    done = subprocess.run([*command, isa, *map(str, folders)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ran = done.stdout.split()
    assert len(ran) == len(folders) and (not isa or set(ran) == {isa})  # the instruction set asked for
    for folder, isa_ran, (op, (x, codebook, codes, bias, attrs)) in zip(folders, ran, layers()):
        want = reference(op, x, codebook, codes, bias, attrs, isa_ran)
        got = np.fromfile(folder / "y.f32", "<f4").reshape(want.shape)
        assert rel(got, want) <= TOL, (isa, op, x.shape, codebook.shape, attrs)
    return ran


VEC = {isa: vec for target in kernel_build.TARGETS for isa, (vec, _) in kernel_build.isas(target).items()}


def expected_choice(op: str, y_shape: tuple, isas: list[str], attrs: dict | None = None) -> str:
    """EFC: the best of the instruction sets the CPU runs (best first). EConv: the first whose vectors
    waste the fewest lanes of an output row (kernels/pack.cc, fullest_vectors), unless it is flat
    (stride 1 and an output row not a multiple of 16 wide: EConvPlan::flat), which runs the best."""
    if op == "EFC":
        return isas[0]
    wo = y_shape[-1]
    waste = [-wo % VEC[i] for i in isas]
    rows = isas[waste.index(min(waste))]
    flat = attrs["strides"] == [1, 1] and wo % 16 != 0
    return isas[0] if flat else rows


def check_choice(command: list[str], tmp_path: Path) -> None:
    """Left to itself, the program runs each EConv on the instruction set that wastes the fewest lanes."""
    isas = subprocess.run([*command, "isas"], capture_output=True, text=True, timeout=60).stdout.split()[0].split(",")
    ran = check_program(command, "", tmp_path)
    want = [expected_choice(op, reference(op, *config).shape, isas, config[4]) for op, config in layers()]
    assert ran == want


@pytest.fixture(scope="module")
def aarch64_program(tmp_path_factory) -> list[str]:
    require_aarch64("qemu")
    program = kernel_build.build_standalone(tmp_path_factory.mktemp("aarch64") / "standalone", target="aarch64")
    assert program is not None, kernel_build.last_reason
    assert program.read_bytes()[18] == 183  # ELF e_machine: EM_AARCH64
    return [QEMU, str(program)]


@pytest.fixture(scope="module")
def host_program(tmp_path_factory) -> list[str]:
    if shutil.which(kernel_build.compiler_for(kernel_build.HOST)) is None:
        pytest.skip(f"no C++ compiler ({kernel_build.compiler_for(kernel_build.HOST)})")
    program = kernel_build.build_standalone(tmp_path_factory.mktemp("host") / "standalone")
    assert program is not None, kernel_build.last_reason
    return [str(program)]


def test_the_aarch64_build_has_neon_and_generic_paths(aarch64_program):
    done = subprocess.run([*aarch64_program, "isas"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["neon,generic"]


@pytest.mark.parametrize("isa", ["neon", "generic"])
def test_aarch64_kernels_match_the_numpy_reference(aarch64_program, isa, tmp_path):
    check_program(aarch64_program, isa, tmp_path)


def test_host_program_matches_the_numpy_reference_on_every_instruction_set(host_program, tmp_path):
    isas = subprocess.run([*host_program, "isas"], capture_output=True, text=True, timeout=60).stdout.split()[0]
    for isa in isas.split(","):
        check_program(host_program, isa, tmp_path)


def test_each_econv_runs_the_instruction_set_that_wastes_the_fewest_lanes(host_program, tmp_path):
    check_choice(host_program, tmp_path)


def test_aarch64_chooses_per_layer_the_same_way(aarch64_program, tmp_path):
    check_choice(aarch64_program, tmp_path)


def test_the_program_refuses_a_bad_layer_in_one_line(host_program, tmp_path):
    folder = tmp_path / "bad"
    x, codebook, codes, bias, attrs = efc_config(0)
    write_layer(folder, "EFC", x, codebook, codes, bias, attrs)
    (folder / "x.f32").write_bytes(b"\0" * 4)  # too short
    done = subprocess.run([*host_program, "", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "x.f32: expected" in done.stderr


def test_the_aarch64_library_cross_compiles(aarch64_library):
    """`python kernels/build.py --target aarch64` (conftest's aarch64_library): the custom-op library a
    board loads."""
    assert aarch64_library.read_bytes()[18] == 183 and b"onnxmerge_kernels_isas" in aarch64_library.read_bytes()
