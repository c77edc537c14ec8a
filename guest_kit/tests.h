/* Test functions: return 1 on success, 0 on failure; `d` (DETAIL_SIZE bytes) gets the detail
 * printed after `ok` / `fail` (may stay empty on success). */
#ifndef GK_TESTS_H
#define GK_TESTS_H

#include "ulib.h"

#define DETAIL_SIZE 160

/* Fill the detail and return 0: `return fail(d, "...", ...);` */
int fail(char *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

int test_pio(char *d);
int test_mmio(char *d);
int test_irq(char *d);
int test_irqfd(char *d);
int test_hlt(char *d);
int test_smp(char *d);

int test_virtio_blk(char *d);
int test_virtio_blk_ro(char *d);
int test_blk_workload(char *d);
int test_virtio_rng(char *d);
int test_virtio_console(char *d);
int test_virtio_net(char *d);
int test_virtio_vsock(char *d);
int test_virtio_fs(char *d);
int test_power_button(char *d);

extern u64 gk_ncpus; /* from rdx at entry */

#endif
