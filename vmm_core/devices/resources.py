"""Host resources of a VM's devices, opened once when the VM starts and kept for every restart.

A device process never opens a path: the core opens what each kind declares
(`ipc_protocol.kinds.HostResource`) here, before any device exists, and hands the fds to every
incarnation.  Opening once matters: a restart that reopened a path would follow whatever a
tenant renamed into its place (a symlink to a root-only file, a FIFO that blocks the opener
forever).  So each open is `O_NOFOLLOW | O_NONBLOCK`, then `fstat` decides what the fd may be,
with one clear line when it is something else.

Images are locked like QEMU locks them (an open-file-description lock: shared for read-only,
exclusive for read-write), so one image cannot be attached read-write twice, in this VM or in
another one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable

from ipc_protocol.kinds import KINDS, HostResource

from ..errors import ConfigError
from .spec import DeviceSpec

SECTOR = 512
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _what(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _open(path: str, flags: int, where: str, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | _OPEN_FLAGS, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{where}: is a symbolic link; give the file itself") from None
        if e.errno == errno.ENOENT and flags & os.O_CREAT:
            raise ConfigError(f"{where}: directory {os.path.dirname(os.path.abspath(path))} "
                              "does not exist") from None
        if e.errno == errno.ENOENT:
            hint = " (create one with `truncate -s 64M PATH`)" if "disk" in where else ""
            raise ConfigError(f"{where}: no such file{hint}") from None
        if e.errno == errno.EISDIR:
            raise ConfigError(f"{where}: is a directory; give a file") from None
        raise ConfigError(f"{where}: cannot open: {e.strerror}") from None


def ofd_lock(fd: int, exclusive: bool) -> None:
    """Lock the whole file with an open-file-description lock (held until the last fd of that
    description closes, so a holder that dies releases it); OSError EAGAIN/EACCES if taken."""
    # struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int) + padding.
    lock = struct.pack("hhqqi4x", fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, os.SEEK_SET,
                       0, 0, 0)
    fcntl.fcntl(fd, F_OFD_SETLK, lock)


def _lock(fd: int, exclusive: bool, where: str) -> None:
    try:
        ofd_lock(fd, exclusive)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"{where}: the image is in use (attached read-write elsewhere, or "
                              "read-only elsewhere while this asks for read-write)") from None
        raise


def open_image(path: str, readonly: bool, where: str, lock: bool = True) -> int:
    """A raw image: a regular file of whole 512-byte sectors, locked (see the module doc) unless
    `lock` is False (several backends sharing one image, as QEMU's `locking=off`)."""
    fd = _open(path, os.O_RDONLY if readonly else os.O_RDWR, where)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where}: is {_what(st.st_mode)}; give a raw image file")
        if st.st_size < SECTOR:
            raise ConfigError(f"{where}: the image is smaller than one 512-byte sector")
        if st.st_size % SECTOR:
            raise ConfigError(f"{where}: the image is {st.st_size} bytes, not a whole number of "
                              f"512-byte sectors (e.g. `truncate -s {st.st_size // SECTOR * SECTOR + SECTOR} PATH`)")
        if lock:
            _lock(fd, exclusive=not readonly, where=where)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_output(path: str, where: str) -> int:
    """Where a device writes: a regular file (created 0600, appended to) or the terminal."""
    if path == "stdout":
        return os.dup(sys.stdout.fileno())
    fd = _open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, where)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{where}: is {_what(st.st_mode)}; give a regular file or 'stdout'")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_input(path: str, where: str) -> int:
    """What a device reads without blocking: a regular file or a FIFO."""
    fd = _open(path, os.O_RDONLY, where)
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        os.close(fd)
        raise ConfigError(f"{where}: is {_what(st.st_mode)}; give a regular file or a FIFO")
    return fd


def open_tap(spec: DeviceSpec, r: HostResource, where: str) -> "tuple[int, Callable[[], None]]":
    """A net device's tap, in its network namespace (`vmm_core.devices.tap`); the namespace
    the core made for it (`netns=new`) is kept until the VM ends."""
    from .tap import open_tap_resource
    tap, ns = open_tap_resource(spec.params[r.field], spec.params.get("netns"),
                                spec.params.get("mtu"), where)
    return tap.fd, (ns.close if ns is not None else lambda: None)


def open_vsock_broker(spec: DeviceSpec, r: HostResource, where: str) -> "tuple[int, Callable[[], None]]":
    """A vsock device's broker (`vmm_core.vsock_broker`): the core listens on the VM's vsock
    socket and makes every connection; the device gets its end of the broker's socketpair."""
    from ..vsock_broker import VsockBroker
    broker = VsockBroker(spec.params[r.field], int(spec.params["cid"]), what=where,
                         cid_what="--vsock cid=")
    fd = broker.open()
    try:
        return os.dup(fd), broker.close
    except BaseException:
        broker.close()
        raise


# An opener returns the fd, or (fd, what to call when the VM ends besides closing it).
Opener = Callable[[DeviceSpec, HostResource, str], "int | tuple[int, Callable[[], None]]"]
OPENERS: dict[str, Opener] = {
    "image": lambda spec, r, where: open_image(spec.params[r.field],
                                               bool(spec.params.get("readonly")), where),
    "output": lambda spec, r, where: open_output(spec.params[r.field], where),
    "input": lambda spec, r, where: open_input(spec.params[r.field], where),
    "tap": open_tap,
    "vsock-broker": open_vsock_broker,
}


@dataclass
class DeviceResources:
    """The fds of one device, by role; closed when the VM ends."""

    fds: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        for closer in reversed(self.closers):
            closer()
        self.closers.clear()


def open_resources(spec: DeviceSpec) -> DeviceResources:
    """Open every host resource `spec`'s kind declares; ConfigError names the flag and path."""
    kind = KINDS[spec.kind]
    out = DeviceResources()
    try:
        for r in kind.resources:
            value = spec.params.get(r.field)
            if value in (None, ""):
                if r.required:
                    raise ConfigError(f"--{kind.flag}: {r.field} is required")
                continue
            opener = OPENERS.get(r.opener)
            if opener is None:
                raise ConfigError(f"--{kind.flag}: no way to open a {r.opener!r} resource")
            opened = opener(spec, r, f"--{kind.flag} {value}")
            fd, closer = opened if isinstance(opened, tuple) else (opened, None)
            out.fds[r.role] = fd
            if closer is not None:
                out.closers.append(closer)
            out.sizes[r.role] = os.fstat(fd).st_size
    except BaseException:
        out.close()
        raise
    return out
