#!/usr/bin/env bash
# A .deb of the static `outpost` for one architecture:
#   cross/build-deb.sh x86_64   ->  target/debian/outpost_VERSION_amd64.deb
# Contents: /usr/bin/outpost, the systemd unit, /etc/outpost/outpost.toml (a conffile serving
# the sample models from /usr/share/outpost/models), and the Mosquitto config and ACL as
# examples. The service runs as a systemd DynamicUser with StateDirectory=/var/lib/outpost, so
# the package creates no user and needs no maintainer scripts. Needs dpkg-deb (Debian's dpkg).
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-x86_64}"
case "$arch" in
  x86_64) deb_arch=amd64 ;;
  aarch64) deb_arch=arm64 ;;
  armv7) deb_arch=armhf ;;
  *) echo "cross/build-deb.sh: x86_64, aarch64 or armv7" >&2; exit 64 ;;
esac
bin=$(cross/build-static.sh "$arch" | tail -1)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
root=target/debian/root-$deb_arch
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
Package: outpost
Version: $version
Architecture: $deb_arch
Maintainer: Outpost maintainers <outpost@invalid>
Installed-Size: $size
Section: net
Priority: optional
Description: edge inference runtime (KServe V2 over HTTP, signed updates over MQTT)
 One static binary that serves quantized ONNX models on the local CPU over the
 KServe V2 HTTP protocol, escalates unsure cases to a central model and pulls
 signed delta model updates over MQTT. Runs as a hardened systemd service.
CONTROL
echo "/etc/outpost/outpost.toml" > "$root/DEBIAN/conffiles"
out=target/debian/outpost_${version}_${deb_arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "$out"
