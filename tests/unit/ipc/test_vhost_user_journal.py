"""The session journal between a vhost-user device process and its launcher: what is kept, what
is dropped, what is replayed, and the bounds on what a device may make the launcher hold."""

from __future__ import annotations

import os
import select
import socket

import pytest

from ipc_protocol import vhost_user as vu
from ipc_protocol import vhost_user_journal as j
from ipc_protocol.transport.fds import socketpair


@pytest.fixture
def pair():
    launcher, device = socketpair()
    yield launcher, j.DeviceJournal(device.detach())
    launcher.close()


def take_all(session: j.SessionJournal, sock: socket.socket) -> None:
    while select.select([sock], [], [], 0)[0]:
        assert session.take(sock)


def test_requests_are_kept_with_their_fds_and_pure_ones_dropped_once_answered(pair):
    launcher, device = pair
    session = j.SessionJournal()
    r, w = os.pipe()
    device.record(vu.request(vu.Request.SET_OWNER)); device.done()
    device.record(vu.request(vu.Request.GET_FEATURES)); device.done()
    device.record(vu.request(vu.Request.SET_VRING_CALL, vu.VringFd(0, False), fds=[w])); device.done()
    device.record(vu.request(vu.Request.GET_CONFIG, vu.Config(0, 6, 0, bytes(6))))  # unanswered
    os.close(w)
    take_all(session, launcher)
    assert [rec.request for rec in session.records] == [vu.Request.SET_OWNER,
                                                       vu.Request.SET_VRING_CALL,
                                                       vu.Request.GET_CONFIG]
    assert session.open_record and session.fd_count() == 1
    os.write(session.records[1].fds[0], b"k")  # the launcher holds a working copy of the fd
    assert os.read(r, 1) == b"k"

    # A fresh process gets them back, the unanswered last one marked as such.
    session.play(launcher)
    replay = device.replay()
    assert [(m.request, unfinished) for m, unfinished in replay] == [
        (vu.Request.SET_OWNER, False), (vu.Request.SET_VRING_CALL, False), (vu.Request.GET_CONFIG, True)]
    fd = replay[1][0].fds[0]
    os.write(fd, b"z")
    assert os.read(r, 1) == b"z"
    os.close(fd)
    session.clear()
    os.close(r)
    assert session.records == [] and session.fd_count() == 0


def test_a_flooding_device_makes_the_session_unresumable_not_the_launcher_fat(pair):
    launcher, device = pair
    session = j.SessionJournal()
    launcher.setblocking(False)
    for _ in range(j.MAX_RECORDS + 2):
        device.record(vu.request(vu.Request.SET_OWNER))
        assert session.take(launcher)
    assert session.overflow is not None and "requests" in session.overflow
    assert session.records == []
    device.record(vu.request(vu.Request.SET_OWNER))  # nothing is kept any more
    assert session.take(launcher) and session.records == []


def test_unknown_records_and_eof(pair):
    launcher, device = pair
    session = j.SessionJournal()
    launcher.setblocking(False)
    device.sock.send(b"X garbage")
    assert session.take(launcher)
    assert session.overflow is not None and "should not" in session.overflow
    device.close()
    assert session.take(launcher) is False  # EOF: the device is gone


def test_a_record_too_large_is_refused(pair):
    launcher, device = pair
    session = j.SessionJournal()
    launcher.setblocking(False)
    device.sock.send(j.MESSAGE + bytes(j.MAX_RECORD + 10))
    assert session.take(launcher) and session.overflow is not None


def test_replay_refuses_a_bad_record(pair):
    launcher, device = pair
    j.send_record(launcher, b"Q")
    with pytest.raises(Exception, match="unexpected record"):
        device.replay()
