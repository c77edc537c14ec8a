"""The test bed's pure parts: result markers, module order, the generated init script."""

from __future__ import annotations

import pytest

from vmm_core.testing import uml
from vmm_core.testing.uml import DEVICE_KINDS, Device, UmlError, load_order, parse_modules_dep, parse_results

DEP = """\
kernel/drivers/block/virtio_blk.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
"""


def test_results_are_parsed_from_marker_lines_only():
    text = ("boot noise UML-RESULT a=1\nUML-RESULT a=2 b=x=y\r\nUML-RESULT c=\n"
            "UML-RESULT  lonely d=4\nUML-RESULTe=5\n")
    assert parse_results(text) == {"a": "2", "b": "x=y", "c": "", "d": "4"}


def test_dependencies_load_first_and_once():
    deps = parse_modules_dep(DEP)
    order = load_order(["kernel/drivers/net/virtio_net.ko", "kernel/drivers/block/virtio_blk.ko",
                        "kernel/drivers/net/net_failover.ko"], deps)
    assert order == ["kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                     "kernel/drivers/net/virtio_net.ko", "kernel/drivers/block/virtio_blk.ko"]


def test_a_module_missing_from_modules_dep_is_an_error():
    with pytest.raises(UmlError, match="virtio_rng"):
        load_order(["kernel/drivers/char/hw_random/virtio_rng.ko"], parse_modules_dep(DEP))


def test_init_script_quotes_what_it_is_given():
    devices = [Device("disk", DEVICE_KINDS["blk"], "/s/a.sock"),
               Device("net0", DEVICE_KINDS["net"], "/s/b.sock")]
    text = uml._init_script(devices, ["/m/virtio_blk.ko"], "/bed/run1/guest.sh", False,
                            {"WEIRD": "a b'$(reboot)"}, "/bed/out", "/bed/run1/scratch")
    assert text.startswith("#!/bin/sh\n")
    assert "insmod /m/virtio_blk.ko || fail" in text
    assert "wait_dev 0 UML_DEV_disk block /dev/%s" in text
    assert "wait_dev 1 UML_DEV_net0 net %s" in text
    assert "WEIRD='a b'\"'\"'$(reboot)'; export WEIRD" in text
    assert text.index("echo UML-BED-READY") < text.index("sh /bed/run1/guest.sh") < text.index("UML-EXIT")


def test_device_names_must_be_shell_identifiers(tmp_path):
    with uml.UmlBed(parent_dir=str(tmp_path)) as bed:
        bed.add_device("ok_1", "blk", "/nonexistent.sock")
        for bad in ("ok_1", "1x", "a-b", "a b"):
            with pytest.raises(UmlError):
                bed.add_device(bad, "blk", "/nonexistent.sock")
        with pytest.raises(UmlError, match="kind"):
            bed.add_device("rng", "rng", "/nonexistent.sock")
    assert not tmp_path.joinpath(bed.dir).exists()
