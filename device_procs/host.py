"""The device process: `python -m device_procs.host --name blk0 --type blk ...`.

Started by `vmm_core.devices.spawn` as a fresh interpreter, or forked by the device zygote
(`device_procs.zygote`, which has this module imported and calls `main(argv)` in the forked
child); never a fork of the threaded core.  Its life, in order:

1. parse argv; set the process title; arm PR_SET_PDEATHSIG so it dies with the core;
2. receive its fds over the bootstrap socket (SCM_RIGHTS bundle: guest memory, ring memfd,
   doorbells, irqfd, one kick eventfd per queue, the host resources its kind declares (disk image, console output, ...)), then close that socket;
3. connect the ZeroMQ control channel, send `Hello`, wait for `Configure` — its arrival also
   proves the connection is up, so no reconnect is ever needed from inside the jail;
4. map guest memory, build the device (opening its files), close every fd it no longer needs;
5. **enter the jail** (the marked call site below) — before touching any guest-controlled data
   (only when started through the jail launcher, i.e. `$BULKHEAD_JAIL` is set);
6. send `Ready` (with the device's features) and serve: request-ring doorbell, kick eventfds and control socket in one poll.

The serve loop is single-threaded and plain receive -> match -> reply (crosvm's child loop).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import zmq

# Imported now, not on first use: once jailed, open(2) (and so any import) kills the process.
from jail import probe as jail_probe
from jail.errors import JailError
from jail.sandbox import ENV_VAR as JAIL_ENV, enter_jail, start_library_threads
from ipc_protocol import messages as msg
from ipc_protocol.errors import ProtocolError, RemoteProtocolError
from ipc_protocol.ring import SLOT_SIZE, Op, Slot
from ipc_protocol.transport import fds as fdpass
from ipc_protocol.transport.shm_ring import RingEndpoint, ShmRings, drain_eventfd
from ipc_protocol.transport.zmq_channel import ControlClient
from ipc_protocol.guest_memory import GuestMemory, RegionSpec
from device_procs.virtio.hostfds import HostFds
from ipc_protocol.kinds import KINDS

log = logging.getLogger("device_procs.host")

BOOTSTRAP_TIMEOUT = 10.0   # default seconds to receive fds / Configure (the core's start timeout)
EXIT_OK, EXIT_ERROR, EXIT_BOOTSTRAP = 0, 1, 2
E_JAIL = "jail-error"  # ErrorReport code: the jail could not be entered (the core reports the text)

# Fault("syscall", {"name": ...}): the forbidden calls a test can make the device attempt, mapped
# onto the jail probe's table (one implementation of each attempt for probe and device).
SYSCALL_FAULTS = {"open_passwd": "open_passwd", "socket": "socket", "execve": "execve",
                  "ptrace": "ptrace", "mount": "mount", "kill_core": "kill_parent",
                  "mmap_exec": "mmap_exec", "ioctl_kvm": "ioctl_kvm"}

# A factory builds the BusDevice the ring feeds: (spec, memory, notify) -> object with
# read/write and, optionally, queue_notify(i), stats(), reset(), restore(state), kick_all().
DeviceFactory = Callable[[dict[str, Any], GuestMemory, Callable[[], None]], Any]


def virtio_factory(spec: dict[str, Any], memory: GuestMemory, notify: Callable[[], None],
                   fds: dict[str, int] | None = None) -> Any:
    """The production factory: the kind's device behind the virtio-mmio transport; `fds` are
    the host resources the core opened, by role (the device never opens a path)."""
    from device_procs.virtio import MmioDevice, create_device
    return MmioDevice(create_device(spec, fds), memory, notify)


def load_factory(path: str | None) -> DeviceFactory:
    """`module:function` given by the (trusted) core on argv; tests use it for fake devices."""
    if not path:
        return virtio_factory
    module_name, _, attr = path.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="device_procs.host")
    p.add_argument("--name", required=True, help="device name, e.g. blk0")
    p.add_argument("--type", required=True, dest="device_type", help="blk | rng | console | test")
    p.add_argument("--identity", required=True, help="ZeroMQ routing id, e.g. blk0.1")
    p.add_argument("--control", required=True, help="ipc:// endpoint of the core's ROUTER")
    p.add_argument("--bootstrap-fd", type=int, required=True, help="inherited SEQPACKET socket")
    p.add_argument("--parent-pid", type=int, required=True, help="the core's pid (PDEATHSIG race)")
    p.add_argument("--factory", default=None, help="module:function building the device (tests)")
    p.add_argument("--allow-faults", action="store_true", help="honour Fault messages (tests)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--bootstrap-timeout", type=float, default=BOOTSTRAP_TIMEOUT, metavar="S",
                   help="seconds to wait for the fds and for Configure (the core's start timeout)")
    return p.parse_args(argv)


def set_process_title(name: str) -> None:
    """`bulkhead-dev:blk0` in ps -f / pgrep -f; comm (15 bytes max) gets `bhdev:blk0`."""
    try:
        import prctl
        prctl.set_name(f"bhdev:{name}"[:15])
        prctl.set_proctitle(f"bulkhead-dev:{name}")
    except Exception:  # cosmetic: never a reason not to run
        try:
            with open("/proc/self/comm", "w") as f:
                f.write(f"bhdev:{name}"[:15])
        except OSError:
            pass


def arm_parent_death(parent_pid: int) -> None:
    """Die with the core (a device never outlives its VM).

    The signal fires when the *thread* that forked us exits, so the core must spawn devices from
    a long-lived thread.  If the core died before this call, getppid() already differs: exit.
    Jailed, our parent is the launcher (which died with the core or checks it) and getppid() is 0
    (the launcher is outside our PID namespace): it already armed PDEATHSIG before our exec.
    """
    import prctl
    prctl.set_pdeathsig(signal.SIGKILL)
    if not jailed() and os.getppid() != parent_pid:
        os._exit(EXIT_BOOTSTRAP)


def jailed() -> bool:
    """Started through the jail launcher (which passes the jail's configuration in the env)."""
    return bool(os.environ.get(JAIL_ENV))


def host_pid() -> int:
    """Our pid as the core sees it.  Jailed we are pid 2 of our PID namespace, but /proc is still
    the host's until the jail's pivot_root, and its `self` link names us in the host's namespace."""
    if jailed():
        try:
            return int(os.readlink("/proc/self"))
        except (OSError, ValueError):
            pass
    return os.getpid()


def _is_socket(fd: int, stat_module: Any) -> bool:
    try:
        return stat_module.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


class _FaultTarget:
    """What the jail probe's attempts expect of their subject (`p.args.parent_pid`, `p.call`)."""

    def __init__(self, parent_pid: int, fd: int) -> None:
        self.args = argparse.Namespace(parent_pid=parent_pid)
        self.call = fd


class ChannelLogHandler(logging.Handler):
    """Log records go to the core as `Log` messages (a jailed device's stderr is /dev/null).

    Never blocks (a record the channel cannot take now is dropped) and never recurses."""

    LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}

    def __init__(self, control: ControlClient) -> None:
        super().__init__()
        self.control = control
        self._busy = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            level = self.LEVELS.get(record.levelno, "error")
            self.control.send(msg.Log(level, record.getMessage()[:1000]), timeout=0)
        except Exception:  # noqa: BLE001 - logging must never take the device down
            pass
        finally:
            self._busy = False


class DeviceHost:
    """Owns the device, its rings and its control channel; `serve()` runs until Shutdown."""

    def __init__(self, args: argparse.Namespace, fds: dict[str, int], control: ControlClient,
                 factory: DeviceFactory) -> None:
        self.args = args
        self.fds = fds
        self.control = control
        self.factory = factory
        self.device: Any = None
        self.memory: GuestMemory | None = None
        self.rings: ShmRings | None = None
        self.ring: RingEndpoint | None = None
        self.kick_fds: list[int] = []
        self.irqfd = -1
        self.spin_us = 0
        self.counters = {"ring_reads": 0, "ring_writes": 0, "ring_syncs": 0, "kicks": 0,
                         "interrupts": 0}
        self._garbage_next = False
        self._doorbell_frozen = False

    # -- setup ---------------------------------------------------------------------------------
    def configure(self, config: msg.Configure) -> None:
        """Map memory, attach rings, build the device; afterwards only needed fds stay open."""
        fds = dict(self.fds)
        for role in ("guest_memory", "ring", "request_doorbell", "response_doorbell", "irqfd"):
            if role not in fds:
                raise ValueError(f"no {role!r} fd was passed")
        specs = [RegionSpec.from_wire(list(row)) for row in config.memory]
        self.memory = GuestMemory.from_fd(fds.pop("guest_memory"), specs)
        self.rings = ShmRings.attach(fds.pop("ring"), fds.pop("request_doorbell"),
                                     fds.pop("response_doorbell"), config.ring_capacity)
        self.ring = self.rings.device_endpoint()
        self.irqfd = fds.pop("irqfd")
        kicks = sorted((int(r[4:]), fd) for r, fd in list(fds.items())
                       if r.startswith("kick") and r[4:].isdigit())
        self.kick_fds = [fd for _, fd in kicks]
        for i, _ in kicks:
            fds.pop(f"kick{i}")
        spec = dict(config.spec)
        # The host resources the kind declares (blk "disk", console "output", ...): the device
        # works on duplicates, so ours are closed once it is built.
        kind = KINDS.get(spec.get("type", ""))
        resources = {r.role: fds.pop(r.role) for r in (kind.resources if kind else ())
                     if r.role in fds}
        self.spin_us = config.spin_us
        try:
            if self.factory is virtio_factory:
                self.device = virtio_factory(spec, self.memory, self._notify, resources)
            else:
                self.device = self.factory(spec, self.memory, self._notify)
        finally:
            for fd in resources.values():
                os.close(fd)
        if hasattr(self.device, "attach_page"):
            self.device.attach_page(self.rings.register_page)
        for role, fd in fds.items():  # anything unexpected: not ours to keep
            log.warning("closing unexpected fd role %r", role)
            os.close(fd)

    def _notify(self) -> None:
        self.counters["interrupts"] += 1
        os.eventfd_write(self.irqfd, 1)

    # -- serving -------------------------------------------------------------------------------
    def serve(self) -> int:
        assert self.ring is not None
        poller = zmq.Poller()
        poller.register(self.ring.incoming_doorbell, zmq.POLLIN)
        for fd in self.kick_fds:
            poller.register(fd, zmq.POLLIN)
        poller.register(self.control.socket, zmq.POLLIN)
        kick_index = {fd: i for i, fd in enumerate(self.kick_fds)}
        # The device's own host fds (a net device's tap, a console's input) and its timers
        # (a rate limiter's refill), kept in step with what it wants after every dispatch.
        host_fds = HostFds(poller, **HostFds.ZMQ_FLAGS) if hasattr(self.device, "poll_fds") \
            else None
        while True:
            self._drain_ring()
            timeout = 1 if self._doorbell_frozen else None
            if host_fds is not None:
                host_fds.sync(self.device.poll_fds())
                timeout = host_fds.timeout_ms(self.device.next_deadline_ns(), timeout)
            for target, revents in poller.poll(timeout):
                if host_fds is not None and host_fds.owns(target):
                    self.device.on_ready(target, host_fds.to_select(revents))
                elif target is self.control.socket:
                    code = self._drain_control()
                    if code is not None:
                        return code
                elif target == self.ring.incoming_doorbell:
                    if self._doorbell_frozen:
                        poller.unregister(target)  # keeps serving the ring by polling it
                        continue
                    drain_eventfd(target)
                elif target in kick_index:
                    if drain_eventfd(target):
                        self.counters["kicks"] += 1
                        # Posted register writes come before the kick in the guest's order
                        # (DRIVER_OK, then QueueNotify): apply them first.
                        self._drain_ring(spin=False)
                        self.device.queue_notify(kick_index[target])
            if host_fds is not None:
                host_fds.fire_timer(self.device)

    def _drain_ring(self, spin: bool = True) -> None:
        """Apply every pending slot in order; then spin a little for the next burst."""
        assert self.ring is not None
        spin_end = time.monotonic() + (self.spin_us / 1e6 if spin else 0.0)
        while True:
            slot = self.ring.try_recv()
            if slot is None:
                if time.monotonic() >= spin_end:
                    return
                continue
            self._apply(slot)
            spin_end = time.monotonic() + self.spin_us / 1e6

    def _apply(self, slot: Slot) -> None:
        assert self.ring is not None
        if slot.op is Op.WRITE:
            self.counters["ring_writes"] += 1
            self.device.write(slot.offset, slot.data)
            self.rings.register_page.set_applied(slot.seq)  # a config read may wait for it
            return
        if slot.op is Op.READ:
            self.counters["ring_reads"] += 1
            data = bytearray(slot.size)
            self.device.read(slot.offset, data)
            answer = slot.answer(bytes(data))
        else:
            self.counters["ring_syncs"] += 1
            answer = slot.answer()
        if self._garbage_next:
            self._garbage_next = False
            sent = self.ring.producer.push_raw(b"\xa5" * SLOT_SIZE)
            self.ring.ring_doorbell()
        else:
            sent = self.ring.send(answer)
        if not sent:  # the core never has more than one answer in flight: a core bug
            raise RemoteProtocolError("response ring is full")

    def _drain_control(self) -> int | None:
        while True:
            try:
                message = self.control.try_recv()
            except RemoteProtocolError as err:
                self.control.send(msg.ErrorReport(msg.E_PROTOCOL, str(err)[:1000]))
                continue
            if message is None:
                return None
            code = self._handle(message)
            if code is not None:
                return code

    def _handle(self, m: msg.Message) -> int | None:
        if isinstance(m, msg.Heartbeat):
            self.control.send(msg.HeartbeatAck(m.seq))
        elif isinstance(m, msg.Stats):
            self.control.send(msg.StatsReply(m.request_id, self._stats()))
        elif isinstance(m, msg.Shutdown):
            log.info("shutdown: %s", m.reason)
            return EXIT_OK
        elif isinstance(m, msg.Reset):
            self.device.reset()
            self.control.send(msg.Ack(m.request_id))
        elif isinstance(m, msg.Activate):
            self._activate(m)
            self.control.send(msg.Ack(m.request_id))
        elif isinstance(m, msg.Fault):
            self._fault(m)
        elif isinstance(m, msg.ErrorReport):
            log.error("core reports %s: %s", m.code, m.text)
        else:
            self.control.send(msg.ErrorReport(msg.E_PROTOCOL, f"unexpected {m.TAG}"))
        return None

    def _activate(self, m: msg.Activate) -> None:
        """Resume a predecessor's transport state (the core's shadow; see `MmioDevice`)."""
        self.device.restore_wire(m.transport_wire())
        self.device.kick_all()

    def device_features(self) -> int:
        transport = getattr(self.device, "transport", None)
        return transport.device_features if transport is not None else 0

    def _stats(self) -> dict[str, int]:
        out = dict(self.counters)
        stats = getattr(self.device, "stats", None)
        for key, value in (stats() if stats else {}).items():
            if isinstance(value, (bool, int)) and 0 <= int(value) < 1 << 64 and len(key) <= 48:
                out[key] = int(value)
        return dict(list(out.items())[:64])

    def _fault(self, m: msg.Fault) -> None:
        if not self.args.allow_faults:
            self.control.send(msg.ErrorReport(msg.E_PROTOCOL, "fault injection is disabled"))
            return
        log.warning("injecting fault %s %s", m.kind, m.args)
        if m.kind == "crash":
            os.abort()
        elif m.kind == "exit":
            os._exit(int(m.args.get("code", 3)))
        elif m.kind == "hang":
            while True:
                time.sleep(3600)
        elif m.kind == "stall_ms":
            time.sleep(int(m.args.get("ms", 100)) / 1000)
        elif m.kind == "garbage_response":
            self._garbage_next = True  # the next ring answer, and the register page at once
            page = getattr(self.device, "page", None)
            if page is not None:
                page.corrupt()
        elif m.kind == "garbage_control":
            self.control.socket.send(b"\x81\xa4type\xa7Garbage")
        elif m.kind == "syscall":
            self._forbidden_call(str(m.args.get("name", "")))
        elif m.kind == "crash_in_request":
            self._crash_in_next_request()
        elif m.kind == "flood_acks":
            for i in range(int(m.args.get("count", 50_000))):
                try:
                    self.control.send(msg.HeartbeatAck(i), timeout=0)
                except ProtocolError:
                    pass
        elif m.kind == "flood_frames":
            self._flood_frames(int(m.args.get("mib", 512)))
        elif m.kind == "grow_memory":
            hoard = []
            while True:  # until the kernel stops us (the device's memory limit)
                hoard.append(bytearray(b"\x01" * (16 << 20)))
        elif m.kind == "spin":
            end = time.monotonic() + int(m.args.get("ms", 1000)) / 1000
            while time.monotonic() < end:
                pass
        elif m.kind == "fill_doorbell":
            assert self.ring is not None
            # The counter's maximum, and then we stop draining it (a compromised device would).
            os.eventfd_write(self.ring.incoming_doorbell, 0xFFFF_FFFF_FFFF_FFFE)
            self._doorbell_frozen = True

    def _flood_frames(self, mib: int) -> None:
        """What a compromised device can do to whoever receives its channel: raw ZMTP frames
        that all say "more" (MAXMSGSIZE bounds a frame, not a message), written straight to the
        connection's socket under libzmq's feet."""
        import select
        import stat
        import struct
        fd = next((f for f in range(3, 256) if _is_socket(f, stat)), None)
        if fd is None:
            return
        chunk = b"\x03" + struct.pack(">Q", 60_000) + b"\xa5" * 60_000  # MORE | LONG
        left = mib * (1 << 20) // len(chunk)
        while left > 0:
            select.select([], [fd], [], 1.0)
            try:
                os.write(fd, chunk)
                left -= 1
            except BlockingIOError:
                continue
            except OSError:
                return  # the receiver is gone: the flood has done what it could

    def _crash_in_next_request(self) -> None:
        """Abort inside the next request: after the device has executed it (a blk write is on
        disk) but before it is returned on the used ring, so the guest has not seen it complete
        and a restarted device must run it again."""
        virtio = getattr(self.device, "device", None)
        if virtio is None:
            self.control.send(msg.ErrorReport(msg.E_PROTOCOL, "this device has no request path"))
            return
        handle = virtio.handle_chain

        def handle_then_abort(queue_index: int, chain: Any) -> int:
            handle(queue_index, chain)
            os.abort()

        virtio.handle_chain = handle_then_abort
        virtio.native = False  # the next request through handle_chain, not the C loop

    def _forbidden_call(self, name: str) -> None:
        """Attempt a call the jail forbids.  In seccomp kill/trap mode we die here (the core sees
        SIGSYS, or the syscall's name in trap mode); if we survive (log/off mode, or an unjailed
        device), an ErrorReport says what happened."""
        if name not in SYSCALL_FAULTS:
            self.control.send(msg.ErrorReport(msg.E_PROTOCOL, f"unknown syscall fault {name!r}"))
            return
        target = _FaultTarget(self.args.parent_pid, self.irqfd)
        try:
            result = jail_probe.VIOLATIONS[SYSCALL_FAULTS[name]](target)  # type: ignore[arg-type]
            outcome = f"returned {result!r}"
        except OSError as err:
            outcome = f"failed: {err}"
        self.control.send(msg.ErrorReport(msg.E_DEVICE, f"syscall {name}: survived, {outcome}"[:1000]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s dev:{args.name}[{host_pid()}] %(levelname)s %(message)s")
    set_process_title(args.name)
    arm_parent_death(args.parent_pid)
    import socket
    bootstrap = socket.socket(fileno=args.bootstrap_fd)
    try:
        fds = fdpass.recv_bundle(bootstrap, timeout=args.bootstrap_timeout)
    except ProtocolError as err:
        log.error("no fds from the core: %s", err)
        return EXIT_BOOTSTRAP
    finally:
        bootstrap.close()

    context = zmq.Context()
    # Never reconnect: a reconnect needs socket(2)/connect(2), which the jail forbids.  The
    # Configure below proves the one connection we need is up before the jail is entered.
    context.setsockopt(zmq.RECONNECT_IVL, -1)

    def connect() -> ControlClient:  # the first socket starts libzmq's threads
        return ControlClient(args.control, args.identity.encode(), context=context)

    try:
        # Jailed, libzmq's threads start capability-less but for CAP_SETUID/SETGID (see
        # `start_library_threads`): enter_jail below drops the main thread's own.
        control = start_library_threads(connect) if jailed() else connect()
    except JailError as err:
        log.error("%s", err)
        return EXIT_ERROR
    channel_log = ChannelLogHandler(control)
    logging.getLogger().addHandler(channel_log)
    try:
        control.send(msg.Hello(msg.PROTOCOL_MAJOR, msg.PROTOCOL_MINOR, args.name,
                               args.device_type, host_pid()))
        config = control.recv(args.bootstrap_timeout)
        if not isinstance(config, msg.Configure):
            raise RemoteProtocolError(f"expected Configure, got {config.TAG}")
        host = DeviceHost(args, fds, control, load_factory(args.factory))
        try:
            host.configure(config)
        except Exception as err:  # a bad spec or path: tell the core why, then exit
            control.send(msg.ErrorReport(msg.E_CONFIG, f"{type(err).__name__}: {err}"[:1000]))
            return EXIT_ERROR

        # ---- JAIL ENTRY POINT -------------------------------------------------------------------
        # Everything is imported, every fd we keep is open (the host resources were duplicated
        # by the device above), the control connection is proven up.
        # Nothing guest-controlled has been read yet.  enter_jail: tmpfs root + pivot_root,
        # capabilities dropped, rlimits, no_new_privs, seccomp on every thread (TSYNC: libzmq's
        # I/O threads too).  Not sandbox's two-phase entry: Configure (what to open) arrives over
        # ZeroMQ, so the connection predates the jail; libzmq's threads keep CAP_SETUID/SETGID,
        # in our user namespace only, where only uid/gid 0 exist and set*id is forbidden.
        if jailed():
            try:
                enter_jail()
            except JailError as err:
                log.error("%s", err)
                control.send(msg.ErrorReport(E_JAIL, str(err)[:1000]), timeout=0.5)
                return EXIT_ERROR
        # -----------------------------------------------------------------------------------------

        control.send(msg.Ready(config.request_id, host.device_features()))
        return host.serve()
    except ProtocolError as err:
        log.error("control channel: %s", err)
        try:
            control.send(msg.ErrorReport(msg.E_PROTOCOL, str(err)[:1000]), timeout=0.1)
        except ProtocolError:
            pass
        return EXIT_ERROR
    except Exception as err:  # a device bug: report it as code + text, then exit for a restart
        log.exception("device failed")
        try:
            control.send(msg.ErrorReport(msg.E_DEVICE, f"{type(err).__name__}: {err}"[:1000]),
                         timeout=0.1)
        except ProtocolError:
            pass
        return EXIT_ERROR
    finally:
        logging.getLogger().removeHandler(channel_log)
        control.close()
        # Terminating the context is what delivers a last message (ErrorReport, Ack) within the
        # socket's linger: a device forked by the zygote ends in os._exit, with no interpreter
        # shutdown to do it implicitly.
        context.term()


if __name__ == "__main__":
    sys.exit(main())
