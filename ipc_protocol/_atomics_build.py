"""cffi API-mode build of `ipc_protocol._atomics`: sequentially consistent loads, stores and
read-modify-writes on words in memory shared between processes (Python has none).

Also maps and unmaps the page itself (`bh_map`).  Used by the register page (`ipc_protocol.register_page`): the device ORs InterruptStatus bits
in, the core's InterruptACK clears them, both without a round trip.  Built by
`setup.py build_ext --inplace` (listed in setup.py's CFFI_MODULES)."""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
uint32_t bh_load32(const uint32_t *p);
void bh_store32(uint32_t *p, uint32_t v);
uint32_t bh_fetch_or32(uint32_t *p, uint32_t v);
uint32_t bh_fetch_andnot32(uint32_t *p, uint32_t v);
uint64_t bh_load64(const uint64_t *p);
void bh_store64(uint64_t *p, uint64_t v);
void bh_fence(void);
void *bh_map(int fd, long offset, size_t length);
int bh_unmap(void *p, size_t length);
int bh_check_words(const uint8_t *base, const uint32_t *offsets, const uint32_t *masks,
                   const uint32_t *expect, int n);
int bh_seqlock_copy(const uint32_t *seq, const uint32_t *len, const uint8_t *src, uint32_t max,
                    uint32_t offset, uint32_t length, uint8_t *out, int tries);
""")
ffibuilder.set_source("ipc_protocol._atomics", r"""
#include <stdint.h>
#include <sys/mman.h>
uint32_t bh_load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
void bh_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
uint32_t bh_fetch_or32(uint32_t *p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
uint32_t bh_fetch_andnot32(uint32_t *p, uint32_t v) {
    return __atomic_fetch_and(p, ~v, __ATOMIC_SEQ_CST);
}
uint64_t bh_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
void bh_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
void bh_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/* The page is mapped here, not through Python's mmap: a cffi pointer into a memoryview is an
   export the garbage collector may clear while it is in use (a crash at exit, seen). */
void *bh_map(int fd, long offset, size_t length) {
    void *p = mmap(0, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
    return p == MAP_FAILED ? 0 : p;
}
int bh_unmap(void *p, size_t length) { return munmap(p, length); }
/* The register page's hot path in one call each (a cffi call costs ~0.2 us; a config read took
   a dozen).  The first word i with (word & masks[i]) != expect[i], or -1. */
int bh_check_words(const uint8_t *base, const uint32_t *offsets, const uint32_t *masks,
                   const uint32_t *expect, int n) {
    for (int i = 0; i < n; i++) {
        uint32_t w = __atomic_load_n((const uint32_t *)(base + offsets[i]), __ATOMIC_SEQ_CST);
        if ((w & masks[i]) != expect[i]) return i;
    }
    return -1;
}
/* Bytes [offset, offset+length) of src (min(*len, max) bytes valid, zero past them) as one
   snapshot under the seqlock *seq (odd while the writer writes); 0, or -1 after `tries`. */
int bh_seqlock_copy(const uint32_t *seq, const uint32_t *len, const uint8_t *src, uint32_t max,
                    uint32_t offset, uint32_t length, uint8_t *out, int tries) {
    for (int t = 0; t < tries; t++) {
        uint32_t s = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
        if (s & 1) continue;
        uint32_t size = __atomic_load_n(len, __ATOMIC_SEQ_CST);
        if (size > max) size = max;
        for (uint32_t i = 0; i < length; i++) {
            uint64_t at = (uint64_t)offset + i;
            out[i] = at < size ? __atomic_load_n(src + at, __ATOMIC_RELAXED) : 0;
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(seq, __ATOMIC_SEQ_CST) == s) return 0;
    }
    return -1;
}
""")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
