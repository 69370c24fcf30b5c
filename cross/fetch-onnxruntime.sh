#!/usr/bin/env bash
# ONNX Runtime's libonnxruntime.so for another architecture, from PyPI's `onnxruntime` wheel at
# the version the tests pin (tests/requirements.txt), checked by sha256, for the `outpost-ort`
# package's test under qemu (tests/deb.rs). Cached:
#   cross/fetch-onnxruntime.sh aarch64  ->  target/cross-tools/onnxruntime-aarch64/libonnxruntime.so
# (The x86_64 tests use the same wheel's library from the .venv tools/test.sh makes.)
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.31.1
case "${1:-aarch64}" in
  aarch64)
    platform=manylinux_2_28_aarch64
    sha256=da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3
    ;;
  *)
    echo "cross/fetch-onnxruntime.sh: aarch64" >&2
    exit 64
    ;;
esac
grep -qx "onnxruntime==$version" tests/requirements.txt ||
  { echo "cross/fetch-onnxruntime.sh: tests/requirements.txt pins another onnxruntime than $version" >&2; exit 1; }
dir=target/cross-tools/onnxruntime-$1
lib=$dir/libonnxruntime.so
if [[ ! -f $lib ]]; then
  mkdir -p "$dir"
  wheel=$dir/onnxruntime-$version-cp311-cp311-$platform.whl
  if [[ ! -f $wheel ]]; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --implementation cp --python-version 3.11 --abi cp311 --platform "$platform" \
      -d "$dir" "onnxruntime==$version" >&2
  fi
  echo "$sha256  $wheel" | sha256sum --check --quiet
  python3 - "$wheel" "$lib" "$version" <<'PY'
import shutil, sys, zipfile
wheel, lib, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"onnxruntime/capi/libonnxruntime.so.{version}") as src, open(lib + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$lib.part" "$lib"
  rm -f "$wheel"
fi
echo "$lib"
