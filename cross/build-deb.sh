#!/usr/bin/env bash
# A .deb of `outpost` for one architecture, in one of two flavours:
#   cross/build-deb.sh x86_64       ->  target/debian/outpost_VERSION_amd64.deb      (static, tract)
#   cross/build-deb.sh x86_64 ort   ->  target/debian/outpost-ort_VERSION_amd64.deb  (glibc, tract
#                                       and ONNX Runtime from the box's libonnxruntime.so)
# `outpost` takes any box (a static musl binary, cross/build-static.sh); `outpost-ort`
# (x86_64 and aarch64; cross/build-ort.sh) installs the same files in the same places, so the two
# conflict and each replaces the other. Without a libonnxruntime.so the loader finds (or
# server.ort_library names), `outpost-ort` serves every model on tract, as `outpost` does.
# Contents: /usr/bin/outpost, the systemd unit, /etc/outpost/outpost.toml (a conffile serving
# the sample models from /usr/share/outpost/models), and the Mosquitto config and ACL as
# examples. The service runs as a systemd DynamicUser with StateDirectory=/var/lib/outpost, so
# the package creates no user and needs no maintainer scripts. Needs dpkg-deb (Debian's dpkg).
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-x86_64}"
flavour="${2:-static}"
case "$arch" in
  x86_64) deb_arch=amd64 ;;
  aarch64) deb_arch=arm64 ;;
  armv7) deb_arch=armhf ;;
  *) echo "cross/build-deb.sh: x86_64, aarch64 or armv7" >&2; exit 64 ;;
esac
case "$flavour" in
  static)
    package=outpost
    bin=$(cross/build-static.sh "$arch" | tail -1)
    relations=$'Conflicts: outpost-ort\nReplaces: outpost-ort'
    summary="edge inference runtime (KServe V2 over HTTP, signed updates over MQTT)"
    body=" One static binary that serves quantized ONNX models on the local CPU (tract)"
    ;;
  ort)
    package=outpost-ort
    bin=$(cross/build-ort.sh "$arch" | tail -1)
    # glibc 2.28 is the floor the binary is linked for (cross/build-ort.sh); zig links the
    # unwinder in, so libgcc_s is not needed.
    relations=$'Depends: libc6 (>= 2.28)\nConflicts: outpost\nReplaces: outpost\nProvides: outpost'
    summary="edge inference runtime with ONNX Runtime (KServe V2 over HTTP, MQTT updates)"
    body=$' The glibc build: it serves quantized ONNX models on tract or on ONNX Runtime\n (the box\'s own libonnxruntime.so: CPU, GPU or NPU), whichever is faster,'
    ;;
  *) echo "cross/build-deb.sh: the flavour is static (the default) or ort" >&2; exit 64 ;;
esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
root=target/debian/root-$package-$deb_arch
rm -rf "$root"
install -D -m 0755 "$bin" "$root/usr/bin/outpost"
install -D -m 0644 cross/systemd/outpost.service "$root/lib/systemd/system/outpost.service"
install -D -m 0644 cross/debian/outpost.toml "$root/etc/outpost/outpost.toml"
for m in digits-edge digits-cnn-qop; do
  install -D -m 0644 "models/$m.onnx" "$root/usr/share/outpost/models/$m.onnx"
  install -D -m 0644 "models/$m.golden.json" "$root/usr/share/outpost/models/$m.golden.json"
done
install -D -m 0644 cross/mosquitto/outpost.conf "$root/usr/share/doc/outpost/examples/mosquitto/outpost.conf"
install -D -m 0644 cross/mosquitto/outpost.acl "$root/usr/share/doc/outpost/examples/mosquitto/outpost.acl"
printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: outpost\n\nFiles: *\nCopyright: the Outpost authors\nLicense: Apache-2.0\n See /usr/share/common-licenses/Apache-2.0.\n' \
  > "$root/usr/share/doc/outpost/copyright"
mkdir -p "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: $package
Version: $version
Architecture: $deb_arch
Maintainer: Outpost maintainers <outpost@invalid>
Installed-Size: $size
$relations
Section: net
Priority: optional
Description: $summary
$body
 over the KServe V2 HTTP protocol, escalates unsure cases to a central model and pulls
 signed delta model updates over MQTT. Runs as a hardened systemd service.
CONTROL
echo "/etc/outpost/outpost.toml" > "$root/DEBIAN/conffiles"
out=target/debian/${package}_${version}_${deb_arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "$out"
