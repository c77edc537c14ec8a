"""The sans-I/O vsock connection: states, credit (§5.10.6.3) and shutdown (§5.10.6.5)."""

from __future__ import annotations

import pytest

from device_procs.virtio import vsock_conn as vc
from device_procs.virtio import vsock_packet as vp
from device_procs.virtio.vsock_conn import State, Verdict, VsockConnection
from device_procs.virtio.vsock_packet import VsockHeader

CID = 7
HOST_PORT, GUEST_PORT = 5000, 1234
NOW = 10**12


def guest(op: int, length: int = 0, flags: int = 0, buf_alloc: int = 65536,
          fwd_cnt: int = 0) -> VsockHeader:
    """A packet of the flow, from the guest."""
    return VsockHeader(src_cid=CID, dst_cid=2, src_port=GUEST_PORT, dst_port=HOST_PORT, len=length,
                       type=vp.VIRTIO_VSOCK_TYPE_STREAM, op=op, flags=flags, buf_alloc=buf_alloc,
                       fwd_cnt=fwd_cnt)


def drain(conn: VsockConnection) -> list[VsockHeader]:
    out = []
    while (h := conn.take_control()) is not None:
        out.append(h)
    return out


def ops(headers: list[VsockHeader]) -> list[int]:
    return [h.op for h in headers]


def established(buf_alloc: int = 65536) -> VsockConnection:
    """A guest-initiated connection the broker accepted, RESPONSE delivered."""
    conn = VsockConnection.guest_initiated(guest(vp.VIRTIO_VSOCK_OP_REQUEST, buf_alloc=buf_alloc), NOW)
    conn.broker_connected()
    assert ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_RESPONSE]
    return conn


# -- handshakes -----------------------------------------------------------------------------------
def test_host_initiated_handshake():
    conn = VsockConnection.host_initiated(HOST_PORT, GUEST_PORT, CID, NOW)
    assert conn.state is State.HOST_CONNECTING and conn.key == (HOST_PORT, GUEST_PORT)
    assert not conn.guest_knows() and conn.read_budget() == 0
    (req,) = drain(conn)
    assert (req.op, req.src_cid, req.src_port, req.dst_cid, req.dst_port) == (
        vp.VIRTIO_VSOCK_OP_REQUEST, 2, HOST_PORT, CID, GUEST_PORT)
    assert (req.buf_alloc, req.fwd_cnt, req.type) == (vc.BUF_ALLOC, 0, vp.VIRTIO_VSOCK_TYPE_STREAM)
    assert conn.guest_knows()
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RESPONSE, buf_alloc=4096)) is Verdict.CONNECTED
    assert conn.state is State.ESTABLISHED and conn.deadline_ns is None
    assert conn.next_to_host() == b"OK 5000\n" and conn.wants_write()
    assert conn.read_budget() == 4096
    conn.wrote(3)                      # a partial write of the preamble
    assert conn.next_to_host() == b"5000\n" and conn.fwd_cnt == 0  # not guest payload
    conn.wrote(5)
    assert not conn.wants_write()


def test_response_before_our_request_went_out_is_a_protocol_error():
    conn = VsockConnection.host_initiated(HOST_PORT, GUEST_PORT, CID, NOW)
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RESPONSE)) is Verdict.RESET
    assert conn.state is State.CLOSED and drain(conn) == []  # the guest never heard of it


def test_guest_refusing_our_request():
    conn = VsockConnection.host_initiated(HOST_PORT, GUEST_PORT, CID, NOW)
    drain(conn)
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RST)) is Verdict.FORGET
    assert conn.state is State.CLOSED and not conn.has_control()


def test_guest_initiated_waits_for_the_broker_then_responds():
    conn = VsockConnection.guest_initiated(guest(vp.VIRTIO_VSOCK_OP_REQUEST, buf_alloc=9000), NOW)
    assert conn.state is State.GUEST_CONNECTING and conn.peer_free() == 9000
    assert conn.guest_knows() and not conn.has_control()
    conn.broker_connected()
    assert conn.read_budget() == 0  # no RW before the guest has our RESPONSE
    (resp,) = drain(conn)
    assert (resp.op, resp.src_port, resp.dst_port) == (vp.VIRTIO_VSOCK_OP_RESPONSE, HOST_PORT, GUEST_PORT)
    assert conn.read_budget() == 9000


def test_broker_refusal_resets():
    conn = VsockConnection.guest_initiated(guest(vp.VIRTIO_VSOCK_OP_REQUEST), NOW)
    conn.abort()
    assert ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_RST]


def test_deadlines_only_while_connecting():
    conn = VsockConnection.host_initiated(HOST_PORT, GUEST_PORT, CID, NOW)
    assert not conn.expired(NOW + vc.CONNECT_TIMEOUT_NS - 1) and conn.expired(NOW + vc.CONNECT_TIMEOUT_NS)
    g = VsockConnection.guest_initiated(guest(vp.VIRTIO_VSOCK_OP_REQUEST), NOW)
    assert g.expired(NOW + vc.BROKER_TIMEOUT_NS)
    assert not established().expired(NOW + 10**15)


@pytest.mark.parametrize("op", [vp.VIRTIO_VSOCK_OP_RW, vp.VIRTIO_VSOCK_OP_SHUTDOWN,
                                vp.VIRTIO_VSOCK_OP_REQUEST])
def test_packets_out_of_place_reset(op):
    conn = VsockConnection.host_initiated(HOST_PORT, GUEST_PORT, CID, NOW)
    drain(conn)
    assert conn.receive(guest(op)) is Verdict.RESET
    assert ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_RST]


# -- credit (§5.10.6.3) ----------------------------------------------------------------------------
def test_peer_free_formula_with_wraparound():
    conn = established(buf_alloc=1000)
    conn.tx_cnt = 5
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=0xFFFFFFF0))
    assert conn.peer_free() == 1000 - 21  # tx_cnt wrapped past 2**32
    # A guest claiming to have forwarded more than we sent gets no credit at all.
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=6))
    assert conn.peer_free() == 0 and conn.read_budget() == 0


def test_running_out_of_credit_asks_once():
    conn = established(buf_alloc=100)
    h = conn.sent_data(60)
    assert (h.op, h.len, h.buf_alloc) == (vp.VIRTIO_VSOCK_OP_RW, 60, vc.BUF_ALLOC)
    assert not conn.has_control()
    conn.sent_data(40)
    assert conn.peer_free() == 0 and ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_CREDIT_REQUEST]
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=0))
    assert not conn.has_control()  # still nothing: no second request
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=30))
    assert conn.read_budget() == 30 and not conn.credit_requested
    with pytest.raises(AssertionError):
        conn.sent_data(31)  # the device never sends beyond the credit


def test_guest_data_within_and_beyond_our_credit():
    conn = established()
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, vc.BUF_ALLOC - 1)) is Verdict.DATA
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 1)) is Verdict.DATA  # exactly BUF_ALLOC
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 1)) is Verdict.OVER_LIMIT
    assert conn.state is State.CLOSED and ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_RST]


def test_credit_counts_from_what_the_guest_was_told():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 60000))
    conn.forwarded_direct(60000)          # written, but the guest has not heard it yet
    for _ in range(3):
        assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 60000)) is Verdict.DATA
        conn.forwarded_direct(60000)
    # 240000 of 262144 used by the advertised fwd_cnt of 0; the update is pending, not delivered.
    assert vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE in conn.pending
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 30000)) is Verdict.OVER_LIMIT


def test_credit_update_after_a_quarter_is_forwarded():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, vc.CREDIT_UPDATE_THRESHOLD))
    conn.buffer(bytes(vc.CREDIT_UPDATE_THRESHOLD))
    conn.wrote(vc.CREDIT_UPDATE_THRESHOLD - 1)
    assert not conn.has_control()
    conn.wrote(1)
    (upd,) = drain(conn)
    assert (upd.op, upd.fwd_cnt, upd.buf_alloc) == (vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                                                    vc.CREDIT_UPDATE_THRESHOLD, vc.BUF_ALLOC)
    assert conn.advertised_fwd_cnt == vc.CREDIT_UPDATE_THRESHOLD
    # Now the guest may send a whole BUF_ALLOC again.
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, vc.BUF_ALLOC)) is Verdict.DATA


def test_a_data_packet_carries_the_update_an_unrequested_one_is_dropped():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, vc.CREDIT_UPDATE_THRESHOLD))
    conn.forwarded_direct(vc.CREDIT_UPDATE_THRESHOLD)
    assert conn.has_control()
    h = conn.sent_data(10)
    assert h.fwd_cnt == vc.CREDIT_UPDATE_THRESHOLD and not conn.has_control()


def test_credit_request_is_answered_even_if_nothing_changed():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_CREDIT_REQUEST))
    conn.sent_data(10)                      # does not replace an asked-for update
    (upd,) = drain(conn)
    assert upd.op == vp.VIRTIO_VSOCK_OP_CREDIT_UPDATE and upd.fwd_cnt == 0


# -- shutdown (§5.10.6.5) ----------------------------------------------------------------------------
def test_guest_shut_send_flushes_then_shuts_the_host_write_side():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 5))
    conn.buffer(b"hello")
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_SHUTDOWN, flags=vp.VIRTIO_VSOCK_SHUTDOWN_SEND)) is Verdict.OK
    assert not conn.host_write_due()        # bytes still queued
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 1)) is Verdict.RESET  # "will not send" is final


def test_guest_shut_send_then_host_may_still_talk():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_SHUTDOWN, flags=vp.VIRTIO_VSOCK_SHUTDOWN_SEND))
    assert conn.host_write_due()
    conn.host_write_shut = True
    assert conn.state is State.ESTABLISHED and conn.read_budget() > 0
    # The hints are permanent: flags 0 later change nothing.
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_SHUTDOWN, flags=0))
    assert conn.guest_shut == vp.VIRTIO_VSOCK_SHUTDOWN_SEND
    conn.on_host_eof()
    assert conn.finished()
    conn.close_clean()
    assert ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_SHUTDOWN, vp.VIRTIO_VSOCK_OP_RST]


def test_guest_shut_both_with_queued_bytes_finishes_after_the_flush():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 4))
    conn.buffer(b"data")
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_SHUTDOWN, flags=vp.SHUTDOWN_BOTH))
    assert conn.state is State.CLOSING and conn.read_budget() == 0 and not conn.finished()
    assert conn.wants_write()
    conn.wrote(4)
    assert conn.finished()
    conn.close_clean()
    assert conn.state is State.CLOSED and ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_RST]


def test_host_eof_sends_shutdown_send():
    conn = established()
    conn.on_host_eof()
    conn.on_host_eof()  # once
    (sd,) = drain(conn)
    assert (sd.op, sd.flags) == (vp.VIRTIO_VSOCK_OP_SHUTDOWN, vp.VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert conn.read_budget() == 0 and conn.state is State.ESTABLISHED
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_SHUTDOWN, flags=vp.SHUTDOWN_BOTH))
    assert conn.finished()


def test_host_eof_after_guest_shut_rcv_sends_nothing():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_SHUTDOWN, flags=vp.VIRTIO_VSOCK_SHUTDOWN_RCV))
    assert conn.read_budget() == 0  # the guest will not receive: stop reading the host
    conn.on_host_eof()
    assert not conn.has_control()


def test_closed_connection_ignores_all_but_rst():
    conn = established()
    conn.abort()
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 10)) is Verdict.OK
    assert conn.receive(guest(vp.VIRTIO_VSOCK_OP_RST)) is Verdict.FORGET
    assert not conn.wants_write() and conn.read_budget() == 0


def test_abort_drops_queued_bytes_and_other_controls():
    conn = established()
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_RW, 4))
    conn.buffer(b"lost")
    conn.receive(guest(vp.VIRTIO_VSOCK_OP_CREDIT_REQUEST))
    conn.abort()
    assert not conn.has_to_host() and ops(drain(conn)) == [vp.VIRTIO_VSOCK_OP_RST]
