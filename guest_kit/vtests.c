/* Phase-2 tests: virtio-blk, virtio-rng and virtio-console through the CPL3 virtio-mmio driver. */
#include "virtio.h"
#include "tests.h"

#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR 512
#define CHUNK_SECTORS 8 /* sectors per read/write request */

/* Request memory inside the device's buffer area. */
#define BLK_HDR_OFF 0
#define BLK_STATUS_OFF 16
#define BLK_DATA_OFF 0x1000

static const char *const blk_status_names[] = {"OK", "IOERR", "UNSUPP"};

static const char *blk_status_name(u8 s) { return s < 3 ? blk_status_names[s] : "?"; }

/* One block request: header, optional data buffer, status byte.  Returns 0 (with a detail) only
 * if the transport failed; the device's status lands in *status. */
static int blk_request(struct vdev *v, u32 type, u64 sector, u32 len, int data_write, u8 *status, char *d)
{
	u8 *hdr = v->buf + BLK_HDR_OFF;
	struct vbuf b[3];
	unsigned n = 0;
	u32 used;

	*(u32 *)hdr = type;
	*(u32 *)(hdr + 4) = 0;
	*(u64 *)(hdr + 8) = sector;
	v->buf[BLK_STATUS_OFF] = 0xff;
	b[n++] = (struct vbuf){(u64)hdr, 16, 0};
	if (len)
		b[n++] = (struct vbuf){(u64)(v->buf + BLK_DATA_OFF), len, data_write};
	b[n++] = (struct vbuf){(u64)(v->buf + BLK_STATUS_OFF), 1, 1};
	if (!vq_run(v, 0, b, n, &used, d))
		return 0;
	*status = *(volatile u8 *)(v->buf + BLK_STATUS_OFF);
	return 1;
}

static u32 pattern_word(u64 sector, unsigned word, u32 seed)
{
	return (u32)sector * 0x9E3779B1u + word * 0x85EBCA77u + seed;
}

static void fill_pattern(u32 *p, u64 sector, unsigned count, u32 seed)
{
	unsigned s, w;

	for (s = 0; s < count; s++)
		for (w = 0; w < SECTOR / 4; w++)
			*p++ = pattern_word(sector + s, w, seed);
}

/* 1 if the `count` sectors at `p` hold the pattern; else a detail naming the first mismatch. */
static int check_pattern(const u32 *p, u64 sector, unsigned count, u32 seed, char *d)
{
	unsigned s, w;

	for (s = 0; s < count; s++)
		for (w = 0; w < SECTOR / 4; w++, p++)
			if (*p != pattern_word(sector + s, w, seed))
				return fail(d, "mismatch sector=%lu word=%u got=0x%08x want=0x%08x", sector + s, w,
					    *p, pattern_word(sector + s, w, seed));
	return 1;
}

/* Write sectors [0, n) with the pattern for `seed` (write=1), or read them back and check. */
static int blk_pass(struct vdev *v, u64 n, u32 seed, int write, char *d)
{
	u64 s;

	for (s = 0; s < n; s += CHUNK_SECTORS) {
		unsigned count = n - s < CHUNK_SECTORS ? n - s : CHUNK_SECTORS;
		u32 *data = (u32 *)(v->buf + BLK_DATA_OFF);
		u8 st;

		if (write)
			fill_pattern(data, s, count, seed);
		else
			memset(data, 0, count * SECTOR);
		if (!blk_request(v, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, s, count * SECTOR, !write, &st, d))
			return 0;
		if (st != VIRTIO_BLK_S_OK)
			return fail(d, "%s sector=%lu status=%s", write ? "write" : "read", s, blk_status_name(st));
		if (!write && !check_pattern(data, s, count, seed, d))
			return 0;
	}
	return 1;
}

/* blk_pass with up to `qd` requests in flight (gk.blk_qd): request k uses descriptors 3k..3k+2
 * and the k-th 64 KiB of the buffer area; completions are taken in whatever order the device
 * returns them (qemu-storage-daemon completes out of order). */
#define QD_MAX 4
#define QD_SLOT 0x10000

static int blk_pass_qd(struct vdev *v, u64 n, u32 seed, int write, unsigned qd, char *d)
{
	u64 next = 0, sector_of[QD_MAX];
	unsigned inflight = 0, k, count_of[QD_MAX], busy[QD_MAX] = {0};

	while (next < n || inflight) {
		u32 id, len;

		for (k = 0; k < qd && next < n; k++) {
			u8 *base = v->buf + k * QD_SLOT;
			unsigned count = n - next < CHUNK_SECTORS ? n - next : CHUNK_SECTORS;
			struct vbuf b[3];

			if (busy[k])
				continue;
			*(u32 *)base = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
			*(u32 *)(base + 4) = 0;
			*(u64 *)(base + 8) = next;
			base[BLK_STATUS_OFF] = 0xff;
			if (write)
				fill_pattern((u32 *)(base + BLK_DATA_OFF), next, count, seed);
			else
				memset(base + BLK_DATA_OFF, 0, count * SECTOR);
			b[0] = (struct vbuf){(u64)base, 16, 0};
			b[1] = (struct vbuf){(u64)(base + BLK_DATA_OFF), count * SECTOR, !write};
			b[2] = (struct vbuf){(u64)(base + BLK_STATUS_OFF), 1, 1};
			if (!vq_add(v, 0, 3 * k, b, 3))
				return fail(d, "vq_add slot=%u", k);
			busy[k] = 1;
			sector_of[k] = next;
			count_of[k] = count;
			next += count;
			inflight++;
		}
		vq_notify(v, 0);
		if (!vq_next_used(v, 0, &id, &len, v->timeout_ms, d))
			return 0;
		k = id / 3;
		if (id % 3 || k >= qd || !busy[k])
			return fail(d, "used id %u is not a head in flight", id);
		busy[k] = 0;
		inflight--;
		if (v->buf[k * QD_SLOT + BLK_STATUS_OFF] != VIRTIO_BLK_S_OK)
			return fail(d, "%s sector=%lu status=%s", write ? "write" : "read", sector_of[k],
				    blk_status_name(v->buf[k * QD_SLOT + BLK_STATUS_OFF]));
		if (!write && !check_pattern((u32 *)(v->buf + k * QD_SLOT + BLK_DATA_OFF), sector_of[k],
					     count_of[k], seed, d))
			return 0;
	}
	return 1;
}

static int blk_open(struct vdev *v, u64 *capacity, char *d)
{
	u32 gen;

	if (!vdev_open(v, "blk", VIRTIO_ID_BLOCK, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, 1, d))
		return 0;
	do { /* §4.2.2.2: 64-bit config fields are read as two 32-bit halves under a generation */
		gen = mmio_r32(v->base + VIRTIO_MMIO_CONFIG_GENERATION);
		*capacity = vdev_config32(v, 0) | (u64)vdev_config32(v, 4) << 32;
	} while (gen != mmio_r32(v->base + VIRTIO_MMIO_CONFIG_GENERATION));
	return 1;
}

static int blk_readonly_checks(struct vdev *v, u64 capacity, char *d)
{
	u8 st;

	if (!blk_request(v, VIRTIO_BLK_T_IN, 0, SECTOR, 1, &st, d))
		return 0;
	if (st != VIRTIO_BLK_S_OK)
		return fail(d, "read sector=0 status=%s", blk_status_name(st));
	fill_pattern((u32 *)(v->buf + BLK_DATA_OFF), 0, 1, 0xdead);
	if (!blk_request(v, VIRTIO_BLK_T_OUT, 0, SECTOR, 0, &st, d))
		return 0;
	if (st != VIRTIO_BLK_S_IOERR)
		return fail(d, "write-to-read-only status=%s (want IOERR)", blk_status_name(st));
	fmt(d, DETAIL_SIZE, "capacity=%lu ro-feature=%d irq=%u poll=%u", capacity,
	    !!(v->features & VIRTIO_BLK_F_RO), v->by_irq, v->by_poll);
	return 1;
}

int test_virtio_blk_ro(char *d)
{
	struct vdev v;
	u64 capacity;
	int ok;

	if (!blk_open(&v, &capacity, d))
		return 0;
	ok = blk_readonly_checks(&v, capacity, d);
	vdev_close(&v);
	return ok;
}

static int blk_full(struct vdev *v, u64 capacity, char *d)
{
	u64 n = cmdline_u64("gk.blk_sectors", 64);
	u32 seed = cmdline_u64("gk.blk_seed", 1);
	char id[VIRTIO_BLK_ID_BYTES + 1];
	u8 st;

	if (n > capacity)
		return fail(d, "disk-too-small capacity=%lu sectors=%lu", capacity, n);
	if (!blk_pass(v, n, seed, 1, d))
		return 0;
	if (v->features & VIRTIO_BLK_F_FLUSH) {
		if (!blk_request(v, VIRTIO_BLK_T_FLUSH, 0, 0, 0, &st, d))
			return 0;
		if (st != VIRTIO_BLK_S_OK)
			return fail(d, "flush status=%s", blk_status_name(st));
	}
	if (!blk_pass(v, n, seed, 0, d))
		return 0;
	memset(v->buf + BLK_DATA_OFF, 0, VIRTIO_BLK_ID_BYTES);
	if (!blk_request(v, VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, 1, &st, d))
		return 0;
	if (st != VIRTIO_BLK_S_OK)
		return fail(d, "get-id status=%s", blk_status_name(st));
	memcpy(id, v->buf + BLK_DATA_OFF, VIRTIO_BLK_ID_BYTES);
	id[VIRTIO_BLK_ID_BYTES] = 0;
	print("guest_kit: virtio-blk id \"%s\"\n", id);
	/* Past the end: must complete, with IOERR. */
	if (!blk_request(v, VIRTIO_BLK_T_IN, capacity, SECTOR, 1, &st, d))
		return 0;
	if (st != VIRTIO_BLK_S_IOERR)
		return fail(d, "read-past-capacity status=%s (want IOERR)", blk_status_name(st));
	fmt(d, DETAIL_SIZE, "capacity=%lu sectors=%lu flush=%d irq=%u poll=%u", capacity, n,
	    !!(v->features & VIRTIO_BLK_F_FLUSH), v->by_irq, v->by_poll);
	return 1;
}

int test_virtio_blk(char *d)
{
	struct vdev v;
	u64 capacity;
	int ok;

	if (!blk_open(&v, &capacity, d))
		return 0;
	if (cmdline_u64("gk.blk_ro", 0))
		ok = blk_readonly_checks(&v, capacity, d);
	else
		ok = blk_full(&v, capacity, d);
	vdev_close(&v);
	return ok;
}

int test_blk_workload(char *d)
{
	u64 rounds = cmdline_u64("gk.blk_rounds", 1), n = cmdline_u64("gk.blk_sectors", 64), r;
	u32 seed = cmdline_u64("gk.blk_seed", 1);
	unsigned qd = cmdline_u64("gk.blk_qd", 1);
	struct vdev v;
	u64 capacity;
	int ok = 1;

	if (!blk_open(&v, &capacity, d))
		return 0;
	/* A device process may be killed mid-request: wait for answers, long. */
	v.timeout_ms = cmdline_u64("gk.io_timeout_ms", 30000);
	if (n > capacity) {
		vdev_close(&v);
		return fail(d, "disk-too-small capacity=%lu sectors=%lu", capacity, n);
	}
	if (qd < 1 || qd > QD_MAX || 3 * qd > v.vq[0].num) {
		vdev_close(&v);
		return fail(d, "gk.blk_qd=%u: 1 to %u", qd, QD_MAX);
	}
	for (r = 0; r < rounds && ok; r++) {
		char step[DETAIL_SIZE];

		if (qd > 1)
			ok = blk_pass_qd(&v, n, seed + r, 1, qd, step) && blk_pass_qd(&v, n, seed + r, 0, qd, step);
		else
			ok = blk_pass(&v, n, seed + r, 1, step) && blk_pass(&v, n, seed + r, 0, step);
		if (!ok)
			fail(d, "round=%lu %s", r, step);
		else
			print("guest_kit: blk-workload round %lu/%lu ok\n", r + 1, rounds);
	}
	if (ok)
		fmt(d, DETAIL_SIZE, "rounds=%lu errors=0 qd=%u irq=%u poll=%u", rounds, qd, v.by_irq, v.by_poll);
	vdev_close(&v);
	return ok;
}

int test_virtio_rng(char *d)
{
	struct vdev v;
	struct vbuf b;
	u32 used, i;
	int ok = 1;

	if (!vdev_open(&v, "rng", VIRTIO_ID_RNG, 0, 1, d))
		return 0;
	memset(v.buf, 0, 64);
	b = (struct vbuf){(u64)v.buf, 64, 1};
	if (!vq_run(&v, 0, &b, 1, &used, d)) {
		ok = 0;
	} else if (used == 0 || used > 64) {
		ok = fail(d, "used-len=%u (want 1..64)", used);
	} else {
		for (i = 1; i < used && v.buf[i] == v.buf[0]; i++)
			;
		if (used > 1 && i == used)
			ok = fail(d, "all-%u-bytes-equal 0x%02x", used, v.buf[0]);
		else
			fmt(d, DETAIL_SIZE, "bytes=%u irq=%u poll=%u", used, v.by_irq, v.by_poll);
	}
	vdev_close(&v);
	return ok;
}

int test_virtio_console(char *d)
{
	static const char msg[] = "hello from guest_kit console\n";
	struct vdev v;
	struct vbuf b;
	u32 used;
	int ok;

	/* No VIRTIO_CONSOLE_F_MULTIPORT: queue 0 is port 0's receiveq, queue 1 its transmitq. */
	if (!vdev_open(&v, "console", VIRTIO_ID_CONSOLE, 0, 2, d))
		return 0;
	memcpy(v.buf, msg, sizeof(msg) - 1);
	b = (struct vbuf){(u64)v.buf, sizeof(msg) - 1, 0};
	ok = vq_run(&v, 1, &b, 1, &used, d);
	if (ok)
		fmt(d, DETAIL_SIZE, "bytes=%u irq=%u poll=%u", (unsigned)sizeof(msg) - 1, v.by_irq, v.by_poll);
	vdev_close(&v);
	return ok;
}
