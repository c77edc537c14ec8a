"""A tiny hand-assembled guest for exit benchmarks: N accesses in a loop, then the debug exit.

Written as an ELF the `bulkhead run --kernel` path loads like any guest.  The loop runs at CPL0
(on kvm_pvm that code is emulated; the figure includes it and says so).
"""

from __future__ import annotations

import struct

from vmm_core import layout

LOAD = 0x100000


def _elf(code: bytes) -> bytes:
    ehdr, phdr = 64, 56
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, LOAD, ehdr, 0, 0, ehdr, phdr, 1, 64, 0, 0)
    prog = struct.pack("<IIQQQQQQ", 1, 5, ehdr + phdr, LOAD, LOAD, len(code), len(code), 0x1000)
    return header + prog + code


def _exit_0() -> bytes:
    # mov dx, DEBUG_EXIT_PORT; xor eax, eax; out dx, eax; jmp $
    return (b"\x66\xBA" + struct.pack("<H", layout.DEBUG_EXIT_PORT) + b"\x31\xC0\xEF\xEB\xFE")


def loop_guest(kind: str, n: int, mmio_addr: int = layout.TESTDEV_MMIO_BASE + 0x100) -> bytes:
    """kind: 'pio-out' (out to the PIO probe), 'mmio-write' or 'mmio-read' (a 4-byte access at
    `mmio_addr`), 'mmio-irq' (the interrupt path of the virtio-mmio device at `mmio_addr`)."""
    code = b"\xB9" + struct.pack("<I", n)            # mov ecx, n
    code += b"\x48\xBB" + struct.pack("<Q", mmio_addr)  # mov rbx, mmio_addr
    code += b"\x66\xBA" + struct.pack("<H", layout.PIO_PROBE_PORT)  # mov dx, probe port
    code += b"\x85\xC9"                               # test ecx, ecx
    body = {
        "pio-out": b"\xEE",          # out dx, al
        "mmio-write": b"\x89\x03",   # mov [rbx], eax
        "mmio-read": b"\x8B\x03",    # mov eax, [rbx]
        # what Linux's virtio-mmio interrupt handler does: read InterruptStatus (base + 0x60),
        # write the bits back to InterruptACK (base + 0x64); `mmio_addr` is the device's base
        "mmio-irq": b"\x8B\x43\x60\x89\x43\x64",  # mov eax, [rbx+0x60]; mov [rbx+0x64], eax
    }[kind]
    loop = body + b"\xFF\xC9"         # dec ecx
    loop += b"\x75" + bytes([(-(len(loop) + 2)) & 0xFF])  # jnz loop
    code += b"\x74" + bytes([len(loop)])  # jz past the loop when n == 0
    code += loop + _exit_0()
    return _elf(code)
