"""Unit tests of the vhost-user frontend's pure parts: the ring watch and the device specs."""

from __future__ import annotations

import random
import struct

import pytest

from ipc_protocol.kinds import KINDS
from vmm_core.devices.frontend import frontend_spec
from vmm_core.devices.spec import parse_device_arg
from vmm_core.errors import ConfigError
from vmm_core.vhost_frontend.ring_watch import RingWatch


class Rings:
    """A split ring's two index/slot arrays, played by a test driver and a test backend."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.avail = [0] * size
        self.used = [0] * size
        self.avail_idx = self.used_idx = 0

    def publish(self, head: int) -> None:
        self.avail[self.avail_idx % self.size] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def complete(self, head: int) -> None:
        self.used[self.used_idx % self.size] = head
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def sample(self, watch: RingWatch) -> None:
        watch.sample(lambda: self.used_idx, lambda: self.avail_idx,
                     lambda slot: self.avail[slot], lambda slot: self.used[slot])


def test_out_of_order_completion_leaves_exactly_the_outstanding_heads():
    r, w = Rings(8), RingWatch(8)
    for head in (0, 1, 2):
        r.publish(head)
    r.complete(2)  # qemu-storage-daemon: a later request finishes first
    r.sample(w)
    assert list(w.outstanding) == [0, 1]
    assert w.consistent(r.avail_idx, r.used_idx)
    # the used index says 1, so the naive resume would re-run avail[1..3) = heads 1, 2
    assert w.resubmit_layout(r.used_idx) == [(1, 0), (2, 1)]


def test_resubmission_makes_a_fresh_backend_run_each_outstanding_request_once():
    """Property: a driver with random submissions, a backend completing in random order, a
    crash at a random point; after the rewrite, the fresh backend starting at the used index
    sees exactly the outstanding heads."""
    rng = random.Random(7)
    overruns = 0
    for trial in range(300):
        size = rng.choice([4, 8, 16])
        r, w = Rings(size), RingWatch(size)
        free = list(range(size))
        taken: list[int] = []   # the backend's in-flight heads
        next_avail = 0          # the backend's last_avail
        for _ in range(rng.randrange(1, 200)):
            op = rng.random()
            if op < 0.4 and free:
                r.publish(free.pop(rng.randrange(len(free))))
            elif op < 0.7 and next_avail != r.avail_idx:
                taken.append(r.avail[next_avail % size])
                next_avail = (next_avail + 1) & 0xFFFF
            elif taken:
                head = taken.pop(rng.randrange(len(taken)))
                r.complete(head)
                free.append(head)
            if rng.random() < 0.5:
                r.sample(w)
        r.sample(w)  # the backend died: one last look
        outstanding = set(range(size)) - set(free)
        if not w.exact:  # looked too rarely: known, and the resume falls back (counted)
            assert not w.consistent(r.avail_idx, r.used_idx)
            overruns += 1
            continue
        assert w.consistent(r.avail_idx, r.used_idx), trial
        for slot, head in w.resubmit_layout(r.used_idx):
            r.avail[slot] = head
        replay = [r.avail[(r.used_idx + i) % size] for i in range((r.avail_idx - r.used_idx) & 0xFFFF)]
        assert sorted(replay) == sorted(outstanding), trial
    assert overruns < 100  # most trials exercised the resubmission


def test_more_than_a_ring_between_samples_is_detected():
    r, w = Rings(4), RingWatch(4)
    for _ in range(3):  # 6 submissions and completions between two samples: slots reused unseen
        r.publish(0)
        r.complete(0)
        r.publish(1)
        r.complete(1)
    r.sample(w)
    assert not w.exact
    assert not w.consistent(r.avail_idx, r.used_idx)


def test_a_completion_of_a_head_never_published_is_a_stray():
    r, w = Rings(4), RingWatch(4)
    r.publish(1)
    r.complete(3)
    r.sample(w)
    assert w.strays == 1 and list(w.outstanding) == [1]
    assert not w.consistent(r.avail_idx, r.used_idx)  # the counts no longer add up


def test_indices_wrap_at_2_to_16():
    r, w = Rings(8), RingWatch(8)
    r.avail_idx = r.used_idx = 0xFFFE
    w.reset(0xFFFE, 0xFFFE)
    for head in (5, 6, 7):
        r.publish(head)
    r.complete(6)
    r.sample(w)
    assert list(w.outstanding) == [5, 7] and r.avail_idx == 1
    assert w.consistent(r.avail_idx, r.used_idx)


# -- specs ---------------------------------------------------------------------------------------

def test_a_vhost_user_disk_names_its_socket_and_takes_no_path():
    spec = parse_device_arg(KINDS["blk"], "vhost-user=/run/qsd.sock,reconnect-timeout=30", 0)
    assert spec.frontend_socket == "/run/qsd.sock" and spec.queue_count == 1
    fs = frontend_spec(spec)
    assert (fs.virtio_id, fs.queues, fs.reconnect, fs.reconnect_timeout) == (2, 1, True, 30.0)
    assert parse_device_arg(KINDS["blk"], "disk.img", 0).frontend_socket is None


@pytest.mark.parametrize("text, needle", [
    ("vhost-user=/s,readonly", "readonly is not for a vhost-user device"),
    ("vhost-user=/s,serial=x", "serial is not for a vhost-user device"),
    ("disk.img,queues=2", "queues is only for a vhost-user device"),
    ("disk.img,reconnect=off", "reconnect is only for a vhost-user device"),
])
def test_keys_of_the_other_way_are_refused(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_device_arg(KINDS["blk"], text, 0)


@pytest.mark.parametrize("kind, text, needle", [
    ("blk", "vhost-user=/s,queues=9", "queues=9: give 1 to 8"),
    ("blk", "vhost-user=/s,reconnect-timeout=0", "at least 1"),
    ("vhost-user", "type=99,socket=/s", "not a virtio device id"),
    ("fs", "socket=/s,tag=" + "é" * 20, "at most 36"),
])
def test_frontend_values_are_checked(kind, text, needle):
    with pytest.raises(ConfigError, match=needle):
        frontend_spec(parse_device_arg(KINDS[kind], text, 0))


def test_virtio_fs_config_is_built_by_the_core():
    spec = parse_device_arg(KINDS["fs"], "socket=/run/vfs.sock,tag=share,queues=2", 0)
    fs = frontend_spec(spec)
    assert spec.queue_count == 3  # hiprio + two request queues
    assert fs.virtio_id == 26 and fs.queues == 3
    assert fs.local_config == b"share".ljust(36, b"\0") + struct.pack("<I", 2)


def test_the_generic_device_takes_its_virtio_id():
    spec = parse_device_arg(KINDS["vhost-user"], "type=4,socket=/s,queues=1", 0)
    assert spec.name == "vu0" and frontend_spec(spec).virtio_id == 4
    with pytest.raises(ConfigError, match="socket is required"):
        parse_device_arg(KINDS["vhost-user"], "type=4", 0)


# -- the native sampler: the same counts as the Python reference ---------------------------------

def test_the_native_sampler_counts_like_the_python_ring_watch():
    import os
    from ipc_protocol.guest_memory import GuestMemory, RegionSpec
    from vmm_core.vhost_frontend import native_watch
    if not native_watch.available():
        pytest.fail("vmm_core.vhost_frontend._watch is not built (./dev.sh setup builds it)")
    fd = os.memfd_create("watch-test")
    os.ftruncate(fd, 1 << 20)
    mem = GuestMemory.from_fd(fd, [RegionSpec(0, 1 << 20, 0)])
    rng = random.Random(11)
    try:
        for size in (4, 16, 256):
            avail, used = 0x1000, 0x8000 + size  # unaligned to the page on purpose
            for off in range(0, 0x10000, 8):
                mem.write(off, bytes(8))
            py, native = RingWatch(size), native_watch.NativeRingWatch(mem, avail, used, size)
            native.pause()  # the test drives the samples itself
            try:
                r = Rings(size)

                def flush():
                    mem.write_u16(avail + 2, r.avail_idx)
                    mem.write_u16(used + 2, r.used_idx)
                    for slot in range(size):
                        mem.write_u16(avail + 4 + 2 * slot, r.avail[slot])
                        mem.write_u32(used + 4 + 8 * slot, r.used[slot])

                free, taken = list(range(size)), []
                for _ in range(3000):
                    op = rng.random()
                    if op < 0.45 and free:
                        h = free.pop(rng.randrange(len(free)))
                        r.publish(h)
                        taken.append(h)
                    elif taken:
                        h = taken.pop(rng.randrange(len(taken)))
                        r.complete(h)
                        free.append(h)
                    if rng.random() < 0.3:
                        flush()
                        r.sample(py)
                        native_watch.lib.bh_watch_sample(native._w)
                        mirror = RingWatch(size)
                        native.export_to(mirror)
                        assert (mirror.counts, mirror.exact, mirror.strays, mirror.avail_pos,
                                mirror.used_pos) == (py.counts, py.exact, py.strays, py.avail_pos,
                                                     py.used_pos)
                        assert all(mirror.last_pos[h] == py.last_pos[h] for h in mirror.counts)
                mirror = RingWatch(size)
                native.export_to(mirror)
                native.import_from(mirror)  # a round trip keeps the state
                again = RingWatch(size)
                native.export_to(again)
                assert again.counts == mirror.counts and again.avail_pos == mirror.avail_pos
            finally:
                native.resume()
                native.close()
    finally:
        mem.close()
