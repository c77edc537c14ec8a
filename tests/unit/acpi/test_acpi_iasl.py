"""External validation: ACPICA's disassembler (`iasl -d`, Debian acpica-tools) reads our tables."""

import re
import shutil
import subprocess

import pytest

from vmm_core import layout
from vmm_core.acpi.tables import VirtioMmioSlot, layout_acpi

IASL = shutil.which("iasl")
pytestmark = pytest.mark.skipif(IASL is None, reason="iasl not installed (apt-get install acpica-tools)")

SLOTS = [VirtioMmioSlot(layout.virtio_slot(i)[0], layout.VIRTIO_MMIO_SLOT_SIZE, layout.virtio_slot(i)[1])
         for i in range(4)]


@pytest.fixture(scope="module")
def disassembly(tmp_path_factory):
    out = tmp_path_factory.mktemp("acpi")
    image = layout_acpi(3, SLOTS)
    texts = {}
    for sig, (_, data) in image.tables.items():
        if sig == b"RSDP":
            continue
        path = out / f"{sig.decode().lower()}.dat"
        path.write_bytes(data)
        proc = subprocess.run([IASL, "-d", str(path)], cwd=out, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Error" not in proc.stdout + proc.stderr
        texts[sig.decode()] = path.with_suffix(".dsl").read_text()
    return texts


def test_every_table_checksum_and_oem(disassembly):
    for sig, text in disassembly.items():
        assert 'Oem ID           "BLKHD "' in text or '"BLKHD "' in text, sig
        assert "Incorrect checksum" not in text and "Invalid" not in text, sig


def test_dsdt_devices(disassembly):
    dsl = disassembly["DSDT"]
    assert 'DefinitionBlock ("", "DSDT", 2, "BLKHD ", "BULKHEAD", 0x00000001)' in dsl
    assert 'Name (_HID, EisaId ("PNP0501")' in dsl
    assert re.search(r"IO \(Decode16,\s+0x03F8,\s+// Range Minimum\s+0x03F8,", dsl)
    assert dsl.count('Name (_HID, "LNRO0005")') == len(SLOTS)
    for i, slot in enumerate(SLOTS):
        assert f"Device (VR{i:02X})" in dsl
        assert re.search(rf"Memory32Fixed \(ReadWrite,\s+0x{slot.base:08X},\s+// Address Base\s+"
                         rf"0x{slot.size:08X},", dsl)
        assert re.search(rf"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s+\{{\s+"
                         rf"0x{slot.irq:08X},", dsl)
    assert re.search(r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s+\{\s+0x00000004,", dsl)
    assert re.search(r"Name \(\\_S5, Package \(0x02\)[^{]*\{\s+0x05,", dsl)


def test_fadt_fields(disassembly):
    dsl = disassembly["FACP"]
    assert re.search(r"Hardware Reduced \(V5\) : 1", dsl)
    assert re.search(r"Reset Register Supported \(V2\) : 1", dsl)
    assert re.search(r"Address : 00000000000003C2", dsl)
    assert re.search(r"Value to cause reset : 01", dsl)
    assert re.search(r"Address : 00000000000003C0", dsl) and re.search(r"Address : 00000000000003C1", dsl)
    assert re.search(r"VGA Not Present \(V4\) : 1", dsl)


def test_madt_entries(disassembly):
    dsl = disassembly["APIC"]
    assert "Local Apic Address : FEE00000" in dsl
    assert "PC-AT Compatibility : 1" in dsl
    assert dsl.count("[Processor Local APIC]") == 3
    assert re.search(r"\[I/O APIC\][\s\S]*Address : FEC00000", dsl)
    assert re.search(r"\[Interrupt Source Override\][\s\S]*Source : 00[\s\S]*Interrupt : 00000002", dsl)


def test_dsdt_power_button_through_a_generic_event_device(disassembly):
    """Hardware-reduced ACPI has no fixed power-button event: a GED (ACPI0013) with the core's
    line runs _EVT, which notifies the PNP0C0C button (0x80 = pressed)."""
    dsl = disassembly["DSDT"]
    assert 'Device (PWRB)' in dsl and 'Name (_HID, EisaId ("PNP0C0C")' in dsl
    assert 'Device (GED0)' in dsl and 'Name (_HID, "ACPI0013" /* Generic Event Device */)' in dsl
    assert re.search(rf"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s+\{{\s+"
                     rf"0x{layout.ACPI_GED_IRQ:08X},", dsl)
    assert re.search(r"Method \(_EVT, 1, Serialized\)[^{]*\{\s+Notify \(\\_SB\.PWRB, 0x80\)", dsl), dsl
