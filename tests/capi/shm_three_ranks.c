/*
 * A C program on the Share Memory C API (the calls of the 1.3.0 release): three ranks (forked
 * before any touches the library) create one object, each writes its part through the GVA
 * (plain stores: same-host parts are mapped in every rank), barrier, and every rank reads every
 * part; then all_gather, sub-groups of some of the ranks (one rank waiting in two of them at
 * once, on two threads), reachability, context, the values ranks hold, a global exit, and the
 * refusals. Valid C11 and C++11, so that it also builds against the upstream headers.
 * Usage: shm_three_ranks tcp://127.0.0.1:STORE_PORT
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "smem/host/smem.h"
#include "smem/host/smem_shm.h"

#define WORLD 3u
#define SIZE (2u << 20)

static int rank = -1;
static int exit_status = -1; /* written by the exit function, on a thread of the library */

static void on_global_exit(int status) {
    __atomic_store_n(&exit_status, status, __ATOMIC_SEQ_CST);
}

/* Waits up to 10 s for the exit function to have run. */
static int exit_status_seen(void) {
    struct timespec nap;
    nap.tv_sec = 0;
    nap.tv_nsec = 10 * 1000 * 1000;
    for (int i = 0; i < 1000 && __atomic_load_n(&exit_status, __ATOMIC_SEQ_CST) < 0; i++) nanosleep(&nap, NULL);
    return __atomic_load_n(&exit_status, __ATOMIC_SEQ_CST);
}

/* Parts through the GVA, the object's all_gather, reachability, context and refusals. */
static void parts_and_gather(smem_shm_t shm, void *gva) {
    uint64_t stride = smem_shm_get_symmetric_size(shm);
    CHECK(stride >= SIZE && stride % SIZE == 0, "symmetric size %llu", (unsigned long long)stride);
    CHECK(smem_shm_get_symmetric_size((smem_shm_t)0x5eed) == 0, "symmetric size of a made-up handle");
    CHECK(smem_shm_get_global_rank(shm) == (uint32_t)rank, "global rank");
    CHECK(smem_shm_get_global_rank_size(shm) == WORLD, "global rank size");
    CHECK(smem_shm_get_global_rank(NULL) == UINT32_MAX, "rank of NULL");
    CHECK(smem_shm_get_global_rank_size((smem_shm_t)0x5eed) == UINT32_MAX, "rank size of a made-up handle");

    /* Rank r's part is at gva + r * stride. */
    unsigned char *base = (unsigned char *)gva;
    memset(base + (size_t)rank * stride, 0x40 + rank, SIZE);
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
    for (unsigned r = 0; r < WORLD; r++) {
        size_t wrong = 0;
        for (size_t i = 0; i < SIZE; i += 4093) wrong += base[r * stride + i] != (unsigned char)(0x40 + r);
        CHECK(wrong == 0, "rank %u's part read through the GVA", r);
    }
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");

    char mine[8] = {'r', (char)('0' + rank), 'x', 'y', 'z', 'w', 'v', 'u'};
    char all[8 * WORLD];
    CHECK(smem_shm_control_allgather(shm, mine, 8, all, sizeof all) == 0, "allgather");
    for (unsigned r = 0; r < WORLD; r++) CHECK(all[r * 8 + 1] == (char)('0' + r), "gathered piece of rank %u", r);
    CHECK(smem_shm_control_allgather(shm, mine, 8, all, 8) == SMEM_BUFFER_TOO_SMALL, "small recvBuf");
    CHECK(smem_shm_control_allgather(shm, NULL, 8, all, sizeof all) == SMEM_INVALID_PARAM, "NULL sendBuf");
    CHECK(smem_shm_control_allgather(shm, mine, 0, all, sizeof all) == SMEM_INVALID_PARAM, "sendSize 0");

    uint32_t reach = 0;
    CHECK(smem_shm_topology_can_reach(shm, (uint32_t)((rank + 1) % WORLD), &reach) == 0, "reach");
    CHECK((reach & SMEMS_DATA_OP_MTE) != 0, "same-host parts are mapped: 0x%x", reach);
    CHECK(smem_shm_topology_can_reach(shm, 7, &reach) == SMEM_INVALID_PARAM, "rank 7");
    CHECK(smem_shm_topology_can_reach(shm, 0, NULL) == SMEM_INVALID_PARAM, "NULL reachInfo");
    CHECK((smem_shm_query_support_data_operation() & SMEMS_DATA_OP_MTE) != 0, "MTE is supported");

    if (rank == 0) CHECK(smem_shm_set_extra_context(shm, "hello", 5) == 0, "context");
    CHECK(smem_shm_set_extra_context(shm, NULL, 5) == SMEM_INVALID_PARAM, "NULL context");
    CHECK(smem_shm_set_extra_context(shm, "hello", 0) == SMEM_INVALID_PARAM, "empty context");
    char *big = (char *)calloc(70000, 1);
    CHECK(smem_shm_set_extra_context(shm, big, 70000) == SMEM_INVALID_PARAM, "context too large");
    free(big);
    CHECK(smem_shm_control_barrier((smem_shm_t)0x5eed) == SMEM_INVALID_PARAM, "made-up handle");
    CHECK(smem_shm_control_barrier(NULL) == SMEM_INVALID_PARAM, "NULL handle");
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
}

/* Sub-groups: ranks 0 and 2 ("ends"), rank 1 alone ("middle"), then all three with their
 * sub-group ranks reversed ("all"). */
static void sub_groups(smem_shm_t shm) {
    uint32_t got[WORLD];
    uint32_t me = (uint32_t)rank;
    if (rank != 1) {
        uint32_t sub_rank = rank == 0 ? 0 : 1;
        CHECK(smem_shm_subgroup_barrier(shm, "ends", 2, sub_rank) == 0, "barrier of ranks 0 and 2");
        CHECK(smem_shm_subgroup_allgather(shm, "ends", 2, sub_rank, (const char *)&me, 4, (char *)got, 8) == 0,
              "all_gather of ranks 0 and 2");
        CHECK(got[0] == 0 && got[1] == 2, "gathered %u %u", got[0], got[1]);
        CHECK(smem_shm_subgroup_barrier(shm, "ends", 2, sub_rank) == 0, "second barrier of ranks 0 and 2");
    } else {
        CHECK(smem_shm_subgroup_barrier(shm, "middle", 1, 0) == 0, "barrier of rank 1 alone");
        CHECK(smem_shm_subgroup_allgather(shm, "middle", 1, 0, (const char *)&me, 4, (char *)got, 4) == 0,
              "all_gather of rank 1 alone");
        CHECK(got[0] == 1, "gathered %u", got[0]);
    }
    uint32_t reversed = WORLD - 1 - me;
    CHECK(smem_shm_subgroup_allgather(shm, "all", WORLD, reversed, (const char *)&me, 4, (char *)got, sizeof got) == 0,
          "all_gather of every rank");
    for (unsigned i = 0; i < WORLD; i++) CHECK(got[i] == WORLD - 1 - i, "sub-group rank %u gave %u", i, got[i]);
    CHECK(smem_shm_subgroup_barrier(shm, "all", WORLD, reversed) == 0, "barrier of every rank");

    CHECK(smem_shm_subgroup_allgather(shm, "all", WORLD, reversed, (const char *)&me, 4, (char *)got, 4) ==
              SMEM_BUFFER_TOO_SMALL,
          "small recvBuf");
    CHECK(smem_shm_subgroup_barrier(shm, "x", WORLD + 1, 0) == SMEM_INVALID_PARAM, "more ranks than the object");
    CHECK(smem_shm_subgroup_barrier(shm, "x", 2, 2) == SMEM_INVALID_PARAM, "rankId beyond rankSize");
    CHECK(smem_shm_subgroup_barrier(shm, NULL, 1, 0) == SMEM_INVALID_PARAM, "NULL key");
    CHECK(smem_shm_subgroup_barrier(shm, "all", 2, 0) == SMEM_INVALID_PARAM, "a key met with another size");
    CHECK(smem_shm_subgroup_barrier((smem_shm_t)0x5eed, "all", WORLD, reversed) == SMEM_INVALID_PARAM,
          "made-up handle");
}

/* A sub-group barrier waited in on a thread of its own. */
struct sub_wait {
    smem_shm_t shm;
    const char *key;
    int32_t rc;
};

static void *sub_barrier_thread(void *arg) {
    struct sub_wait *w = (struct sub_wait *)arg;
    w->rc = smem_shm_subgroup_barrier(w->shm, w->key, 2, 0);
    return NULL;
}

static void nap_ms(long ms) {
    struct timespec t;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (ms % 1000) * 1000 * 1000;
    nanosleep(&t, NULL);
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Rank 0 waits in sub-group "pa" on one thread, then in "pb" on another; rank 2 comes to "pb"
 * first, then to "pa". A rendezvous waiting in one sub-group holds up no other (nor the rank's
 * other calls): both pass at once. */
static void sub_groups_at_once(smem_shm_t shm) {
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
    double start = seconds_now();
    if (rank == 0) {
        struct sub_wait waits[2] = {{shm, "pa", -1}, {shm, "pb", -1}};
        pthread_t threads[2];
        for (int i = 0; i < 2; i++) {
            CHECK(pthread_create(&threads[i], NULL, sub_barrier_thread, &waits[i]) == 0, "thread %d", i);
            nap_ms(100); /* "pa" is waiting before "pb" starts */
        }
        for (int i = 0; i < 2; i++) {
            pthread_join(threads[i], NULL);
            CHECK(waits[i].rc == 0, "barrier of %s on a thread of its own: %d", waits[i].key, waits[i].rc);
        }
    } else if (rank == 2) {
        nap_ms(300);
        CHECK(smem_shm_subgroup_barrier(shm, "pb", 2, 1) == 0, "barrier of pb");
        CHECK(smem_shm_subgroup_barrier(shm, "pa", 2, 1) == 0, "barrier of pa");
    }
    CHECK(seconds_now() - start < 10.0, "the sub-groups took %.1f s", seconds_now() - start);
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
}

/* Values held by one rank at a time. */
static void values(smem_shm_t shm) {
    int32_t mine = -1;
    CHECK(smem_shm_atomic_alloc_value(shm, WORLD, &mine) == 0, "alloc");
    CHECK(mine >= 0 && mine < (int32_t)WORLD, "value %d", mine);
    int32_t all[WORLD];
    CHECK(smem_shm_control_allgather(shm, (const char *)&mine, 4, (char *)all, sizeof all) == 0, "gather values");
    for (unsigned a = 0; a < WORLD; a++)
        for (unsigned b = a + 1; b < WORLD; b++) CHECK(all[a] != all[b], "ranks %u and %u both got %d", a, b, all[a]);
    int32_t more = -1;
    CHECK(smem_shm_atomic_alloc_value(shm, WORLD, &more) == SMEM_NO_RESOURCES, "every value below 3 is held");
    CHECK(smem_shm_atomic_alloc_value(shm, 0, &more) == SMEM_INVALID_PARAM, "limit 0");
    CHECK(smem_shm_atomic_alloc_value(shm, SMEM_SHM_ATOMIC_NUM_LIMIT + 1, &more) == SMEM_INVALID_PARAM, "limit 1025");
    CHECK(smem_shm_atomic_alloc_value(shm, WORLD, NULL) == SMEM_INVALID_PARAM, "NULL value");
    CHECK(smem_shm_atomic_release_value(shm, all[(rank + 1) % WORLD]) == SMEM_NOT_EXIST, "another rank's value");
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
    CHECK(smem_shm_atomic_release_value(shm, mine) == 0, "release");
    CHECK(smem_shm_atomic_release_value(shm, mine) == SMEM_NOT_EXIST, "second release");
    CHECK(smem_shm_atomic_release_value(shm, -1) == SMEM_INVALID_PARAM, "negative value");
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
    if (rank == 0) {
        CHECK(smem_shm_atomic_alloc_value(shm, 1, &mine) == 0 && mine == 0, "value 0 is free again: %d", mine);
        CHECK(smem_shm_atomic_release_value(shm, mine) == 0, "release");
    }
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
}

/* Every rank registers an exit function; rank 1 calls the global exit. */
static void exit_functions(smem_shm_t shm) {
    CHECK(smem_shm_register_exit(shm, NULL) == SMEM_INVALID_PARAM, "NULL exit function");
    CHECK(smem_shm_register_exit(shm, on_global_exit) == 0, "register exit");
    CHECK(smem_shm_register_exit(shm, on_global_exit) == SMEM_REPEAT_INVOKE, "second exit function");
    CHECK(smem_shm_register_exit((smem_shm_t)0x5eed, on_global_exit) == SMEM_INVALID_PARAM, "made-up handle");
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
    if (rank == 1) {
        smem_shm_global_exit(shm, 3);
        /* The caller's own function has run when the call returns. */
        CHECK(__atomic_load_n(&exit_status, __ATOMIC_SEQ_CST) == 3, "own exit function ran");
    }
    CHECK(exit_status_seen() == 3, "exit function ran with status 3: %d", exit_status);
    CHECK(smem_shm_control_barrier(shm) == 0, "barrier");
}

static int run(int r, const char *url) {
    rank = r;
    snprintf(who, sizeof who, "rank %d", rank);
    smem_shm_config_t cfg;
    CHECK(smem_shm_config_init(&cfg) == 0, "config_init");
    CHECK(cfg.startConfigStoreServer && cfg.controlOperationTimeout == 120, "defaults");
    cfg.startConfigStoreServer = rank == 0;
    cfg.shmInitTimeout = 30;
    cfg.controlOperationTimeout = 30;
    CHECK(smem_shm_init(url, WORLD, (uint32_t)rank, 0, &cfg) == 0, "init");
    void *gva = NULL;
    CHECK(smem_shm_create(0, WORLD, (uint32_t)rank, SIZE + 4096, SMEMS_DATA_OP_MTE, 0, &gva) == NULL,
          "a size that is not a multiple of 2 MiB");
    CHECK(smem_shm_create(0, WORLD, (uint32_t)rank, SIZE, (smem_shm_data_op_type)0, 0, &gva) == NULL,
          "no data operation");
    CHECK(smem_shm_create(0, WORLD, (uint32_t)rank, SIZE, SMEMS_DATA_OP_MTE, 0, NULL) == NULL, "NULL gva");
    smem_shm_t shm = smem_shm_create(0, WORLD, (uint32_t)rank, SIZE, SMEMS_DATA_OP_MTE, 0, &gva);
    CHECK(shm != NULL && gva != NULL, "create");
    if (shm == NULL) return 1;

    parts_and_gather(shm, gva);
    int first = failures;
    printf("rank %d: %s\n", rank, failures == 0 ? "parts, gather, reach and refusals verified" : "FAILED");
    sub_groups(shm);
    sub_groups_at_once(shm);
    values(shm);
    exit_functions(shm);

    CHECK(smem_shm_destroy(shm, 0) == 0, "destroy");
    CHECK(smem_shm_get_global_rank_size(shm) == UINT32_MAX, "rank size of a destroyed object");
    CHECK(smem_shm_destroy(shm, 0) == SMEM_INVALID_PARAM, "second destroy");
    smem_shm_uninit(0);
    CHECK(smem_shm_control_barrier(shm) == SMEM_NOT_INIT, "after uninit");
    printf("rank %d: %s\n", rank,
           failures == first ? "sub-groups, values, global exit and destroy verified" : "FAILED");
    fflush(stdout);
    return failures == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s STORE_URL\n", argv[0]);
        return 2;
    }
    return run_ranks((int)WORLD, run, argv[1]);
}
