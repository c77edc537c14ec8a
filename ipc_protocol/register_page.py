"""The register page: what the device publishes so the core can answer register reads itself.

A register read through the ring is a round trip to another process (tens of µs, more with
both on one CPU).  Yet almost every virtio-mmio read has an answer the core can give: constants
(MagicValue, Version, DeviceID, VendorID), what its own transport shadow knows exactly (Status,
DeviceFeatures, QueueNumMax, QueueReady — the shadow applies the same rules as the device), and
the few values only the device can change, which it publishes here, in shared memory beside the
rings:

- InterruptStatus: the device ORs a bit in (atomically) before it signals its irqfd; the core's
  InterruptACK clears bits (atomically) without telling the device.  The interrupt path — the
  read and the ACK every Linux virtio-mmio interrupt makes — never leaves the core.
- DEVICE_NEEDS_RESET (it sets the Status bit), ConfigGeneration and the config space, published
  under a sequence lock (odd while being written).
- `applied_seq`: the sequence number of the last ring slot the device applied, so a config read
  that follows a posted config write waits for that write, not for a round trip.

The device stays the authority: it writes everything here; the core validates what it reads
(masks, lengths, a bounded seqlock retry) and falls back to a ring round trip when the page is
not (yet) valid.  Only `ipc_protocol._atomics` touches the words: sequentially consistent C
atomics, since Python has none.

Layout (little-endian, offsets in bytes; each group on its own cache line)::

    0    magic u32 "BHRP", version u32
    64   valid u32 (1 once the device has published), flags u32 (bit 0: DEVICE_NEEDS_RESET)
    128  interrupt_status u32
    192  config_generation u32, config_seq u32 (odd while writing), config_len u32
    256  applied_seq u64
    320  config bytes[MAX_CONFIG]
"""

from __future__ import annotations

import mmap
import os
import struct

from ._atomics import ffi, lib

PAGE_MAGIC = 0x50524842  # "BHRP"
PAGE_VERSION = 1
MAX_CONFIG = 256
PAGE_BYTES = 4096  # one page: mapped on its own
FLAG_NEEDS_RESET = 1
INTERRUPT_BITS = 0x3  # used buffer, configuration change (§4.2.2)
SEQLOCK_TRIES = 64

_MAGIC, _VERSION, _VALID, _FLAGS, _INTERRUPT = 0, 4, 64, 68, 128
_GENERATION, _CONFIG_SEQ, _CONFIG_LEN, _APPLIED, _CONFIG = 192, 196, 200, 256, 320

# The words only the device writes, as checked on every local read (one C call) and named when
# one is wrong: (offset, mask, expected, what) -- bad when (word & mask) != expected.
_CHECKS = ((_MAGIC, 0xFFFFFFFF, PAGE_MAGIC, "magic overwritten:"),
           (_VERSION, 0xFFFFFFFF, PAGE_VERSION, "version overwritten:"),
           (_VALID, ~1 & 0xFFFFFFFF, 0, "valid has bits no device sets:"),
           (_FLAGS, ~FLAG_NEEDS_RESET & 0xFFFFFFFF, 0, "flags have bits no device sets:"),
           (_INTERRUPT, ~INTERRUPT_BITS & 0xFFFFFFFF, 0, "interrupt status has bits no device sets:"))


class RegisterPage:
    """Either side's view of one device's page: PAGE_BYTES of a memfd at a page-aligned offset,
    mapped by this object and unmapped when the last reference to it goes (so a reader racing a
    restart never touches an unmapped page)."""

    def __init__(self, fd: int, offset: int) -> None:
        if offset % mmap.PAGESIZE:
            raise ValueError(f"a register page must start on a page boundary, not at {offset:#x}")
        base = lib.bh_map(fd, offset, PAGE_BYTES)
        if base == ffi.NULL:
            raise OSError(ffi.errno, f"cannot map the register page: {os.strerror(ffi.errno)}")
        self._base = ffi.gc(ffi.cast("uint8_t *", base), _unmap, size=PAGE_BYTES)
        self._u32 = {off: ffi.cast("uint32_t *", self._base + off)
                     for off in (_MAGIC, _VERSION, _VALID, _FLAGS, _INTERRUPT, _GENERATION,
                                 _CONFIG_SEQ, _CONFIG_LEN)}
        self._applied = ffi.cast("uint64_t *", self._base + _APPLIED)
        # The words the hot path checks in one C call: (offset, mask, expected) -- a word is
        # bad when (word & mask) != expected.  `corruption()` says which and why.
        self._check = tuple(ffi.new("uint32_t[]", [c[k] for c in _CHECKS]) for k in range(3))
        self._out = ffi.new("uint8_t[]", MAX_CONFIG + 8)

    # -- the creator (the core, once) ------------------------------------------------------------
    def initialize(self) -> None:
        ffi.memmove(self._base, struct.pack("<II", PAGE_MAGIC, PAGE_VERSION).ljust(PAGE_BYTES,
                                                                                    b"\0"),
                    PAGE_BYTES)

    # -- the device's side -------------------------------------------------------------------
    def publish(self, config: bytes, generation: int, needs_reset: bool) -> None:
        """Config space, ConfigGeneration and DEVICE_NEEDS_RESET as the device has them now."""
        config = bytes(config[:MAX_CONFIG])
        seq = lib.bh_load32(self._u32[_CONFIG_SEQ])
        lib.bh_store32(self._u32[_CONFIG_SEQ], (seq + 1) | 1)  # odd: being written
        ffi.memmove(self._base + _CONFIG, config, len(config))
        lib.bh_store32(self._u32[_CONFIG_LEN], len(config))
        lib.bh_store32(self._u32[_GENERATION], generation & 0xFFFFFFFF)
        lib.bh_store32(self._u32[_CONFIG_SEQ], ((seq + 1) | 1) + 1)  # even: stable
        lib.bh_store32(self._u32[_FLAGS], FLAG_NEEDS_RESET if needs_reset else 0)
        lib.bh_store32(self._u32[_VALID], 1)

    def raise_interrupt(self, bits: int) -> None:
        lib.bh_fetch_or32(self._u32[_INTERRUPT], bits & INTERRUPT_BITS)

    def corrupt(self) -> None:
        """Fault injection (`bulkhead fault VM DEV bad-reply`): what a hostile device may do."""
        lib.bh_store32(self._u32[_MAGIC], 0xBAD0BAD0)

    def set_applied(self, seq: int) -> None:
        lib.bh_store64(self._applied, seq & 0xFFFF_FFFF_FFFF_FFFF)

    # -- both ----------------------------------------------------------------------------------
    def interrupt_status(self) -> int:
        return lib.bh_load32(self._u32[_INTERRUPT]) & INTERRUPT_BITS

    def ack(self, bits: int) -> None:
        """InterruptACK (§4.2.2): clear `bits`."""
        lib.bh_fetch_andnot32(self._u32[_INTERRUPT], bits & 0xFFFFFFFF)

    def clear_interrupts(self) -> None:
        lib.bh_store32(self._u32[_INTERRUPT], 0)

    # -- the core's side (every value is the untrusted device's) -------------------------------
    @property
    def valid(self) -> bool:
        return lib.bh_load32(self._u32[_VALID]) == 1 and \
            lib.bh_load32(self._u32[_MAGIC]) == PAGE_MAGIC

    def intact(self) -> bool:
        """The hot path's check, one C call: every word only the device writes looks like one
        of our devices wrote it (`corruption()` names what is wrong, and checks more)."""
        return lib.bh_check_words(self._base, *self._check, len(_CHECKS)) < 0

    def corruption(self) -> str | None:
        """What makes this page one no device of ours would write, or None.  The words only the
        device writes are checked (the core never trusts them); a corrupt page fails the device
        like a garbage ring answer."""
        bad = lib.bh_check_words(self._base, *self._check, len(_CHECKS))
        if bad >= 0:
            offset, _, _, what = _CHECKS[bad]
            return f"{what} {lib.bh_load32(self._u32[offset]):#x}"
        length = lib.bh_load32(self._u32[_CONFIG_LEN])
        if length > MAX_CONFIG:
            return f"config length {length} > {MAX_CONFIG}"
        return None

    def needs_reset(self) -> bool:
        return bool(lib.bh_load32(self._u32[_FLAGS]) & FLAG_NEEDS_RESET)

    def config_generation(self) -> int:
        return lib.bh_load32(self._u32[_GENERATION])

    def applied_seq(self) -> int:
        return lib.bh_load64(self._applied)

    def read_config(self, offset: int, length: int) -> bytes | None:
        """Config bytes [offset, offset+length) as one consistent snapshot, zero past the
        device's config (as `VirtioDevice.read_config` answers); None if no stable snapshot
        could be read (a device holding the lock odd: the caller asks through the ring)."""
        if not 0 <= length <= MAX_CONFIG + 8 or offset < 0:
            return None
        if lib.bh_seqlock_copy(self._u32[_CONFIG_SEQ], self._u32[_CONFIG_LEN],
                               self._base + _CONFIG, MAX_CONFIG, min(offset, 0xFFFFFFFF), length,
                               self._out, SEQLOCK_TRIES) < 0:
            return None
        return ffi.buffer(self._out, length)[:]


def _unmap(base: object) -> None:
    lib.bh_unmap(base, PAGE_BYTES)
