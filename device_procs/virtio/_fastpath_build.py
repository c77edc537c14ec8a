"""cffi API-mode build of `device_procs.virtio._fastpath`: the split-virtqueue chain walk and
virtio-net's transmit and receive loops in C, run only inside the jailed device process.

Why: a TCP stream through the net device spent over half a CPU in the device's Python (≈ 26 µs
of interpreter per 64 KiB frame: the ring, the chain walk, the header check, the counters) and
that, not the tap, capped the stream.  The Python implementations (`Queue.parse_chain`,
`net_header.check_tx`/`check_rx`, `NetDevice`'s loops) stay the reference: the unit tests run the
same rings through both, including every hostile chain and the hypothesis fuzz tables, and
compare results and error codes.  `fastpath.py` is the Python side; the error codes map to the
messages of `queue.CHAIN_ERRORS`.

Everything the guest controls is checked exactly as the Python does (same limits, same order of
checks); guest addresses are translated only through the region table, with overflow-safe
bounds.  The index loads are acquire, the used index store is release, and the EVENT_IDX
re-check after publishing avail_event has the store-load fence the Python cannot express.
Built by `setup.py build_ext --inplace` (listed in setup.py's CFFI_MODULES)."""

from __future__ import annotations

from cffi import FFI

# One declaration for cffi and for the compiler.
DECLS = """
#define BH_IOV_MAX 1024

struct bh_region { uint64_t gpa; uint64_t size; uint8_t *host; };

struct bh_vq {
    uint8_t *desc, *avail, *used;
    uint32_t size;
    uint32_t next_avail, used_idx;     /* u16 values */
    int32_t event_idx, indirect;
    const struct bh_region *regions;
    int32_t nregions;
    uint8_t *inflight;                 /* vhost-user inflight region of this queue, or NULL */
    uint64_t counter;                  /* its next "taken" counter */
};

struct bh_chain {
    uint32_t head, nr, nw;             /* true buffer counts (arrays hold BH_IOV_MAX at most) */
    uint64_t rlen, wlen;
    int32_t err;
    uint64_t a0, a1;                   /* the values an error message names */
    struct iovec riov[BH_IOV_MAX + 1];
    struct iovec wiov[BH_IOV_MAX + 1]; /* + 1: room for receive's bounce tail */
    uint64_t raddr[BH_IOV_MAX], waddr[BH_IOV_MAX];
};

struct bh_net_counters {
    uint64_t chains, tx_packets, tx_bytes, tx_eagain, tx_dropped_no_header, tx_dropped_runt,
        tx_dropped_flags, tx_dropped_csum, tx_dropped_hdr_len, tx_dropped_gso_type,
        tx_dropped_gso_size, tx_dropped_oversize, tx_dropped_tap_error,
        rx_packets, rx_bytes, rx_buffers, rx_bad_buffers, rx_dropped_runt, rx_dropped_csum,
        rx_dropped_oversize, rx_dropped_gso_type, rx_dropped_too_big, rx_dropped_filtered;
};

struct bh_blk_counters {
    uint64_t chains, requests, reads, writes, bytes_read, bytes_written, errors;
};

struct bh_rx_filter {
    int32_t enabled;                   /* CTRL_RX negotiated */
    int32_t promisc, allmulti, all_unicast;
    uint8_t mac[6];
    uint32_t n_unicast, n_multicast;
    const uint8_t *unicast, *multicast; /* 6 bytes each */
};
"""

# Return codes (also in fastpath.py).
CODES = """
#define BH_OK 0
#define BH_EMPTY 1
#define BH_SLOW 2
#define BH_EAGAIN 3
#define BH_TAP_ERROR 4
#define BH_STOP 5
#define BH_E_PENDING 10
#define BH_E_HEAD 11
#define BH_E_LOOP 12
#define BH_E_INDIRECT_NOT_NEGOTIATED 13
#define BH_E_INDIRECT_NESTED 14
#define BH_E_INDIRECT_NEXT 15
#define BH_E_INDIRECT_LEN 16
#define BH_E_INDIRECT_ENTRIES 17
#define BH_E_INDIRECT_RAM 18
#define BH_E_ORDER 19
#define BH_E_BYTES 20
#define BH_E_BUFFER_RAM 21
#define BH_E_NEXT 22
"""

ffibuilder = FFI()
ffibuilder.cdef("struct iovec { void *iov_base; size_t iov_len; };\n" + DECLS + CODES + """
int bh_pending(struct bh_vq *q, uint32_t *out);
int bh_walk(struct bh_vq *q, uint32_t head, struct bh_chain *c);
int bh_check_tx(const uint8_t *hdr, uint64_t frame_len, uint64_t features, uint32_t mtu);
int bh_check_rx(const uint8_t *hdr, uint64_t frame_len, uint64_t features, uint32_t mtu);
int bh_net_tx(struct bh_vq *q, struct bh_chain *c, int fd, uint64_t features, uint32_t mtu,
              struct bh_net_counters *k, int32_t *err_out);
int bh_net_rx(struct bh_vq *q, struct bh_chain *c, int fd, uint64_t features, uint32_t mtu,
              const struct bh_rx_filter *f, uint8_t *bounce, uint64_t bounce_len,
              uint32_t budget, struct bh_net_counters *k, int32_t *err_out);
int bh_blk(struct bh_vq *q, struct bh_chain *c, int fd, uint64_t capacity, int readonly,
           struct bh_blk_counters *k);
""")

ffibuilder.set_source("device_procs.virtio._fastpath", r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
""" + DECLS + CODES + r"""

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define MAX_INDIRECT_DESCRIPTORS 1024
#define MAX_CHAIN_BYTES (64ull * 1024 * 1024)

/* virtio-net (VIRTIO 1.2 §5.1.3, §5.1.6); the Python names are in net_header.py. */
#define HEADER_SIZE 12
#define NUM_BUFFERS_OFFSET 10
#define F_CSUM (1ull << 0)
#define F_GUEST_CSUM (1ull << 1)
#define F_GUEST_TSO4 (1ull << 7)
#define F_GUEST_TSO6 (1ull << 8)
#define F_GUEST_ECN (1ull << 9)
#define F_GUEST_UFO (1ull << 10)
#define F_HOST_TSO4 (1ull << 11)
#define F_HOST_TSO6 (1ull << 12)
#define F_HOST_ECN (1ull << 13)
#define F_HOST_UFO (1ull << 14)
#define F_MRG_RXBUF (1ull << 15)
#define GUEST_GSO (F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_UFO)
#define HDR_F_NEEDS_CSUM 1
#define HDR_F_DATA_VALID 2
#define HDR_F_RSC_INFO 4
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_UDP 3
#define GSO_TCPV6 4
#define GSO_ECN 0x80
#define ETH_HLEN 14
#define VLAN_HLEN 4
#define TCP_CSUM_OFFSET 16
#define TCP_HLEN_MIN 20
#define MAX_GSO_FRAME (65550 + VLAN_HLEN)

/* Drop reasons, the suffixes of the Python counters (net_header.check_tx / check_rx). */
enum { DROP_NONE, DROP_RUNT, DROP_FLAGS, DROP_CSUM, DROP_HDR_LEN, DROP_GSO_TYPE, DROP_GSO_SIZE, DROP_OVERSIZE };

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t ld16_acquire(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}
static inline void st16_release(uint8_t *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

static int fail(struct bh_chain *c, int code, uint64_t a0, uint64_t a1) {
    c->err = code; c->a0 = a0; c->a1 = a1;
    return code;
}

/* Host address of guest [gpa, gpa + len), len > 0, inside one region; NULL if not RAM.
   Like GuestMemory._find: the region holding gpa decides; no sum can overflow. */
static uint8_t *translate(const struct bh_vq *q, uint64_t gpa, uint64_t len) {
    for (int i = 0; i < q->nregions; i++) {
        const struct bh_region *r = &q->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint64_t off = gpa - r->gpa;
            return len <= r->size - off ? r->host + off : NULL;
        }
    }
    return NULL;
}

/* Chains made available and not yet consumed (Queue.pending). */
int bh_pending(struct bh_vq *q, uint32_t *out) {
    uint32_t pending = (uint32_t)(ld16_acquire(q->avail + 2) - q->next_avail) & 0xFFFF;
    if (pending > q->size) { *out = pending; return BH_E_PENDING; }
    *out = pending;
    return BH_OK;
}

/* Queue.parse_chain: the same checks in the same order; BH_SLOW when the chain is valid but
   has more buffers of one direction than BH_IOV_MAX (the Python path takes those). */
int bh_walk(struct bh_vq *q, uint32_t head, struct bh_chain *c) {
    c->head = head; c->nr = c->nw = 0; c->rlen = c->wlen = 0; c->err = 0;
    if (head >= q->size)
        return fail(c, BH_E_HEAD, head, q->size);
    const uint8_t *table = q->desc;
    uint32_t table_len = q->size, index = head, steps_left = q->size;
    int in_indirect = 0;
    uint64_t total = 0;
    for (;;) {
        if (steps_left == 0)
            return fail(c, BH_E_LOOP, head, 0);
        steps_left--;
        const uint8_t *d = table + 16 * (size_t)index;
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12), nxt = ld16(d + 14);
        if (flags & VIRTQ_DESC_F_INDIRECT) {
            if (!q->indirect) return fail(c, BH_E_INDIRECT_NOT_NEGOTIATED, 0, 0);
            if (in_indirect) return fail(c, BH_E_INDIRECT_NESTED, 0, 0);
            if (flags & VIRTQ_DESC_F_NEXT) return fail(c, BH_E_INDIRECT_NEXT, 0, 0);
            if (len == 0 || len % 16) return fail(c, BH_E_INDIRECT_LEN, len, 0);
            uint32_t entries = len / 16;
            if (entries > MAX_INDIRECT_DESCRIPTORS)
                return fail(c, BH_E_INDIRECT_ENTRIES, entries, 0);
            const uint8_t *t = translate(q, addr, len);
            if (t == NULL) return fail(c, BH_E_INDIRECT_RAM, addr, len);
            table = t; table_len = entries; index = 0; in_indirect = 1; steps_left = entries;
            continue;
        }
        if (len) {
            int writable = flags & VIRTQ_DESC_F_WRITE;
            if (!writable && c->nw) return fail(c, BH_E_ORDER, 0, 0);
            total += len;
            if (total > MAX_CHAIN_BYTES) return fail(c, BH_E_BYTES, 0, 0);
            uint8_t *h = translate(q, addr, len);
            if (h == NULL) return fail(c, BH_E_BUFFER_RAM, addr, len);
            if (writable) {
                if (c->nw < BH_IOV_MAX) {
                    c->wiov[c->nw].iov_base = h; c->wiov[c->nw].iov_len = len;
                    c->waddr[c->nw] = addr;
                }
                c->nw++; c->wlen += len;
            } else {
                if (c->nr < BH_IOV_MAX) {
                    c->riov[c->nr].iov_base = h; c->riov[c->nr].iov_len = len;
                    c->raddr[c->nr] = addr;
                }
                c->nr++; c->rlen += len;
            }
        }
        if (!(flags & VIRTQ_DESC_F_NEXT))
            break;
        if (nxt >= table_len)
            return fail(c, BH_E_NEXT, nxt, table_len);
        index = nxt;
    }
    return (c->nr > BH_IOV_MAX || c->nw > BH_IOV_MAX) ? BH_SLOW : BH_OK;
}

/* -- the ring's two ends, with vhost-user inflight tracking (inflight.py's layout) ----------- */
#define INFLIGHT_HEADER 16
#define INFLIGHT_LAST_BATCH 12
#define INFLIGHT_USED_IDX 14

static uint32_t avail_head(struct bh_vq *q, uint32_t pos) {
    return ld16(q->avail + 4 + 2 * (pos % q->size));
}

/* The chain at next_avail leaves the available ring (InflightQueue.take). */
static void consume(struct bh_vq *q, uint32_t head) {
    q->next_avail = (q->next_avail + 1) & 0xFFFF;
    if (q->inflight) {
        uint8_t *s = q->inflight + INFLIGHT_HEADER + 16 * (size_t)head;
        s[0] = 1;
        st64(s + 8, q->counter++);
    }
}

/* Queue.add_used (and InflightQueue's before_used / after_used around it). */
static void add_used(struct bh_vq *q, uint32_t head, uint32_t len) {
    uint8_t *s = NULL;
    if (q->inflight) {
        s = q->inflight + INFLIGHT_HEADER + 16 * (size_t)head;
        st16(s + 6, ld16(q->inflight + INFLIGHT_LAST_BATCH));
        st16(q->inflight + INFLIGHT_LAST_BATCH, head);
    }
    uint8_t *e = q->used + 4 + 8 * (size_t)(q->used_idx % q->size);
    st32(e, head);
    st32(e + 4, len);
    q->used_idx = (q->used_idx + 1) & 0xFFFF;
    st16_release(q->used + 2, q->used_idx);  /* the element before the index */
    if (s) {
        s[0] = 0;
        st16(q->inflight + INFLIGHT_USED_IDX, q->used_idx);
    }
}

/* Queue.enable_notification: 1 if more arrived meanwhile, 0 if none, < 0 an error code. */
static int enable_notification(struct bh_vq *q, struct bh_chain *c) {
    if (q->event_idx) {
        st16(q->used + 4 + 8 * (size_t)q->size, (uint16_t)q->next_avail);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* publish avail_event before re-reading idx */
    }
    uint32_t pending;
    if (bh_pending(q, &pending) != BH_OK)
        return -fail(c, BH_E_PENDING, pending, q->size);
    return pending > 0;
}

/* The next available head, or -1 with *rc = BH_EMPTY (notifications re-enabled, nothing came)
   or an error code. */
static int64_t next_head(struct bh_vq *q, struct bh_chain *c, int *rc) {
    for (;;) {
        uint32_t pending;
        if (bh_pending(q, &pending) != BH_OK) {
            *rc = fail(c, BH_E_PENDING, pending, q->size);
            return -1;
        }
        if (pending)
            return avail_head(q, q->next_avail);
        int more = enable_notification(q, c);
        if (more < 0) { *rc = -more; return -1; }
        if (!more) { *rc = BH_EMPTY; return -1; }
    }
}

/* The next available chain, walked into `c` (not consumed): BH_OK with *head, or what stops. */
static int next_chain(struct bh_vq *q, struct bh_chain *c, int64_t *head) {
    int rc;
    *head = next_head(q, c, &rc);
    if (*head < 0) return rc;
    return bh_walk(q, (uint32_t)*head, c);
}

/* dst[at..] = the buffers of src after its first `skip` bytes; the new count, or room + 1 when
   they do not fit in `room` entries. */
static uint32_t iov_after(const struct iovec *src, uint32_t n, size_t skip, struct iovec *dst,
                          uint32_t at, uint32_t room) {
    uint32_t i = 0;
    for (; i < n && skip >= src[i].iov_len; i++) skip -= src[i].iov_len;
    for (; i < n; i++, skip = 0) {
        if (at == room) return room + 1;
        dst[at].iov_base = (uint8_t *)src[i].iov_base + skip;
        dst[at].iov_len = src[i].iov_len - skip;
        at++;
    }
    return at;
}

/* -- virtio-net header checks (net_header.check_tx / check_rx, same order) ------------------ */
struct hdr { uint8_t flags, gso_type; uint16_t hdr_len, gso_size, csum_start, csum_offset; };

static struct hdr parse_hdr(const uint8_t *p) {
    struct hdr h = {p[0], p[1], ld16(p + 2), ld16(p + 4), ld16(p + 6), ld16(p + 8)};
    return h;
}

static uint64_t max_plain_frame(uint32_t mtu) { return (uint64_t)mtu + ETH_HLEN + VLAN_HLEN; }

int bh_check_tx(const uint8_t *raw, uint64_t frame_len, uint64_t features, uint32_t mtu) {
    struct hdr h = parse_hdr(raw);
    if (frame_len < ETH_HLEN) return DROP_RUNT;
    if (h.flags & (HDR_F_DATA_VALID | HDR_F_RSC_INFO)) return DROP_FLAGS;
    if (h.flags & HDR_F_NEEDS_CSUM) {
        if (!(features & F_CSUM)) return DROP_CSUM;
        if ((uint64_t)h.csum_start + h.csum_offset + 2 > frame_len) return DROP_CSUM;
    }
    if (h.hdr_len > frame_len) return DROP_HDR_LEN;
    uint8_t base = h.gso_type & ~GSO_ECN;
    if (h.gso_type == GSO_NONE)
        return frame_len > max_plain_frame(mtu) ? DROP_OVERSIZE : DROP_NONE;
    uint64_t needed = base == GSO_TCPV4 ? F_HOST_TSO4 : base == GSO_TCPV6 ? F_HOST_TSO6
                    : base == GSO_UDP ? F_HOST_UFO : 0;
    if (!needed || !(features & needed)) return DROP_GSO_TYPE;
    if ((h.gso_type & GSO_ECN) && !(features & F_HOST_ECN)) return DROP_GSO_TYPE;
    if (!(h.flags & HDR_F_NEEDS_CSUM)) return DROP_CSUM;
    if ((base == GSO_TCPV4 || base == GSO_TCPV6)
        && (h.csum_offset != TCP_CSUM_OFFSET || (uint64_t)h.csum_start + TCP_HLEN_MIN > frame_len))
        return DROP_CSUM;
    if (h.gso_size == 0 || h.gso_size > mtu) return DROP_GSO_SIZE;
    if (frame_len > MAX_GSO_FRAME) return DROP_OVERSIZE;
    return DROP_NONE;
}

int bh_check_rx(const uint8_t *raw, uint64_t frame_len, uint64_t features, uint32_t mtu) {
    struct hdr h = parse_hdr(raw);
    if (frame_len < ETH_HLEN) return DROP_RUNT;
    if ((h.flags & HDR_F_NEEDS_CSUM) && !(features & F_GUEST_CSUM)) return DROP_CSUM;
    if (h.gso_type == GSO_NONE)
        return frame_len > max_plain_frame(mtu) ? DROP_OVERSIZE : DROP_NONE;
    uint8_t base = h.gso_type & ~GSO_ECN;
    uint64_t needed = base == GSO_TCPV4 ? F_GUEST_TSO4 : base == GSO_TCPV6 ? F_GUEST_TSO6
                    : base == GSO_UDP ? F_GUEST_UFO : 0;
    if (!needed || !(features & needed)) return DROP_GSO_TYPE;
    if ((h.gso_type & GSO_ECN) && !(features & F_GUEST_ECN)) return DROP_GSO_TYPE;
    return frame_len > MAX_GSO_FRAME ? DROP_OVERSIZE : DROP_NONE;
}

/* The first n bytes of a scatter list (n <= its total). */
static void gather_prefix(const struct iovec *iov, uint32_t cnt, uint8_t *out, size_t n) {
    for (uint32_t i = 0; i < cnt && n; i++) {
        size_t take = iov[i].iov_len < n ? iov[i].iov_len : n;
        memcpy(out, iov[i].iov_base, take);
        out += take; n -= take;
    }
}

/* -- transmit (NetDevice._drain_tx) ------------------------------------------------------------
   Until the ring is empty (BH_EMPTY, notifications re-enabled), the tap is full (BH_EAGAIN: the
   chain stays available, nothing consumed), a chain the Python must take (BH_SLOW, not
   consumed), a tap write error (BH_TAP_ERROR, that frame dropped and used, *err_out = errno)
   or a broken ring (an error code). */
int bh_net_tx(struct bh_vq *q, struct bh_chain *c, int fd, uint64_t features, uint32_t mtu,
              struct bh_net_counters *k, int32_t *err_out) {
    for (;;) {
        int64_t head;
        int rc = next_chain(q, c, &head);
        if (rc != BH_OK) return rc;
        if (c->rlen < HEADER_SIZE) {
            consume(q, head); k->chains++; k->tx_dropped_no_header++;
            add_used(q, head, 0);
            continue;
        }
        uint8_t raw[HEADER_SIZE];
        gather_prefix(c->riov, c->nr, raw, HEADER_SIZE);
        uint64_t frame_len = c->rlen - HEADER_SIZE;
        int reason = bh_check_tx(raw, frame_len, features, mtu);
        if (reason != DROP_NONE) {
            consume(q, head); k->chains++;
            uint64_t *slot[] = {NULL, &k->tx_dropped_runt, &k->tx_dropped_flags,
                                &k->tx_dropped_csum, &k->tx_dropped_hdr_len,
                                &k->tx_dropped_gso_type, &k->tx_dropped_gso_size,
                                &k->tx_dropped_oversize};
            (*slot[reason])++;
            add_used(q, head, 0);
            continue;
        }
        /* The tap gets the header that was checked, not the guest's bytes again (which the
           guest may rewrite meanwhile): our copy, then the frame after the header. */
        struct iovec *iov = c->wiov;  /* free on the transmitq: device-writable buffers are ignored */
        iov[0].iov_base = raw;
        iov[0].iov_len = HEADER_SIZE;
        uint32_t niov = iov_after(c->riov, c->nr, HEADER_SIZE, iov, 1, BH_IOV_MAX);
        if (niov > BH_IOV_MAX) return BH_SLOW;  /* writev's limit: the Python takes it */
        ssize_t n;
        do {
            n = writev(fd, iov, (int)niov);
        } while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            k->tx_eagain++;
            return BH_EAGAIN;
        }
        consume(q, head); k->chains++;
        add_used(q, head, 0);  /* §2.7.8: the device wrote nothing */
        if (n < 0) {
            *err_out = errno;
            k->tx_dropped_tap_error++;
            return BH_TAP_ERROR;
        }
        k->tx_packets++;
        k->tx_bytes += frame_len;
    }
}

/* -- receive (NetDevice._receive / _complete with nothing held) --------------------------------
   Buffers are looked at in ring order without being consumed until a frame fills them, so
   nothing is held between calls.  Per frame: the chains from next_avail until `max_frame`
   bytes are covered (one chain without MRG_RXBUF), one readv into them plus the bounce tail.
   Stops at BH_EMPTY (no receive buffer: the caller starves), BH_EAGAIN (tap empty), BH_STOP
   (budget spent, or a frame that spilled into the bounce tail: its length is *err_out and the
   caller places it by copy, as the Python does), BH_SLOW (a chain the Python must take), a tap
   error (BH_TAP_ERROR, *err_out = errno) or a broken ring. */
static int filter_accepts(const struct bh_rx_filter *f, const uint8_t *dst) {
    static const uint8_t broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (!f->enabled || f->promisc || memcmp(dst, broadcast, 6) == 0) return 1;
    if (dst[0] & 1) {
        if (f->allmulti) return 1;
        for (uint32_t i = 0; i < f->n_multicast; i++)
            if (memcmp(dst, f->multicast + 6 * i, 6) == 0) return 1;
        return 0;
    }
    if (memcmp(dst, f->mac, 6) == 0 || f->all_unicast) return 1;
    for (uint32_t i = 0; i < f->n_unicast; i++)
        if (memcmp(dst, f->unicast + 6 * i, 6) == 0) return 1;
    return 0;
}

#define RX_MAX_CHAINS 256

int bh_net_rx(struct bh_vq *q, struct bh_chain *c, int fd, uint64_t features, uint32_t mtu,
              const struct bh_rx_filter *f, uint8_t *bounce, uint64_t bounce_len,
              uint32_t budget, struct bh_net_counters *k, int32_t *err_out) {
    int mergeable = (features & F_MRG_RXBUF) != 0;
    uint64_t max_frame = HEADER_SIZE + ((features & GUEST_GSO) ? MAX_GSO_FRAME : max_plain_frame(mtu));
    static struct iovec iov[BH_IOV_MAX + 1];
    uint32_t heads[RX_MAX_CHAINS];
    uint64_t lens[RX_MAX_CHAINS];
    for (uint32_t frame = 0; frame < budget; frame++) {
        uint32_t nchains = 0, niov = 0;
        uint64_t held = 0;
        int rc;
        /* Gather, from next_avail, without consuming. */
        while (held < (mergeable ? max_frame : 1) && nchains < RX_MAX_CHAINS) {
            uint32_t pending;
            if (bh_pending(q, &pending) != BH_OK)
                return fail(c, BH_E_PENDING, pending, q->size);
            if (nchains >= pending) {
                if (nchains) break;            /* what is there may be enough for this frame */
                int more = enable_notification(q, c);
                if (more < 0) return -more;
                if (!more) return BH_EMPTY;
                continue;
            }
            uint32_t head = avail_head(q, (q->next_avail + nchains) & 0xFFFF);
            rc = bh_walk(q, head, c);
            if (rc != BH_OK) {
                if (nchains) break;            /* met at the front, after this frame */
                return rc;
            }
            if (c->wlen < HEADER_SIZE) {
                if (nchains) break;
                /* §5.1.6.3.1: every receive buffer holds the header; give it back empty. */
                consume(q, head); k->chains++; k->rx_bad_buffers++;
                add_used(q, head, 0);
                continue;
            }
            if (niov + c->nw > BH_IOV_MAX) {
                if (nchains) break;
                return BH_SLOW;
            }
            memcpy(iov + niov, c->wiov, sizeof(struct iovec) * c->nw);
            niov += c->nw;
            heads[nchains] = head;
            lens[nchains] = c->wlen;
            nchains++;
            held += c->wlen;
            if (!mergeable) break;
        }
        iov[niov].iov_base = bounce;
        iov[niov].iov_len = bounce_len;
        ssize_t n;
        do {
            n = readv(fd, iov, (int)niov + 1);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return BH_EAGAIN;
            *err_out = errno;
            return BH_TAP_ERROR;
        }
        if ((uint64_t)n > held) {
            /* Did not fit what was gathered: the caller copies it out of the buffers and the
               tail (nothing consumed yet) and places it its own way. */
            *err_out = (int32_t)n;
            c->nr = niov;  /* how many of iov[] are guest buffers */
            memcpy(c->wiov, iov, sizeof(struct iovec) * (niov + 1));
            return BH_STOP;
        }
        if (n == 0) { *err_out = 0; return BH_TAP_ERROR; }  /* end of file: the Python says so */
        uint8_t head_bytes[HEADER_SIZE + 6];
        int reason;
        if ((uint64_t)n < HEADER_SIZE) {
            reason = DROP_RUNT;
        } else {
            size_t want = (uint64_t)n < sizeof head_bytes ? (size_t)n : sizeof head_bytes;
            memset(head_bytes, 0, sizeof head_bytes);
            gather_prefix(iov, niov, head_bytes, want);
            reason = bh_check_rx(head_bytes, (uint64_t)n - HEADER_SIZE, features, mtu);
            if (reason == DROP_NONE && f->enabled && !filter_accepts(f, head_bytes + HEADER_SIZE)) {
                k->rx_dropped_filtered++;
                continue;                      /* the buffers stay for the next frame */
            }
        }
        if (reason != DROP_NONE) {
            uint64_t *slot[] = {NULL, &k->rx_dropped_runt, NULL, &k->rx_dropped_csum, NULL,
                                &k->rx_dropped_gso_type, NULL, &k->rx_dropped_oversize};
            (*slot[reason])++;
            continue;
        }
        /* §5.1.6.4.1: every buffer but the last used up to its full length; num_buffers is
           how many. */
        uint64_t left = (uint64_t)n;
        uint32_t used = 0;
        while (left) {
            uint64_t take = lens[used] < left ? lens[used] : left;
            left -= take;
            used++;
        }
        uint8_t nb[2] = {(uint8_t)(used & 0xFF), (uint8_t)(used >> 8)};
        /* num_buffers sits in the first 12 bytes, which may span buffers. */
        size_t skip = NUM_BUFFERS_OFFSET;
        for (uint32_t i = 0, w = 0; i < niov && w < 2; i++) {
            size_t len = iov[i].iov_len;
            uint8_t *p = iov[i].iov_base;
            while (w < 2 && len) {
                if (skip) {
                    size_t s = skip < len ? skip : len;
                    p += s; len -= s; skip -= s;
                    continue;
                }
                *p++ = nb[w++]; len--;
            }
        }
        left = (uint64_t)n;
        for (uint32_t i = 0; i < used; i++) {
            uint64_t take = lens[i] < left ? lens[i] : left;
            left -= take;
            consume(q, heads[i]); k->chains++; k->rx_buffers++;
            add_used(q, heads[i], (uint32_t)take);
        }
        k->rx_packets++;
        k->rx_bytes += (uint64_t)n - HEADER_SIZE;
    }
    return BH_STOP;
}

/* -- virtio-blk (BlkDevice.handle_chain for T_IN / T_OUT, VIRTIO 1.2 §5.2.6) -------------------
   Until the ring is empty (BH_EMPTY) or a chain the Python must take (BH_SLOW, not consumed):
   no header or status byte, any other request type, more buffers than one preadv/pwritev
   takes, or an I/O error (reads and writes are idempotent, so the Python runs the request
   again and reports the error its way).  Header {le32 type, le32 reserved, le64 sector}; the
   status is the last writable byte. */
#define BLK_HEADER 16
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define SECTOR_SIZE 512

static int blk_io(int fd, int write, struct iovec *iov, uint32_t cnt, uint64_t off, uint64_t want) {
    uint64_t done = 0;
    while (done < want) {
        ssize_t n = write ? pwritev(fd, iov, (int)cnt, (off_t)(off + done))
                          : preadv(fd, iov, (int)cnt, (off_t)(off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;                 /* an error, or a short read at end of file */
        done += (uint64_t)n;
        while (cnt && (uint64_t)n >= iov->iov_len) { n -= (ssize_t)iov->iov_len; iov++; cnt--; }
        if (cnt && n) { iov->iov_base = (uint8_t *)iov->iov_base + n; iov->iov_len -= (size_t)n; }
    }
    return 0;
}

int bh_blk(struct bh_vq *q, struct bh_chain *c, int fd, uint64_t capacity, int readonly,
           struct bh_blk_counters *k) {
    static struct iovec iov[BH_IOV_MAX];
    for (;;) {
        int64_t head;
        int rc = next_chain(q, c, &head);
        if (rc != BH_OK) return rc;
        if (c->rlen < BLK_HEADER || c->wlen < 1) return BH_SLOW;
        uint8_t hdr[BLK_HEADER];
        gather_prefix(c->riov, c->nr, hdr, BLK_HEADER);
        uint32_t type = ld32(hdr);
        uint64_t sector = ld64(hdr + 8);
        if (type != BLK_T_IN && type != BLK_T_OUT) return BH_SLOW;
        struct iovec *last = &c->wiov[c->nw - 1];
        uint8_t *status = (uint8_t *)last->iov_base + last->iov_len - 1;
        uint32_t cnt = 0;
        uint64_t nbytes;
        if (type == BLK_T_IN) {       /* every writable byte but the status */
            for (uint32_t i = 0; i < c->nw; i++) iov[cnt++] = c->wiov[i];
            if (--iov[cnt - 1].iov_len == 0) cnt--;
            nbytes = c->wlen - 1;
        } else {                      /* every readable byte after the header */
            cnt = iov_after(c->riov, c->nr, BLK_HEADER, iov, 0, BH_IOV_MAX);
            nbytes = c->rlen - BLK_HEADER;
        }
        /* §5.2.6.1: whole sectors; §5.2.6.2: past the end, or a write to a read-only disk,
           is IOERR (BlkDevice._in_range, without overflow). */
        int ok = nbytes % SECTOR_SIZE == 0 && sector <= capacity
                 && nbytes / SECTOR_SIZE <= capacity - sector
                 && !(type == BLK_T_OUT && readonly);
        uint32_t written = 0;
        if (ok) {
            if (blk_io(fd, type == BLK_T_OUT, iov, cnt, sector * SECTOR_SIZE, nbytes) < 0)
                return BH_SLOW;
            if (type == BLK_T_IN) {
                k->reads++; k->bytes_read += nbytes; written = (uint32_t)nbytes;
            } else {
                k->writes++; k->bytes_written += nbytes;
            }
        } else {
            k->errors++;
        }
        *status = ok ? BLK_S_OK : BLK_S_IOERR;
        consume(q, (uint32_t)head);
        k->chains++; k->requests++;
        add_used(q, (uint32_t)head, written + 1);
    }
}
""")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
