"""`Vm`: a KVM VM fd (memory slots, irqchip, PIT, TSS, ioeventfd, irqfd, IRQ lines)."""

from __future__ import annotations

import os

from ._ioctl import ioctl_int, ioctl_ptr
from ._kvm_cffi import ffi, lib
from .system import Kvm


class Vm:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm()
        self._next_slot = 0

    def set_user_memory_region(self, guest_phys_addr: int, size: int, host_addr: int,
                               slot: int | None = None) -> int:
        if slot is None:
            slot = self._next_slot
            self._next_slot += 1
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": 0, "guest_phys_addr": guest_phys_addr,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl_ptr(self.fd, "KVM_SET_USER_MEMORY_REGION", region)
        return slot

    def set_tss_addr(self, addr: int) -> None:
        # A 32-bit address that Python's fcntl.ioctl would pass as a signed C int.
        ioctl_int(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ffi.new("uint64_t *", addr)
        ioctl_ptr(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", value)

    def create_irqchip(self) -> None:
        ioctl_int(self.fd, "KVM_CREATE_IRQCHIP", 0)

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl_ptr(self.fd, "KVM_CREATE_PIT2", config)

    def irq_line(self, gsi: int, level: bool) -> None:
        irq = ffi.new("struct kvm_irq_level *", {"irq": gsi, "level": int(level)})
        ioctl_ptr(self.fd, "KVM_IRQ_LINE", irq)

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        irqfd = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": 0})
        ioctl_ptr(self.fd, "KVM_IRQFD", irqfd)

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        irqfd = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi,
                                              "flags": lib.KVM_IRQFD_FLAG_DEASSIGN})
        ioctl_ptr(self.fd, "KVM_IRQFD", irqfd)

    def _ioeventfd(self, eventfd: int, addr: int, length: int, datamatch: int | None,
                   pio: bool, deassign: bool) -> None:
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        ev = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": eventfd, "flags": flags})
        ioctl_ptr(self.fd, "KVM_IOEVENTFD", ev)

    def register_ioeventfd(self, eventfd: int, addr: int, length: int = 4,
                           datamatch: int | None = None, pio: bool = False) -> None:
        """Writes of `length` bytes at `addr` (equal to `datamatch`, if given) signal `eventfd`
        inside KVM: no exit reaches us."""
        self._ioeventfd(eventfd, addr, length, datamatch, pio, deassign=False)

    def unregister_ioeventfd(self, eventfd: int, addr: int, length: int = 4,
                             datamatch: int | None = None, pio: bool = False) -> None:
        self._ioeventfd(eventfd, addr, length, datamatch, pio, deassign=True)

    def create_vcpu(self, index: int) -> int:
        return ioctl_int(self.fd, "KVM_CREATE_VCPU", index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["Vm"]
