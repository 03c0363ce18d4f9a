/* What the C test programs share: a check that counts failures and says where, which process,
 * and the library's last error. Each program names its process in `who`. */
#ifndef MF_TEST_CHECK_H
#define MF_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "smem/host/smem.h"

/* This library's own codes (smem.h), for programs compiled against headers that lack them. */
#ifndef MF_PEER_GONE
#define MF_PEER_GONE (-3001)
#define MF_OUT_OF_BOUNDS (-3002)
#define MF_REFUSED (-3003)
#define MF_TLS (-3004)
#define MF_PROTOCOL (-3005)
#define MF_UNSUPPORTED (-3006)
#define MF_IO (-3007)
#endif

static int failures = 0;
static char who[32] = "main";

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "[%s] FAILED %s:%d: %s -- ", who, __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, " (last error: %s)\n", smem_get_last_err_msg());             \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

/* Runs run(rank, arg) as n ranks (at most 64): rank 0 in this process, the others in children
 * forked before anything touches the library. 0 when every rank returned 0. */
static inline int run_ranks(int n, int (*run)(int rank, const char *arg), const char *arg) {
    pid_t kids[64];
    if (n < 1 || n > 64) return 2;
    fflush(stdout);
    for (int r = 1; r < n; r++) {
        kids[r] = fork();
        if (kids[r] < 0) return 2;
        if (kids[r] == 0) exit(run(r, arg)); /* exit, not _exit: stdout is flushed */
    }
    int rc = run(0, arg);
    for (int r = 1; r < n; r++) {
        int status = 0;
        waitpid(kids[r], &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "rank %d exit status %d\n", r, status);
            rc = 1;
        }
    }
    return rc;
}

#endif /* MF_TEST_CHECK_H */
