"""A hostile vhost-user backend for tests: a man in the middle between the core (the frontend)
and a real backend, which relays every message (fds included) and breaks the protocol in a
planned way on chosen connections.

    proxy = HostileProxy(listen_path, backend_path, ["clean", "bad-size", "extra-fds", ...])
    proxy.start()          # connection k follows plan[k] (the last entry repeats)
    proxy.drop()           # close the current connection (the core must reconnect)

Plans: "clean" relays faithfully; "bad-size" answers GET_FEATURES with a 4-byte payload;
"extra-fds" attaches an fd to the GET_PROTOCOL_FEATURES reply; "channel-unknown" sends request
99 on the backend channel right after relaying SET_SLAVE_REQ_FD; "unsolicited" sends a reply
nobody asked for after the first SET_VRING_ENABLE; "silent" never answers GET_FEATURES;
"config-change" relays faithfully and, after the first SET_VRING_ENABLE, sends the frontend a
CONFIG_CHANGE_MSG (with NEED_REPLY) on the backend channel, as a backend whose disk grew would.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import ProtocolError
from ipc_protocol.transport.vhost_user_socket import VhostUserSocket, close_fds

PLANS = ("clean", "bad-size", "extra-fds", "channel-unknown", "unsolicited", "silent",
         "config-change")


class HostileProxy:
    def __init__(self, path: str, backend: str, plan: list[str]) -> None:
        if not plan or any(p not in PLANS for p in plan):
            raise ValueError(f"plans are {', '.join(PLANS)}")
        self.path, self.backend, self.plan = path, backend, plan
        self.connections = 0
        self.events: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(path)
        self._listener.listen(4)
        self._current: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drop(self) -> None:
        for s in list(self._current):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.drop()
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stop:
            try:
                front, _ = self._listener.accept()
            except OSError:
                return
            plan = self.plan[min(self.connections, len(self.plan) - 1)]
            self.connections += 1
            back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                back.connect(self.backend)
            except OSError:
                front.close()
                back.close()
                continue
            self._current = [front, back]
            try:
                self._relay(front, back, plan)
            except (ProtocolError, OSError) as err:
                self.events.append(f"{plan}: ended ({err})")
            finally:
                front.close()
                back.close()
                self._current = []

    def _relay(self, front_sock: socket.socket, back_sock: socket.socket, plan: str) -> None:
        front = VhostUserSocket(front_sock, vu.Channel.FRONTEND, incoming="requests")
        back = VhostUserSocket(back_sock, vu.Channel.FRONTEND, incoming="replies")
        enabled = False
        channel = -1
        while True:
            msg = front.recv()
            if plan == "silent" and msg.request == vu.Request.GET_FEATURES:
                self.events.append("silent: GET_FEATURES left unanswered")
                close_fds(msg.fds)
                front.recv()  # until the core gives up and closes
                continue
            if plan == "config-change" and msg.request == vu.Request.SET_SLAVE_REQ_FD:
                channel = os.dup(msg.fds[0])  # the frontend's end: ours to speak on, too
            if plan == "channel-unknown" and msg.request == vu.Request.SET_SLAVE_REQ_FD:
                # request 99 does not exist on the backend channel
                os.write(msg.fds[0], struct.pack("=III", 99, vu.VHOST_USER_VERSION, 0))
                self.events.append("channel-unknown: sent request 99")
            try:
                reply = back.request(msg)
            finally:
                close_fds(msg.fds)
            if reply is None:
                continue
            if plan == "bad-size" and msg.request == vu.Request.GET_FEATURES:
                front_sock.sendall(struct.pack("=III", msg.request, vu.VHOST_USER_VERSION | vu.FLAG_REPLY, 4)
                                   + b"\0" * 4)
                self.events.append("bad-size: 4-byte GET_FEATURES reply")
                close_fds(reply.fds)
                continue
            if plan == "extra-fds" and msg.request == vu.Request.GET_PROTOCOL_FEATURES:
                data, _ = vu.encode(reply)
                fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    socket.send_fds(front_sock, [data], [fd])
                finally:
                    os.close(fd)
                self.events.append("extra-fds: an fd on the GET_PROTOCOL_FEATURES reply")
                continue
            try:
                front.send(reply)
            finally:
                close_fds(reply.fds)
            if plan == "config-change" and msg.request == vu.Request.SET_VRING_ENABLE and not enabled:
                enabled = True
                ch = VhostUserSocket(socket.socket(fileno=channel), vu.Channel.BACKEND,
                                     incoming="replies")
                try:
                    ack = ch.request(vu.request(vu.BackendRequest.CONFIG_CHANGE_MSG, need_reply=True,
                                                channel=vu.Channel.BACKEND))
                    self.events.append(f"config-change: sent, acked {ack.payload!r}")
                finally:
                    ch.close()
            if plan == "unsolicited" and msg.request == vu.Request.SET_VRING_ENABLE and not enabled:
                enabled = True
                front.send(vu.Message(vu.Request.GET_FEATURES, vu.U64Value(0),
                                      vu.VHOST_USER_VERSION | vu.FLAG_REPLY, (), vu.Channel.FRONTEND))
                self.events.append("unsolicited: a GET_FEATURES reply nobody asked for")
