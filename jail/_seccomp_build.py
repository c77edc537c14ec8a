"""cffi API-mode build of `jail._seccomp_cffi`: libseccomp, a SIGSYS reporter, and the
few raw system calls the jail needs that Python 3.11's `os` module lacks.

Built by `setup.py build_ext --inplace` (setup.py lists `jail/_seccomp_build.py:ffibuilder`).
Everything numeric comes from the system headers at compile time: no hand-counted BPF, no
hand-copied ioctl numbers.  The constant table `bh_consts` is what policy files may name.
"""

from __future__ import annotations

from cffi import FFI

# Names a policy file may use as argument values (resolved from the C headers at build time).
CONSTANT_NAMES: tuple[str, ...] = (
    # mmap / mprotect protections and flags
    "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC",
    "MAP_SHARED", "MAP_PRIVATE", "MAP_ANONYMOUS", "MAP_FIXED", "MAP_NORESERVE", "MAP_STACK",
    "MAP_POPULATE",
    # madvise advice
    "MADV_DONTNEED", "MADV_FREE", "MADV_WILLNEED", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE",
    "MADV_DONTDUMP",
    # fcntl commands and flags
    "F_GETFD", "F_SETFD", "F_GETFL", "F_SETFL", "F_DUPFD", "F_DUPFD_CLOEXEC", "F_GETLK",
    "F_SETLK", "F_OFD_SETLK", "F_OFD_GETLK", "FD_CLOEXEC", "O_NONBLOCK",
    # *at() flags (fstat of an fd is newfstatat(fd, "", AT_EMPTY_PATH) in glibc)
    "AT_EMPTY_PATH",
    # generic and tty ioctl requests
    "FIONBIO", "FIOCLEX", "FIONCLEX", "FIONREAD", "TCGETS", "TCSETS", "TIOCGWINSZ",
    # futex operations (with and without FUTEX_PRIVATE_FLAG)
    "FUTEX_WAIT", "FUTEX_WAKE", "FUTEX_WAIT_BITSET", "FUTEX_WAKE_PRIVATE", "FUTEX_WAIT_PRIVATE",
    "FUTEX_WAIT_BITSET_PRIVATE", "FUTEX_PRIVATE_FLAG", "FUTEX_CLOCK_REALTIME",
    # fallocate modes
    "FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE", "FALLOC_FL_ZERO_RANGE",
    # getrandom flags
    "GRND_NONBLOCK", "GRND_RANDOM",
    # clock ids
    "CLOCK_REALTIME", "CLOCK_MONOTONIC", "CLOCK_PROCESS_CPUTIME_ID", "CLOCK_THREAD_CPUTIME_ID",
    "CLOCK_MONOTONIC_RAW", "CLOCK_BOOTTIME",
    # signals (rt_sigprocmask how, tgkill targets)
    "SIG_BLOCK", "SIG_UNBLOCK", "SIG_SETMASK", "SIGSYS", "SIGTERM", "SIGINT", "SIGKILL", "SIGABRT",
    # socket options and msg flags zmq uses on an already connected socket
    "MSG_DONTWAIT", "MSG_NOSIGNAL", "MSG_CMSG_CLOEXEC", "SOL_SOCKET", "SO_ERROR",
    "SO_SNDBUF", "SO_RCVBUF", "SO_PEERCRED",
    # epoll_ctl operations
    "EPOLL_CTL_ADD", "EPOLL_CTL_DEL", "EPOLL_CTL_MOD",
    # eventfd flags
    "EFD_CLOEXEC", "EFD_NONBLOCK", "EFD_SEMAPHORE",
    # prctl options
    "PR_SET_NAME", "PR_GET_NAME",
    # tap ioctls (virtio-net: offloads on a tap the core opened) and their flags
    "TUNSETOFFLOAD", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN", "TUN_F_UFO",
)

CDEF = r"""
typedef void *scmp_filter_ctx;
enum scmp_filter_attr {
    SCMP_FLTATR_ACT_DEFAULT = 1, SCMP_FLTATR_ACT_BADARCH = 2, SCMP_FLTATR_CTL_NNP = 3,
    SCMP_FLTATR_CTL_TSYNC = 4, SCMP_FLTATR_API_TSKIP = 5, SCMP_FLTATR_CTL_LOG = 6, ...
};
enum scmp_compare {
    SCMP_CMP_NE = 1, SCMP_CMP_LT = 2, SCMP_CMP_LE = 3, SCMP_CMP_EQ = 4, SCMP_CMP_GE = 5,
    SCMP_CMP_GT = 6, SCMP_CMP_MASKED_EQ = 7, ...
};
typedef uint64_t scmp_datum_t;
struct scmp_arg_cmp { unsigned int arg; enum scmp_compare op; scmp_datum_t datum_a; scmp_datum_t datum_b; };
typedef int... __u64;
typedef int... __u32;
typedef int... __s64;
typedef int... __s32;
struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; };
struct seccomp_notif { __u64 id; __u32 pid; __u32 flags; struct seccomp_data data; };
struct seccomp_notif_resp { __u64 id; __s64 val; __s32 error; __u32 flags; };

#define SCMP_ACT_KILL_PROCESS ...
#define SCMP_ACT_KILL_THREAD ...
#define SCMP_ACT_TRAP ...
#define SCMP_ACT_NOTIFY ...
#define SCMP_ACT_LOG ...
#define SCMP_ACT_ALLOW ...
#define SECCOMP_USER_NOTIF_FLAG_CONTINUE ...
#define __NR_SCMP_ERROR ...

scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_attr_set(scmp_filter_ctx ctx, enum scmp_filter_attr attr, uint32_t value);
int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                           unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
int seccomp_load(const scmp_filter_ctx ctx);
int seccomp_export_pfc(const scmp_filter_ctx ctx, int fd);
int seccomp_syscall_resolve_name(const char *name);
char *seccomp_syscall_resolve_num_arch(uint32_t arch_token, int num);
uint32_t seccomp_arch_native(void);
unsigned int seccomp_api_get(void);
int seccomp_notify_alloc(struct seccomp_notif **req, struct seccomp_notif_resp **resp);
void seccomp_notify_free(struct seccomp_notif *req, struct seccomp_notif_resp *resp);
int seccomp_notify_receive(int fd, struct seccomp_notif *req);
int seccomp_notify_respond(int fd, struct seccomp_notif_resp *resp);
int seccomp_notify_fd(const scmp_filter_ctx ctx);
void free(void *);

struct bh_const { const char *name; long long value; };
extern const struct bh_const bh_consts[];
extern const int bh_nconsts;

uint32_t bh_act_errno(uint32_t err);
int bh_install_sigsys_reporter(int fd);
int bh_unshare(int flags);
int bh_setns(int fd, int nstype);
int bh_pivot_root(const char *new_root, const char *put_old);
int bh_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
             const char *data);
int bh_umount2(const char *target, int flags);
int bh_sethostname(const char *name);
int bh_setgroups_empty(void);
int bh_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
int bh_pidfd_getfd(int pidfd, int targetfd);

#define CLONE_NEWUSER ...
#define CLONE_NEWNS ...
#define CLONE_NEWPID ...
#define CLONE_NEWNET ...
#define CLONE_NEWIPC ...
#define CLONE_NEWUTS ...
#define MS_RDONLY ...
#define MS_NOSUID ...
#define MS_NODEV ...
#define MS_NOEXEC ...
#define MS_BIND ...
#define MS_REC ...
#define MS_PRIVATE ...
#define MS_REMOUNT ...
#define MNT_DETACH ...
#define PR_CAP_AMBIENT ...
#define PR_CAP_AMBIENT_CLEAR_ALL ...
#define PR_CAP_AMBIENT_IS_SET ...
"""

SOURCE = r"""
#include <seccomp.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sched.h>
#include <grp.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/falloc.h>
#include <linux/futex.h>
#include <linux/if_tun.h>
#include <linux/seccomp.h>
#include <termios.h>

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

__CONSTS__

uint32_t bh_act_errno(uint32_t err) { return SCMP_ACT_ERRNO(err); }

/* SIGSYS reporter: async-signal-safe only (write, sigaction, raise, _exit).  Writes one line
 * "sigsys <nr> <arch>\n" to the fd given at install time, then ends the whole process *by
 * SIGSYS*: the core only believes a report from a process the kernel says SIGSYS ended. */
static int bh_report_fd = -1;

static size_t bh_fmt_uint(char *out, unsigned long v) {
    char tmp[24];
    size_t n = 0, i;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v && n < sizeof tmp);
    for (i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
    return n;
}

static void bh_sigsys_handler(int sig, siginfo_t *info, void *uctx) {
    char line[64];
    size_t n = 0;
    (void)sig; (void)uctx;
    memcpy(line, "sigsys ", 7); n = 7;
    n += bh_fmt_uint(line + n, (unsigned long)(unsigned int)info->si_syscall);
    line[n++] = ' ';
    n += bh_fmt_uint(line + n, (unsigned long)info->si_arch);
    line[n++] = '\n';
    if (bh_report_fd >= 0) { ssize_t r = write(bh_report_fd, line, n); (void)r; }
    {
        struct sigaction dfl;
        sigset_t set;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGSYS, &dfl, NULL);
        sigemptyset(&set);
        sigaddset(&set, SIGSYS);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        raise(SIGSYS);
    }
    _exit(128 + SIGSYS);
}

int bh_install_sigsys_reporter(int fd) {
    struct sigaction sa;
    sigset_t set;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = bh_sigsys_handler;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    bh_report_fd = fd;
    if (sigaction(SIGSYS, &sa, NULL) != 0) return -errno;
    sigemptyset(&set);
    sigaddset(&set, SIGSYS);
    if (pthread_sigmask(SIG_UNBLOCK, &set, NULL) != 0) return -EINVAL;
    return 0;
}

int bh_unshare(int flags) { return unshare(flags) == 0 ? 0 : -errno; }
int bh_setns(int fd, int nstype) { return setns(fd, nstype) == 0 ? 0 : -errno; }
int bh_pivot_root(const char *n, const char *o) {
    return syscall(SYS_pivot_root, n, o) == 0 ? 0 : -errno;
}
int bh_mount(const char *s, const char *t, const char *f, unsigned long fl, const char *d) {
    return mount(s, t, f, fl, d) == 0 ? 0 : -errno;
}
int bh_umount2(const char *t, int fl) { return umount2(t, fl) == 0 ? 0 : -errno; }
int bh_sethostname(const char *name) { return sethostname(name, strlen(name)) == 0 ? 0 : -errno; }
int bh_setgroups_empty(void) { return setgroups(0, NULL) == 0 ? 0 : -errno; }
int bh_prctl(int o, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5) {
    int r = prctl(o, a2, a3, a4, a5);
    return r >= 0 ? r : -errno;
}
int bh_pidfd_getfd(int pidfd, int targetfd) {
    long r = syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
    return r >= 0 ? (int)r : -errno;
}
"""


def _consts_source() -> str:
    rows = "\n".join(f'    {{"{name}", (long long)({name})}},' for name in CONSTANT_NAMES)
    return (
        "struct bh_const { const char *name; long long value; };\n"
        f"const struct bh_const bh_consts[] = {{\n{rows}\n}};\n"
        f"const int bh_nconsts = {len(CONSTANT_NAMES)};\n"
    )


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "jail._seccomp_cffi",
    SOURCE.replace("__CONSTS__", _consts_source()),
    libraries=["seccomp"],
    extra_compile_args=["-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
