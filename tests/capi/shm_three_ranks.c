/*
 * A C program on the Share Memory C API: three ranks (forked before any touches the library)
 * create one object, each writes its part through the GVA (plain stores: same-host parts are
 * mapped in every rank), barrier, and every rank reads every part; then all_gather, context,
 * reachability and the refusals.
 * Usage: shm_three_ranks tcp://127.0.0.1:STORE_PORT
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "smem/host/smem.h"
#include "smem/host/smem_shm.h"

#define WORLD 3u
#define SIZE (2u << 20)

static int rank = -1;

static int run(int r, const char *url) {
    rank = r;
    snprintf(who, sizeof who, "rank %d", rank);
    smem_shm_config_t cfg;
    CHECK(smem_shm_config_init(&cfg) == 0, "config_init");
    cfg.startConfigStore = rank == 0;
    cfg.shmInitTimeout = 30;
    CHECK(smem_shm_init(url, WORLD, (uint32_t)rank, 0, 0, &cfg) == 0, "init");
    void *gva = NULL;
    CHECK(smem_shm_create(0, WORLD, (uint32_t)rank, SIZE + 4096, SMEMS_DATA_OP_MTE, 0, &gva) == NULL,
          "a size that is not a multiple of 2 MiB");
    smem_shm_t shm = smem_shm_create(0, WORLD, (uint32_t)rank, SIZE, SMEMS_DATA_OP_MTE, 0, &gva);
    CHECK(shm != NULL && gva != NULL, "create");
    if (shm == NULL) return 1;
    smem_shm_team_t team = smem_shm_get_global_team(shm);
    CHECK(smem_shm_team_get_rank(team) == (uint32_t)rank, "team rank");
    CHECK(smem_shm_team_get_size(team) == WORLD, "team size");

    /* Parts are SIZE apart (2 MiB multiples need no rounding). */
    unsigned char *base = gva;
    memset(base + (size_t)rank * SIZE, 0x40 + rank, SIZE);
    CHECK(smem_shm_control_barrier(team) == 0, "barrier");
    for (unsigned r = 0; r < WORLD; r++) {
        size_t wrong = 0;
        for (size_t i = 0; i < SIZE; i += 4093) wrong += base[r * SIZE + i] != (unsigned char)(0x40 + r);
        CHECK(wrong == 0, "rank %u's part read through the GVA", r);
    }
    CHECK(smem_shm_control_barrier(team) == 0, "barrier");

    char mine[8] = {'r', (char)('0' + rank), 'x', 'y', 'z', 'w', 'v', 'u'};
    char all[8 * WORLD];
    CHECK(smem_shm_control_allgather(team, mine, 8, all, sizeof all) == 0, "allgather");
    for (unsigned r = 0; r < WORLD; r++) CHECK(all[r * 8 + 1] == (char)('0' + r), "gathered piece of rank %u", r);
    CHECK(smem_shm_control_allgather(team, mine, 8, all, 8) == SMEM_BUFFER_TOO_SMALL, "small recvBuf");

    uint32_t reach = 0;
    CHECK(smem_shm_topology_can_reach(shm, (uint32_t)((rank + 1) % WORLD), &reach) == 0, "reach");
    CHECK((reach & SMEMS_DATA_OP_MTE) != 0, "same-host parts are mapped: 0x%x", reach);
    CHECK(smem_shm_topology_can_reach(shm, 7, &reach) != 0, "rank 7");
    CHECK(smem_shm_topology_can_reach(shm, 0, NULL) == SMEM_INVALID_PARAM, "NULL reachInfo");
    if (rank == 0) CHECK(smem_shm_set_extra_context(shm, "hello", 5) == 0, "context");
    CHECK(smem_shm_set_extra_context(shm, NULL, 70000) == SMEM_INVALID_PARAM, "context too large");
    CHECK(smem_shm_control_barrier((smem_shm_team_t)0x5eed) == SMEM_INVALID_PARAM, "made-up team");
    CHECK(smem_shm_control_barrier(team) == 0, "barrier");

    CHECK(smem_shm_destroy(shm, 0) == 0, "destroy");
    CHECK(smem_shm_team_get_size(team) == UINT32_MAX, "team of a destroyed object");
    CHECK(smem_shm_destroy(shm, 0) == SMEM_INVALID_PARAM, "second destroy");
    smem_shm_uninit(0);
    printf("rank %d: %s\n", rank, failures == 0 ? "parts, gather, reach and refusals verified" : "FAILED");
    return failures == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s STORE_URL\n", argv[0]);
        return 2;
    }
    return run_ranks((int)WORLD, run, argv[1]);
}
