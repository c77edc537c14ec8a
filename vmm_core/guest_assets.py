"""`bulkhead guest fetch`: Debian's cloud kernel and a busybox initramfs, cached on the host.

Steps (each skipped when its output is already in the cache, so a second run is instant):
  1. resolve `linux-image-cloud-amd64` to its versioned package (`apt-cache depends`), running
     `apt-get update` first if apt knows no candidate;
  2. `apt-get download` that package and `busybox-static`, unpack them with `dpkg -x`;
  3. build `initramfs-<version>.cpio.gz` in Python: busybox and the applet links /init uses,
     /dev/console, the virtio modules in dependency order (from their `depends=` modinfo), and an
     /init that prints BULKHEAD-INITRAMFS-OK, loads the modules and powers off.

Cache: $XDG_CACHE_HOME/bulkhead (default ~/.cache/bulkhead).  Progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from .boot.initramfs import Initramfs
from .errors import BulkheadError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
INIT_MARKER = "BULKHEAD-INITRAMFS-OK"
# The virtio drivers /init loads; their order comes from each module's depends= field.
VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console", "virtio-rng")
INIT_APPLETS = ("sh", "mount", "echo", "insmod", "ls", "cat", "uname", "poweroff", "sleep", "dmesg")
MANIFEST = "manifest.json"
APT_OPTIONS = ("-o", "APT::Sandbox::User=root")  # download into a root-owned cache without warnings


class GuestAssetError(BulkheadError):
    """Fetching or building the guest kernel/initramfs failed."""


@dataclass(frozen=True)
class GuestAssets:
    kernel: str  # path of the bzImage (vmlinuz)
    initrd: str  # path of the gzip cpio initramfs
    kernel_version: str  # e.g. "6.1.0-57-cloud-amd64"
    kernel_package: str  # e.g. "linux-image-6.1.0-57-cloud-amd64"
    modules: tuple[str, ...]  # module paths inside the initramfs, in load order


Runner = Callable[[Sequence[str], Path | None], str]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bulkhead"


def _progress(message: str) -> None:
    print(f"bulkhead: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestAssetError(f"{argv[0]} not found: `bulkhead guest fetch` needs a Debian host "
                              "with apt and dpkg") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise GuestAssetError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                              f"{detail[-1] if detail else 'no output'}")
    return proc.stdout


# -- pure helpers ------------------------------------------------------------------------------------
def parse_depends(apt_cache_depends_output: str, prefix: str = "linux-image-") -> str:
    """The versioned kernel package a metapackage depends on, from `apt-cache depends`."""
    for line in apt_cache_depends_output.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith(prefix) and m.group(1) != KERNEL_METAPACKAGE:
            return m.group(1)
    raise GuestAssetError(f"apt-cache found no {prefix}* dependency of {KERNEL_METAPACKAGE}; "
                          "is this a Debian amd64 host with main enabled?")


def has_candidate(apt_cache_policy_output: str) -> bool:
    m = re.search(r"Candidate:\s*(\S+)", apt_cache_policy_output)
    return bool(m) and m.group(1) != "(none)"


def modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` list from a module's .modinfo strings."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def module_load_order(deps: dict[str, list[str]]) -> list[str]:
    """Topological order (dependencies first) of the wanted modules, stable in `deps` order."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(mod: str) -> None:
        if mod in order:
            return
        if mod in visiting:
            raise GuestAssetError(f"module dependency cycle through {mod}")
        visiting.add(mod)
        for dep in deps.get(mod, []):
            if dep not in deps:
                raise GuestAssetError(f"module {mod} needs {dep}, which is not being packed")
            visit(dep)
        visiting.discard(mod)
        order.append(mod)

    for mod in deps:
        visit(mod)
    return order


def init_script(module_paths: Sequence[str]) -> str:
    lines = [
        "#!/bin/sh",
        "# Bulkhead test initramfs: prove userspace runs, load the virtio drivers, power off.",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        f"echo {INIT_MARKER}",
        'echo "bulkhead: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"',
    ]
    for path in module_paths:
        name = os.path.basename(path)
        lines.append(f'if insmod /{path}; then echo "bulkhead: loaded {name}"; '
                     f'else echo "bulkhead: FAILED to load {name}"; fi')
    lines += [
        'echo "bulkhead: virtio devices: $(ls /sys/bus/virtio/devices 2>/dev/null)"',
        "echo bulkhead: powering off",
        "poweroff -f",
        "",
    ]
    return "\n".join(lines)


def build_initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The gzip'd newc initramfs: busybox, applet links, /dev nodes, modules (in order), /init."""
    fs = Initramfs()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc"):
        fs.directory(d)
    fs.file("bin/busybox", busybox, 0o755)
    for applet in INIT_APPLETS:
        fs.symlink(f"bin/{applet}", "busybox")
    fs.char_device("dev/console", 5, 1)
    fs.char_device("dev/null", 1, 3, 0o666)
    for path, data in modules:
        fs.file(path, data)
    fs.file("init", init_script([p for p, _ in modules]).encode(), 0o755)
    return fs.cpio_gz()


# -- the fetch ------------------------------------------------------------------------------------------
def _download_and_unpack(package: str, cache: Path, run: Runner, log: Callable[[str], None]) -> Path:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    unpacked = cache / "unpacked" / package
    if (unpacked / ".complete").exists():
        return unpacked
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        log(f"downloading {package} with apt-get")
        run(["apt-get", *APT_OPTIONS, "download", package], debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise GuestAssetError(f"apt-get download {package} produced no .deb in {debs}")
    log(f"unpacking {found[-1].name}")
    if unpacked.exists():
        shutil.rmtree(unpacked)
    unpacked.mkdir(parents=True)
    run(["dpkg", "-x", str(found[-1]), str(unpacked)], None)
    (unpacked / ".complete").touch()
    return unpacked


def _load_manifest(cache: Path) -> GuestAssets | None:
    try:
        data = json.loads((cache / MANIFEST).read_text())
        assets = GuestAssets(**{**data, "modules": tuple(data["modules"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if os.path.isfile(assets.kernel) and os.path.isfile(assets.initrd):
        return assets
    return None


def fetch_guest_assets(cache: Path | None = None, *, refresh: bool = False, run: Runner = _run,
                       log: Callable[[str], None] = _progress) -> GuestAssets:
    """Download/unpack/build what a Linux guest boot needs; return the cached paths."""
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if not refresh:
        cached = _load_manifest(cache)
        if cached is not None:
            log(f"guest assets cached in {cache}")
            return cached
    if not has_candidate(run(["apt-cache", "policy", KERNEL_METAPACKAGE], None)):
        log("apt knows no candidate for the kernel: running apt-get update")
        run(["apt-get", "update"], None)
        if not has_candidate(run(["apt-cache", "policy", KERNEL_METAPACKAGE], None)):
            raise GuestAssetError(f"apt has no {KERNEL_METAPACKAGE} even after apt-get update: "
                                  "enable Debian bookworm main in the apt sources")
    kernel_pkg = parse_depends(run(["apt-cache", "depends", KERNEL_METAPACKAGE], None))
    version = kernel_pkg[len("linux-image-"):]
    log(f"{KERNEL_METAPACKAGE} -> {kernel_pkg}")
    kroot = _download_and_unpack(kernel_pkg, cache, run, log)
    broot = _download_and_unpack(BUSYBOX_PACKAGE, cache, run, log)

    vmlinuz = kroot / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        raise GuestAssetError(f"{kernel_pkg} has no boot/vmlinuz-{version}")
    busybox_path = broot / "bin" / "busybox"
    if not busybox_path.is_file():
        raise GuestAssetError(f"{BUSYBOX_PACKAGE} has no bin/busybox")

    moddir = kroot / "lib" / "modules" / version / "kernel"
    found: dict[str, Path] = {}
    for ko in moddir.rglob("*.ko"):
        if ko.stem in VIRTIO_MODULES:
            found[ko.stem] = ko
    missing = [m for m in VIRTIO_MODULES if m not in found]
    if missing:
        raise GuestAssetError(f"{kernel_pkg} lacks modules {', '.join(missing)} (built in? then "
                              "drop them from VIRTIO_MODULES)")
    blobs = {m: found[m].read_bytes() for m in VIRTIO_MODULES}
    order = module_load_order({m: modinfo_depends(blobs[m]) for m in VIRTIO_MODULES})
    modules = [(str(found[m].relative_to(kroot)), blobs[m]) for m in order]

    initrd = cache / f"initramfs-{version}.cpio.gz"
    log(f"building {initrd.name} (busybox + {len(modules)} modules: {', '.join(order)})")
    tmp = initrd.with_suffix(".tmp")
    tmp.write_bytes(build_initramfs(busybox_path.read_bytes(), modules))
    tmp.replace(initrd)
    assets = GuestAssets(kernel=str(vmlinuz), initrd=str(initrd), kernel_version=version,
                         kernel_package=kernel_pkg, modules=tuple(p for p, _ in modules))
    (cache / MANIFEST).write_text(json.dumps(asdict(assets), indent=2) + "\n")
    log(f"kernel {vmlinuz}")
    log(f"initrd {initrd}")
    return assets


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vmm_core.guest_assets [--refresh]`: what `bulkhead guest fetch` runs."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        assets = fetch_guest_assets(refresh="--refresh" in args)
    except BulkheadError as e:
        print(f"bulkhead: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(assets), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
