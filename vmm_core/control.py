"""The VM control endpoint: `bulkhead ps|stats|stop|fault` talking to a running VM.

The core binds a ZeroMQ ROUTER at `ipc://<runtime dir>/vm.sock` (the runtime directory is the
VM's private 0700 directory, the socket file 0600) and registers the VM by name
(`vmm_core.registry`).  One thread serves it: receive a request (`control_protocol`, a closed and
validated set), answer with one `Reply`.  ROUTER rather than REP: a client that sends garbage or
vanishes mid-request cannot wedge a REP state machine; every request is answered or dropped on
its own.

It asks the devices only what `DeviceManager` offers (`ps`, `stats`, `inject_fault`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import zmq

from ipc_protocol.errors import ProtocolError, RemoteProtocolError

from . import control_protocol as cp
from . import registry
from .errors import BulkheadError
from .vcpu import StopReason, StopRequest

if TYPE_CHECKING:
    from .vm import Machine

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 5.0     # seconds a CLI waits for the VM's answer


class ControlError(BulkheadError):
    """A control request could not be made or was refused (message = one line for the user)."""


class ControlEndpoint(threading.Thread):
    """Serves one VM's control socket until `close()`."""

    def __init__(self, machine: "Machine") -> None:
        super().__init__(name="control", daemon=True)
        self.machine = machine
        self.endpoint = f"ipc://{machine.runtime_dir}/vm.sock"
        self._context = zmq.Context.instance()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, cp.MAX_REQUEST_BYTES + 256)
        self._sock.bind(self.endpoint)
        os.chmod(self.endpoint[len("ipc://"):], 0o600)
        self._closing = threading.Event()
        self.entry = registry.register(machine.name, machine.runtime_dir)

    def run(self) -> None:
        while not self._closing.is_set():
            if not self._sock.poll(200):
                continue
            frames = self._sock.recv_multipart()
            # A REQ client's envelope: [routing id, empty delimiter, payload].
            if len(frames) != 3 or frames[1] != b"":
                continue
            peer, _, payload = frames
            try:
                reply = self.handle(cp.decode_request(payload))
            except RemoteProtocolError as err:
                reply = cp.Reply(False, f"bad request: {err}")
            except Exception as err:  # noqa: BLE001 - a failing request must not end the endpoint
                log.exception("control request failed")
                reply = cp.Reply(False, f"internal error: {type(err).__name__}: {err}")
            try:
                self._sock.send_multipart([peer, b"", cp.encode_reply(reply)], flags=zmq.NOBLOCK)
            except (zmq.ZMQError, ProtocolError):
                pass  # the client went away

    # -- requests ----------------------------------------------------------------------------------
    def handle(self, req: cp.Request) -> cp.Reply:
        devices = self.machine.devices
        if isinstance(req, cp.Ps):
            return cp.Reply(True, body=self._summary(devices.ps()))
        if isinstance(req, cp.GetStats):
            return cp.Reply(True, body=self._summary(devices.stats()))
        if isinstance(req, cp.Stop):
            self.machine.request_stop(StopRequest(StopReason.POWEROFF, "stopped by `bulkhead stop`"))
            return cp.Reply(True, body={"stopping": self.machine.name})
        if isinstance(req, cp.InjectFault):
            try:
                text = devices.inject_fault(req.device, req.action, req.ms)
            except BulkheadError as err:
                return cp.Reply(False, f"VM {self.machine.name}: {err}")
            except ProtocolError as err:
                return cp.Reply(False, f"could not reach device {req.device}: {err}")
            return cp.Reply(True, body={"done": text})
        return cp.Reply(False, f"unsupported request {req.TAG}")

    def _summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": self.machine.name, "pid": os.getpid(),
                "sandbox": self.machine.devices.sandbox, "devices": rows}

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(2.0)
        self._sock.close(linger=0)
        registry.unregister(self.entry)


# -- client ------------------------------------------------------------------------------------------

def request(vm_name: str, req: cp.Request, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Send `req` to the VM called `vm_name`; its reply body, or `ControlError`."""
    entry = registry.lookup(vm_name)
    if entry is None:
        known = ", ".join(e.name for e in registry.running()) or "none"
        raise ControlError(f"no running VM named {vm_name!r} (running: {known})")
    return request_entry(entry, req, timeout)


def request_entry(entry: registry.VmEntry, req: cp.Request,
                  timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, cp.MAX_REPLY_BYTES + 256)
    try:
        sock.connect(entry.endpoint)
        sock.send(cp.encode_request(req))
        if not sock.poll(int(timeout * 1000)):
            raise ControlError(f"VM {entry.name} (pid {entry.pid}) did not answer within {timeout:.0f} s")
        try:
            reply = cp.decode_reply(sock.recv())
        except RemoteProtocolError as err:
            raise ControlError(f"VM {entry.name} sent an invalid reply: {err}") from None
    finally:
        sock.close(linger=0)
    if not reply.ok:
        raise ControlError(reply.error)
    return reply.body
