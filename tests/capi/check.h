/* What the C test programs share: a check that counts failures and says where, which process,
 * and the library's last error. Each program names its process in `who`. */
#ifndef MF_TEST_CHECK_H
#define MF_TEST_CHECK_H

#include <stdio.h>

#include "smem/host/smem.h"

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

#endif /* MF_TEST_CHECK_H */
