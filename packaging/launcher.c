/*
 * The first stage of the single-file build: a static program with the real executable appended to it.
 *
 * The real executable (PyInstaller's one-file program wrapped by staticx) unpacks its dynamic loader, its C
 * library and its interpreter into TMPDIR (or /tmp) and runs them from there. On a temporary directory that is
 * mounted noexec, or is too full, it fails deep inside a bootloader with a message that names neither the
 * cause nor the fix. This stage checks the temporary directory first and says both in one line; then it writes
 * the real executable there, runs it, waits for it, removes it, and exits with its status. It passes the
 * environment on untouched.
 *
 * Signals: the real executable is two bootloaders (staticx's, PyInstaller's) that each wait for a child and
 * then remove what they unpacked, and the migrator with its worker processes. A stop (SIGINT, SIGTERM, SIGHUP,
 * SIGQUIT) must reach the migrator, which stops at a safe point and exits 128 + the signal, and must not kill a
 * bootloader first (its unpacked folder would be left behind, and the migrator orphaned, still running). So
 * the child runs in a process group of its own with those signals ignored, which exec keeps and both
 * bootloaders inherit; the migrator installs its own handlers; this program forwards every stop to the whole
 * group, waits for its child, and exits with its status.
 *
 * Layout of the built file: [this program][payload][trailer], trailer = "A2OPAYLD" + payload size (8 bytes,
 * little endian) + bytes the payload unpacks at most (8 bytes, little endian).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAGIC "A2OPAYLD"
#define TRAILER (8 + 8 + 8)
#define EXIT_FAILED 1
#define NEED_INODES 256  /* the bootloaders unpack about 70 files and folders (measured); room to spare */

static pid_t child;
static char payload_path[4096];

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail(const char *fmt, ...)
{
    va_list ap;
    fputs("aufs2overlay: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (payload_path[0])
        unlink(payload_path);
    exit(EXIT_FAILED);
}

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void forward_stop(int sig)
{
    if (child > 0)
        kill(-child, sig);  /* the child's process group: the bootloaders ignore it, the migrator stops */
}

static void forward(int sig)
{
    if (child > 0)
        kill(child, sig);
}

static void no_room(const char *tmp, unsigned long long need_mib, unsigned long long free_mib)
{
    fail("the temporary directory %s has %llu MiB free, and this single-file build unpacks about %llu MiB there "
         "before it can start; free space there, or set TMPDIR to a directory with room (e.g. TMPDIR=/var/tmp)",
         tmp, free_mib, need_mib);
}

int main(int argc, char **argv)
{
    (void)argc;
    int self = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (self < 0)
        fail("cannot read its own executable through /proc/self/exe (%s); is /proc mounted?", strerror(errno));
    struct stat st;
    unsigned char trailer[TRAILER];
    if (fstat(self, &st) != 0 || st.st_size < TRAILER
        || pread(self, trailer, TRAILER, st.st_size - TRAILER) != TRAILER || memcmp(trailer, MAGIC, 8) != 0)
        fail("this file is not a complete aufs2overlay build (its payload is missing: a truncated download?)");
    uint64_t size = le64(trailer + 8), unpacked = le64(trailer + 16);
    if (size > (uint64_t)st.st_size - TRAILER)
        fail("this file is not a complete aufs2overlay build (its payload is cut short: a truncated download?)");
    off_t offset = st.st_size - TRAILER - (off_t)size;

    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    struct statvfs vfs;
    if (statvfs(tmp, &vfs) != 0)
        fail("cannot use the temporary directory %s (%s); set TMPDIR to a writable directory on a filesystem "
             "mounted with exec (e.g. TMPDIR=/var/tmp)", tmp, strerror(errno));
    if (vfs.f_flag & ST_NOEXEC)
        fail("the temporary directory %s is on a filesystem mounted noexec, and this single-file build runs its "
             "interpreter from there; set TMPDIR to a directory on a filesystem mounted with exec "
             "(e.g. TMPDIR=/var/tmp, or a tmpfs: mount -t tmpfs -o size=128m tmpfs /run/aufs2overlay)", tmp);
    if (vfs.f_flag & ST_RDONLY)
        fail("the temporary directory %s is on a read-only filesystem; set TMPDIR to a writable directory on a "
             "filesystem mounted with exec (e.g. TMPDIR=/var/tmp)", tmp);
    unsigned long long need = size + unpacked, avail = (unsigned long long)vfs.f_bavail * vfs.f_frsize;
    if (avail < need)
        no_room(tmp, need >> 20, avail >> 20);
    if (vfs.f_files > 0 && vfs.f_favail < NEED_INODES)  /* f_files 0: a filesystem without an inode count */
        fail("the temporary directory %s has %llu free inodes, and this single-file build unpacks about %d files "
             "there before it can start; free inodes there, or set TMPDIR to a directory with room "
             "(e.g. TMPDIR=/var/tmp)", tmp, (unsigned long long)vfs.f_favail, NEED_INODES);

    snprintf(payload_path, sizeof payload_path, "%s/aufs2overlay-XXXXXX", tmp);
    int out = mkostemp(payload_path, O_CLOEXEC);
    if (out < 0) {
        payload_path[0] = 0;
        fail("cannot create a file in the temporary directory %s (%s); set TMPDIR to a writable directory on a "
             "filesystem mounted with exec (e.g. TMPDIR=/var/tmp)", tmp, strerror(errno));
    }
    for (uint64_t left = size; left > 0;) {
        ssize_t n = sendfile(out, self, &offset, left > (1 << 30) ? (1 << 30) : left);
        if (n <= 0) {
            if (n < 0 && (errno == ENOSPC || errno == EDQUOT))
                no_room(tmp, need >> 20, avail >> 20);
            fail("cannot write to the temporary directory %s (%s); set TMPDIR to a writable directory "
                 "(e.g. TMPDIR=/var/tmp)", tmp, n < 0 ? strerror(errno) : "short read of its own executable");
        }
        left -= (uint64_t)n;
    }
    if (fchmod(out, 0700) != 0 || close(out) != 0)
        fail("cannot write to the temporary directory %s (%s)", tmp, strerror(errno));
    close(self);

    static const int stops[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    struct sigaction sa = {0};
    sa.sa_handler = forward_stop;
    sigset_t block, old;
    sigemptyset(&block);
    for (size_t i = 0; i < sizeof stops / sizeof stops[0]; i++)
        sigaddset(&block, stops[i]);
    sigprocmask(SIG_BLOCK, &block, &old);  /* a stop before the child has its group waits for it */
    for (size_t i = 0; i < sizeof stops / sizeof stops[0]; i++)
        sigaction(stops[i], &sa, NULL);
    sa.sa_handler = forward;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    child = fork();
    if (child < 0)
        fail("cannot start a process (%s)", strerror(errno));
    if (child == 0) {
        setpgid(0, 0);
        for (size_t i = 0; i < sizeof stops / sizeof stops[0]; i++)
            signal(stops[i], SIG_IGN);
        sigprocmask(SIG_SETMASK, &old, NULL);
        execv(payload_path, argv);
        int err = errno;
        if (err == EACCES || err == EPERM)
            fprintf(stderr, "aufs2overlay: error: the temporary directory %s does not allow running programs "
                    "(%s: a noexec mount or a security policy); set TMPDIR to a directory on a filesystem "
                    "mounted with exec (e.g. TMPDIR=/var/tmp)\n", tmp, strerror(err));
        else
            fprintf(stderr, "aufs2overlay: error: cannot run %s (%s)\n", payload_path, strerror(err));
        _exit(EXIT_FAILED);
    }
    setpgid(child, child);  /* also here: whichever of the two runs first, the group exists before a forward */
    sigprocmask(SIG_SETMASK, &old, NULL);
    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) {
            status = EXIT_FAILED << 8;
            break;
        }
    }
    unlink(payload_path);
    if (WIFSIGNALED(status)) {
        signal(WTERMSIG(status), SIG_DFL);
        raise(WTERMSIG(status));
        return 128 + WTERMSIG(status);
    }
    return WEXITSTATUS(status);
}
