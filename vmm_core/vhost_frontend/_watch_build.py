"""cffi API-mode build of `vmm_core.vhost_frontend._watch`: the ring watch's sampling loop in a
native thread, which no Python thread can hold off (the Python sampler's looks were up to 12 ms
apart under GIL contention, more than a 16-entry ring lasts at ~4 000 requests/s).

It does exactly what `RingWatch.sample` does (that class stays the reference, and the unit tests
run both on the same rings), on its own read-only mappings of the guest memory file: the used
index first, then the available index, every new avail entry counted up per head, every new used
entry down; more than a ring's worth since the last look clears `exact`.  The core pauses the
thread, copies the state into a `RingWatch` for the resume, and re-seeds it.
Built by `setup.py build_ext --inplace` (listed in setup.py's CFFI_MODULES)."""

from __future__ import annotations

from cffi import FFI

# One declaration for cffi and for the compiler.
STRUCT = """
struct bh_ring_watch {
    const uint8_t *avail;   /* flags u16, idx u16, ring[size] u16 */
    const uint8_t *used;    /* flags u16, idx u16, ring[size] {u32 id, u32 len} */
    uint32_t size;
    uint32_t avail_pos, used_pos;
    int32_t counts[1024];
    uint32_t last_pos[1024];
    int32_t exact, strays;
    uint64_t samples;
    void *map_avail, *map_used;
    size_t len_avail, len_used;
};
"""

ffibuilder = FFI()
ffibuilder.cdef("#define BH_WATCH_MAX_SIZE 1024\n" + STRUCT + """
int bh_watch_map(struct bh_ring_watch *w, int fd, long avail_off, long used_off, uint32_t size);
void bh_watch_unmap(struct bh_ring_watch *w);
void bh_watch_sample(struct bh_ring_watch *w);
void *bh_watcher_start(struct bh_ring_watch *w, long period_ns);
void bh_watcher_pause(void *h);
void bh_watcher_resume(void *h);
void bh_watcher_stop(void *h);
""")
ffibuilder.set_source("vmm_core.vhost_frontend._watch", r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define BH_WATCH_MAX_SIZE 1024
""" + STRUCT + r"""

void bh_watch_unmap(struct bh_ring_watch *w);

/* Map [off, off + len) of the guest memory file read-only; the pointer to `off` inside it. */
static const uint8_t *map_range(int fd, long off, size_t len, void **base, size_t *maplen) {
    long page = sysconf(_SC_PAGESIZE);
    long start = off & ~(page - 1);
    size_t total = (size_t)(off - start) + len;
    void *p = mmap(0, total, PROT_READ, MAP_SHARED, fd, start);
    if (p == MAP_FAILED) return 0;
    *base = p;
    *maplen = total;
    return (const uint8_t *)p + (off - start);
}

int bh_watch_map(struct bh_ring_watch *w, int fd, long avail_off, long used_off, uint32_t size) {
    memset(w, 0, sizeof *w);
    if (size == 0 || size > BH_WATCH_MAX_SIZE || (size & (size - 1))) return -1;
    w->size = size;
    w->exact = 1;
    w->avail = map_range(fd, avail_off, 4 + 2 * (size_t)size, &w->map_avail, &w->len_avail);
    w->used = map_range(fd, used_off, 4 + 8 * (size_t)size, &w->map_used, &w->len_used);
    if (!w->avail || !w->used) { bh_watch_unmap(w); return -1; }
    return 0;
}

void bh_watch_unmap(struct bh_ring_watch *w) {
    if (w->map_avail) munmap(w->map_avail, w->len_avail);
    if (w->map_used) munmap(w->map_used, w->len_used);
    w->map_avail = w->map_used = 0;
    w->avail = w->used = 0;
}

static uint16_t ld16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static uint32_t ld32(const uint8_t *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }

/* RingWatch.sample: the same steps, in the same order. */
void bh_watch_sample(struct bh_ring_watch *w) {
    if (!w->avail || !w->used) return;
    uint32_t size = w->size;
    uint32_t used_now = ld16(w->used + 2);
    uint32_t avail_now = ld16(w->avail + 2);
    uint32_t new_avail = (avail_now - w->avail_pos) & 0xFFFF;
    if (new_avail > size) {
        w->exact = 0;
        new_avail = size;
        w->avail_pos = (avail_now - size) & 0xFFFF;
    }
    for (uint32_t i = 0; i < new_avail; i++) {
        uint32_t pos = (w->avail_pos + i) & 0xFFFF;
        uint32_t head = ld16(w->avail + 4 + 2 * (pos % size));
        if (head >= size) { w->strays++; continue; }
        w->counts[head]++;
        w->last_pos[head] = pos;
    }
    w->avail_pos = avail_now;
    uint32_t new_used = (used_now - w->used_pos) & 0xFFFF;
    if (new_used > size) {
        w->exact = 0;
        new_used = size;
        w->used_pos = (used_now - size) & 0xFFFF;
    }
    for (uint32_t i = 0; i < new_used; i++) {
        uint32_t head = ld32(w->used + 4 + 8 * (((w->used_pos + i) & 0xFFFF) % size));
        if (head >= size || w->counts[head] <= 0) { w->strays++; continue; }
        w->counts[head]--;
    }
    w->used_pos = used_now;
    w->samples++;
}

struct watcher {
    pthread_t thread;
    pthread_mutex_t lock;
    struct bh_ring_watch *w;
    long period_ns;
    int stop;
};

static void *run(void *arg) {
    struct watcher *h = arg;
    struct timespec ts = {0, h->period_ns};
    for (;;) {
        pthread_mutex_lock(&h->lock);
        int stop = h->stop;
        if (!stop) bh_watch_sample(h->w);
        pthread_mutex_unlock(&h->lock);
        if (stop) return 0;
        nanosleep(&ts, 0);
    }
}

void *bh_watcher_start(struct bh_ring_watch *w, long period_ns) {
    struct watcher *h = calloc(1, sizeof *h);
    if (!h) return 0;
    h->w = w;
    h->period_ns = period_ns;
    pthread_mutex_init(&h->lock, 0);
    if (pthread_create(&h->thread, 0, run, h)) { free(h); return 0; }
    return h;
}

/* Between pause and resume the thread does not touch the watch: the caller may read it, take
   a last look itself and re-seed it. */
void bh_watcher_pause(void *h) { pthread_mutex_lock(&((struct watcher *)h)->lock); }
void bh_watcher_resume(void *h) { pthread_mutex_unlock(&((struct watcher *)h)->lock); }

void bh_watcher_stop(void *p) {
    struct watcher *h = p;
    pthread_mutex_lock(&h->lock);
    h->stop = 1;
    pthread_mutex_unlock(&h->lock);
    pthread_join(h->thread, 0);
    pthread_mutex_destroy(&h->lock);
    free(h);
}
""", extra_compile_args=["-O2", "-pthread"], extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
