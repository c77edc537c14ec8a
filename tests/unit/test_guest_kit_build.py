"""The freestanding test guest (guest_kit/) builds with make and is what docs/guest_abi.md promises.

Builds a copy of guest_kit/ in a temporary directory (so it never races a build in the tree),
then checks the ELF image (ELF64 x86-64, linked at 1 MiB, PT_LOAD segments only, entry inside the
first segment) and disassembles `.ktext`, the section holding every instruction that runs at CPL0,
for instructions this machine's kvm_pvm cannot run there (its CPL0 is emulated).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

GUEST_KIT = Path(__file__).resolve().parents[2] / "guest_kit"
LOAD_ADDR = 0x100000
PT_LOAD = 1

# Not usable at CPL0 under kvm_pvm (KVM_EXIT_INTERNAL_ERROR or a fault).
FORBIDDEN_MNEMONICS = {
    "cmpxchg16b", "rdtscp", "popcnt", "movbe", "int3", "clac", "stac", "ldmxcsr", "stmxcsr",
    # BMI1/BMI2/ABM (F3 0F BC, what `rep bsf` decodes to, shows up as tzcnt)
    "andn", "bextr", "blsi", "blsmsk", "blsr", "tzcnt", "lzcnt", "bzhi", "mulx", "pdep", "pext",
    "rorx", "sarx", "shlx", "shrx",
    "wait", "fwait",
}
X87_ALLOWED = {"fxsave", "fxsave64", "fxrstor", "fxrstor64"}
PREFIXES = {"lock", "rep", "repz", "repe", "repnz", "repne", "data16", "addr32", "cs", "ds", "es",
            "ss", "fs", "gs", "notrack", "bnd", "rex", "rex.w"}
VECTOR_REGISTER = re.compile(r"%[xyz]?mm\d+|%st(\(\d\))?\b")
INSN_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(.*)$")
BRANCH_TARGET = re.compile(r"^([0-9a-f]+)\b")


def parse_disassembly(text: str) -> list[tuple[int, str, str]]:
    """(address, mnemonic, operands) per instruction of `objdump -d --no-show-raw-insn` output."""
    out = []
    for line in text.splitlines():
        m = INSN_LINE.match(line)
        if not m:
            continue
        words = m.group(2).split()
        while words and words[0] in PREFIXES:
            words.pop(0)
        if not words:
            continue
        out.append((int(m.group(1), 16), words[0], " ".join(words[1:])))
    return out


def forbidden(insns: list[tuple[int, str, str]]) -> list[str]:
    """Instructions in `insns` that must not run at CPL0 on kvm_pvm, as readable strings."""
    bad = []
    for addr, mnem, ops in insns:
        base = mnem.split(".")[0]
        if (base in FORBIDDEN_MNEMONICS or (base.startswith("f") and base not in X87_ALLOWED)
                or base == "(bad)" or (base == "int" and ops.strip() == "$0x3")
                or VECTOR_REGISTER.search(ops)):
            bad.append(f"{addr:#x}: {mnem} {ops}".strip())
    return bad


def branches_leaving(insns: list[tuple[int, str, str]], start: int, end: int) -> list[str]:
    """Direct calls/jumps whose target lies outside [start, end)."""
    out = []
    for addr, mnem, ops in insns:
        if not (mnem.startswith("call") or mnem.startswith("j")):
            continue
        m = BRANCH_TARGET.match(ops)
        if m and not start <= int(m.group(1), 16) < end:
            out.append(f"{addr:#x}: {mnem} {ops}")
    return out


def sections(data: bytes) -> dict[str, tuple[int, int]]:
    """{name: (address, size)} from the ELF64 section header table."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = headers[shstrndx][4]
    result = {}
    for name_off, _type, _flags, addr, _off, size, *_ in headers:
        end = data.index(b"\0", strtab_off + name_off)
        result[data[strtab_off + name_off:end].decode()] = (addr, size)
    return result


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("guest_kit")
    shutil.copytree(GUEST_KIT, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("build"))
    proc = subprocess.run(["make", "-s", "-C", str(work)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"make failed:\n{proc.stdout}{proc.stderr}"
    assert proc.stdout == "" and proc.stderr == "", f"the build is not quiet:\n{proc.stdout}{proc.stderr}"
    return work


@pytest.fixture(scope="module")
def elf(build_dir) -> bytes:
    return (build_dir / "build" / "testguest.elf").read_bytes()


def test_elf_header_is_static_elf64_x86_64(elf):
    assert elf[:4] == b"\x7fELF"
    assert elf[4] == 2 and elf[5] == 1  # ELFCLASS64, little endian
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    assert (e_type, e_machine) == (2, 62)  # ET_EXEC, EM_X86_64


def test_only_load_segments_linked_at_1mib_with_entry_inside(elf):
    entry, phoff = struct.unpack_from("<QQ", elf, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    phdrs = [struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize) for i in range(phnum)]
    assert phdrs, "no program headers"
    assert [p[0] for p in phdrs] == [PT_LOAD] * len(phdrs)
    for _type, _flags, _off, vaddr, paddr, filesz, memsz, _align in phdrs:
        assert vaddr == paddr and filesz <= memsz
    first = min(phdrs, key=lambda p: p[3])
    assert first[3] == LOAD_ADDR
    assert first[1] & 1, "the first segment must be executable"
    assert LOAD_ADDR <= entry < LOAD_ADDR + first[6]
    # Everything the drivers use from 8 MiB up must stay clear of the image.
    assert max(p[3] + p[6] for p in phdrs) <= 0x800000


def disassemble_ktext(build_dir) -> list[tuple[int, str, str]]:
    proc = subprocess.run(["objdump", "-d", "-j", ".ktext", "--no-show-raw-insn",
                           str(build_dir / "build" / "testguest.elf")],
                          capture_output=True, text=True, check=True)
    return parse_disassembly(proc.stdout)


def test_cpl0_code_has_no_instruction_kvm_pvm_cannot_emulate(build_dir, elf):
    assert ".ktext" in sections(elf)
    insns = disassemble_ktext(build_dir)
    assert len(insns) > 50, "the .ktext section is suspiciously small"
    assert {"iretq", "hlt", "lidt"} <= {m for _, m, _ in insns}
    assert forbidden(insns) == []


def test_cpl0_code_never_branches_into_user_code(build_dir, elf):
    start, size = sections(elf)[".ktext"]
    assert branches_leaving(disassemble_ktext(build_dir), start, start + size) == []


def test_make_with_nothing_changed_does_nothing(build_dir):
    assert subprocess.run(["make", "-q", "-C", str(build_dir)], capture_output=True).returncode == 0


@pytest.mark.parametrize("line", [
    "  100010:\tpopcnt %rax,%rbx",
    "  100010:\tlock cmpxchg16b (%rdi)",
    "  100010:\trdtscp",
    "  100010:\tint3",
    "  100010:\tint    $0x3",
    "  100010:\ttzcnt  %rax,%rax",
    "  100010:\tshlx   %rax,%rbx,%rcx",
    "  100010:\tmovbe  (%rdi),%eax",
    "  100010:\tstac",
    "  100010:\taddsd  %xmm1,%xmm0",
    "  100010:\tmovq   %xmm0,%rax",
    "  100010:\tfldl   (%rax)",
    "  100010:\tfaddp  %st,%st(1)",
])
def test_scanner_flags_each_forbidden_kind(line):
    assert forbidden(parse_disassembly(line)) != []


def test_scanner_accepts_what_kvm_pvm_runs():
    text = "\n".join(f"  1000{i:02x}:\t{s}" for i, s in enumerate([
        "lock xadd %eax,0x104000", "lock cmpxchg %ecx,(%rdi)", "rdtsc", "cpuid", "fxsave (%rdi)",
        "lidt   (%rsp)", "iretq", "rep stos %rax,%es:(%rdi)", "bsf    %rax,%rdx", "cmovg  %edx,%eax",
        "div    %rcx", "mfence", "out    %al,(%dx)", "sti", "hlt",
    ]))
    assert forbidden(parse_disassembly(text)) == []


def test_branch_check_sees_calls_out_of_range():
    insns = parse_disassembly("  100010:\tcall   101000 <memset>\n  100015:\tjmp    100000 <x>")
    assert branches_leaving(insns, 0x100000, 0x100800) == ["0x100010: call 101000 <memset>"]
