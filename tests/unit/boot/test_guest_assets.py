"""guest_assets: apt output parsing, module ordering, the initramfs, and the real cached fetch."""

import stat

import pytest

from vmm_core import guest_assets as ga
from vmm_core.boot.initramfs import Initramfs, read_newc


def test_parse_depends():
    out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n"
    assert ga.parse_depends(out) == "linux-image-6.1.0-57-cloud-amd64"
    with pytest.raises(ga.GuestAssetError):
        ga.parse_depends("linux-image-cloud-amd64\n")


def test_has_candidate():
    assert ga.has_candidate("foo:\n  Installed: (none)\n  Candidate: 6.1.192-3\n")
    assert not ga.has_candidate("foo:\n  Installed: (none)\n  Candidate: (none)\n")
    assert not ga.has_candidate("")


def test_modinfo_and_order():
    assert ga.modinfo_depends(b"xx\0license=GPL\0depends=virtio,virtio_ring\0name=x\0") == ["virtio", "virtio_ring"]
    assert ga.modinfo_depends(b"\0depends=\0") == []
    deps = {"virtio_mmio": ["virtio", "virtio_ring"], "virtio": ["virtio_ring"], "virtio_ring": []}
    assert ga.module_load_order(deps) == ["virtio_ring", "virtio", "virtio_mmio"]
    with pytest.raises(ga.GuestAssetError, match="cycle"):
        ga.module_load_order({"a": ["b"], "b": ["a"]})
    with pytest.raises(ga.GuestAssetError, match="not being packed"):
        ga.module_load_order({"a": ["zz"]})


def test_newc_round_trip():
    fs = Initramfs()
    fs.file("bin/busybox", b"\x7fELF" + b"x" * 13, 0o755)
    fs.symlink("bin/sh", "busybox")
    fs.char_device("dev/console", 5, 1)
    archive = fs.cpio()
    assert archive.startswith(b"070701") and len(archive) % 4 == 0
    entries = {p: (m, d) for p, m, d in read_newc(archive)}
    assert set(entries) == {"bin", "bin/busybox", "bin/sh", "dev", "dev/console"}
    assert stat.S_ISDIR(entries["bin"][0]) and stat.S_ISLNK(entries["bin/sh"][0])
    assert entries["bin/sh"][1] == b"busybox" and entries["bin/busybox"][1] == b"\x7fELF" + b"x" * 13
    assert fs.cpio_gz() == fs.cpio_gz()  # reproducible


def test_init_script_and_image():
    image = ga.build_initramfs(b"BUSYBOX", [("lib/modules/v/a.ko", b"A"), ("lib/modules/v/b.ko", b"B")])
    entries = {p: d for p, _, d in read_newc(image)}
    init = entries["init"].decode()
    assert init.startswith("#!/bin/sh\n") and ga.INIT_MARKER in init and "poweroff -f" in init
    assert init.index("a.ko") < init.index("b.ko")
    for applet in ("sh", "mount", "insmod", "poweroff"):
        assert entries[f"bin/{applet}"] == b"busybox"


def test_fetch_uses_cache_without_running_anything(tmp_path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    (tmp_path / ga.MANIFEST).write_text(
        '{"kernel": "%s", "initrd": "%s", "kernel_version": "v", "kernel_package": "p", "modules": []}'
        % (kernel, initrd))

    def no_run(argv, cwd):
        raise AssertionError(f"ran {argv}")

    assert ga.fetch_guest_assets(tmp_path, run=no_run, log=lambda m: None).kernel == str(kernel)


def test_real_debian_assets(debian_assets):
    entries = {p: (m, d) for p, m, d in read_newc(open(debian_assets.initrd, "rb").read())}
    assert stat.S_IMODE(entries["init"][0]) == 0o755
    names = [p.rsplit("/", 1)[1] for p in debian_assets.modules]
    assert names == ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko", "virtio_blk.ko",
                     "virtio_console.ko", "virtio-rng.ko"]
    for path in debian_assets.modules:
        assert entries[path][1][:4] == b"\x7fELF"
    assert stat.S_ISCHR(entries["dev/console"][0])
