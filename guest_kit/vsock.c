/* virtio-vsock test (VIRTIO 1.2 §5.10) through a minimal CPL3 driver: receiveq 0 holds RX_BUFS
 * posted buffers, transmitq 1 sends one packet at a time; the event queue is not set up (the
 * device keeps events until it is).  The guest connects to host CID 2, port gk.vsock=PORT (the
 * core's broker connects that to <vsock socket>_PORT, where the test's echo program listens),
 * sends a message, reads it back, shuts the connection down and expects the device's RST. */
#include "virtio.h"
#include "tests.h"

#define VIRTIO_ID_VSOCK 19
#define HDR 44               /* struct virtio_vsock_hdr (§5.10.6) */
#define RX_BUFS 8
#define RX_BUF_SIZE (HDR + 1024)
#define RX_STRIDE 2048
#define TX_OFF (RX_BUFS * RX_STRIDE)
#define SCRATCH_OFF (TX_OFF + RX_STRIDE)
#define HOST_CID 2
#define LOCAL_PORT 1234
#define BUF_ALLOC 65536
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define SHUTDOWN_BOTH 3
#define MAX_PACKETS 64

static const char message[] = "bulkhead vsock echo: the quick brown fox jumps over the lazy dog";

static u8 *rx_buf(struct vdev *v, unsigned i) { return v->buf + i * RX_STRIDE; }

static int rx_post(struct vdev *v, unsigned i)
{
	struct vbuf b = {(u64)rx_buf(v, i), RX_BUF_SIZE, 1};

	return vq_add(v, 0, i, &b, 1);
}

static int send_pkt(struct vdev *v, u64 cid, u32 port, u16 op, u32 flags, const void *payload, u32 len,
		    u32 fwd_cnt, char *d)
{
	u8 *tx = v->buf + TX_OFF;
	struct vbuf b[2];
	u32 used;

	memset(tx, 0, HDR);
	le(tx + 0, cid, 8);        /* src_cid */
	le(tx + 8, HOST_CID, 8);   /* dst_cid */
	le(tx + 16, LOCAL_PORT, 4);
	le(tx + 20, port, 4);
	le(tx + 24, len, 4);
	le(tx + 28, TYPE_STREAM, 2);
	le(tx + 30, op, 2);
	le(tx + 32, flags, 4);
	le(tx + 36, BUF_ALLOC, 4);
	le(tx + 40, fwd_cnt, 4);
	memcpy(tx + HDR, payload, len);
	b[0] = (struct vbuf){(u64)tx, HDR, 0};
	b[1] = (struct vbuf){(u64)(tx + HDR), len, 0};
	return vq_run(v, 1, b, len ? 2 : 1, &used, d);
}

/* The next packet for our connection (copied to the scratch area); 0 on timeout or a packet
 * that is not from host:port to us. */
static u8 *recv_pkt(struct vdev *v, u64 cid, u32 port, u32 *payload_len, char *d)
{
	u32 id, len;
	u8 *p;

	if (!vq_next_used(v, 0, &id, &len, v->timeout_ms, d))
		return 0;
	if (id >= RX_BUFS || len < HDR || len > RX_BUF_SIZE) {
		fail(d, "rx used id=%u len=%u", id, len);
		return 0;
	}
	p = v->buf + SCRATCH_OFF;
	memcpy(p, rx_buf(v, id), len);
	rx_post(v, id);
	vq_notify(v, 0);
	if (rdle(p, 8) != HOST_CID || rdle(p + 8, 8) != cid || rdle(p + 16, 4) != port ||
	    rdle(p + 20, 4) != LOCAL_PORT || rdle(p + 28, 2) != TYPE_STREAM) {
		fail(d, "rx packet src=%lu:%lu dst=%lu:%lu", rdle(p, 8), rdle(p + 16, 4), rdle(p + 8, 8),
		     rdle(p + 20, 4));
		return 0;
	}
	*payload_len = rdle(p + 24, 4);
	if (*payload_len > len - HDR) {
		fail(d, "rx len %u in a %u-byte buffer", *payload_len, len);
		return 0;
	}
	return p;
}

/* Wait for a packet with `op` (RW packets' payloads go to `got`); RST ends the wait early. */
static int wait_op(struct vdev *v, u64 cid, u32 port, u16 op, u8 *got, u32 *have, u32 want, char *d)
{
	unsigned n;

	for (n = 0; n < MAX_PACKETS; n++) {
		u32 plen;
		u8 *p = recv_pkt(v, cid, port, &plen, d);
		u16 o;

		if (!p)
			return 0;
		o = rdle(p + 30, 2);
		if (o == OP_RW && got) {
			if (*have + plen > want)
				return fail(d, "echo longer than sent (%u > %u)", *have + plen, want);
			memcpy(got + *have, p + HDR, plen);
			*have += plen;
			if (op == OP_RW && *have == want)
				return 1;
			continue;
		}
		if (o == op)
			return 1;
		if (o == OP_RST)
			return fail(d, "rst while waiting for op %u (have %u bytes)", op, have ? *have : 0);
		/* CREDIT_UPDATE and friends: nothing to do for one short message */
	}
	return fail(d, "no op %u among %u packets", op, MAX_PACKETS);
}

int test_virtio_vsock(char *d)
{
	struct vdev v;
	u8 got[sizeof(message)];
	u32 have = 0, len = sizeof(message) - 1;
	u64 cid, port;
	unsigned i;
	int ok;

	port = cmdline_u64("gk.vsock", 0);
	if (!port || port >> 32)
		return fail(d, "no gk.vsock=PORT on the command line");
	if (!vdev_open(&v, "vsock", VIRTIO_ID_VSOCK, 0, 2, d))
		return 0;
	cid = vdev_config32(&v, 0) | (u64)vdev_config32(&v, 4) << 32; /* guest_cid (§5.10.4) */
	for (i = 0; i < RX_BUFS; i++)
		rx_post(&v, i);
	vq_notify(&v, 0);
	ok = send_pkt(&v, cid, port, OP_REQUEST, 0, 0, 0, 0, d) &&
	     wait_op(&v, cid, port, OP_RESPONSE, 0, 0, 0, d) &&
	     send_pkt(&v, cid, port, OP_RW, 0, message, len, 0, d) &&
	     wait_op(&v, cid, port, OP_RW, got, &have, len, d);
	if (ok && memcmp(got, message, len))
		ok = fail(d, "echo differs from what was sent");
	if (ok)
		ok = send_pkt(&v, cid, port, OP_SHUTDOWN, SHUTDOWN_BOTH, 0, 0, have, d) &&
		     wait_op(&v, cid, port, OP_RST, 0, 0, 0, d);
	if (ok)
		fmt(d, DETAIL_SIZE, "cid=%lu port=%lu echoed=%u irq=%u poll=%u", cid, port, have, v.by_irq,
		    v.by_poll);
	vdev_close(&v);
	return ok;
}
