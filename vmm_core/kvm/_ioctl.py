"""The one place KVM ioctls are issued: errno becomes a `KvmError` naming the ioctl."""

from __future__ import annotations

import os

from ..errors import KvmError
from ._kvm_cffi import ffi, lib


def _check(ret: int, name: str) -> int:
    if ret < 0:
        err = ffi.errno
        raise KvmError(f"{name} failed: {os.strerror(err)} (errno {err})").with_errno(err)
    return ret


def ioctl_ptr(fd: int, request_name: str, arg) -> int:
    """ioctl with a pointer argument (a cffi cdata or NULL)."""
    return _check(lib.bh_ioctl_ptr(fd, getattr(lib, request_name), arg), request_name)


def ioctl_int(fd: int, request_name: str, arg: int = 0) -> int:
    """ioctl with a full-width unsigned long argument."""
    return _check(lib.bh_ioctl_int(fd, getattr(lib, request_name), arg), request_name)
