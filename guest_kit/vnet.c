/* virtio-net test (VIRTIO 1.2 §5.1) through a minimal CPL3 driver: receiveq 0 holds RX_BUFS
 * posted buffers, transmitq 1 sends one frame at a time.  gk.net=IP/PREFIX,PEER[,TARGET]: the
 * test ARPs for PEER (the tap's address, or the gateway in front of TARGET), sends an ICMP echo
 * request to TARGET (PEER if not given) through PEER's MAC and checks the reply; ARP requests
 * for our own address are answered meanwhile, so the peer can refresh its neighbour entry.
 * Requests are sent again every RETRY_MS until gk.net_wait_ms (default gk.io_timeout_ms): the
 * other side of a `netns=new` tap gets its addresses and routes (`bulkhead net setup`) only
 * after the VM has started, and a frame sent before that is simply not answered. */
#include "virtio.h"
#include "tests.h"

#define VIRTIO_NET_F_MAC (1ULL << 5)
#define NET_HDR 12        /* struct virtio_net_hdr_v1: always 12 bytes with VERSION_1 (§5.1.6) */
#define NUM_BUFFERS_OFF 10
#define RX_BUFS 8
#define RX_BUF_SIZE 1526  /* §5.1.6.3: 1514 + the header, one buffer per frame without MRG_RXBUF */
#define RX_STRIDE 2048
#define TX_OFF (RX_BUFS * RX_STRIDE)
#define SCRATCH_OFF (TX_OFF + RX_STRIDE)
#define ETH_HLEN 14
#define ETH_ZLEN 60
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ARP_REQUEST 1
#define ARP_REPLY 2
#define IP_HLEN 20
#define ICMP_ECHO 8
#define ICMP_ECHOREPLY 0
#define PING_PAYLOAD 56
#define MAX_UNRELATED 64  /* frames we skip (IPv6, other ARP) while waiting for an answer */
#define RETRY_MS 500

struct netcfg {
	u8 mac[6], peer_mac[6];
	u32 ip, peer, target;  /* host byte order */
	u16 ping_id, ping_seq;
	unsigned sent;         /* requests sent, retries included */
};

static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static u16 get16(const u8 *p) { return p[0] << 8 | p[1]; }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = v; }
static void put32(u8 *p, u32 v) { put16(p, v >> 16); put16(p + 2, v); }

/* RFC 1071 checksum of `n` bytes: 0 over a block that carries a correct one. */
static u16 csum(const u8 *p, unsigned n)
{
	u32 s = 0;

	for (; n > 1; p += 2, n -= 2)
		s += get16(p);
	if (n)
		s += p[0] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return ~s & 0xffff;
}

static int parse_ip(const char **s, u32 *ip)
{
	u32 v = 0;
	u64 octet;
	int i;

	for (i = 0; i < 4; i++) {
		if (i && *(*s)++ != '.')
			return 0;
		if (!parse_u64(s, &octet) || octet > 255)
			return 0;
		v = v << 8 | octet;
	}
	*ip = v;
	return 1;
}

static int parse_netcfg(struct netcfg *c, char *d)
{
	char arg[64];
	const char *p = arg;
	u64 prefix;

	if (!cmdline_get("gk.net", arg, sizeof(arg)))
		return fail(d, "no gk.net=IP/PREFIX,PEER[,TARGET] on the command line");
	if (!parse_ip(&p, &c->ip) || *p++ != '/' || !parse_u64(&p, &prefix) || prefix > 32 || *p++ != ',' ||
	    !parse_ip(&p, &c->peer))
		return fail(d, "bad gk.net=%s (want IP/PREFIX,PEER[,TARGET])", arg);
	c->target = c->peer;
	if (*p == ',' && (p++, !parse_ip(&p, &c->target)))
		return fail(d, "bad TARGET in gk.net=%s (want IP/PREFIX,PEER[,TARGET])", arg);
	if (*p)
		return fail(d, "bad gk.net=%s (want IP/PREFIX,PEER[,TARGET])", arg);
	return 1;
}

static u8 *rx_buf(struct vdev *v, unsigned i) { return v->buf + i * RX_STRIDE; }

static int rx_post(struct vdev *v, unsigned i)
{
	struct vbuf b = {(u64)rx_buf(v, i), RX_BUF_SIZE, 1};

	return vq_add(v, 0, i, &b, 1); /* descriptor i holds buffer i */
}

/* Transmit one complete frame: header all zero (flags 0, GSO_NONE: §5.1.6.2 case 1), padded
 * to the Ethernet minimum. */
static int net_send(struct vdev *v, const u8 *frame, unsigned len, char *d)
{
	u8 *tx = v->buf + TX_OFF;
	struct vbuf b[2];
	u32 used;

	memset(tx, 0, NET_HDR + ETH_ZLEN);
	memcpy(tx + NET_HDR, frame, len);
	if (len < ETH_ZLEN)
		len = ETH_ZLEN;
	b[0] = (struct vbuf){(u64)tx, NET_HDR, 0};
	b[1] = (struct vbuf){(u64)(tx + NET_HDR), len, 0};
	return vq_run(v, 1, b, 2, &used, d);
}

static unsigned eth_header(u8 *f, const u8 *dst, const u8 *src, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, src, 6);
	put16(f + 12, type);
	return ETH_HLEN;
}

static unsigned arp_frame(u8 *f, const struct netcfg *c, u16 op, const u8 *dst, u32 target_ip)
{
	u8 *a = f + eth_header(f, dst, c->mac, ETH_P_ARP);

	put16(a, 1);          /* hardware: Ethernet */
	put16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, c->mac, 6);
	put32(a + 14, c->ip);
	memcpy(a + 18, op == ARP_REQUEST ? (const u8 *)"\0\0\0\0\0\0" : dst, 6);
	put32(a + 24, target_ip);
	return ETH_HLEN + 28;
}

static unsigned icmp_frame(u8 *f, const struct netcfg *c)
{
	u8 *ip = f + eth_header(f, c->peer_mac, c->mac, ETH_P_IP), *icmp = ip + IP_HLEN;
	unsigned i;

	memset(ip, 0, IP_HLEN + 8);
	ip[0] = 0x45;
	put16(ip + 2, IP_HLEN + 8 + PING_PAYLOAD);
	put16(ip + 4, c->ping_seq);
	put16(ip + 6, 0x4000); /* don't fragment */
	ip[8] = 64;
	ip[9] = 1;             /* ICMP */
	put32(ip + 12, c->ip);
	put32(ip + 16, c->target);
	put16(ip + 10, csum(ip, IP_HLEN));
	icmp[0] = ICMP_ECHO;
	put16(icmp + 4, c->ping_id);
	put16(icmp + 6, c->ping_seq);
	for (i = 0; i < PING_PAYLOAD; i++)
		icmp[8 + i] = i * 3 + c->ping_seq;
	put16(icmp + 2, csum(icmp, 8 + PING_PAYLOAD));
	return ETH_HLEN + IP_HLEN + 8 + PING_PAYLOAD;
}

static int is_arp(const u8 *f, unsigned len, u16 op)
{
	return len >= ETH_HLEN + 28 && get16(f + 12) == ETH_P_ARP && get16(f + 14 + 6) == op;
}

static int match_arp_reply(struct netcfg *c, const u8 *f, unsigned len)
{
	if (!is_arp(f, len, ARP_REPLY) || get32(f + 14 + 14) != c->peer || get32(f + 14 + 24) != c->ip)
		return 0;
	memcpy(c->peer_mac, f + 14 + 8, 6);
	return 1;
}

static int match_echo_reply(struct netcfg *c, const u8 *f, unsigned len)
{
	const u8 *ip = f + ETH_HLEN, *icmp = ip + IP_HLEN;
	unsigned i;

	if (len < ETH_HLEN + IP_HLEN + 8 + PING_PAYLOAD || get16(f + 12) != ETH_P_IP || ip[0] != 0x45 ||
	    ip[9] != 1 || get32(ip + 12) != c->target || get32(ip + 16) != c->ip || icmp[0] != ICMP_ECHOREPLY ||
	    get16(icmp + 4) != c->ping_id || get16(icmp + 6) != c->ping_seq)
		return 0;
	if (csum(ip, IP_HLEN) || csum(icmp, get16(ip + 2) - IP_HLEN))
		return -1; /* ours, but a bad checksum */
	for (i = 0; i < PING_PAYLOAD; i++)
		if (icmp[8 + i] != (u8)(i * 3 + c->ping_seq))
			return -1;
	return 1;
}

typedef int (*frame_match)(struct netcfg *, const u8 *, unsigned);

/* Receive frames until `match` accepts one (copied to the scratch area); answer ARP requests
 * for our address on the way.  A wait longer than `timeout_ms` fails with v->timed_out set. */
static int net_recv(struct vdev *v, struct netcfg *c, frame_match match, const char *what, u64 timeout_ms,
		    char *d)
{
	unsigned n;

	for (n = 0; n < MAX_UNRELATED; n++) {
		u32 id, len;
		u8 *buf, *f;
		int m;

		if (!vq_next_used(v, 0, &id, &len, timeout_ms, d))
			return 0;
		if (id >= RX_BUFS)
			return fail(d, "rx used-id %u (posted 0..%u)", id, RX_BUFS - 1);
		buf = rx_buf(v, id);
		if (len < NET_HDR + ETH_HLEN || len > RX_BUF_SIZE)
			return fail(d, "rx used-len %u", len);
		/* §5.1.6.4.1: without MRG_RXBUF num_buffers is 1. */
		if ((buf[NUM_BUFFERS_OFF] | buf[NUM_BUFFERS_OFF + 1] << 8) != 1)
			return fail(d, "rx num_buffers=%u (want 1)", buf[NUM_BUFFERS_OFF] | buf[NUM_BUFFERS_OFF + 1] << 8);
		f = v->buf + SCRATCH_OFF;
		memcpy(f, buf + NET_HDR, len - NET_HDR);
		rx_post(v, id);
		vq_notify(v, 0);
		m = match(c, f, len - NET_HDR);
		if (m < 0)
			return fail(d, "%s: bad checksum or payload", what);
		if (m)
			return 1;
		if (is_arp(f, len - NET_HDR, ARP_REQUEST) && get32(f + 14 + 24) == c->ip) {
			u8 reply[ETH_ZLEN];
			unsigned rl = arp_frame(reply, c, ARP_REPLY, f + 14 + 8, get32(f + 14 + 14));

			if (!net_send(v, reply, rl, d))
				return 0;
		}
	}
	return fail(d, "no %s among %u frames", what, MAX_UNRELATED);
}

/* Send `frame` and wait for the answer `match` accepts, sending it again every RETRY_MS until
 * `wait_ms` has passed; anything but a quiet receiveq ends at once. */
static int exchange(struct vdev *v, struct netcfg *c, const u8 *frame, unsigned len, frame_match match,
		    const char *what, u64 wait_ms, char *d)
{
	u64 waited;

	for (waited = 0;; waited += RETRY_MS) {
		c->sent++;
		if (!net_send(v, frame, len, d))
			return 0;
		if (net_recv(v, c, match, what, wait_ms - waited < RETRY_MS ? wait_ms - waited : RETRY_MS, d))
			return 1;
		if (!v->timed_out)
			return 0;
		if (waited + RETRY_MS >= wait_ms)
			return fail(d, "no %s in %lu ms (%u requests sent)", what, wait_ms, c->sent);
	}
}

int test_virtio_net(char *d)
{
	struct netcfg c;
	struct vdev v;
	u8 frame[ETH_HLEN + IP_HLEN + 8 + PING_PAYLOAD];
	unsigned i, len;
	u64 pings, wait_ms;
	int ok;

	memset(&c, 0, sizeof(c));
	if (!parse_netcfg(&c, d))
		return 0;
	if (!vdev_open(&v, "net", VIRTIO_ID_NET, VIRTIO_NET_F_MAC, 2, d))
		return 0;
	if (v.features & VIRTIO_NET_F_MAC) {
		for (i = 0; i < 6; i++)
			c.mac[i] = vdev_config8(&v, i); /* mac is the first config field (§5.1.4) */
	} else {
		static const u8 local[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01}; /* locally administered */

		memcpy(c.mac, local, 6);
	}
	for (i = 0; i < RX_BUFS; i++)
		rx_post(&v, i);
	vq_notify(&v, 0);

	wait_ms = cmdline_u64("gk.net_wait_ms", v.timeout_ms);
	len = arp_frame(frame, &c, ARP_REQUEST, broadcast, c.peer);
	ok = exchange(&v, &c, frame, len, match_arp_reply, "arp-reply", wait_ms, d);
	c.ping_id = 0x4b47; /* "GK" */
	c.ping_seq = 1;
	if (ok) {
		len = icmp_frame(frame, &c);
		ok = exchange(&v, &c, frame, len, match_echo_reply, "echo-reply", wait_ms, d);
	}
	/* gk.net_pings=N: N more echo round trips (benchmarks/net.py times runs with and without; a
	 * restarting device loses some, re-sent like the first) */
	for (i = 0, pings = cmdline_u64("gk.net_pings", 0); ok && i < pings; i++) {
		c.ping_seq++;
		len = icmp_frame(frame, &c);
		ok = exchange(&v, &c, frame, len, match_echo_reply, "echo-reply", wait_ms, d);
	}
	if (ok)
		fmt(d, DETAIL_SIZE, "mac=%02x:%02x:%02x:%02x:%02x:%02x peer-mac=%02x:%02x:%02x:%02x:%02x:%02x target=%u.%u.%u.%u sent=%u irq=%u poll=%u",
		    c.mac[0], c.mac[1], c.mac[2], c.mac[3], c.mac[4], c.mac[5], c.peer_mac[0], c.peer_mac[1],
		    c.peer_mac[2], c.peer_mac[3], c.peer_mac[4], c.peer_mac[5], c.target >> 24, c.target >> 16 & 0xff,
		    c.target >> 8 & 0xff, c.target & 0xff, c.sent, v.by_irq, v.by_poll);
	vdev_close(&v);
	return ok;
}
