"""Taps for virtio-net, made by the core inside a network namespace (the "tap" resource).

The core opens the tap (the device process never opens anything): `/dev/net/tun`, TUNSETIFF
with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, TUNSETVNETHDRSZ 12, O_NONBLOCK | O_CLOEXEC.  The tap
lives in a network namespace of the user's choice, while the core itself stays in its own:

- `netns=NAME` (an `ip netns add NAME` namespace, /run/netns/NAME) or `netns=/path` (any
  nsfs file, e.g. /proc/PID/ns/net);
- `netns=new`: a fresh namespace for this VM, held by an fd of the core (`NetNamespace`); it
  goes away when that fd and the last tap fd in it are closed, i.e. at VM exit;
- no netns: the core's own namespace.

How, without moving the core: a short-lived helper thread `setns()`es into the namespace
(CLONE_NEWNET is per thread, allowed in a multi-threaded process; `netns=new` is an
`unshare(CLONE_NEWNET)` of that thread), opens `/dev/net/tun` there (a tun file belongs to the
namespace it is opened in, and TUNSETIFF makes the interface there), switches back and ends.
Everything except the open fds stays behind with the thread.  Needs CAP_NET_ADMIN (and
CAP_SYS_ADMIN for setns/unshare).

Connecting the namespace to the host (a veth pair, addresses, routes): `vmm_core/netsetup.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from ..errors import ConfigError

T = TypeVar("T")

IFNAMSIZ = 16
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1: what VIRTIO 1.2 §5.1.6 puts before every frame
# <linux/sockios.h>, <net/if.h>, <linux/ethtool.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCETHTOOL = 0x8946
IFF_UP = 0x1
ETHTOOL_GDRVINFO = 0x3
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_IFREQ = struct.Struct("16s24x")  # struct ifreq is 40 bytes on x86-64: name + a union
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class TapError(ConfigError):
    """A tap or its network namespace cannot be made or opened; the message says which and why."""


# -- names ----------------------------------------------------------------------------------------
def check_ifname(name: str) -> bytes:
    """`name` as the kernel accepts it (dev_valid_name): 1..15 bytes, no '/', ':' or blanks."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise TapError(f"tap name {name!r} must be 1 to {IFNAMSIZ - 1} bytes (IFNAMSIZ)")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise TapError(f"tap name {name!r} may not be '.' or '..' or contain '/', ':' or blanks")
    if "%" in name and name.count("%d") != 1 or name.replace("%d", "").count("%"):
        raise TapError(f"tap name {name!r}: '%' only as one '%d' (the kernel picks a number)")
    return raw


def check_mac(text: str) -> str:
    """`text` if it is a unicast MAC written as six hex octets (aa:bb:cc:dd:ee:ff), else TapError
    (the device checks again: this is for a one-line error before anything starts)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts):
        raise TapError(f"{text!r} is not a MAC address (six hex octets: 52:54:00:12:34:56)")
    if int(parts[0], 16) & 1:
        raise TapError(f"{text} is a multicast address: a NIC needs a unicast MAC")
    return text.lower()


def default_mac(vm_name: str, index: int) -> str:
    """A stable, locally administered unicast MAC for NIC `index` of VM `vm_name`.

    Stable across device restarts (the guest read it once at probe) and distinct per VM."""
    digest = hashlib.sha256(f"bulkhead:{vm_name}:{index}".encode()).digest()
    first = (digest[0] & 0xFC) | 0x02  # locally administered, unicast
    return ":".join(f"{b:02x}" for b in bytes([first]) + digest[1:6])


# -- namespaces -----------------------------------------------------------------------------------
def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unshare_net() -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_namespace(netns: "NetNamespace | None", fn: Callable[[], T]) -> T:
    """Run `fn` on a helper thread inside `netns` (None: here) and return its result.

    The caller's thread never changes namespace; the helper switches back before it ends."""
    if netns is None:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            box["error"] = e
            return
        try:
            _setns(netns.fd)
            try:
                box["result"] = fn()
            finally:
                _setns(home)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
        finally:
            os.close(home)

    t = threading.Thread(target=run, name="bulkhead-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


@dataclass
class NetNamespace:
    """A network namespace held open by `fd` (an nsfs file); `owned` if made for this VM."""

    fd: int
    description: str
    owned: bool = False

    @classmethod
    def open(cls, spec: str) -> "NetNamespace":
        """`new`, an `ip netns` name, or a path to a namespace file."""
        if spec == "new":
            return cls.create()
        if not spec:
            raise TapError("netns= needs new, a name from `ip netns list` or a path")
        path = spec if "/" in spec else os.path.join(NETNS_RUN_DIR, spec)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            hint = f" (create it with `ip netns add {spec}`)" if "/" not in spec else ""
            raise TapError(f"netns {spec}: cannot open {path}: {e.strerror}{hint}") from None
        ns = cls(fd, spec)
        try:
            in_namespace(ns, lambda: None)  # setns says EINVAL if it is not a net namespace
        except OSError as e:
            ns.close()
            why = "not a network namespace" if e.errno == errno.EINVAL else e.strerror
            raise TapError(f"netns {spec}: {path}: {why}") from None
        return ns

    @classmethod
    def create(cls) -> "NetNamespace":
        """A fresh namespace (loopback only), made on a helper thread; the core keeps its fd."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _unshare_net()
                    try:
                        box["fd"] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                        _set_link_up("lo")
                    finally:
                        _setns(home)
                finally:
                    os.close(home)
            except OSError as e:
                box["error"] = e

        t = threading.Thread(target=run, name="bulkhead-netns-new", daemon=True)
        t.start()
        t.join()
        if "error" in box:
            if "fd" in box:
                os.close(box["fd"])
            err = box["error"]
            raise TapError(f"netns new: cannot create a network namespace: {err.strerror}"
                           + (" (needs CAP_SYS_ADMIN)" if err.errno == errno.EPERM else "")) from None
        return cls(box["fd"], "new", owned=True)

    @property
    def path(self) -> str:
        """A path naming this namespace while the core lives (for `ip link set ... netns PATH`
        and `nsenter --net=PATH`)."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def inode(self) -> int:
        return os.fstat(self.fd).st_ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- taps -----------------------------------------------------------------------------------------
def _ifreq_ioctl(sock: socket.socket, request: int, name: bytes, payload: bytes = b"") -> bytes:
    req = bytearray(_IFREQ.pack(name))
    req[IFNAMSIZ:IFNAMSIZ + len(payload)] = payload
    fcntl.ioctl(sock.fileno(), request, req)
    return bytes(req)


def _set_link_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        raw = name.encode()
        flags = struct.unpack_from("<H", _ifreq_ioctl(s, SIOCGIFFLAGS, raw), IFNAMSIZ)[0]
        _ifreq_ioctl(s, SIOCSIFFLAGS, raw, struct.pack("<H", flags | IFF_UP))


def interface_kind(name: str) -> str | None:
    """'tap', 'tun', another driver's name, or None if no interface `name` exists (here)."""
    info = ctypes.create_string_buffer(196)  # struct ethtool_drvinfo
    struct.pack_into("<I", info, 0, ETHTOOL_GDRVINFO)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            _ifreq_ioctl(s, SIOCETHTOOL, name.encode(), struct.pack("<Q", ctypes.addressof(info)))
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            if e.errno == errno.EOPNOTSUPP:
                return "unknown"  # no ethtool driver info (loopback, some virtual devices)
            raise
    driver = info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace")
    bus = info.raw[100:132].split(b"\0", 1)[0].decode(errors="replace")
    return bus if driver == "tun" else driver  # tun's bus_info says "tap" or "tun"


@dataclass
class Tap:
    """An open tap: `fd` for the device, `name` as the kernel knows it, its `mtu`."""

    fd: int
    name: str
    mtu: int
    netns: NetNamespace | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_tap_here(name: str, up: bool, mtu: int | None) -> Tap:
    raw = check_ifname(name)
    if "%d" not in name:
        kind = interface_kind(name)
        if kind is not None and kind != "tap":
            raise TapError(f"tap {name}: an interface of that name exists and is not a tap "
                           f"(driver: {kind}); pick another name")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(f"tap {name}: cannot open /dev/net/tun: {e.strerror}"
                       + (" (load the tun module)" if e.errno == errno.ENOENT else "")) from None
    try:
        req = struct.pack("16sH22x", raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            got = fcntl.ioctl(fd, TUNSETIFF, req)
        except OSError as e:
            raise TapError(f"tap {name}: TUNSETIFF failed: {_tunsetiff_hint(e)}") from None
        actual = got[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            if mtu is not None:
                _ifreq_ioctl(s, SIOCSIFMTU, actual.encode(), struct.pack("<i", mtu))
            mtu_now = struct.unpack_from("<i", _ifreq_ioctl(s, SIOCGIFMTU, actual.encode()), IFNAMSIZ)[0]
        if up:
            _set_link_up(actual)
        return Tap(fd, actual, mtu_now)
    except BaseException:
        os.close(fd)
        raise


def _tunsetiff_hint(e: OSError) -> str:
    if e.errno == errno.EBUSY:
        return "the tap is already attached to another open file (another VM or process?)"
    if e.errno == errno.EPERM:
        return "permission denied (needs CAP_NET_ADMIN, or the tap belongs to another user)"
    if e.errno == errno.EINVAL:
        return "an interface of that name exists with other flags (a tun, or multi-queue)"
    return e.strerror or str(e)


def open_tap(name: str, netns: NetNamespace | None = None, *, up: bool = True,
             mtu: int | None = None) -> Tap:
    """Create (or attach to an existing persistent) tap `name` inside `netns`.

    The fd is non-blocking and close-on-exec, with a 12-byte vnet header; `up` brings the
    interface up, `mtu` sets its MTU (the device's config `mtu` should be `Tap.mtu`)."""
    try:
        tap = in_namespace(netns, lambda: _open_tap_here(name, up, mtu))
    except OSError as e:
        raise TapError(f"tap {name}: {e.strerror or e}") from None
    tap.netns = netns
    return tap


def open_tap_resource(name: str, netns: str | None, mtu: int | None, where: str) -> tuple[Tap, NetNamespace | None]:
    """The core's opener for a net device's "tap" resource (`vmm_core.devices.resources`).

    Returns the open tap (its fd goes to the device as role "tap") and the namespace to keep
    while the VM runs: for `netns=new` the core's fd is how a user reaches it
    (`nsenter --net=/proc/<core pid>/fd/<n>`); close it at VM exit.  Errors name `where`."""
    ns = None
    try:
        if netns:
            ns = NetNamespace.open(netns)
        tap = open_tap(name, ns, mtu=mtu)
    except TapError as e:
        if ns is not None:
            ns.close()
        raise TapError(f"{where}: {e}") from None
    if ns is not None and not ns.owned:
        ns.close()  # a named namespace outlives us anyway; the tap holds it meanwhile
        ns, tap.netns = None, None
    return tap, ns
