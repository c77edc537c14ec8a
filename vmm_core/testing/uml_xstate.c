/*
 * LD_PRELOAD shim for Debian's linux.uml 6.1 on hosts whose XSAVE area is larger than UML's.
 *
 * UML keeps each guest thread's FPU state in a fixed buffer sized for the legacy area, the
 * header and AVX (struct _xstate), and moves it with PTRACE_GETREGSET / PTRACE_SETREGSET
 * NT_X86_XSTATE.  GETREGSET truncates to the buffer it is given, but the host's SETREGSET
 * refuses anything but the whole standard-format area (arch/x86/kernel/fpu/regset.c:
 * `count != fpu_user_cfg.max_size` -> -EFAULT).  On a host with AVX-512 and AMX the area is
 * ~11 KiB, so the first context switch fails ("ptrace set fp regs failed, errno = 14") and
 * init dies.  Later UML kernels size the buffer from the host; this one cannot be rebuilt here.
 *
 * The shim keeps, per UML buffer (its address is per guest thread), a shadow of the whole area:
 * a short GET fetches the whole area into the shadow and hands UML its prefix; a short SET
 * writes UML's prefix over the shadow and sets the whole area.  So each thread's AVX-512/AMX
 * state survives its context switches too.  Every other ptrace call passes through untouched,
 * as do whole-size ones (a host whose area fits UML's buffer never reaches the shadow code).
 * The shadows are a direct-mapped table: a thread whose slot was taken over falls back to the
 * host thread's current upper state, which is what the unpatched UML would have wanted anyway.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define NT_X86_XSTATE 0x202
#define SLOTS 1024
#define PROBE_SIZE (64 * 1024)

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace;
static size_t area_size;                 /* the host's whole XSAVE area, learned once */
static unsigned char scratch[PROBE_SIZE];
static struct { void *owner; unsigned char *area; } shadows[SLOTS];

__attribute__((constructor)) static void resolve(void) {
    real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
}

static int learn_area_size(pid_t pid) {
    if (area_size)
        return 1;
    struct iovec iov = {scratch, PROBE_SIZE};
    if (real_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov) < 0)
        return 0;
    area_size = iov.iov_len;
    return 1;
}

/* The shadow of UML buffer `owner`; with `claim`, taken (or made) for it if it has none. */
static unsigned char *shadow(void *owner, int claim) {
    size_t i = ((uintptr_t)owner >> 4) % SLOTS;
    if (shadows[i].owner == owner && shadows[i].area)
        return shadows[i].area;
    if (!claim)
        return NULL;
    if (!shadows[i].area) {
        /* mmap, not malloc: UML redirects the C library's allocator into its own kernel. */
        void *m = mmap(NULL, area_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            return NULL;
        shadows[i].area = m;
    }
    shadows[i].owner = owner;
    return shadows[i].area;
}

static long get_area(pid_t pid, unsigned char *area) {
    struct iovec whole = {area, area_size};
    return real_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &whole);
}

long ptrace(enum __ptrace_request request, ...) {
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);

    struct iovec *iov = data;
    int xstate = (request == PTRACE_GETREGSET || request == PTRACE_SETREGSET)
                 && (uintptr_t)addr == NT_X86_XSTATE && iov != NULL;
    if (!xstate || !learn_area_size(pid) || iov->iov_len >= area_size)
        return real_ptrace(request, pid, addr, data);

    size_t part = iov->iov_len;
    if (request == PTRACE_GETREGSET) {
        unsigned char *area = shadow(iov->iov_base, 1);
        if (area == NULL)
            area = scratch;
        long r = get_area(pid, area);
        if (r < 0)
            return r;
        memcpy(iov->iov_base, area, part);
        return r;
    }
    unsigned char *area = shadow(iov->iov_base, 0);
    if (area == NULL) {
        area = scratch;
        long r = get_area(pid, area);
        if (r < 0)
            return r;
    }
    memcpy(area, iov->iov_base, part);
    struct iovec whole = {area, area_size};
    return real_ptrace(PTRACE_SETREGSET, pid, addr, &whole);
}
