# Sourced by the build scripts that compile C for another target or libc with zig (musl headers
# and libc, and every glibc version's symbols, for every target in one package): puts zig and
# cargo-zigbuild on PATH, installing what is missing from the registries: cargo-zigbuild from
# crates.io, zig from PyPI (the `ziglang` wheel, in target/cross-tools/).
tools=target/cross-tools
if ! command -v zig >/dev/null; then
  if ! "$tools/venv/bin/python3" -m ziglang version >/dev/null 2>&1; then
    python3 -m venv "$tools/venv" >&2
    "$tools/venv/bin/pip" install --quiet "ziglang==0.17.1" >&2
  fi
  # cargo-zigbuild runs `python3 -m ziglang` when there is no `zig` on PATH.
  export PATH="$PWD/$tools/venv/bin:$PATH"
fi
command -v cargo-zigbuild >/dev/null || cargo install --quiet --locked cargo-zigbuild@0.24.1 >&2
