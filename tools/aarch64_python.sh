#!/usr/bin/env bash
# An aarch64 Python with onnxruntime and numpy, run under qemu-user, for the end-to-end test of a
# deployed aarch64 folder (tests/test_deploy.py): Debian's arm64 python3.11 and the libraries it
# loads, unpacked (not installed) into DIR/root, and onnxruntime's and numpy's aarch64 wheels from
# PyPI, unpacked into DIR/site. Needs root for `dpkg --add-architecture arm64` (the package lists);
# nothing arm64 is installed on this machine.
#
#   tools/aarch64_python.sh DIR
#   export ONNXMERGE_AARCH64_PYTHON=DIR   # the tests then run:
#   PYTHONPATH=DIR/site qemu-aarch64 -L DIR/root DIR/root/usr/bin/python3.11 run.py
#
# onnxruntime 1.23.2: the newest releases' aarch64 wheels (1.32.0 here) crash on import under Debian
# 12's qemu-user 7.2; 1.20.1 to 1.23.2 were seen to run.
set -euo pipefail
dir="$(realpath -m "${1:?usage: tools/aarch64_python.sh DIR}")"
ORT_VERSION="${ORT_VERSION:-1.23.2}"
NUMPY_VERSION="${NUMPY_VERSION:-2.2.6}"
mkdir -p "$dir/debs" "$dir/root" "$dir/wheels" "$dir/site"

sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $sudo dpkg --add-architecture arm64
    $sudo apt-get update -q >/dev/null
fi
packages=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6 libgcc-s1 zlib1g libexpat1
          libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libsqlite3-0 libncursesw6 libtinfo6)
(cd "$dir/debs" && chmod 777 . && apt-get download -q "${packages[@]/%/:arm64}" >/dev/null)
for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done

python3 -m pip download -q -d "$dir/wheels" --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
for wheel in "$dir"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$dir/site"; done
PYTHONPATH="$dir/site" qemu-aarch64 -L "$dir/root" "$dir/root/usr/bin/python3.11" -c \
    "import platform, numpy, onnxruntime; print('aarch64 python ready:', platform.machine(), 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
