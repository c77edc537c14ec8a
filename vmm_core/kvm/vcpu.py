"""`Vcpu`: a KVM vCPU fd (registers, special registers, FPU, MSRs, LAPIC, CPUID, run)."""

from __future__ import annotations

import errno
import mmap
import os

from ..errors import KvmError
from ._ioctl import ioctl_ptr
from ._kvm_cffi import ffi, lib
from .exits import Exit, InterruptedExit, decode_exit
from .vm import Vm

_INTERRUPTED = InterruptedExit()


class Vcpu:
    def __init__(self, vm: Vm, index: int) -> None:
        self.index = index
        self.fd = vm.create_vcpu(index)
        size = vm.kvm.vcpu_mmap_size()
        self.run_page = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_request = lib.KVM_RUN

    # -- running ------------------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN once (the GIL is released while the guest runs) and decode the exit."""
        if lib.bh_ioctl_int(self.fd, self._run_request, 0) < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                return _INTERRUPTED
            raise KvmError(f"KVM_RUN failed on vCPU {self.index}: {os.strerror(err)}")
        return decode_exit(self.run_page)

    def set_immediate_exit(self, value: bool) -> None:
        """Make the next (or current, after a signal) KVM_RUN return at once with EINTR."""
        self.run_page[lib.BH_OFF_IMMEDIATE_EXIT] = int(value)

    def io_data(self, offset: int, length: int) -> memoryview:
        return memoryview(self.run_page)[offset:offset + length]

    def mmio_data(self, length: int) -> memoryview:
        return memoryview(self.run_page)[lib.BH_OFF_MMIO_DATA:lib.BH_OFF_MMIO_DATA + length]

    # -- state --------------------------------------------------------------------------------
    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl_ptr(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs) -> None:
        ioctl_ptr(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl_ptr(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        ioctl_ptr(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        ioctl_ptr(self.fd, "KVM_GET_FPU", fpu)
        return fpu

    def set_fpu(self, fpu) -> None:
        ioctl_ptr(self.fd, "KVM_SET_FPU", fpu)

    def set_msrs(self, entries: dict[int, int]) -> None:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(entries), "entries": len(entries)})
        for i, (index, value) in enumerate(entries.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = value
        written = ioctl_ptr(self.fd, "KVM_SET_MSRS", msrs)
        if written != len(entries):
            bad = list(entries)[written]
            raise KvmError(f"KVM_SET_MSRS stopped at MSR {bad:#x} ({written}/{len(entries)} set)")

    def get_lapic(self):
        lapic = ffi.new("struct kvm_lapic_state *")
        ioctl_ptr(self.fd, "KVM_GET_LAPIC", lapic)
        return lapic

    def set_lapic(self, lapic) -> None:
        ioctl_ptr(self.fd, "KVM_SET_LAPIC", lapic)

    def set_cpuid2(self, cpuid) -> None:
        ioctl_ptr(self.fd, "KVM_SET_CPUID2", cpuid)

    def set_mp_state(self, state: int) -> None:
        mp = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        ioctl_ptr(self.fd, "KVM_SET_MP_STATE", mp)

    def close(self) -> None:
        try:
            self.run_page.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
