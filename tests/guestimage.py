"""Boot files for a QEMU (TCG) guest with a network stack of its own: Debian's cloud kernel
and a busybox initramfs whose /init loads the virtio-net driver, takes the address given on
the kernel command line (``pfaddr=ADDR/LEN pfgw=GATEWAY``) and answers every TCP
connection to port 80 with ``guest BOOT-ID`` (a random id drawn at boot: the same id after
a live migration proves the guest kept running).

The kernel package is fetched with ``apt-get download`` (Debian's own registry, through
apt); kernel and initramfs are cached in CACHE, keyed by the package and by this file's
/init, and rebuilt when either changes.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Tuple

CACHE = "/var/tmp/portfwd-test-roots"
KERNEL_META = "linux-image-cloud-amd64"
GUEST_PORT = 80
# in dependency order; loaded twice over, so that an order the kernel disagrees with still ends loaded
MODULES = ["net/core/failover.ko", "drivers/net/net_failover.ko", "drivers/virtio/virtio.ko",
           "drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio_pci_legacy_dev.ko",
           "drivers/virtio/virtio_pci_modern_dev.ko", "drivers/virtio/virtio_pci.ko",
           "drivers/net/virtio_net.ko"]
INIT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for pass in 1 2; do for m in /modules/*.ko; do insmod "$m" 2>/dev/null; done; done
for word in $(cat /proc/cmdline); do
    case $word in pfaddr=*) addr=${{word#pfaddr=}} ;; pfgw=*) gw=${{word#pfgw=}} ;; esac
done
ip link set lo up
ip addr add "$addr" dev eth0
ip link set eth0 up
ip route add default via "$gw"
boot=$(cat /proc/sys/kernel/random/uuid)
printf '#!/bin/sh\\nhead -c 5 >/dev/null\\necho "guest %s"\\n' "$boot" >/answer
chmod 755 /answer
echo "portfwd-guest ready $addr $boot"
while :; do nc -ll -p {GUEST_PORT} -e /answer; sleep 1; done
"""


def boot_files() -> Tuple[str, str]:
    """(kernel, initramfs) paths, built into the cache on first use."""
    package = _kernel_package()
    key = hashlib.sha256((package + INIT + " ".join(MODULES)).encode()).hexdigest()[:12]
    folder = os.path.join(CACHE, f"guest-{key}")
    kernel, initrd = os.path.join(folder, "vmlinuz"), os.path.join(folder, "initrd.gz")
    if os.path.exists(initrd) and os.path.exists(kernel):
        return kernel, initrd
    os.makedirs(CACHE, mode=0o755, exist_ok=True)
    work = tempfile.mkdtemp(prefix="guest-", dir=CACHE)
    try:
        os.chmod(work, 0o755)  # apt's download user writes here
        subprocess.run(["apt-get", "download", "-q", package], cwd=work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deb, = glob.glob(os.path.join(work, "*.deb"))
        unpacked = os.path.join(work, "x")
        subprocess.run(["dpkg-deb", "-x", deb, unpacked], check=True)
        shutil.copy(glob.glob(os.path.join(unpacked, "boot", "vmlinuz-*"))[0],
                    os.path.join(work, "vmlinuz"))
        modules, = glob.glob(os.path.join(unpacked, "lib", "modules", "*", "kernel"))
        _initramfs(os.path.join(work, "root"), modules, os.path.join(work, "initrd.gz"))
        for name in ("vmlinuz", "initrd.gz"):
            os.chmod(os.path.join(work, name), 0o644)
        shutil.rmtree(os.path.join(work, "root"))
        shutil.rmtree(unpacked)
        os.remove(deb)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return kernel, initrd


def _kernel_package() -> str:
    """The versioned image package that Debian's cloud kernel meta-package depends on."""
    for attempt in (1, 2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_META], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True).stdout
        for line in out.splitlines():
            word = line.split(":")[-1].strip()
            if "Depends:" in line and word.startswith("linux-image-"):
                return word
        if attempt == 1:  # no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], check=True)
    raise RuntimeError(f"apt knows no {KERNEL_META}: cannot build the test guest's kernel")


def _initramfs(root: str, modules: str, out: str) -> None:
    """busybox (with the libraries it links), the virtio-net modules and /init, as a
    gzip'd newc cpio archive."""
    for d in ("bin", "proc", "sys", "dev", "modules"):
        os.makedirs(os.path.join(root, d))
    shutil.copy("/usr/bin/busybox", os.path.join(root, "bin", "busybox"))
    for applet in ("sh", "mount", "insmod", "cat", "ip", "printf", "chmod", "head", "echo", "nc",
                   "sleep"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    ldd = subprocess.run(["ldd", "/usr/bin/busybox"], stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    for line in ldd.splitlines():
        lib = next((w for w in line.split() if w.startswith("/")), None)
        if lib:
            target = os.path.join(root, lib.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(lib, target)
    for i, module in enumerate(MODULES):
        shutil.copy(os.path.join(modules, module),
                    os.path.join(root, "modules", f"{i}-{os.path.basename(module)}"))
    with open(os.path.join(root, "init"), "w") as f:
        f.write(INIT)
    os.chmod(os.path.join(root, "init"), 0o755)
    names = subprocess.run(["find", "."], cwd=root, stdout=subprocess.PIPE, check=True).stdout
    archive = subprocess.run(["busybox", "cpio", "-o", "-H", "newc"], cwd=root, input=names,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True).stdout
    with open(out, "wb") as f:
        f.write(subprocess.run(["gzip", "-9n"], input=archive, stdout=subprocess.PIPE,
                               check=True).stdout)
