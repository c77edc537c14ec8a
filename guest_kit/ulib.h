/* The CPL3 runtime of the test guest: system calls, MMIO accessors, formatting, command line. */
#ifndef GK_ULIB_H
#define GK_ULIB_H

#include <stdarg.h>
#include <stddef.h>
#include "abi.h"

static inline u64 syscall3(u64 nr, u64 a, u64 b, u64 c)
{
	u64 ret;

	__asm__ volatile("int3" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "memory");
	return ret;
}

static inline u64 wait_irq(u32 line_mask, u64 timeout_ms) { return syscall3(SYS_WAIT_IRQ, line_mask, timeout_ms, 0); }
static inline void sleep_ms(u64 ms) { wait_irq(0, ms); }

/* Little-endian fields of `n` bytes in device structures (vsock headers, FUSE messages). */
static inline void le(u8 *p, u64 v, unsigned n)
{
	unsigned i;

	for (i = 0; i < n; i++)
		p[i] = v >> (8 * i);
}

static inline u64 rdle(const u8 *p, unsigned n)
{
	u64 v = 0;

	while (n--)
		v = v << 8 | p[n];
	return v;
}
static inline u32 pio_in(u16 port, unsigned size) { return syscall3(SYS_PIO, port | size << 16, 0, 0); }
static inline void pio_out(u16 port, unsigned size, u32 v) { syscall3(SYS_PIO, port | size << 16 | PIO_WRITE, v, 0); }
static inline void __attribute__((noreturn)) sys_exit(u32 code)
{
	syscall3(SYS_EXIT, code, 0, 0);
	__builtin_unreachable();
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline void mb(void) { __asm__ volatile("mfence" : : : "memory"); }

static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_r64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_w64(u64 a, u64 v) { *(volatile u64 *)a = v; }
u64 mmio_read(u64 addr, unsigned size);
void mmio_write(u64 addr, unsigned size, u64 v);

static inline u32 td_r32(unsigned off) { return mmio_r32(TESTDEV_BASE + off); }
static inline u64 td_r64(unsigned off) { return mmio_r64(TESTDEV_BASE + off); }
static inline void td_w32(unsigned off, u32 v) { mmio_w32(TESTDEV_BASE + off, v); }

/* 8259 masks, kept here so unmasking costs one port write. */
void pic_unmask(unsigned line);
void pic_mask(unsigned line);

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

int vfmt(char *buf, size_t size, const char *fmt, va_list ap);
int fmt(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Command line: `key=value` words.  cmdline_get copies the value (NUL-terminated) and returns 1
 * if the key is present; cmdline_u64 parses decimal or 0x-hex, `def` if absent or malformed. */
void cmdline_set(const char *cmdline);
int cmdline_get(const char *key, char *out, size_t size);
u64 cmdline_u64(const char *key, u64 def);
/* Parses a decimal or 0x-hex number at *s, advancing *s; returns 0 if none. */
int parse_u64(const char **s, u64 *out);

#endif
