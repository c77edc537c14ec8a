"""The VM control endpoint: the HTTP API of a running VM (`bulkhead ps|stats|stop|fault`, curl).

The core serves HTTP/1.1 on `<runtime dir>/api.sock` (the runtime directory is the VM's private
0700 directory, the socket 0600) and registers the VM by name (`vmm_core.registry`); the routes
and their JSON are `control_protocol` (sans-I/O).  One thread serves one connection at a time,
each with a 5 s deadline and `Connection: close`: a client that sends garbage or stalls costs
at most that, and cannot wedge the endpoint.  Requests are bounded (4 KiB body, the standard
library's header limits), chunked bodies are refused.

    curl --unix-socket <runtime dir>/api.sock http://localhost/api/v1/vm.info

It asks the devices only what `DeviceManager` offers (`ps`, `stats`, `inject_fault`).
"""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Any

from ipc_protocol.errors import ProtocolError, RemoteProtocolError

from . import control_protocol as cp
from . import registry
from .errors import BulkheadError
from .vcpu import StopReason, StopRequest

if TYPE_CHECKING:
    from .vm import Machine

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 5.0     # seconds a CLI waits for the VM's answer
CONNECTION_TIMEOUT = 5.0  # seconds a client may take to send its request


class ControlError(BulkheadError):
    """A control request could not be made or was refused (message = one line for the user)."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bulkhead"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT
    endpoint: "ControlEndpoint"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass

    def _answer(self, status: int, data: bytes) -> None:
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self._refuse(411, "give a Content-Length (chunked bodies are not accepted)")
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._refuse(400, "Content-Length is not a number")
            return None
        if not 0 <= length <= cp.MAX_REQUEST_BYTES:
            self._refuse(413, f"request body of {length} bytes exceeds {cp.MAX_REQUEST_BYTES}")
            return None
        return self.rfile.read(length) if length else b""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (a garbage request line, headers too long, an unknown
        method) as our JSON, always with a status line."""
        self.request_version = "HTTP/1.1"  # the stdlib answers an unparsable line as HTTP/0.9
        self._refuse(code, message or self.responses.get(code, ("error",))[0])

    def _refuse(self, status: int, message: str) -> None:
        self._answer(status, cp.reply_to_http(cp.Reply(False, message, status=status))[1])

    def _any(self) -> None:
        body = self._read_body()
        if body is not None:
            self._answer(*self.endpoint.serve_http(self.command, self.path, body))

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _any


class _Server(socketserver.UnixStreamServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("control connection failed", exc_info=True)


class ControlEndpoint(threading.Thread):
    """Serves one VM's HTTP API until `close()`."""

    def __init__(self, machine: "Machine") -> None:
        super().__init__(name="control", daemon=True)
        self.machine = machine
        self.path = os.path.join(str(machine.runtime_dir), registry.API_SOCKET)
        handler = type("Handler", (_Handler,), {"endpoint": self})
        self._server = _Server(self.path, handler, bind_and_activate=False)
        try:
            old = os.umask(0o177)  # the socket is 0600 from the start
            try:
                self._server.server_bind()
            finally:
                os.umask(old)
            self._server.server_activate()
        except BaseException:
            self._server.server_close()
            raise
        self._closing = threading.Event()
        self.entry = registry.register(machine.name, machine.runtime_dir)

    def run(self) -> None:
        self._server.timeout = 0.2
        while not self._closing.is_set():
            self._server.handle_request()

    def serve_http(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            reply = self.handle(cp.from_http(method, path.split("?", 1)[0], body))
        except cp.HttpError as err:
            reply = cp.Reply(False, str(err), status=err.status)
        except Exception as err:  # noqa: BLE001 - a failing request must not end the endpoint
            log.exception("control request failed")
            reply = cp.Reply(False, f"internal error: {type(err).__name__}: {err}", status=500)
        return cp.reply_to_http(reply)

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
        if isinstance(req, cp.Pause):
            if not self.machine.pause():
                return cp.Reply(False, f"VM {self.machine.name}: a vCPU did not stop", status=500)
            return cp.Reply(True, body={"state": "paused"})
        if isinstance(req, cp.PowerButton):
            self.machine.press_power_button()
            return cp.Reply(True, body={"pressed": True})
        if isinstance(req, cp.Resume):
            self.machine.resume()
            return cp.Reply(True, body={"state": "running"})
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
                "state": "paused" if self.machine.paused else "running",
                "sandbox": self.machine.devices.sandbox, "devices": rows}

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(2.0)
        self._server.server_close()
        registry.unregister(self.entry)


# -- client ------------------------------------------------------------------------------------------

def request(vm_name: str, req: cp.Request, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Send `req` to the VM called `vm_name`; its reply body, or `ControlError`."""
    entry = registry.lookup(vm_name)
    if entry is None:
        known = ", ".join(e.name for e in registry.running()) or "none"
        raise ControlError(f"no running VM named {vm_name!r} (running: {known})")
    return request_entry(entry, req, timeout)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def request_entry(entry: registry.VmEntry, req: cp.Request,
                  timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    method, path, body = cp.to_http(req)
    conn = _UnixConnection(entry.api_socket, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        data = response.read(cp.MAX_REPLY_BYTES + 1)
        reply = cp.reply_from_http(response.status, data)
    except (TimeoutError, socket.timeout):
        raise ControlError(f"VM {entry.name} (pid {entry.pid}) did not answer within {timeout:.0f} s") from None
    except (OSError, http.client.HTTPException) as err:
        raise ControlError(f"VM {entry.name} (pid {entry.pid}): cannot reach its API: {err}") from None
    except RemoteProtocolError as err:
        raise ControlError(f"VM {entry.name} sent an invalid reply: {err}") from None
    finally:
        conn.close()
    if not reply.ok:
        raise ControlError(reply.error)
    return reply.body
