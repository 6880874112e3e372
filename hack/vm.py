"""Run a command as root in a small VM whose kernel has autofs, on a host whose kernel has not.

Some machines this project is tested on run a kernel built without autofs
(`# CONFIG_AUTOFS_FS is not set`: no `autofs` in /proc/filesystems, no
/dev/autofs) and with no module tree to load it from. The mount healer's
tests need a real automount, so `hack/test.sh` runs them here instead:

- the kernel and its modules are Debian's own `linux-image-amd64`, and the
  initramfs shell is `busybox-static`, both fetched with `apt-get download`
  and unpacked into a cache (`--cache`, default /var/cache/node-agents-vm),
  built once and rebuilt when this file's recipe changes;
- the guest's root is the host's `/` read-only over 9p, under an overlay with
  a tmpfs upper: the guest sees the same checkout, venv and Debian tools and
  every write it makes vanishes with it;
- the guest has no network device (only its own loopback): nothing it runs can
  reach beyond the VM;
- qemu uses KVM when the host CPU offers virtualisation, else TCG (software
  emulation, several times slower): `NODE_AGENTS_TIME_SCALE` tells the tests
  by how much to stretch their time bounds (`hack.autofs_world.wait_for` and
  `scaled` read it).

    python -m hack.vm -- .venv/bin/pytest -m autofs

The exit code is the command's; 125 when the VM could not be started or did
not report one (a crash, `--timeout`).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
QEMU = "qemu-system-x86_64"
DEFAULT_CACHE = Path("/var/cache/node-agents-vm")
TIME_SCALE_ENV = "NODE_AGENTS_TIME_SCALE"
# How much slower the tests' timed steps run under TCG on this kind of machine
# (a heal that takes 0.6 s on the host took 1.5-2.7 s in the guest).
TCG_TIME_SCALE = 5.0
VM_FAILED = 125

# Loaded in the initramfs, dependencies first (resolved from each module's
# `depends=` in its .modinfo): virtio PCI + 9p for the root, overlay for its
# writable layer, and the two the tests are here for.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "autofs4", "fuse")

# The initramfs' /init (busybox sh): the host's / over 9p as the lower layer
# of an overlay root, then the guest script from the real root.
INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $(cat /modules); do $B insmod /modules.d/$m.ko || echo "vm: insmod $m failed"; done
$B mkdir -p /lower /rw /newroot
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
  || echo "vm: 9p mount of the host's root failed"
$B mount -t tmpfs -o mode=0755 rw /rw
$B mkdir -p /rw/upper /rw/work
$B mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot \
  || echo "vm: overlay root failed"
$B mkdir -p /newroot/.node-agents-vm
$B cp /guest.sh /newroot/.node-agents-vm/guest.sh
$B umount /proc /sys
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /bin/sh /.node-agents-vm/guest.sh
"""

# The guest script (the host's /bin/sh): the file systems a node has, then the
# command, then its exit code behind a nonce only the host knows, then power off.
GUEST = r"""
mount -t proc proc /proc
mount -t sysfs sys /sys
# A checkout under /tmp or /run (a CI clone in /tmp) would be hidden by the
# fresh tmpfs there: keep it at its path, where the venv's shebangs point.
mkdir -p /.node-agents-vm/cwd
mount --bind {cwd} /.node-agents-vm/cwd
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p {cwd}
mount --move /.node-agents-vm/cwd {cwd}
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t fusectl fusectl /sys/fs/fuse/connections
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
hostname node-agents-vm
{exports}
cd {cwd}
echo "{nonce} start"
{command}
rc=$?
echo "{nonce} exit $rc"
sync
echo o > /proc/sysrq-trigger
sleep 60
"""


class VMError(RuntimeError):
    """The VM's kernel, initramfs or qemu could not be had."""


def kernel_has_autofs(proc_root: str = "/proc") -> bool:
    """Whether this kernel mounts autofs (built in, or its module loaded)."""
    try:
        filesystems = Path(proc_root, "filesystems").read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["autofs"] for line in filesystems.splitlines())


def time_scale() -> float:
    """The factor the tests stretch their time bounds by (1 outside the VM)."""
    try:
        return max(1.0, float(os.environ.get(TIME_SCALE_ENV, "1")))
    except ValueError:
        return 1.0


def kvm_usable() -> bool:
    """/dev/kvm alone is not enough: nested guests here have it without the CPU's vmx/svm."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE) is not None


# -- the kernel, its modules and busybox, cached --------------------------------


def _recipe_key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _apt_download(package: str, into: Path) -> Path:
    """`apt-get download` one package into `into`; once more after `apt-get update` on failure."""
    into.chmod(0o777)  # apt drops to the _apt user for downloads
    for attempt in range(2):
        done = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=into,
            capture_output=True,
            text=True,
            check=False,
        )
        found = sorted(into.glob(f"{package}_*.deb"))
        if done.returncode == 0 and found:
            return found[-1]
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    raise VMError(f"apt-get download {package} failed: {done.stderr.strip()}")


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def _module_files(tree: Path) -> dict[str, Path]:
    """Module name (with `_`, as the kernel spells it) -> its .ko file."""
    return {ko.name[: -len(".ko")].replace("-", "_"): ko for ko in tree.rglob("*.ko")}


def _module_depends(ko: Path) -> list[str]:
    # modpost writes `depends=a,b` into the module's .modinfo section.
    found = re.search(rb"\x00depends=([^\x00]*)\x00", ko.read_bytes())
    names = found.group(1).decode() if found else ""
    return [n.replace("-", "_") for n in names.split(",") if n]


def module_load_order(tree: Path, wanted: Sequence[str]) -> list[Path]:
    """The .ko files of `wanted` and everything they depend on, dependencies first."""
    files = _module_files(tree)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            raise VMError(f"kernel module {name} not in {tree}")
        for dep in _module_depends(files[name]):
            visit(dep)
        order.append(files[name])

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def ensure_assets(cache: Path) -> Path:
    """The cached kernel, modules and busybox for this recipe; fetched and built if missing."""
    ready = cache / _recipe_key()
    if (ready / "complete").exists():
        return ready
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        raise VMError("needs Debian's apt-get and dpkg-deb to fetch the VM's kernel")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        work = Path(scratch)
        meta = _apt_download(KERNEL_PACKAGE, work)
        # The metapackage depends on the versioned image, e.g. linux-image-6.1.0-57-amd64.
        image_package = _deb_field(meta, "Depends").split()[0]
        kernel_deb = _apt_download(image_package, work)
        busybox_deb = _apt_download(BUSYBOX_PACKAGE, work)
        unpacked = work / "unpacked"
        for deb in (kernel_deb, busybox_deb):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        build = work / "build"
        (build / "modules").mkdir(parents=True)
        vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise VMError(f"{image_package} holds no /boot/vmlinuz-*")
        shutil.copy(vmlinuz[-1], build / "vmlinuz")
        modules = module_load_order(unpacked / "lib" / "modules", MODULES)
        for ko in modules:
            shutil.copy(ko, build / "modules" / ko.name)
        (build / "modules.order").write_text("".join(ko.name[:-3] + "\n" for ko in modules))
        shutil.copy(unpacked / "bin" / "busybox", build / "busybox")
        (build / "kernel-package").write_text(image_package + "\n")
        (build / "complete").touch()
        if ready.exists():
            shutil.rmtree(ready)
        build.rename(ready)
    return ready


# -- the initramfs ------------------------------------------------------------


def _cpio_newc(entries: Iterator[tuple[str, int, bytes]]) -> bytes:
    """A `newc` cpio archive (the initramfs format, Documentation/driver-api/early-userspace)."""
    out = io.BytesIO()

    def record(name: str, mode: int, data: bytes, ino: int) -> None:
        encoded = name.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\x00" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\x00" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        record(name, mode, data, ino)
    record("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def build_initramfs(assets: Path, guest_script: str) -> bytes:
    DIR, FILE, EXE = 0o040755, 0o100644, 0o100755

    def entries() -> Iterator[tuple[str, int, bytes]]:
        for directory in ("bin", "dev", "proc", "sys", "modules.d"):
            yield directory, DIR, b""
        yield "bin/busybox", EXE, (assets / "busybox").read_bytes()
        yield "init", EXE, INIT.encode()
        yield "guest.sh", FILE, guest_script.encode()
        order = (assets / "modules.order").read_text().split()
        yield "modules", FILE, ("\n".join(order) + "\n").encode()
        for name in order:
            yield f"modules.d/{name}.ko", FILE, (assets / "modules" / f"{name}.ko").read_bytes()

    return gzip.compress(_cpio_newc(entries()), compresslevel=1)


def guest_script(command: Sequence[str], cwd: str, env: dict[str, str], nonce: str) -> str:
    exports = "\n".join(
        f"export {key}={shlex.quote(value)}"
        for key, value in sorted(env.items())
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)
    )
    return GUEST.format(
        exports=exports, cwd=shlex.quote(cwd), nonce=nonce, command=shlex.join(command)
    )


# -- running it -----------------------------------------------------------------


def run(
    command: Sequence[str],
    *,
    cwd: str,
    env: dict[str, str],
    cache: Path = DEFAULT_CACHE,
    memory_mib: int = 4096,
    cpus: int = 2,
    timeout: float = 3600,
    out: io.TextIOBase | None = None,
) -> int:
    """Boot the VM, run `command` in it, stream its output to `out`; its exit code."""
    out = out or sys.stdout  # type: ignore[assignment]
    assert out is not None
    if shutil.which(QEMU) is None:
        raise VMError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    assets = ensure_assets(cache)
    kvm = kvm_usable()
    env = dict(env)
    env.setdefault(TIME_SCALE_ENV, "1" if kvm else str(TCG_TIME_SCALE))
    nonce = "node-agents-vm-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="node-agents-vm-") as scratch:
        initrd = Path(scratch) / "initrd.gz"
        initrd.write_bytes(build_initramfs(assets, guest_script(command, cwd, env, nonce)))
        argv = [
            QEMU,
            *(["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg"]),
            "-m", str(memory_mib), "-smp", str(cpus),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(assets / "vmlinuz"), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet loglevel=1 panic=-1",
            # multidevs=remap: the host's / spans several devices; without it
            # inode numbers of different devices could collide in the guest.
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        ]  # fmt: skip
        started = time.monotonic()
        qemu = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert qemu.stdout is not None
        code: int | None = None
        boot_log: list[str] = []
        streaming = False
        try:
            deadline = started + timeout
            for raw in qemu.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                # The BIOS's screen codes may precede the first line on the console.
                if nonce in line:
                    word = line[line.index(nonce) + len(nonce) :].split()
                    if word[:1] == ["start"]:
                        streaming = True
                        print(f"vm: booted in {time.monotonic() - started:.1f}s", file=out)
                    elif word[:1] == ["exit"] and len(word) == 2 and word[1].isdigit():
                        code = int(word[1])
                        break
                    continue
                if streaming:
                    print(line, file=out, flush=True)
                else:
                    boot_log.append(line)
                if time.monotonic() > deadline:
                    print(f"vm: no exit within {timeout:.0f}s", file=out)
                    break
        finally:
            qemu.kill()
            qemu.wait()
    if code is None:
        if not streaming:
            print("vm: the guest never started; its console said:", file=out)
            print("\n".join(boot_log[-60:]), file=out)
        return VM_FAILED
    print(f"vm: exit {code} after {time.monotonic() - started:.1f}s", file=out)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hack.vm", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="kernel/busybox cache")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before giving up")
    parser.add_argument("--memory", type=int, default=4096, help="guest memory in MiB")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if os.geteuid() != 0:
        print("hack.vm: needs root (it shares the host's root)", file=sys.stderr)
        return VM_FAILED
    try:
        return run(
            command,
            cwd=os.getcwd(),
            env=dict(os.environ),
            cache=args.cache,
            memory_mib=args.memory,
            timeout=args.timeout,
        )
    except VMError as err:
        print(f"hack.vm: {err}", file=sys.stderr)
        return VM_FAILED


if __name__ == "__main__":
    sys.exit(main())
