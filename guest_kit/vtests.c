/* Phase-2 virtio tests (virtio-mmio drivers): not written yet. */
#include "tests.h"

int test_virtio_blk(char *d) { return fail(d, "not-implemented"); }
int test_virtio_blk_ro(char *d) { return fail(d, "not-implemented"); }
int test_blk_workload(char *d) { return fail(d, "not-implemented"); }
int test_virtio_rng(char *d) { return fail(d, "not-implemented"); }
int test_virtio_console(char *d) { return fail(d, "not-implemented"); }
