/* virtio-fs test (VIRTIO 1.2 §5.11): a minimal FUSE-over-virtqueue client.  FUSE_INIT, LOOKUP
 * of gk.fs_file in the root, OPEN, READ in 4 KiB chunks, each request one chain on request
 * queue 1 (queue 0 is hiprio, unused): device-readable header + arguments, device-writable
 * fuse_out_header + reply.  The file's bytes must be (i * 7 + 3) & 0xff and its size
 * gk.fs_size; the config's tag must be gk.fs_tag. */
#include "virtio.h"
#include "tests.h"

#define VIRTIO_ID_FS 26
#define FUSE_LOOKUP 1
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_INIT 26
#define FUSE_ROOT_ID 1
#define FUSE_KERNEL_VERSION 7
#define FUSE_KERNEL_MINOR_VERSION 31
#define IN_HDR 40  /* struct fuse_in_header */
#define OUT_HDR 16 /* struct fuse_out_header */
#define REQ_OFF 0
#define OUT_OFF 0x800
#define REPLY_OFF 0x1000
#define CHUNK 4096
#define TAG_BYTES 36

static u64 unique;

/* One FUSE request: `arg_len` argument bytes already at REQ_OFF + IN_HDR; the reply (at most
 * `reply_len` bytes) lands at REPLY_OFF.  Returns 0 with a detail on transport or FUSE error. */
static int fuse_call(struct vdev *v, u32 opcode, u64 nodeid, u32 arg_len, u32 reply_len, u32 *got,
		     char *d)
{
	u8 *req = v->buf + REQ_OFF, *out = v->buf + OUT_OFF;
	struct vbuf b[3];
	u32 used;
	int error;

	memset(req, 0, IN_HDR);
	le(req, IN_HDR + arg_len, 4);
	le(req + 4, opcode, 4);
	le(req + 8, ++unique, 8);
	le(req + 16, nodeid, 8);
	memset(out, 0xff, OUT_HDR);
	b[0] = (struct vbuf){(u64)req, IN_HDR + arg_len, 0};
	b[1] = (struct vbuf){(u64)out, OUT_HDR, 1};
	b[2] = (struct vbuf){(u64)(v->buf + REPLY_OFF), reply_len, 1};
	if (!vq_run(v, 1, b, 3, &used, d))
		return 0;
	error = (int)(u32)rdle(out + 4, 4);
	if (rdle(out + 8, 8) != unique)
		return fail(d, "opcode %u: reply unique %lu, want %lu", opcode, rdle(out + 8, 8), unique);
	if (error)
		return fail(d, "opcode %u: error %d", opcode, error);
	if (rdle(out, 4) < OUT_HDR || rdle(out, 4) > OUT_HDR + reply_len)
		return fail(d, "opcode %u: reply length %lu", opcode, rdle(out, 4));
	*got = rdle(out, 4) - OUT_HDR;
	return 1;
}

int test_virtio_fs(char *d)
{
	struct vdev v;
	char name[64], tag[TAG_BYTES + 1], want_tag[TAG_BYTES + 1];
	u8 *arg, *reply;
	u64 size, want_size = cmdline_u64("gk.fs_size", 0), node, fh, off;
	u32 got, i, len, hash = 2166136261u;
	int ok = 0;

	if (!cmdline_get("gk.fs_file", name, sizeof(name)))
		return fail(d, "no gk.fs_file=");
	if (!vdev_open(&v, "fs", VIRTIO_ID_FS, 0, 2, d))
		return 0;
	arg = v.buf + REQ_OFF + IN_HDR;
	reply = v.buf + REPLY_OFF;
	for (i = 0; i < TAG_BYTES; i++)
		tag[i] = vdev_config8(&v, i);
	tag[TAG_BYTES] = 0;
	if (cmdline_get("gk.fs_tag", want_tag, sizeof(want_tag)) && memcmp(tag, want_tag, strlen(want_tag) + 1)) {
		fail(d, "tag \"%s\", want \"%s\"", tag, want_tag);
		goto out;
	}
	if (vdev_config32(&v, TAG_BYTES) < 1) {
		fail(d, "num_request_queues %u", vdev_config32(&v, TAG_BYTES));
		goto out;
	}
	/* FUSE_INIT: struct fuse_init_in (64 bytes with flags2 and unused[11]) */
	memset(arg, 0, 64);
	le(arg, FUSE_KERNEL_VERSION, 4);
	le(arg + 4, FUSE_KERNEL_MINOR_VERSION, 4);
	le(arg + 8, 0x20000, 4);
	if (!fuse_call(&v, FUSE_INIT, 0, 64, 256, &got, d))
		goto out;
	if (rdle(reply, 4) != FUSE_KERNEL_VERSION) {
		fail(d, "init: major %lu", rdle(reply, 4));
		goto out;
	}
	/* FUSE_LOOKUP: the name, NUL-terminated; struct fuse_entry_out (nodeid, ..., attr.size) */
	len = strlen(name) + 1;
	memcpy(arg, name, len);
	if (!fuse_call(&v, FUSE_LOOKUP, FUSE_ROOT_ID, len, 256, &got, d))
		goto out;
	if (got < 128) {
		fail(d, "lookup: %u-byte entry", got);
		goto out;
	}
	node = rdle(reply, 8);
	size = rdle(reply + 40 + 8, 8);
	if (size != want_size) {
		fail(d, "lookup: size %lu, want %lu", size, want_size);
		goto out;
	}
	/* FUSE_OPEN: struct fuse_open_in {flags = O_RDONLY, open_flags}; reply fuse_open_out.fh */
	memset(arg, 0, 8);
	if (!fuse_call(&v, FUSE_OPEN, node, 8, 16, &got, d))
		goto out;
	fh = rdle(reply, 8);
	for (off = 0; off < size; off += got) {
		/* FUSE_READ: struct fuse_read_in {fh, offset, size, read_flags, lock_owner, flags, pad} */
		memset(arg, 0, 40);
		le(arg, fh, 8);
		le(arg + 8, off, 8);
		le(arg + 16, CHUNK, 4);
		if (!fuse_call(&v, FUSE_READ, node, 40, CHUNK, &got, d))
			goto out;
		if (got == 0) {
			fail(d, "read: EOF at %lu of %lu", off, size);
			goto out;
		}
		for (i = 0; i < got; i++) {
			if (reply[i] != (u8)((off + i) * 7 + 3)) {
				fail(d, "read: byte %lu is 0x%02x", off + i, reply[i]);
				goto out;
			}
			hash = (hash ^ reply[i]) * 16777619u;
		}
	}
	fmt(d, DETAIL_SIZE, "tag=%s size=%lu fnv=%08x irq=%u poll=%u", tag, size, hash, v.by_irq,
	    v.by_poll);
	ok = 1;
out:
	vdev_close(&v);
	return ok;
}
