"""ELF64 loader for the test guest and for an uncompressed Linux `vmlinux`.

Parsing is pure (`parse_elf` on bytes); `load_elf` copies each PT_LOAD segment to its physical
address in guest memory and zero-fills the rest of its memory size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BootError, GuestMemoryError
from ..memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


@dataclass(frozen=True)
class Segment:
    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes, name: str = "kernel") -> ElfImage:
    if len(data) < _EHDR.size or not is_elf(data):
        raise BootError(f"{name} is not an ELF file")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise BootError(f"{name} is not a 64-bit little-endian ELF; Bulkhead boots x86-64 guests")
    if e_machine != EM_X86_64:
        raise BootError(f"{name} is an ELF for machine {e_machine}, not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise BootError(f"{name} is not an executable ELF (type {e_type}); link it static")
    if e_phentsize != _PHDR.size or e_phoff + e_phnum * _PHDR.size > len(data):
        raise BootError(f"{name} has a truncated or malformed program header table")
    segments = []
    for i in range(e_phnum):
        p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = _PHDR.unpack_from(
            data, e_phoff + i * _PHDR.size)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise BootError(f"{name}: segment {i} runs past the end of the file (truncated?)")
        segments.append(Segment(p_offset, p_paddr, p_vaddr, p_filesz, p_memsz))
    if not segments:
        raise BootError(f"{name} has no loadable segment")
    return ElfImage(e_entry, tuple(segments))


def load_elf(memory: GuestMemory, data: bytes, name: str = "kernel") -> ElfImage:
    """Copy every PT_LOAD segment to its physical address; return the parsed image."""
    image = parse_elf(data, name)
    for seg in image.segments:
        try:
            view = memory.view(seg.paddr, seg.memsz)
        except GuestMemoryError:
            raise BootError(f"{name}: segment at {seg.paddr:#x} ({seg.memsz} bytes) does not fit "
                            f"in guest RAM ({memory.size >> 20} MiB): give the VM more --mem") from None
        view[:seg.filesz] = data[seg.offset:seg.offset + seg.filesz]
        view[seg.filesz:] = bytes(seg.memsz - seg.filesz)
    return image


def entry_physical(image: ElfImage) -> int:
    """The entry point as a physical address (Linux's vmlinux links at a high virtual address)."""
    for seg in image.segments:
        if seg.vaddr <= image.entry < seg.vaddr + seg.memsz:
            return image.entry - seg.vaddr + seg.paddr
    return image.entry
