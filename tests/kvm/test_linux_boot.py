"""Debian's cloud kernel boots through our Linux loader: host-side decompression, zero page, e820,
ACPI (RSDP/XSDT/FADT/MADT/DSDT) and SMP enumeration, checked on what the kernel prints on COM1.

CPL0 code is emulated on hosts without hardware virtualization (~1.5 M instructions/s), so the
kernel only gets through early boot in the time given; the assertions cover that part.
"""

import re
import shutil

import pytest

from vmm_core.testing import run_bulkhead

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BOOT_SECONDS = 120
CMDLINE = "earlyprintk=serial,ttyS0,115200 console=ttyS0 panic=-1 bulkhead.test=1"


@pytest.fixture(scope="module")
def assets():
    if shutil.which("apt-get") is None:
        pytest.skip("needs a Debian host with apt-get to fetch the reference kernel")
    from vmm_core.guest_assets import fetch_guest_assets
    return fetch_guest_assets(log=lambda msg: None)


@pytest.fixture(scope="module")
def console(assets, tmp_path_factory):
    serial = tmp_path_factory.mktemp("linux") / "serial.txt"
    run = run_bulkhead("run", "--kernel", assets.kernel, "--initrd", assets.initrd, "--mem", "320",
                       "--vcpus", "2", "--rng", "--no-sandbox", "--cmdline", CMDLINE,
                       "--serial", str(serial), "--timeout", str(BOOT_SECONDS),
                       timeout=BOOT_SECONDS + 60)
    text = serial.read_text(errors="replace") if serial.exists() else ""
    assert text, f"no serial output\nstderr:\n{run.stderr[-3000:]}"
    return text, run


def test_banner_and_command_line(console, assets):
    text, run = console
    assert f"Linux version {assets.kernel_version}" in text, text[:2000]
    assert f"Command line: {CMDLINE}" in text


def test_e820_map_as_we_built_it(console):
    text, _ = console
    for line in ("BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable",
                 "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] ACPI data",
                 "BIOS-e820: [mem 0x0000000000100000-0x0000000013ffffff] usable",
                 "BIOS-e820: [mem 0x00000000fec00000-0x00000000ffffffff] reserved"):
        assert line in text, text[:3000]


def test_acpi_tables_found_with_our_oem_id(console):
    text, _ = console
    assert re.search(r"ACPI: RSDP 0x00000000000E0000 000024 \(v02 BLKHD \)", text), text[:4000]
    for sig in ("XSDT", "FACP", "DSDT", "APIC"):
        assert re.search(rf"ACPI: {sig} 0x00000000000E0[0-9A-F]{{3}} [0-9A-F]{{6}} \(v0\d BLKHD  BULKHEAD "
                         r"00000001 BLKH 00000001\)", text), sig


def test_madt_gives_ioapic_override_and_two_cpus(console):
    text, _ = console
    assert "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23" in text
    assert "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)" in text
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in text
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in text
    assert "RAMDISK: [mem 0x" in text
