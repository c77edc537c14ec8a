"""virtio-blk against a temp image file, byte for byte (VIRTIO 1.2 §5.2)."""

from __future__ import annotations

import os
import struct

import pytest

from device_procs.testing.local import LocalHarness as Harness
from device_procs.virtio import blk as b
from device_procs.virtio.errors import DeviceSpecError


def sector_pattern(sector: int, count: int = 1) -> bytes:
    """The conftest image's content: byte i of sector s is (s * 7 + i) & 0xff."""
    return b"".join(bytes((s * 7 + i) & 0xFF for i in range(512)) for s in range(sector, sector + count))


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def d(blk):
    blk.driver.init()
    return blk.driver


def test_features_and_config(blk):
    feats = blk.driver.device_features()
    for bit in (b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_SEG_MAX, b.VIRTIO_BLK_F_BLK_SIZE,
                b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES):
        assert feats & bit
    cfg = blk.driver.read_config(0, 60)
    capacity, size_max, seg_max = struct.unpack_from("<QII", cfg)
    assert (capacity, size_max, seg_max) == (2048, 0, b.SEG_MAX)
    assert struct.unpack_from("<I", cfg, 20)[0] == 512
    assert struct.unpack_from("<H", cfg, 34)[0] == 1  # num_queues
    max_dsec, max_dseg, align, max_wz, max_wzseg = struct.unpack_from("<5I", cfg, 36)
    assert (max_dsec, max_dseg, align) == (b.MAX_DISCARD_SECTORS, b.MAX_DISCARD_SEG, 8)
    assert (max_wz, max_wzseg, cfg[56]) == (b.MAX_DISCARD_SECTORS, b.MAX_DISCARD_SEG, 1)


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_read(d, indirect, split):
    res = d.blk_read(5, 3 * 512, indirect=indirect, split_header=split)
    assert res.status == b.VIRTIO_BLK_S_OK
    assert res.data == sector_pattern(5, 3)
    assert res.used_len == 3 * 512 + 1


@pytest.mark.parametrize("indirect", [False, True])
def test_write(d, blk, image, indirect):
    data = os.urandom(4 * 512)
    assert d.blk_write(100, data, indirect=indirect) == b.VIRTIO_BLK_S_OK
    disk = read_file(image)
    assert disk[100 * 512:104 * 512] == data
    assert disk[99 * 512:100 * 512] == sector_pattern(99)
    assert disk[104 * 512:105 * 512] == sector_pattern(104)
    assert d.blk_read(100, 4 * 512).data == data
    stats = blk.device.stats()
    assert stats["bytes_written"] == 4 * 512 and stats["writes"] == 1


def test_scattered_buffers(d, image):
    """Data spread over many descriptors, header split, status in its own buffer."""
    q = d.queue(0)
    chunks = [os.urandom(512) for _ in range(8)]
    header = struct.pack("<IIQ", b.VIRTIO_BLK_T_OUT, 0, 10)
    done = q.submit([header[:3], header[3:]] + chunks, [1])
    assert done.writable_data(d.memory) == b"\x00"
    assert read_file(image)[10 * 512:18 * 512] == b"".join(chunks)
    done = q.submit([header[:0] + struct.pack("<IIQ", b.VIRTIO_BLK_T_IN, 0, 10)], [100, 412, 1024, 512, 1])
    assert done.writable_data(d.memory)[:-1] == b"".join(chunks[:4])


def test_status_shares_buffer_with_data(d):
    """§2.6.4: no framing assumptions — data and status in one writable descriptor."""
    done = d.queue(0).submit([struct.pack("<IIQ", b.VIRTIO_BLK_T_IN, 0, 3)], [513])
    data = done.writable_data(d.memory)
    assert data[:512] == sector_pattern(3) and data[512] == 0 and done.length == 513


def test_flush(d, blk):
    assert d.blk_flush() == b.VIRTIO_BLK_S_OK
    assert blk.device.stats()["flushes"] == 1


def test_get_id(d):
    res = d.blk_get_id()
    assert res.status == 0
    assert res.data == b"bulkhead-disk-0".ljust(20, b"\0")
    assert res.used_len == 21


def test_get_id_full_length_serial(memory, image):
    dev = b.BlkDevice(image, serial="A" * 20)
    h = Harness(dev, memory)
    h.driver.init()
    assert h.driver.blk_get_id().data == b"A" * 20
    dev.close()


def test_serial_too_long(image):
    with pytest.raises(DeviceSpecError, match="serial"):
        b.BlkDevice(image, serial="x" * 21)


def test_discard(d, image):
    assert d.blk_discard([(8, 8, 0), (40, 1, 0)]) == b.VIRTIO_BLK_S_OK
    disk = read_file(image)
    assert disk[8 * 512:16 * 512] == bytes(8 * 512)
    assert disk[40 * 512:41 * 512] == bytes(512)
    assert disk[16 * 512:17 * 512] == sector_pattern(16)
    assert disk[7 * 512:8 * 512] == sector_pattern(7)
    assert len(disk) == 2048 * 512  # KEEP_SIZE


@pytest.mark.parametrize("flags", [0, b.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes(d, image, flags):
    assert d.blk_discard([(3, 5, flags)], write_zeroes=True) == b.VIRTIO_BLK_S_OK
    disk = read_file(image)
    assert disk[3 * 512:8 * 512] == bytes(5 * 512)
    assert disk[8 * 512:9 * 512] == sector_pattern(8)


def test_discard_fallback_writes_zeroes(d, blk, image):
    blk.device.backend.can_punch = False
    assert d.blk_discard([(1, 2, 0)]) == b.VIRTIO_BLK_S_OK
    assert read_file(image)[512:3 * 512] == bytes(1024)


@pytest.mark.parametrize("segments,write_zeroes,status", [
    ([(0, 1, b.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)], False, b.VIRTIO_BLK_S_UNSUPP),  # unmap on discard
    ([(0, 1, 0x80)], True, b.VIRTIO_BLK_S_UNSUPP),  # unknown flag
    ([(0, b.MAX_DISCARD_SECTORS + 1, 0)], False, b.VIRTIO_BLK_S_IOERR),
    ([(0, 1, 0)] * (b.MAX_DISCARD_SEG + 1), True, b.VIRTIO_BLK_S_IOERR),
    ([], False, b.VIRTIO_BLK_S_IOERR),
])
def test_discard_errors(d, image, segments, write_zeroes, status):
    before = read_file(image)
    assert d.blk_discard(segments, write_zeroes=write_zeroes) == status
    assert read_file(image) == before


def test_discard_payload_not_whole_segments(d):
    res = d.blk_request(b.VIRTIO_BLK_T_DISCARD, out=bytes(20))
    assert res.status == b.VIRTIO_BLK_S_IOERR


def test_unsupported_type(d, blk):
    assert d.blk_request(99).status == b.VIRTIO_BLK_S_UNSUPP
    assert d.blk_request(10, in_len=48).status == b.VIRTIO_BLK_S_UNSUPP  # GET_LIFETIME not offered
    assert blk.device.stats()["unsupported"] == 2


def test_readonly(memory, image):
    dev = b.BlkDevice(image, readonly=True)
    h = Harness(dev, memory)
    assert h.driver.device_features() & b.VIRTIO_BLK_F_RO
    h.driver.init()
    before = read_file(image)
    assert h.driver.blk_write(0, b"z" * 512) == b.VIRTIO_BLK_S_IOERR
    assert h.driver.blk_discard([(0, 1, 0)]) == b.VIRTIO_BLK_S_IOERR
    assert h.driver.blk_discard([(0, 1, 0)], write_zeroes=True) == b.VIRTIO_BLK_S_IOERR
    assert read_file(image) == before
    assert h.driver.blk_read(0, 512).data == sector_pattern(0)
    assert h.driver.blk_flush() == b.VIRTIO_BLK_S_OK
    assert dev.stats()["errors"] == 3
    dev.close()


def test_missing_image(tmp_path):
    with pytest.raises(DeviceSpecError, match="cannot open"):
        b.BlkDevice(str(tmp_path / "nope.img"))


def test_image_not_multiple_of_sector(memory, tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x11" * 1300)
    dev = b.BlkDevice(str(path))
    h = Harness(dev, memory)
    h.driver.init()
    assert dev.backend.capacity == 2
    assert h.driver.blk_read(1, 512).data == b"\x11" * 512
    assert h.driver.blk_read(2, 512).status == b.VIRTIO_BLK_S_IOERR
    dev.close()


def test_many_requests_batch_and_event_idx(d, blk):
    """Several chains per kick; with EVENT_IDX, one interrupt per batch."""
    q = d.queue(0)
    heads = [q.add([struct.pack("<IIQ", b.VIRTIO_BLK_T_IN, 0, s)], [512, 1]) for s in range(20)]
    q.set_used_event(19)
    before = blk.notifications
    q.kick()
    done = q.get_used()
    assert [c.head for c in done] == heads
    assert all(c.writable_data(d.memory)[:512] == sector_pattern(s) for s, c in enumerate(done))
    assert blk.notifications == before + 1
    assert q.avail_event() == 20


def test_large_request_over_many_segments(d, image):
    data = os.urandom(200 * 512)
    q = d.queue(0)
    header = struct.pack("<IIQ", b.VIRTIO_BLK_T_OUT, 0, 1000)
    done = q.submit([header] + [data[i:i + 512] for i in range(0, len(data), 512)], [1], indirect=True)
    assert done.writable_data(d.memory) == b"\0"
    assert read_file(image)[1000 * 512:1200 * 512] == data


def test_read_without_data_buffer(d):
    res = d.blk_read(0, 0)
    assert (res.status, res.used_len) == (b.VIRTIO_BLK_S_OK, 1)


def test_write_from_all_writable_chain_is_ioerr(d):
    """Everything device-writable: no header to read, so IOERR in the last byte."""
    done = d.queue(0).submit([], [16, 512, 1])
    assert done.writable_data(d.memory)[-1] == b.VIRTIO_BLK_S_IOERR
