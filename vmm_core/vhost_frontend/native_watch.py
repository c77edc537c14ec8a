"""The ring watch's sampling in a native thread (`_watch_build.py`), for a `RingWatch` whose
logic stays in Python: the thread only counts; the core pauses it to look at its counts
(`export_to`), and re-seeds it after a resume (`import_from`)."""

from __future__ import annotations

from ipc_protocol.guest_memory import GuestMemory

from .ring_watch import RingWatch

try:
    from ._watch import ffi, lib
except ImportError:  # not built: the Python sampler does the work (see device.py)
    ffi = lib = None

PERIOD_NS = 50_000  # a look every 50 us: a 16-entry ring would need 320 000 requests/s to outrun it


def available() -> bool:
    return lib is not None


def _file_offset(memory: GuestMemory, gpa: int) -> int:
    for spec in memory.specs:
        if spec.guest_phys_addr <= gpa < spec.guest_phys_addr + spec.size:
            return spec.file_offset + gpa - spec.guest_phys_addr
    raise ValueError(f"guest address {gpa:#x} is not RAM")


class NativeRingWatch:
    def __init__(self, memory: GuestMemory, avail: int, used: int, size: int) -> None:
        assert lib is not None
        self._w = ffi.new("struct bh_ring_watch *")
        if lib.bh_watch_map(self._w, memory.fd, _file_offset(memory, avail),
                            _file_offset(memory, used), size) != 0:
            raise OSError(f"cannot map a {size}-entry ring for the watcher")
        self._h = lib.bh_watcher_start(self._w, PERIOD_NS)
        if self._h == ffi.NULL:
            lib.bh_watch_unmap(self._w)
            raise OSError("cannot start the ring watcher thread")
        self.size = size
        self._paused = False

    def pause(self) -> None:
        if not self._paused:
            lib.bh_watcher_pause(self._h)
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            lib.bh_watcher_resume(self._h)

    def export_to(self, watch: RingWatch) -> None:
        """The thread's counts into `watch` (call paused)."""
        w = self._w
        watch.avail_pos, watch.used_pos = w.avail_pos, w.used_pos
        watch.counts = {h: w.counts[h] for h in range(self.size) if w.counts[h]}
        watch.last_pos = {h: w.last_pos[h] for h in watch.counts}
        watch.exact, watch.strays = bool(w.exact), w.strays

    def import_from(self, watch: RingWatch) -> None:
        """`watch`'s state into the thread's (call paused)."""
        w = self._w
        w.avail_pos, w.used_pos = watch.avail_pos, watch.used_pos
        for h in range(self.size):
            w.counts[h] = watch.counts.get(h, 0)
            w.last_pos[h] = watch.last_pos.get(h, 0)
        w.exact, w.strays = int(watch.exact), watch.strays

    @property
    def samples(self) -> int:
        return int(self._w.samples)

    def close(self) -> None:
        if self._h is not None:
            self.resume()  # the thread takes the lock to stop
            lib.bh_watcher_stop(self._h)
            lib.bh_watch_unmap(self._w)
            self._h = None
