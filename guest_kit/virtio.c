/* The virtio-mmio transport and split virtqueues, driver side (VIRTIO 1.2 §2.7, §3.1, §4.2). */
#include "virtio.h"
#include "tests.h"

#define VRING_SLOT_SIZE 0x10000 /* per device: VQ_MAX_QUEUES queues x 16 KiB */
#define VRING_QUEUE_SIZE 0x4000
#define POLL_MS 100

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

static inline u32 rd(struct vdev *v, unsigned off) { return mmio_r32(v->base + off); }
static inline void wr(struct vdev *v, unsigned off, u32 val) { mmio_w32(v->base + off, val); }

/* Parse gk.virtio=TYPE@ADDR:IRQ,... for `type`. */
static int find_device(const char *type, u64 *addr, u64 *irq)
{
	char list[512];
	const char *p = list;
	size_t tlen = strlen(type);

	if (!cmdline_get("gk.virtio", list, sizeof(list)))
		return 0;
	while (*p) {
		if (!memcmp(p, type, tlen) && p[tlen] == '@') {
			const char *q = p + tlen + 1;

			if (parse_u64(&q, addr) && *q == ':' && (q++, parse_u64(&q, irq)))
				return 1;
			return 0;
		}
		while (*p && *p != ',')
			p++;
		if (*p)
			p++;
	}
	return 0;
}

u32 vdev_config32(struct vdev *v, unsigned off) { return rd(v, VIRTIO_MMIO_CONFIG + off); }
u8 vdev_config8(struct vdev *v, unsigned off) { return mmio_r8(v->base + VIRTIO_MMIO_CONFIG + off); }

static int setup_queue(struct vdev *v, unsigned qi, char *d)
{
	struct vq *q = &v->vq[qi];
	u64 ring = VRING_AREA + (u64)v->slot * VRING_SLOT_SIZE + qi * VRING_QUEUE_SIZE;
	u32 max;

	wr(v, VIRTIO_MMIO_QUEUE_SEL, qi);
	if (rd(v, VIRTIO_MMIO_QUEUE_READY))
		return fail(d, "queue%u-ready-after-reset", qi);
	max = rd(v, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (!max)
		return fail(d, "queue%u-missing", qi);
	q->num = max < VQ_SIZE ? max : VQ_SIZE;
	q->avail_idx = q->last_used = 0;
	/* Descriptor table (16 * num), driver area (6 + 2 * num), device area (6 + 8 * num). */
	q->desc = (volatile u8 *)ring;
	q->avail = (volatile u8 *)(ring + 0x1000);
	q->used = (volatile u8 *)(ring + 0x2000);
	memset((void *)ring, 0, VRING_QUEUE_SIZE);
	wr(v, VIRTIO_MMIO_QUEUE_NUM, q->num);
	wr(v, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	wr(v, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u64)q->desc >> 32);
	wr(v, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
	wr(v, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u64)q->avail >> 32);
	wr(v, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
	wr(v, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u64)q->used >> 32);
	wr(v, VIRTIO_MMIO_QUEUE_READY, 1);
	return 1;
}

static int reset(struct vdev *v)
{
	int i;

	wr(v, VIRTIO_MMIO_STATUS, 0);
	for (i = 0; i < 100 && rd(v, VIRTIO_MMIO_STATUS); i++)
		sleep_ms(1);
	return rd(v, VIRTIO_MMIO_STATUS) == 0;
}

int vdev_open(struct vdev *v, const char *type, u32 device_id, u64 want, unsigned nq, char *d)
{
	u64 addr, irq, offered;
	u32 magic, version, id, status;
	unsigned i;

	memset(v, 0, sizeof(*v));
	if (!find_device(type, &addr, &irq))
		return fail(d, "no-device (no %s@ADDR:IRQ in gk.virtio)", type);
	v->base = addr;
	v->irq = irq;
	v->slot = ((addr - VIRTIO_MMIO_BASE) / VIRTIO_MMIO_SLOT_SIZE) % VIRTIO_MMIO_MAX_SLOTS;
	v->buf = (u8 *)(VBUF_AREA + (u64)v->slot * VBUF_SIZE);
	v->nq = nq;
	v->timeout_ms = cmdline_u64("gk.io_timeout_ms", 10000);
	magic = rd(v, VIRTIO_MMIO_MAGIC);
	version = rd(v, VIRTIO_MMIO_VERSION);
	id = rd(v, VIRTIO_MMIO_DEVICE_ID);
	if (magic == 0 || magic == 0xffffffff)
		return fail(d, "no-device (magic 0x%x at 0x%lx)", magic, addr);
	if (magic != VIRTIO_MAGIC)
		return fail(d, "bad-magic 0x%x at 0x%lx", magic, addr);
	if (version != 2)
		return fail(d, "bad-version %u (want 2, modern virtio-mmio)", version);
	if (id == 0)
		return fail(d, "no-device (device id 0 at 0x%lx)", addr);
	if (id != device_id)
		return fail(d, "bad-device-id %u want %u", id, device_id);

	/* §3.1.1 driver initialization. */
	if (!reset(v))
		return fail(d, "reset-timeout status=0x%x", rd(v, VIRTIO_MMIO_STATUS));
	wr(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	wr(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	wr(v, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	offered = rd(v, VIRTIO_MMIO_DEVICE_FEATURES);
	wr(v, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(v, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (!(offered & VIRTIO_F_VERSION_1)) {
		wr(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
		return fail(d, "no-VERSION_1 features=0x%lx", offered);
	}
	v->features = offered & (want | VIRTIO_F_VERSION_1);
	wr(v, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	wr(v, VIRTIO_MMIO_DRIVER_FEATURES, (u32)v->features);
	wr(v, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	wr(v, VIRTIO_MMIO_DRIVER_FEATURES, v->features >> 32);
	wr(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
	status = rd(v, VIRTIO_MMIO_STATUS);
	if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
		wr(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
		return fail(d, "features-not-ok status=0x%x features=0x%lx", status, v->features);
	}
	for (i = 0; i < nq; i++)
		if (!setup_queue(v, i, d)) {
			wr(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
			return 0;
		}
	wr(v, VIRTIO_MMIO_STATUS, status | VIRTIO_STATUS_DRIVER_OK);
	status = rd(v, VIRTIO_MMIO_STATUS);
	if (status & VIRTIO_STATUS_NEEDS_RESET)
		return fail(d, "device-needs-reset status=0x%x", status);
	if (!(status & VIRTIO_STATUS_DRIVER_OK))
		return fail(d, "driver-ok-refused status=0x%x", status);
	if (v->irq < 16)
		pic_unmask(v->irq);
	return 1;
}

void vdev_close(struct vdev *v)
{
	if (v->irq < 16)
		pic_mask(v->irq);
	if (v->base)
		reset(v);
}

static void ack_interrupt(struct vdev *v)
{
	u32 isr = rd(v, VIRTIO_MMIO_INTERRUPT_STATUS);

	if (isr)
		wr(v, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

static void write_chain(struct vq *q, u16 head, const struct vbuf *bufs, unsigned n)
{
	unsigned i;

	for (i = 0; i < n; i++) {
		volatile u8 *e = q->desc + 16 * (head + i);

		*(volatile u64 *)e = bufs[i].addr;
		*(volatile u32 *)(e + 8) = bufs[i].len;
		*(volatile u16 *)(e + 12) = (i + 1 < n ? VRING_DESC_F_NEXT : 0) | (bufs[i].write ? VRING_DESC_F_WRITE : 0);
		*(volatile u16 *)(e + 14) = i + 1 < n ? head + i + 1 : 0;
	}
}

/* Put `head` in the available ring, then publish the index (§2.7.13). */
static void publish(struct vq *q, u16 head)
{
	*(volatile u16 *)(q->avail + 4 + 2 * (q->avail_idx % q->num)) = head;
	mb();
	*(volatile u16 *)(q->avail + 2) = ++q->avail_idx;
	mb();
}

int vq_add(struct vdev *v, unsigned qi, u16 head, const struct vbuf *bufs, unsigned n)
{
	struct vq *q = &v->vq[qi];

	if (qi >= v->nq || n == 0 || head + n > q->num)
		return 0;
	write_chain(q, head, bufs, n);
	publish(q, head);
	return 1;
}

void vq_notify(struct vdev *v, unsigned qi) { wr(v, VIRTIO_MMIO_QUEUE_NOTIFY, qi); }

int vq_next_used(struct vdev *v, unsigned qi, u32 *id, u32 *len, u64 timeout_ms, char *d)
{
	struct vq *q = &v->vq[qi];
	u64 waited = 0;

	v->timed_out = 0;
	for (;;) {
		u16 idx = *(volatile u16 *)(q->used + 2);
		u64 r;

		if (idx != q->last_used) {
			mb();
			*id = *(volatile u32 *)(q->used + 4 + 8 * (q->last_used % q->num));
			*len = *(volatile u32 *)(q->used + 8 + 8 * (q->last_used % q->num));
			q->last_used++;
			return 1;
		}
		if (rd(v, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET)
			return fail(d, "device-needs-reset while waiting on queue %u", qi);
		if (waited >= timeout_ms) {
			v->timed_out = 1;
			return fail(d, "timeout queue=%u after %lu ms (used idx %u)", qi, waited, idx);
		}
		r = v->irq < 16 ? wait_irq(1u << v->irq, POLL_MS) : (sleep_ms(POLL_MS), 0);
		if (r & (1u << v->irq)) {
			v->by_irq++;
			ack_interrupt(v);
			waited += 1; /* an interrupt storm still ends */
		} else {
			waited += POLL_MS;
		}
	}
}

int vq_run(struct vdev *v, unsigned qi, const struct vbuf *bufs, unsigned n, u32 *used_len, char *d)
{
	struct vq *q = &v->vq[qi];
	u64 waited = 0;
	int irq_seen = 0;
	u16 idx;
	u32 id;

	if (qi >= v->nq || n == 0 || n > q->num)
		return fail(d, "bad-request queue=%u buffers=%u", qi, n);
	write_chain(q, 0, bufs, n);
	publish(q, 0);
	wr(v, VIRTIO_MMIO_QUEUE_NOTIFY, qi);

	/* Wait for the interrupt first (it may already be pending), so the count of completions
	 * seen by interrupt is honest; every POLL_MS without one, look at the used ring anyway. */
	for (;;) {
		u64 r = v->irq < 16 ? wait_irq(1u << v->irq, POLL_MS) : (sleep_ms(POLL_MS), 0);

		if (r & (1u << v->irq)) {
			irq_seen = 1;
			ack_interrupt(v);
		} else {
			waited += POLL_MS;
		}
		idx = *(volatile u16 *)(q->used + 2);
		if (idx != q->last_used)
			break;
		if (!(r & (1u << v->irq))) {
			if (rd(v, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET)
				return fail(d, "device-needs-reset while waiting on queue %u", qi);
			if (waited >= v->timeout_ms)
				return fail(d, "timeout queue=%u after %lu ms (used idx %u, avail idx %u)", qi,
					    waited, idx, q->avail_idx);
		}
	}
	mb();
	id = *(volatile u32 *)(q->used + 4 + 8 * (q->last_used % q->num));
	*used_len = *(volatile u32 *)(q->used + 8 + 8 * (q->last_used % q->num));
	q->last_used++;
	if (irq_seen) {
		v->by_irq++;
	} else {
		v->by_poll++;
		ack_interrupt(v);
	}
	if (id != 0)
		return fail(d, "used-id %u want 0", id);
	if (idx != q->last_used)
		return fail(d, "used-idx jumped to %u (expected %u)", idx, q->last_used);
	if (rd(v, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET)
		return fail(d, "device-needs-reset after queue %u request", qi);
	return 1;
}
