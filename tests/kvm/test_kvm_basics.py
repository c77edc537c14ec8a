"""KVM bindings and 64-bit entry, with hand-assembled guest code (no guest_kit needed)."""

import pytest

from vmm_core import layout
from vmm_core.boot import cpu as cpu_setup
from vmm_core.kvm import IoExit, Kvm, MmioExit, Vcpu, Vm
from vmm_core.memory import GuestMemory, create_guest_memory

pytestmark = pytest.mark.kvm

CODE_ADDR = 0x100000


@pytest.fixture
def machine():
    kvm = Kvm()
    vm = Vm(kvm)
    mem = create_guest_memory(32 << 20)
    for r in mem.regions:
        vm.set_user_memory_region(r.start, r.spec.size, r.host_addr)
    vm.set_tss_addr(layout.KVM_TSS_ADDR)
    vm.create_irqchip()
    cpu_setup.write_boot_structures(mem)
    vcpu = Vcpu(vm, 0)
    sregs = vcpu.get_sregs()
    cpu_setup.long_mode_sregs(sregs)
    vcpu.set_sregs(sregs)
    yield kvm, vm, mem, vcpu
    vcpu.close()
    vm.close()
    mem.close()
    kvm.close()


def start(vcpu, code_addr=CODE_ADDR):
    regs = vcpu.get_regs()
    regs.rip = code_addr
    regs.rsp = layout.BOOT_STACK_POINTER
    regs.rflags = 2
    vcpu.set_regs(regs)


def test_capabilities_present():
    kvm = Kvm()
    kvm.require_caps()
    assert kvm.vcpu_mmap_size() >= 4096
    assert kvm.supported_cpuid().nent > 0
    kvm.close()


def test_pio_out_in_long_mode(machine):
    _, _, mem, vcpu = machine
    code = bytes([
        0x66, 0xBA, 0x01, 0x05,              # mov dx, 0x501
        0xB8, 0x2A, 0x00, 0x00, 0x00,        # mov eax, 42
        0xEF,                                # out dx, eax
        0x66, 0xBA, 0x10, 0x05,              # mov dx, 0x510
        0xEC,                                # in al, dx
        0xEB, 0xFE,                          # jmp $
    ])
    mem.write(CODE_ADDR, code)
    start(vcpu)
    ex = vcpu.run()
    assert isinstance(ex, IoExit) and ex.is_write and ex.port == 0x501 and ex.size == 4
    assert int.from_bytes(vcpu.io_data(ex.data_offset, 4), "little") == 42
    ex = vcpu.run()
    assert isinstance(ex, IoExit) and not ex.is_write and ex.port == 0x510 and ex.size == 1
    vcpu.io_data(ex.data_offset, 1)[:] = b"\x77"


def test_mmio_write_and_read(machine):
    _, _, mem, vcpu = machine
    code = bytes([
        0x48, 0xBB]) + layout.TESTDEV_MMIO_BASE.to_bytes(8, "little") + bytes([  # mov rbx, imm64
        0x48, 0xB8]) + (0x1122334455667788).to_bytes(8, "little") + bytes([      # mov rax, imm64
        0x48, 0x89, 0x43, 0x20,                                                  # mov [rbx+0x20], rax
        0x8B, 0x4B, 0x10,                                                        # mov ecx, [rbx+0x10]
        0x89, 0x0C, 0x25, 0x00, 0x20, 0x00, 0x00,                                # mov [0x2000], ecx
        0x66, 0xBA, 0x01, 0x05, 0xEF,                                            # out 0x501, eax
    ])
    mem.write(CODE_ADDR, code)
    start(vcpu)
    ex = vcpu.run()
    assert isinstance(ex, MmioExit) and ex.is_write
    assert ex.phys_addr == layout.TESTDEV_MMIO_BASE + 0x20 and ex.size == 8
    assert bytes(vcpu.mmio_data(8)) == (0x1122334455667788).to_bytes(8, "little")
    ex = vcpu.run()
    assert isinstance(ex, MmioExit) and not ex.is_write and ex.size == 4
    vcpu.mmio_data(4)[:] = (0xCAFEF00D).to_bytes(4, "little")
    ex = vcpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x501
    assert mem.read_u32(0x2000) == 0xCAFEF00D
