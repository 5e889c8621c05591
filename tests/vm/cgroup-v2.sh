#!/usr/bin/env bash
# Proves the agent's cgroup v2 backend on a real cgroup v2 kernel: boots Debian's cloud kernel under QEMU (TCG)
# with a busybox initramfs holding corral-agent, mounts cgroup2 with every controller, and runs
# `corral-agent check-isolation` (memory limit + OOM detection, kill of every process, cgroup removal).
# Needs: qemu-system-x86, busybox-static, cpio (deploy/test.sh installs them). Usage: tests/vm/cgroup-v2.sh [AGENT_BINARY]
set -euo pipefail
cd "$(dirname "$0")/../.."
agent="${1:-target/debug/corral-agent}"
[ -x "$agent" ] || { echo "cgroup-v2 VM: $agent not built" >&2; exit 1; }
vm=target/vm
mkdir -p "$vm"

# The kernel: the package that Debian's linux-image-cloud-amd64 points at, unpacked once.
if ! ls "$vm"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$pkg" ] || { apt-get update -qq; pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}'); }
    (cd "$vm" && rm -f ./*.deb && apt-get download -qq -o APT::Sandbox::User=root "$pkg" && dpkg-deb -x ./*.deb kernel)
fi
kernel=$(ls "$vm"/kernel/boot/vmlinuz-* | head -1)

# The initramfs: busybox, the agent and the libraries it links.
root="$vm/root"
rm -rf "$root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp}
cp /bin/busybox "$root/bin/"
for applet in sh mount cat head tail sleep setsid poweroff ls grep; do ln -s busybox "$root/bin/$applet"; done
cp "$agent" "$root/bin/corral-agent"
for lib in $(ldd "$agent" | grep -o '/[^ ]*'); do mkdir -p "$root$(dirname "$lib")"; cp "$lib" "$root$lib"; done
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
mount -t cgroup2 none /sys/fs/cgroup
echo "VM kernel $(cat /proc/sys/kernel/osrelease); cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
corral-agent check-isolation
echo "VM check-isolation exit $?"
if ls /sys/fs/cgroup | grep -q corral; then echo "VM leftover cgroups"; else echo "VM no cgroups left"; fi
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$vm/initrd.gz"

out=$(timeout 300 qemu-system-x86_64 -accel tcg -m 768 -nographic -no-reboot -kernel "$kernel" -initrd "$vm/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet" 2>&1 | tr -d '\r' | grep -E '^(VM |ok |FAIL|isolation)' || true)
echo "$out"
if echo "$out" | grep -q "VM check-isolation exit 0" && echo "$out" | grep -q "VM no cgroups left" \
    && [ "$(echo "$out" | grep -c '^ok ')" = 4 ] && echo "$out" | grep -q "backend: cgroups-v2"; then
    echo "cgroup-v2 VM: passed"
else
    echo "cgroup-v2 VM: FAILED" >&2
    exit 1
fi
