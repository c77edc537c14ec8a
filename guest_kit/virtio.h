/* A minimal virtio-mmio driver (modern transport, VIRTIO 1.2 §4.2.2; split virtqueues §2.7)
 * running at CPL3: one request in flight per queue, completion by interrupt with a polling
 * fallback after a timeout. */
#ifndef GK_VIRTIO_H
#define GK_VIRTIO_H

#include "ulib.h"

/* Register offsets (§4.2.2). */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976 /* "virt" */

/* Device status (§2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

#define VIRTIO_F_VERSION_1 (1ULL << 32)

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

#define VQ_MAX_QUEUES 2
#define VQ_SIZE 16 /* descriptors we use at most; the queue is min(QueueNumMax, this) */

struct vq {
	u16 num, avail_idx, last_used;
	volatile u8 *desc, *avail, *used;
};

struct vdev {
	u64 base;
	unsigned slot, irq;
	u64 features; /* negotiated */
	struct vq vq[VQ_MAX_QUEUES];
	unsigned nq;
	u8 *buf;             /* VBUF_SIZE bytes of request memory for this device */
	u32 by_irq, by_poll; /* how completions were noticed */
	u64 timeout_ms;      /* how long one request may take */
	int timed_out;       /* the last vq_next_used failed by its timeout (nothing else wrong) */
};

#define VBUF_SIZE 0x40000

/* One buffer of a descriptor chain; `write` = device-writable. */
struct vbuf {
	u64 addr;
	u32 len;
	int write;
};

/* Find `type` (e.g. "blk") in gk.virtio=, reset the device, negotiate `want` (VERSION_1 is
 * required) and set up `nq` queues.  Returns 0 with a detail in `d` on failure. */
int vdev_open(struct vdev *v, const char *type, u32 device_id, u64 want, unsigned nq, char *d);
/* Reset the device and mask its interrupt line. */
void vdev_close(struct vdev *v);
/* Submit one chain on queue `qi`, notify, wait for it to be used (interrupt first, the used ring
 * re-checked every 100 ms); `*used_len` gets the device's written length. */
int vq_run(struct vdev *v, unsigned qi, const struct vbuf *bufs, unsigned n, u32 *used_len, char *d);
u32 vdev_config32(struct vdev *v, unsigned off);
u8 vdev_config8(struct vdev *v, unsigned off);

/* Several chains in flight on one queue (virtio-net's receive buffers): `vq_add` places a chain
 * at descriptors head..head+n-1 and makes it available without notifying; `vq_notify` kicks;
 * `vq_next_used` waits up to `timeout_ms` for the next used element (interrupt first, the used
 * ring re-checked every 100 ms) and returns 0 on timeout or DEVICE_NEEDS_RESET (detail in `d`).
 * Do not mix with `vq_run` on the same queue. */
int vq_add(struct vdev *v, unsigned qi, u16 head, const struct vbuf *bufs, unsigned n);
void vq_notify(struct vdev *v, unsigned qi);
int vq_next_used(struct vdev *v, unsigned qi, u32 *id, u32 *len, u64 timeout_ms, char *d);

#endif
