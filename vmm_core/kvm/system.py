"""`Kvm`: the /dev/kvm system fd (API version, capabilities, VM creation)."""

from __future__ import annotations

import errno
import os

from ..errors import KvmError
from ._ioctl import ioctl_int, ioctl_ptr
from ._kvm_cffi import ffi, lib

KVM_PATH = "/dev/kvm"

# What the core cannot run without, with what each is for.
REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": "the in-kernel PIC/IOAPIC/LAPIC",
    "KVM_CAP_USER_MEMORY": "guest RAM from our memfd",
    "KVM_CAP_SET_TSS_ADDR": "x86 real-mode TSS placement",
    "KVM_CAP_IRQFD": "device interrupts straight from device processes",
    "KVM_CAP_IOEVENTFD": "queue kicks straight to device processes",
    "KVM_CAP_IMMEDIATE_EXIT": "stopping vCPUs cleanly",
}


class Kvm:
    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"{path} does not exist: load the kvm module (kvm_intel/kvm_amd) "
                           "or run on a host with virtualisation enabled") from None
        except PermissionError:
            raise KvmError(f"no permission to open {path}: run as root or add your user "
                           "to the 'kvm' group") from None
        version = ioctl_int(self.fd, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"KVM API version {version} is not the supported {lib.KVM_API_VERSION}")

    def check_extension(self, cap_name: str) -> int:
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, cap_name))

    def require_caps(self) -> None:
        missing = [f"{name} ({why})" for name, why in REQUIRED_CAPS.items()
                   if self.check_extension(name) <= 0]
        if missing:
            raise KvmError("this KVM lacks required capabilities: " + ", ".join(missing))

    def max_vcpus(self) -> int:
        return self.check_extension("KVM_CAP_MAX_VCPUS") or self.check_extension("KVM_CAP_NR_VCPUS") or 4

    def vcpu_mmap_size(self) -> int:
        return ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID as a `struct kvm_cpuid2 *` (grown on E2BIG)."""
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            try:
                ioctl_ptr(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
                return cpuid
            except KvmError as e:
                if e.errno != errno.E2BIG or max_entries >= 4096:
                    raise
                max_entries *= 2

    def create_vm(self) -> int:
        return ioctl_int(self.fd, "KVM_CREATE_VM", 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
