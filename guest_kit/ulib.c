/* The CPL3 runtime: formatting, strings, command line, PIC masks. */
#include "ulib.h"

static const char *cmdline = "";
static u8 pic_masks[2] = {0xfb, 0xff}; /* as kernel_init leaves them */

u64 mmio_read(u64 addr, unsigned size)
{
	switch (size) {
	case 1: return mmio_r8(addr);
	case 2: return mmio_r16(addr);
	case 4: return mmio_r32(addr);
	default: return mmio_r64(addr);
	}
}

void mmio_write(u64 addr, unsigned size, u64 v)
{
	switch (size) {
	case 1: mmio_w8(addr, v); break;
	case 2: mmio_w16(addr, v); break;
	case 4: mmio_w32(addr, v); break;
	default: mmio_w64(addr, v); break;
	}
}

static void pic_set(unsigned line, int masked)
{
	unsigned chip = line >= 8;
	u8 bit = 1u << (line & 7);
	u8 m = masked ? pic_masks[chip] | bit : pic_masks[chip] & ~bit;

	if (m != pic_masks[chip]) {
		pic_masks[chip] = m;
		pio_out(chip ? PIC2_DATA : PIC1_DATA, 1, m);
	}
}

void pic_unmask(unsigned line) { pic_set(line & 15, 0); }
void pic_mask(unsigned line) { pic_set(line & 15, 1); }

void *memset(void *d, int c, size_t n)
{
	u8 *p = d;

	while (n--)
		*p++ = c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *p = a, *q = b;

	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p < *q ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

struct out {
	char *buf;
	size_t size, len;
};

static void out_c(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

/* printf subset: %[0][width][l|ll|z](d|u|x|s|c|%). */
int vfmt(char *buf, size_t size, const char *f, va_list ap)
{
	struct out o = {buf, size, 0};

	for (; *f; f++) {
		char tmp[24];
		int zero = 0, width = 0, lng = 0, n = 0, neg = 0;
		unsigned base = 10;
		u64 v;

		if (*f != '%') {
			out_c(&o, *f);
			continue;
		}
		f++;
		if (*f == '0')
			zero = 1, f++;
		while (*f >= '0' && *f <= '9')
			width = width * 10 + (*f++ - '0');
		while (*f == 'l' || *f == 'z')
			lng = 1, f++;
		switch (*f) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			int len = strlen(s);

			for (; width > len; width--)
				out_c(&o, ' ');
			while (*s)
				out_c(&o, *s++);
			continue;
		}
		case 'c':
			out_c(&o, va_arg(ap, int));
			continue;
		case 'd':
			if (lng) {
				long long x = va_arg(ap, long long);
				neg = x < 0;
				v = neg ? -(u64)x : (u64)x;
			} else {
				int x = va_arg(ap, int);
				neg = x < 0;
				v = neg ? -(u64)(long long)x : (u64)x;
			}
			break;
		case 'x':
			base = 16;
			/* fall through */
		case 'u':
			v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
			break;
		case '%':
			out_c(&o, '%');
			continue;
		default:
			out_c(&o, '?');
			continue;
		}
		do {
			tmp[n++] = "0123456789abcdef"[v % base];
			v /= base;
		} while (v);
		if (neg)
			width--;
		if (neg && zero)
			out_c(&o, '-');
		for (; width > n; width--)
			out_c(&o, zero ? '0' : ' ');
		if (neg && !zero)
			out_c(&o, '-');
		while (n)
			out_c(&o, tmp[--n]);
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = 0;
	return o.len;
}

int fmt(char *buf, size_t size, const char *f, ...)
{
	va_list ap;
	int n;

	va_start(ap, f);
	n = vfmt(buf, size, f, ap);
	va_end(ap);
	return n;
}

void print(const char *f, ...)
{
	char buf[256];
	va_list ap;
	int n;

	va_start(ap, f);
	n = vfmt(buf, sizeof(buf), f, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 1)
		n = sizeof(buf) - 1;
	syscall3(SYS_WRITE, (u64)buf, n, 0);
}

void cmdline_set(const char *c) { cmdline = c ? c : ""; }

int cmdline_get(const char *key, char *out, size_t size)
{
	size_t klen = strlen(key);
	const char *p = cmdline;

	while (*p) {
		const char *w = p;

		while (*p && *p != ' ')
			p++;
		if ((size_t)(p - w) > klen && !memcmp(w, key, klen) && w[klen] == '=') {
			size_t n = p - (w + klen + 1);

			if (n >= size)
				n = size - 1;
			memcpy(out, w + klen + 1, n);
			out[n] = 0;
			return 1;
		}
		while (*p == ' ')
			p++;
	}
	return 0;
}

int parse_u64(const char **s, u64 *out)
{
	const char *p = *s;
	u64 v = 0;
	int digits = 0;

	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		for (p += 2;; p++, digits++) {
			char c = *p;

			if (c >= '0' && c <= '9')
				v = v * 16 + (c - '0');
			else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
				v = v * 16 + ((c | 0x20) - 'a' + 10);
			else
				break;
		}
	} else {
		for (; *p >= '0' && *p <= '9'; p++, digits++)
			v = v * 10 + (*p - '0');
	}
	if (!digits)
		return 0;
	*s = p;
	*out = v;
	return 1;
}

u64 cmdline_u64(const char *key, u64 def)
{
	char buf[32];
	const char *p = buf;
	u64 v;

	if (!cmdline_get(key, buf, sizeof(buf)) || !parse_u64(&p, &v) || *p)
		return def;
	return v;
}
