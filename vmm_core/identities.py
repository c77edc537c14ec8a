"""Host identities allocated per VM, never derived: the jail uid/gid pair and vsock CIDs.

A vsock device without `cid=` gets the lowest free CID (>= 3); one with `cid=N` gets N only if
no live VM holds it.

Each identity is a file in a private directory under the host runtime directory
(`<registry dir>/../ids/uid-N`, `.../vsock-cids/N`) on which the VM's core holds an
open-file-description lock for its whole life.  The kernel drops the lock when the core exits,
however it exits (SIGKILL and the OOM killer included), so an identity is free again exactly when
its core is gone, and a live VM's identity is never handed out twice.  The file's content names
the holder (for people: the lock is the truth).

A jail uses two consecutive ids (N, and N + 1 while it sets itself up), so uids are allocated
in steps of two from the VM's range (`--uid-range START-END`, per tenant if its VMs' configs say
so; default 0x78000000-0x7FFFFFFD, above the ids `jail.options.default_vm_ids` derives for
`bulkhead device`, and outside /etc/subuid's and systemd-nspawn's ranges).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from jail.options import MAX_JAIL_ID, valid_jail_id

from .errors import BulkheadError, ConfigError

DEFAULT_UID_RANGE = (0x7800_0000, 0x7FFF_FFFD)


@dataclass
class Claim:
    """An identity this process holds until `release()` (or its exit)."""

    value: int
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _directory(name: str):
    from .registry import registry_dir
    directory = registry_dir().parent / name
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def try_claim(directory_name: str, key: str, holder: str) -> Claim | None:
    """Hold `<dir>/<key>`; None if a live process holds it."""
    from .devices.resources import ofd_lock
    path = _directory(directory_name) / key
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        ofd_lock(fd, exclusive=True)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode()[:200] + b"\n", 0)
    return Claim(int(key.rsplit("-", 1)[-1]), fd)


def parse_uid_range(text: str) -> tuple[int, int]:
    """`START-END` (decimal or 0x hex), both valid jail ids, at least one pair wide."""
    start_s, sep, end_s = text.partition("-")
    try:
        start, end = int(start_s, 0), int(end_s, 0)
    except ValueError:
        raise ConfigError(f"--uid-range {text!r}: give START-END, e.g. 0x78000000-0x7800ffff") from None
    if not sep or not (valid_jail_id(start) and 0 < end <= MAX_JAIL_ID + 1 and end > start):
        raise ConfigError(f"--uid-range {text!r}: give START-END with 0 < START < END <= "
                          f"{MAX_JAIL_ID + 1:#x}")
    return start, end


def allocate_jail_ids(vm_name: str, uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
                      tenant: str | None = None) -> Claim:
    """The lowest free id pair (N, N + 1) in `uid_range` for this VM's devices."""
    start, end = uid_range
    holder = f"vm={vm_name} pid={os.getpid()} tenant={tenant or '-'}"
    for n in range(start + (start & 1), end, 2):  # even N: pairs never overlap
        if not valid_jail_id(n) or not valid_jail_id(n + 1):
            continue
        claim = try_claim("ids", f"uid-{n}", holder)
        if claim is not None:
            return claim
    raise BulkheadError(f"no free jail uid in {start:#x}-{end:#x}: every pair is held by a "
                        "running VM (widen --uid-range)")


# vsock CIDs: 0-2 are reserved (hypervisor, local, host); a VM's CID is unique among live VMs.
FIRST_GUEST_CID, LAST_GUEST_CID = 3, 0xFFFF_FFFE
_reserved_cids: dict[int, Claim] = {}


def claim_cid(cid: int, holder: str) -> Claim | None:
    """Hold CID `cid` (None if a live VM holds it); one this process allocated is handed over."""
    reserved = _reserved_cids.pop(cid, None)
    return reserved if reserved is not None else try_claim("vsock-cids", str(cid), holder)


def allocate_cid(vm_name: str, limit: int = 1 << 16) -> int:
    """The lowest free guest CID, held for this process until its broker takes it over."""
    holder = f"vm={vm_name} pid={os.getpid()}"
    for cid in range(FIRST_GUEST_CID, min(LAST_GUEST_CID, FIRST_GUEST_CID + limit)):
        if cid in _reserved_cids:
            continue
        claim = try_claim("vsock-cids", str(cid), holder)
        if claim is not None:
            _reserved_cids[cid] = claim
            return cid
    raise BulkheadError(f"no free vsock CID among the first {limit}: give --vsock cid=N")
