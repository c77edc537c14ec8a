"""Linux's own drivers against what only Bulkhead's backends are asked for: the jail seen from
/proc while a guest uses the device, a read-only disk, discard and write-zeroes reaching the
image, the console byte for byte, and the device process killed under load (the guest does not
notice: the launcher resumes the session).

(The data-path tests every backend passes are in test_blk.py, which runs them against Bulkhead's
backend too.  virtio-rng has no UML driver in Debian's build, so rng is only met by guest_kit.)
"""

from __future__ import annotations

import hashlib
import os
import random
import time

import pytest

from vmm_core.testing.uml import BulkheadBackend, BulkheadBlkBackend, UmlBed

pytestmark = [pytest.mark.linux, pytest.mark.root]

MIB = 1 << 20
SECTOR = 512
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts")


@pytest.fixture(autouse=True)
def _needs_uml(uml_host):
    pass


def image_of(path, size: int, fill: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill)
    return str(path)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.split(":\t", 1) for ln in f.read().splitlines() if ":\t" in ln)


def test_the_backend_serving_linux_is_jailed(tmp_path):
    """Seen from the host while the guest's virtio_blk driver has the device open."""
    backend = BulkheadBlkBackend()
    image = image_of(tmp_path / "disk.img", 8 * MIB)
    seen: dict[str, object] = {}

    def inspect(line: str) -> None:
        if "UML-RESULT holding=1" not in line:
            return
        pid = backend.device_pids()[-1]
        st = status(pid)
        seen.update(seccomp=st["Seccomp"].strip(), nnp=st["NoNewPrivs"].strip(),
                    caps={k: st[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")},
                    ns={n: os.readlink(f"/proc/{pid}/ns/{n}") != os.readlink(f"/proc/self/ns/{n}")
                        for n in NAMESPACES})

    with UmlBed() as bed:
        bed.add_blk("disk", backend, image)
        bed.run("""
            set -e
            dd if=$UML_DEV_disk of=/dev/null bs=4096 count=16 iflag=direct status=none
            echo UML-RESULT holding=1
            sleep 2
            """, timeout=60, on_line=inspect).check()
    assert seen, "the guest never reached the point where the jail is inspected"
    assert seen["seccomp"] == "2" and seen["nnp"] == "1", seen
    assert set(seen["caps"].values()) == {"0000000000000000"}, seen
    assert all(seen["ns"].values()), seen


def test_a_readonly_disk_refuses_the_guests_writes(tmp_path):
    data = random.Random(3).randbytes(64 * 1024)
    image = image_of(tmp_path / "disk.img", 4 * MIB, data)
    before = hashlib.sha256(open(image, "rb").read()).hexdigest()
    with UmlBed() as bed:
        bed.add_blk("disk", BulkheadBlkBackend(readonly=True), image)
        run = bed.run("""
            dev=$UML_DEV_disk
            echo "UML-RESULT ro=$(cat /sys/block/${dev#/dev/}/ro)"
            if head -c 4096 /dev/urandom | dd of=$dev bs=4096 oflag=direct conv=notrunc \
                    status=none 2>/dev/null; then
                echo UML-RESULT write=accepted
            else
                echo UML-RESULT write=refused
            fi
            sum=$(dd if=$dev bs=65536 count=1 iflag=direct status=none | sha256sum)
            echo "UML-RESULT read=${sum%% *}"
            """, timeout=60).check()
    assert run.results["ro"] == "1" and run.results["write"] == "refused", run.explain()
    assert run.results["read"] == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(open(image, "rb").read()).hexdigest() == before


def test_discard_and_write_zeroes_reach_the_image(tmp_path):
    """blkdiscard (VIRTIO_BLK_T_DISCARD) and blkdiscard -z (WRITE_ZEROES) from the guest; a
    flush (fsync) between. The host then reads zeroes where the guest asked for them."""
    size = 16 * MIB
    rng = random.Random(7)
    full = rng.randbytes(size)
    image = image_of(tmp_path / "disk.img", size, full)
    discard, zero = (1 * MIB, 2 * MIB), (6 * MIB + 4096, 1 * MIB)   # (offset, length)
    with UmlBed() as bed:
        bed.add_blk("disk", BulkheadBlkBackend(), image)
        run = bed.run(f"""
            set -e
            dev=$UML_DEV_disk; q=/sys/block/${{dev#/dev/}}/queue
            echo "UML-RESULT discard_max=$(cat $q/discard_max_bytes) zeroes_max=$(cat $q/write_zeroes_max_bytes)"
            blkdiscard -o {discard[0]} -l {discard[1]} $dev
            blkdiscard -z -o {zero[0]} -l {zero[1]} $dev
            python3 -c "import os; fd = os.open('$dev', os.O_RDWR); os.fsync(fd)"
            echo UML-RESULT done=1
            """, timeout=60).check()
    assert int(run.results["discard_max"]) > 0 and int(run.results["zeroes_max"]) > 0
    with open(image, "rb") as f:
        after = f.read()
    for off, length in (discard, zero):
        assert after[off:off + length] == bytes(length), (off, length)
    untouched = [(0, discard[0]), (discard[0] + discard[1], zero[0]), (zero[0] + zero[1], size)]
    for a, b in untouched:
        assert after[a:b] == full[a:b], (a, b)


def test_console_output_arrives_byte_for_byte(tmp_path):
    out = tmp_path / "console.txt"
    text = "".join(random.Random(9).choice("abcdefghij \t\n") for _ in range(20000)) + "end\n"
    src = tmp_path / "text.txt"
    src.write_text(text)
    backend = BulkheadBackend("console")
    with UmlBed() as bed:
        bed.add_backend("hvc", "console", backend, "--output", str(out))
        bed.run(f"""
            set -e
            exec 3<>/dev/hvc0          # held open: a tty's settings last while it is open
            stty raw -echo <&3         # raw: no newline translation, the bytes as written
            cat {src} >&3
            sleep 0.5
            exec 3>&-
            echo UML-RESULT written=1
            """, timeout=60).check()
    # The bed stopped the backend: everything it received is in the file.
    assert out.read_bytes() == text.encode()


def test_killing_the_device_under_fio_the_guest_does_not_notice(tmp_path):
    """SIGKILL to the jailed device process while fio writes with verification.  virtio_uml
    never reconnects, so the launcher resumes the session on the same connection in a fresh
    jailed process (journal replay, rings continued at the used index: requests in flight are
    executed again).  fio finishes without an error and its verify pass finds every block; the
    writes acknowledged before the kill are on the image."""
    size = 96 * MIB
    image = image_of(tmp_path / "disk.img", size)
    acked = random.Random(1).randbytes(1 * MIB)
    (tmp_path / "acked.bin").write_bytes(acked)
    backend = BulkheadBlkBackend()
    killed: list[int] = []

    def kill_during_fio(line: str) -> None:
        if "UML-RESULT fio=started" in line and not killed:
            time.sleep(1.0)  # fio is writing now
            killed.append(backend.kill_device())

    with UmlBed() as bed:
        bed.add_blk("disk", backend, image)
        run = bed.run(f"""
            dev=$UML_DEV_disk
            dd if={tmp_path}/acked.bin of=$dev bs=1M seek=0 oflag=direct conv=fsync status=none
            echo UML-RESULT acked=$?
            echo UML-RESULT fio=started
            fio --name=w --filename=$dev --direct=1 --ioengine=libaio --iodepth=16 \
                --rw=randwrite --bs=64k --offset=8m --size=80m --verify=crc32c --do_verify=1 \
                --verify_fatal=1 --eta=never --output=$UML_OUT/fio.txt >/dev/null 2>&1
            echo UML-RESULT fio_status=$?
            """, timeout=120, on_line=kill_during_fio).check()
        assert run.results.get("acked") == "0", run.explain()
        assert killed, run.explain()
        with open(os.path.join(bed.out_dir, "fio.txt")) as f:
            report = f.read()
        assert run.results.get("fio_status") == "0", run.explain() + report
        done = backend.wait_line(r"frontend 1 done: device process (.*)", 10).group(1)
        assert "SIGKILL" in done, backend.log
        resumed = backend.wait_line(r"frontend 1 resumed \((\d+) requests replayed\), served "
                                    r"by jailed pid (\d+)", 10)
        assert int(resumed.group(2)) not in killed, backend.log
        assert "I/O error" not in run.dmesg and "blk_update_request" not in run.dmesg, run.dmesg
    with open(image, "rb") as f:
        assert f.read(len(acked)) == acked
