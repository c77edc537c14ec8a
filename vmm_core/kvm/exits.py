"""Typed vCPU exits, decoded from the shared kvm_run page at offsets taken from <linux/kvm.h>."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._kvm_cffi import lib

EXIT_NAMES = {getattr(lib, n): n for n in dir(lib) if n.startswith("KVM_EXIT_") and not n.startswith("KVM_EXIT_IO_")}


@dataclass(frozen=True, slots=True)
class IoExit:
    """Port I/O: `count` accesses of `size` bytes at `data_offset` in the run page."""
    port: int
    size: int
    is_write: bool
    count: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class MmioExit:
    phys_addr: int
    size: int
    is_write: bool


@dataclass(frozen=True, slots=True)
class HltExit:
    pass


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """Triple fault or a guest reset request."""


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    type: int


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    hardware_entry_failure_reason: int


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InterruptedExit:
    """KVM_RUN returned EINTR or immediate_exit was set: someone wants this vCPU to stop."""


@dataclass(frozen=True, slots=True)
class OtherExit:
    reason: int

    @property
    def name(self) -> str:
        return EXIT_NAMES.get(self.reason, f"exit {self.reason}")


Exit = (IoExit | MmioExit | HltExit | ShutdownExit | SystemEventExit | FailEntryExit
        | InternalErrorExit | InterruptedExit | OtherExit)

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_HLT = HltExit()
_SHUTDOWN = ShutdownExit()


def decode_exit(run) -> Exit:
    """Decode the exit described by the kvm_run mapping `run`."""
    reason = _U32.unpack_from(run, lib.BH_OFF_EXIT_REASON)[0]
    if reason == lib.KVM_EXIT_IO:
        return IoExit(
            port=_U16.unpack_from(run, lib.BH_OFF_IO_PORT)[0],
            size=_U8.unpack_from(run, lib.BH_OFF_IO_SIZE)[0],
            is_write=_U8.unpack_from(run, lib.BH_OFF_IO_DIRECTION)[0] == lib.KVM_EXIT_IO_OUT,
            count=_U32.unpack_from(run, lib.BH_OFF_IO_COUNT)[0],
            data_offset=_U64.unpack_from(run, lib.BH_OFF_IO_DATA_OFFSET)[0],
        )
    if reason == lib.KVM_EXIT_MMIO:
        return MmioExit(
            phys_addr=_U64.unpack_from(run, lib.BH_OFF_MMIO_PHYS_ADDR)[0],
            size=_U32.unpack_from(run, lib.BH_OFF_MMIO_LEN)[0],
            is_write=bool(_U8.unpack_from(run, lib.BH_OFF_MMIO_IS_WRITE)[0]),
        )
    if reason == lib.KVM_EXIT_HLT:
        return _HLT
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        return SystemEventExit(_U32.unpack_from(run, lib.BH_OFF_SYSTEM_EVENT_TYPE)[0])
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(_U64.unpack_from(run, lib.BH_OFF_FAIL_ENTRY_REASON)[0])
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        ndata = min(_U32.unpack_from(run, lib.BH_OFF_INTERNAL_NDATA)[0], 16)
        data = struct.unpack_from(f"<{ndata}Q", run, lib.BH_OFF_INTERNAL_DATA)
        return InternalErrorExit(_U32.unpack_from(run, lib.BH_OFF_INTERNAL_SUBERROR)[0], data)
    if reason == lib.KVM_EXIT_INTR:
        return InterruptedExit()
    return OtherExit(reason)
