/* The CPL0 part of the test guest: descriptor tables, 8259 PIC and local-APIC timer setup, the
 * interrupt and system-call handlers.  This machine's KVM emulates CPL0 code instruction by
 * instruction, so this file does as little as it can; the tests themselves run at CPL3.
 * It must not call into user code (memset and friends included): the build test checks that
 * every call and jump in .ktext stays inside .ktext. */
#include "abi.h"

struct exc_frame {
	u64 vector, error, rip, cs, rflags, rsp, ss;
};

struct __attribute__((packed)) tss64 {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
};

struct __attribute__((packed)) table_ptr {
	u16 limit;
	u64 base;
};

extern char gk_kstack[];
extern char exc_stubs[], irq_stubs[], apic_spurious_stub[], syscall_stub[];

volatile u32 gk_irq_counts[256];
volatile u32 gk_ap_checkin;

static u64 gdt[8] __attribute__((aligned(16)));
static u64 idt[512] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
static volatile u32 irq_pending;  /* 8259 lines seen since the last wait_irq returned them */
static volatile u32 timer_fired;

/* APIC registers (offsets in the local APIC page). */
#define APIC_EOI 0x0b0
#define APIC_SVR 0x0f0
#define APIC_LVT_TIMER 0x320
#define APIC_TIMER_INIT 0x380
#define APIC_TIMER_DIV 0x3e0
/* KVM's APIC timer counts at 1 GHz; divided by 16 that is 62500 ticks per millisecond. */
#define APIC_TICKS_PER_MS 62500
#define MAX_TIMEOUT_MS 60000

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

static void set_gate(unsigned vec, void *handler, unsigned dpl)
{
	u64 a = (u64)handler;
	idt[2 * vec] = (a & 0xffff) | ((u64)SEL_KCODE << 16) | ((u64)(0x8e | dpl << 5) << 40) |
		       ((a & 0xffff0000) << 32);
	idt[2 * vec + 1] = a >> 32;
}

void kernel_init(void)
{
	struct table_ptr p;
	u64 t = (u64)&tss;
	unsigned v;

	/* GDT: the VMM's layout plus our TSS, whose rsp0 is the stack system calls run on. */
	tss.rsp[0] = (u64)gk_kstack + KSTACK_SIZE;
	tss.iomap_base = sizeof(tss); /* no I/O bitmap: port I/O faults at CPL3 */
	gdt[2] = 0x00af9b000000ffffULL; /* kernel code64 */
	gdt[3] = 0x00cf93000000ffffULL; /* kernel data */
	gdt[4] = 0x00cff3000000ffffULL; /* user data, DPL3 */
	gdt[5] = 0x00affb000000ffffULL; /* user code64, DPL3 */
	gdt[6] = (sizeof(tss) - 1) | ((t & 0xffffff) << 16) | (0x89ULL << 40) | ((t >> 24 & 0xff) << 56);
	gdt[7] = t >> 32;
	p.limit = sizeof(gdt) - 1;
	p.base = (u64)gdt;
	__asm__ volatile("lgdt %0\n\t"
			 "pushq %1\n\t"
			 "pushq $1f\n\t"
			 "lretq\n"
			 "1:\tmov %2, %%ds\n\t"
			 "mov %2, %%es\n\t"
			 "mov %2, %%ss\n\t"
			 "ltr %w3"
			 : : "m"(p), "i"(SEL_KCODE), "r"(SEL_KDATA), "r"(SEL_TSS) : "memory");

	/* IDT: exceptions, the 16 PIC lines, the APIC timer, APIC spurious, and the DPL3 system-call
	 * gate on the breakpoint vector (see syscall_stub). */
	for (v = 0; v < 32; v++)
		set_gate(v, exc_stubs + 16 * v, 0);
	for (v = 0; v <= VEC_TIMER - VEC_PIC_BASE; v++)
		set_gate(VEC_PIC_BASE + v, irq_stubs + 16 * v, 0);
	set_gate(VEC_APIC_SPURIOUS, apic_spurious_stub, 0);
	set_gate(VEC_SYSCALL, syscall_stub, 3);
	p.limit = sizeof(idt) - 1;
	p.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(p) : "memory");

	/* 8259 pair: edge triggered, cascaded, 8086 mode, vectors 0x20-0x2f; all masked but the
	 * cascade line (the CPL3 program unmasks lines with the pio system call). */
	outb(PIC1_CMD, 0x11);
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, VEC_PIC_BASE);
	outb(PIC2_DATA, VEC_PIC_BASE + 8);
	outb(PIC1_DATA, 4);
	outb(PIC2_DATA, 2);
	outb(PIC1_DATA, 1);
	outb(PIC2_DATA, 1);
	outb(PIC1_DATA, 0xfb);
	outb(PIC2_DATA, 0xff);

	/* Local APIC software-enabled (LINT0 ExtINT is the VMM's), timer one-shot, stopped. */
	apic_write(APIC_SVR, 0x100 | VEC_APIC_SPURIOUS);
	apic_write(APIC_TIMER_DIV, 0x3); /* divide by 16 */
	apic_write(APIC_LVT_TIMER, VEC_TIMER);
}

static void put(const char *s)
{
	while (*s)
		outb(COM1_PORT, *s++);
}

static void put_hex(const char *label, u64 v)
{
	char buf[19];
	int i;

	put(label);
	buf[0] = '0';
	buf[1] = 'x';
	for (i = 0; i < 16; i++)
		buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
	buf[18] = 0;
	put(buf);
}

static void __attribute__((noreturn)) do_exit(u32 code)
{
	*(volatile u32 *)(TESTDEV_BASE + TD_EXIT) = code;
	outl(DEBUG_EXIT_PORT, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void __attribute__((noreturn)) exc_report(struct exc_frame *f)
{
	u64 cr2;

	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	put_hex("guest_kit: exception vector=", f->vector);
	put_hex(" error=", f->error);
	put_hex(" rip=", f->rip);
	put_hex(" cs=", f->cs);
	put_hex(" rsp=", f->rsp);
	put_hex(" cr2=", cr2);
	put("\n");
	do_exit(3);
}

void irq_dispatch(u64 vec)
{
	unsigned line = vec - VEC_PIC_BASE;

	if (vec == VEC_TIMER) {
		gk_irq_counts[vec]++;
		timer_fired = 1;
		apic_write(APIC_EOI, 0);
		return;
	}
	if (line == 7 || line == 15) {
		/* Spurious if the line is not in service (OCW3: read ISR). */
		u16 cmd = line == 7 ? PIC1_CMD : PIC2_CMD;
		outb(cmd, 0x0b);
		if (!(inb(cmd) & 0x80)) {
			if (line == 15)
				outb(PIC1_CMD, 0x20);
			return;
		}
	}
	gk_irq_counts[vec]++;
	irq_pending |= 1u << line;
	if (line >= 8)
		outb(PIC2_CMD, 0x20);
	outb(PIC1_CMD, 0x20);
}

/* Halt with interrupts on until a line in `mask` fires or `timeout_ms` (0: none) passes. */
static u64 wait_irq(u32 mask, u64 timeout_ms)
{
	u64 halts = 0;
	u32 fired;

	timer_fired = 0;
	if (!(irq_pending & mask)) {
		if (timeout_ms)
			apic_write(APIC_TIMER_INIT,
				   (timeout_ms > MAX_TIMEOUT_MS ? MAX_TIMEOUT_MS : timeout_ms) * APIC_TICKS_PER_MS);
		while (!(irq_pending & mask) && !(timeout_ms && timer_fired)) {
			__asm__ volatile("sti; hlt; cli" : : : "memory");
			halts++;
		}
		if (timeout_ms)
			apic_write(APIC_TIMER_INIT, 0);
	}
	fired = irq_pending & mask;
	irq_pending &= ~mask;
	return fired | (fired ? 0 : timer_fired ? WAIT_TIMEOUT : 0) | halts << 32;
}

static u64 pio(u64 op, u64 value)
{
	u16 port = op & 0xffff;
	unsigned size = (op >> 16) & 0xff;

	if (op & PIO_WRITE) {
		if (size == 1)
			outb(port, value);
		else if (size == 2)
			outw(port, value);
		else if (size == 4)
			outl(port, value);
		return 0;
	}
	if (size == 1)
		return inb(port);
	if (size == 2)
		return inw(port);
	if (size == 4)
		return inl(port);
	return ~0ULL;
}

u64 syscall_dispatch(u64 nr, u64 a, u64 b, u64 c)
{
	(void)c;
	switch (nr) {
	case SYS_WRITE: {
		const char *s = (const char *)a;
		u64 i;

		for (i = 0; i < b; i++)
			outb(COM1_PORT, s[i]);
		return b;
	}
	case SYS_WAIT_IRQ:
		return wait_irq(a, b);
	case SYS_PIO:
		return pio(a, b);
	case SYS_EXIT:
		do_exit(a);
	}
	return ~0ULL;
}
