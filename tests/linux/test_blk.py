"""Linux's own virtio_blk driver (in user-mode Linux) against a vhost-user-blk backend.

The template for every backend: each test runs once per `BLK_BACKENDS` entry (qemu-storage-daemon
with aio=threads and with aio=io_uring in an iothread; Bulkhead's backend is one more entry).
The host checks what the guest did on the image itself, after the backend has stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess

import pytest

from vmm_core.testing.uml import UmlBed

pytestmark = [pytest.mark.linux, pytest.mark.root]  # root: UML runs in a PID namespace

MIB = 1 << 20
SECTOR = 512


def make_image(path, size: int, chunks: dict[int, bytes] | None = None) -> str:
    """A sparse image of `size` bytes with `chunks` ({offset: data}) written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in (chunks or {}).items():
            f.seek(offset)
            f.write(data)
    return str(path)


def test_guest_sees_the_disk_its_size_and_its_data(make_blk_backend, tmp_path):
    size = 96 * MIB + 7 * SECTOR                     # not a multiple of 4 KiB or 1 MiB
    rng = random.Random(11)
    host_chunks = {0: rng.randbytes(64 * 1024), 37 * MIB + 3 * SECTOR: rng.randbytes(8 * SECTOR),
                   size - SECTOR: rng.randbytes(SECTOR)}   # the last sector too
    guest_offset, guest_sectors = 50 * MIB + SECTOR, 33
    image = make_image(tmp_path / "disk.img", size, host_chunks)
    reads = " ".join(f"{off // SECTOR}:{len(data) // SECTOR}" for off, data in host_chunks.items())
    with UmlBed() as bed:
        bed.add_blk("disk", make_blk_backend(), image)
        run = bed.run(f"""
            set -e
            dev=$UML_DEV_disk; name=${{dev#/dev/}}
            q=/sys/block/$name
            echo "UML-RESULT dev=$dev bytes=$(blockdev --getsize64 $dev) sectors=$(cat $q/size)"
            echo "UML-RESULT ro=$(cat $q/ro) lbs=$(cat $q/queue/logical_block_size)"
            for r in {reads}; do
                s=${{r%:*}}; n=${{r#*:}}
                sum=$(dd if=$dev bs=512 skip=$s count=$n iflag=direct status=none | sha256sum)
                echo "UML-RESULT read_$s=${{sum%% *}}"
            done
            head -c $(({guest_sectors} * 512)) /dev/urandom > $TMPDIR/w
            dd if=$TMPDIR/w of=$dev bs=512 seek={guest_offset // SECTOR} oflag=direct conv=notrunc status=none
            sync
            echo "UML-RESULT written=$(sha256sum < $TMPDIR/w | cut -d' ' -f1)"
            """, timeout=60).check()
    r = run.results
    assert r["dev"].startswith("/dev/vd")
    assert int(r["bytes"]) == size and int(r["sectors"]) == size // SECTOR
    assert r["ro"] == "0" and r["lbs"] == "512"
    for off, data in host_chunks.items():
        assert r[f"read_{off // SECTOR}"] == hashlib.sha256(data).hexdigest(), f"offset {off}"
    with open(image, "rb") as f:                     # the backend has stopped: on the image now
        f.seek(guest_offset)
        assert hashlib.sha256(f.read(guest_sectors * SECTOR)).hexdigest() == r["written"]


FIO_JOBS = """\
[global]
filename=${UML_DEV_disk}
direct=1
verify=crc32c
verify_fatal=1
do_verify=1
[qd32-mixed]
ioengine=libaio
iodepth=32
rw=randwrite
bssplit=4k/40:16k/20:64k/25:1m/15
offset=0
size=48m
[qd1-mixed]
stonewall
ioengine=psync
rw=randwrite
bsrange=4k-128k
offset=48m
size=24m
[qd8-seq]
stonewall
ioengine=libaio
iodepth=8
rw=write
bs=256k
offset=72m
size=24m
"""
FIO_BYTES = {"qd32-mixed": 48 * MIB, "qd1-mixed": 24 * MIB, "qd8-seq": 24 * MIB}


def _fio_boot(backend, image: str, jobfile: str, extra: str = "") -> dict:
    """One boot running the job file; each job's JSON report, checked to have read (verified)
    all of its bytes without an error."""
    with UmlBed() as bed:
        bed.add_blk("disk", backend, image)
        bed.run(f"fio --eta=never {extra} --output-format=json --output=$UML_OUT/fio.json {jobfile}",
                timeout=150).check()
        with open(os.path.join(bed.out_dir, "fio.json")) as f:
            jobs = {job["jobname"]: job for job in json.load(f)["jobs"]}
    assert set(jobs) == set(FIO_BYTES)
    for name, job in jobs.items():
        assert job["error"] == 0, name
        assert job["read"]["io_bytes"] == FIO_BYTES[name], name
    return jobs


def test_fio_write_verify_mixed_sizes_and_depths(make_blk_backend, tmp_path):
    """96 MiB written and verified (crc32c) at QD32, QD1 and QD8 with mixed block sizes, then
    verified again by a second boot against a freshly started backend: the data is on the image."""
    image = make_image(tmp_path / "disk.img", 128 * MIB)
    jobfile = tmp_path / "verify.fio"
    jobfile.write_text(FIO_JOBS)
    jobs = _fio_boot(make_blk_backend(), image, str(jobfile))
    for name, job in jobs.items():
        assert job["write"]["io_bytes"] == FIO_BYTES[name], name   # written, then read back
    written = _sha256(image)
    _fio_boot(make_blk_backend(), image, str(jobfile), "--verify_only")
    assert _sha256(image) == written  # verify_only only read


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def test_ext4_made_in_the_guest_is_clean_and_holds_the_files(make_blk_backend, tmp_path):
    rng = random.Random(5)
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    files = {"empty": b"", "one": b"x", "page-1": rng.randbytes(4095), "big": rng.randbytes(3 * MIB + 3),
             "sub/text.txt": "".join(rng.choice("abc\n") for _ in range(10000)).encode(),
             "sub/deeper/blob": rng.randbytes(200 * 1024)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    image = make_image(tmp_path / "disk.img", 128 * MIB)
    with UmlBed() as bed:
        bed.add_blk("disk", make_blk_backend(), image)
        run = bed.run(f"""
            set -e
            mkfs.ext4 -q -F -L bulkhead $UML_DEV_disk
            mkdir $TMPDIR/mnt
            mount -t ext4 $UML_DEV_disk $TMPDIR/mnt
            cp -r {src}/. $TMPDIR/mnt/
            head -c 5000000 /dev/urandom > $TMPDIR/mnt/guest.bin
            echo "UML-RESULT guest_sha=$(sha256sum < $TMPDIR/mnt/guest.bin | cut -d' ' -f1)"
            sync
            umount $TMPDIR/mnt
            echo UML-RESULT umounted=1
            """, timeout=90).check()
    assert run.results["umounted"] == "1"
    fsck = subprocess.run(["e2fsck", "-f", "-n", image], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for rel, data in files.items():
        assert _debugfs_cat(image, rel) == data, rel
    assert hashlib.sha256(_debugfs_cat(image, "guest.bin")).hexdigest() == run.results["guest_sha"]
    label = subprocess.run(["debugfs", "-R", "stats", image], capture_output=True, text=True).stdout
    assert "Filesystem volume name:   bulkhead" in label


def _debugfs_cat(image: str, rel: str) -> bytes:
    out = subprocess.run(["debugfs", "-R", f"cat /{rel}", image], capture_output=True)
    assert out.returncode == 0, out.stderr
    return out.stdout
