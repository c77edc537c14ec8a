/* The CPL3 test program: runs the tests named by gk.tests= and reports on COM1 (guest ABI). */
#include "tests.h"

u64 gk_ncpus;

struct test {
	const char *name;
	int (*run)(char *d);
};

static const struct test tests[] = {
	{"pio", test_pio},
	{"mmio", test_mmio},
	{"irq", test_irq},
	{"irqfd", test_irqfd},
	{"hlt", test_hlt},
	{"smp", test_smp},
	{"virtio-blk", test_virtio_blk},
	{"virtio-blk-ro", test_virtio_blk_ro},
	{"blk-workload", test_blk_workload},
	{"virtio-rng", test_virtio_rng},
	{"virtio-console", test_virtio_console},
	{"virtio-net", test_virtio_net},
	{"virtio-vsock", test_virtio_vsock},
	{"virtio-fs", test_virtio_fs},
	{"power-button", test_power_button},
};

int fail(char *d, const char *f, ...)
{
	va_list ap;

	va_start(ap, f);
	vfmt(d, DETAIL_SIZE, f, ap);
	va_end(ap);
	return 0;
}

static int run_one(const char *name)
{
	char detail[DETAIL_SIZE];
	unsigned i;
	int ok;

	detail[0] = 0;
	for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
		if (!memcmp(tests[i].name, name, strlen(name) + 1))
			break;
	if (i == sizeof(tests) / sizeof(tests[0])) {
		print("GK %s fail unknown-test\n", name);
		return 0;
	}
	ok = tests[i].run(detail);
	if (!ok && !detail[0])
		fmt(detail, sizeof(detail), "failed");
	print("GK %s %s%s%s\n", name, ok ? "ok" : "fail", detail[0] ? " " : "", detail);
	return ok;
}

void __attribute__((noreturn)) user_main(const char *cmdline, u64 ncpus)
{
	static char list[1024];
	unsigned passed = 0, total = 0;
	char *p = list;

	td_w32(TD_MARK, 1);
	gk_ncpus = ncpus;
	cmdline_set(cmdline);
	print("guest_kit: cpl3 up, %lu vcpus, cmdline \"%s\"\n", ncpus, cmdline);
	if (cmdline_get("gk.tests", list, sizeof(list))) {
		while (*p) {
			char *name = p;

			while (*p && *p != ',')
				p++;
			if (*p)
				*p++ = 0;
			if (!*name)
				continue;
			total++;
			passed += run_one(name);
		}
	}
	print("GK done %u/%u\n", passed, total);
	td_w32(TD_MARK, 2);
	if (cmdline_u64("gk.hold", 0))
		for (;;)
			wait_irq(0, 1000);
	sys_exit(passed == total ? 0 : 1);
}
