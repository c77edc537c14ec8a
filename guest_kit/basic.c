/* Phase-1 tests: port I/O, MMIO, interrupts (KVM_IRQ_LINE and irqfd), HLT wake-up, SMP check-in.
 * The numbers checked here are the testdev's (docs/guest_abi.md). */
#include "tests.h"

static u64 expect_bytes(u8 (*pattern)(unsigned), unsigned off, unsigned size)
{
	u64 v = 0;
	unsigned i;

	for (i = 0; i < size; i++)
		v |= (u64)pattern(off + i) << (8 * i);
	return v;
}

static u8 pio_pattern(unsigned o) { return (o * 13 + 0x3c) & 0xff; }
static u8 mmio_pattern(unsigned o) { return (o * 7 + 0x5a) & 0xff; }

struct probe_write {
	unsigned off, size;
	u64 value;
};

/* Check the testdev's record of the last probe write. */
static int check_last(char *d, const char *what, const struct probe_write *w)
{
	u32 size = td_r32(TD_LAST_SIZE);
	u64 off = td_r64(TD_LAST_OFFSET), val = td_r64(TD_LAST_VALUE);

	if (size != w->size || off != w->off || val != w->value)
		return fail(d, "%s-last size=%u/%u offset=0x%lx/0x%x value=0x%lx/0x%lx", what, size, w->size,
			    off, w->off, val, w->value);
	return 1;
}

int test_pio(char *d)
{
	static const unsigned sizes[] = {1, 2, 4};
	static const struct probe_write writes[] = {
		{1, 1, 0xa5}, {2, 2, 0xbeef}, {8, 4, 0xdeadbeef}, {12, 4, 0x01234567}, {15, 1, 0x7e},
	};
	unsigned i, o;

	for (i = 0; i < 3; i++) {
		for (o = 0; o + sizes[i] <= PIO_PROBE_SIZE; o += sizes[i]) {
			u32 got = pio_in(PIO_PROBE_PORT + o, sizes[i]);
			u32 want = expect_bytes(pio_pattern, o, sizes[i]);

			if (got != want)
				return fail(d, "read size=%u port=0x%x got=0x%x want=0x%x", sizes[i],
					    PIO_PROBE_PORT + o, got, want);
		}
	}
	for (i = 0; i < sizeof(writes) / sizeof(writes[0]); i++) {
		const struct probe_write *w = &writes[i];
		u32 back;

		pio_out(PIO_PROBE_PORT + w->off, w->size, w->value);
		if (!check_last(d, "pio", w))
			return 0;
		back = pio_in(PIO_PROBE_PORT + w->off, w->size);
		if (back != w->value)
			return fail(d, "readback size=%u port=0x%x got=0x%x want=0x%lx", w->size,
				    PIO_PROBE_PORT + w->off, back, w->value);
	}
	return 1;
}

int test_mmio(char *d)
{
	static const unsigned sizes[] = {1, 2, 4, 8};
	static const struct probe_write writes[] = {
		{0x11, 1, 0xa5}, {0x22, 2, 0xbeef}, {0x44, 4, 0xdeadbeef},
		{0x88, 8, 0x0123456789abcdefULL}, {0xf8, 8, 0xfedcba9876543210ULL},
	};
	unsigned i, o;

	for (i = 0; i < 4; i++) {
		for (o = 0; o + sizes[i] <= TD_PROBE_SIZE; o += sizes[i]) {
			u64 got = mmio_read(TESTDEV_BASE + TD_PROBE + o, sizes[i]);
			u64 want = expect_bytes(mmio_pattern, o, sizes[i]);

			if (got != want)
				return fail(d, "read size=%u offset=0x%x got=0x%lx want=0x%lx", sizes[i], o, got,
					    want);
		}
	}
	for (i = 0; i < sizeof(writes) / sizeof(writes[0]); i++) {
		const struct probe_write *w = &writes[i];
		u64 back;

		mmio_write(TESTDEV_BASE + TD_PROBE + w->off, w->size, w->value);
		if (!check_last(d, "mmio", w))
			return 0;
		back = mmio_read(TESTDEV_BASE + TD_PROBE + w->off, w->size);
		if (back != w->value)
			return fail(d, "readback size=%u offset=0x%x got=0x%lx want=0x%lx", w->size, w->off,
				    back, w->value);
	}
	return 1;
}

struct irq_result {
	u64 cycles, halts;
};

/* Ask the testdev for one interrupt on 8259 `line` (through IRQ_LINE, or IRQFD for line 3)
 * `delay_ms` from now, wait for it with HLT, and check both counters rose. */
static int irq_roundtrip(char *d, unsigned line, int irqfd, unsigned delay_ms, struct irq_result *res)
{
	unsigned vec = VEC_PIC_BASE + line, i;
	u32 count0 = gk_irq_counts[vec], dev0 = td_r32(TD_IRQ_COUNT), dev1;
	u64 t0, r;

	pic_unmask(line);
	t0 = rdtsc();
	if (irqfd)
		td_w32(TD_IRQFD, delay_ms);
	else
		td_w32(TD_IRQ_LINE, line | delay_ms << 8);
	r = wait_irq(1u << line, delay_ms + 2000);
	res->cycles = rdtsc() - t0;
	res->halts = r >> 32;
	pic_mask(line);
	if (!(r & (1u << line)))
		return fail(d, "no-interrupt line=%u vector=0x%x after %lu ms", line, vec, delay_ms + 2000UL);
	if (gk_irq_counts[vec] == count0)
		return fail(d, "vector-count-unchanged vector=0x%x", vec);
	/* The VMM may count the injection just after performing it: allow it a moment. */
	for (i = 0; (dev1 = td_r32(TD_IRQ_COUNT)) == dev0 && i < 20; i++)
		sleep_ms(5);
	if (dev1 == dev0)
		return fail(d, "irq-count-unchanged count=%u", dev0);
	return 1;
}

static unsigned irq_line(void)
{
	return cmdline_u64("gk.irq_line", 5) & 15;
}

int test_irq(char *d)
{
	struct irq_result r;
	unsigned line = irq_line();

	if (!irq_roundtrip(d, line, 0, 20, &r))
		return 0;
	fmt(d, DETAIL_SIZE, "line=%u vector=0x%x", line, VEC_PIC_BASE + line);
	return 1;
}

int test_irqfd(char *d)
{
	struct irq_result r;

	if (!irq_roundtrip(d, TESTDEV_IRQFD_GSI, 1, 20, &r))
		return 0;
	fmt(d, DETAIL_SIZE, "gsi=%u vector=0x%x", TESTDEV_IRQFD_GSI, VEC_PIC_BASE + TESTDEV_IRQFD_GSI);
	return 1;
}

int test_hlt(char *d)
{
	struct irq_result r;

	if (!irq_roundtrip(d, irq_line(), 0, 50, &r))
		return 0;
	if (r.halts == 0)
		return fail(d, "did-not-halt (interrupt already pending)");
	if (r.cycles == 0)
		return fail(d, "tsc-did-not-advance");
	fmt(d, DETAIL_SIZE, "halts=%lu tsc_delta=%lu", r.halts, r.cycles);
	return 1;
}

int test_smp(char *d)
{
	u32 vcpus = td_r32(TD_VCPUS), want, i;

	if (gk_ncpus != vcpus)
		print("guest_kit: vcpu count differs: rdx=%lu testdev=%u\n", gk_ncpus, vcpus);
	if (gk_ncpus < 2)
		return fail(d, "needs-2-vcpus");
	want = gk_ncpus - 1;
	for (i = 0; gk_ap_checkin < want && i < 300; i++)
		sleep_ms(10);
	if (gk_ap_checkin != want)
		return fail(d, "aps-checked-in=%u want=%u", gk_ap_checkin, want);
	fmt(d, DETAIL_SIZE, "cpus=%lu aps=%u", gk_ncpus, want);
	return 1;
}

/* The ACPI power button as an OS meets it on a hardware-reduced platform: the Generic Event
 * Device's interrupt (the core's `vm.power-button`, SIGTERM with --shutdown-grace, `bulkhead
 * down`), after which the OS powers off with SLP_TYP = S5 and SLP_EN in SLEEP_CONTROL_REG.  The
 * result line is printed first: the power-off ends the VM. */
int test_power_button(char *d)
{
	u64 timeout = cmdline_u64("gk.pb_timeout_ms", 60000), r;

	pic_unmask(ACPI_GED_IRQ);
	print("guest_kit: waiting for the power button\n");
	r = wait_irq(1u << ACPI_GED_IRQ, timeout);
	pic_mask(ACPI_GED_IRQ);
	if (!(r & (1u << ACPI_GED_IRQ)))
		return fail(d, "no power-button interrupt within %lu ms", timeout);
	print("GK power-button ok line=%u, powering off\n", ACPI_GED_IRQ);
	pio_out(ACPI_SLEEP_CONTROL_PORT, 1, (ACPI_S5_SLP_TYP << 2) | ACPI_SLP_EN);
	return fail(d, "still running after the S5 write");
}
