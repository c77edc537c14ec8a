/* bulkhead-jail-init: pid 1 of a device's PID namespace (see jail/launch.py).
 *
 *   bulkhead-jail-init:DEVICE ALIVE_FD UID GID
 *
 * Exec'd (as root, by the launcher, before anything else runs in the namespace) so that the
 * namespace's init is a few pages of its own rather than a copy of the launcher's interpreter:
 * every page the launcher wrote after a fork would be charged to the copy.  It closes every fd
 * but ALIVE_FD, ignores SIGCHLD (so whatever is orphaned into the namespace is reaped), becomes
 * UID/GID with no groups (root -> unprivileged: the kernel clears every capability), sets
 * no_new_privs and PR_SET_PDEATHSIG, then sleeps until ALIVE_FD reads EOF: the launcher holds
 * the other end and never writes.  Any failure exits, which ends the namespace: fail closed. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static unsigned long number(const char *text) {
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value > 0xFFFFFFFFUL) _exit(2);
    return value;
}

int main(int argc, char **argv) {
    if (argc != 4) _exit(2);
    unsigned int alive_fd = (unsigned int)number(argv[1]);
    unsigned int uid = (unsigned int)number(argv[2]), gid = (unsigned int)number(argv[3]);
    struct sigaction ignore;
    char byte;

    /* ps shows argv[0] (the title) only: the numbers are ours. */
    memset(argv[1], 0, (size_t)(argv[argc - 1] + strlen(argv[argc - 1]) - argv[1]));

    if (alive_fd > 0 && syscall(SYS_close_range, 0U, alive_fd - 1, 0U) != 0) _exit(1);
    if (alive_fd < ~0U && syscall(SYS_close_range, alive_fd + 1, ~0U, 0U) != 0) _exit(1);
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN;
    if (sigaction(SIGCHLD, &ignore, NULL) != 0) _exit(1);
    /* Raw calls: this process has one thread, glibc's setxid broadcast is not needed. */
    if (syscall(SYS_setgroups, 0, NULL) != 0 || syscall(SYS_setresgid, gid, gid, gid) != 0 ||
        syscall(SYS_setresuid, uid, uid, uid) != 0)
        _exit(1);
    /* PDEATHSIG after the uid switch (which resets it); the pipe covers a launcher gone before. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        _exit(1);
    for (;;) {
        ssize_t n = read((int)alive_fd, &byte, 1);
        if (n == 0 || (n < 0 && errno != EINTR)) _exit(0);
    }
}
