/*
 * A C program on the Big Memory C API: two ranks (forked before either touches the library)
 * create one object, write into each other's part, wait, and check what landed on both sides.
 * Usage: bm_two_ranks tcp://127.0.0.1:STORE_PORT
 * (MF_TRANSPORT=tcp in the environment makes the ranks reach each other over the network path.)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "smem/host/smem.h"
#include "smem/host/smem_bm.h"

#define PART (4u << 20)
#define BLOCKS 64u

static unsigned char pattern(int writer, size_t i) { return (unsigned char)((i / 4096 + 31 * writer + i) % 253); }

static size_t differing(const unsigned char *p, int writer, size_t n, size_t (*index)(size_t)) {
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] != pattern(writer, index(i))) wrong++;
    return wrong;
}

static size_t same(size_t i) { return i; }

/* Where byte i of a rank's part came from after the reversed batch: block b of the part holds
 * the writer's block BLOCKS-1-b. */
static size_t reversed(size_t i) {
    size_t block = PART / BLOCKS;
    return (BLOCKS - 1 - i / block) * block + i % block;
}

static int run(int rank, const char *url) {
    snprintf(who, sizeof who, "rank %d", rank);
    smem_bm_config_t cfg;
    CHECK(smem_bm_config_init(&cfg) == 0, "config_init");
    cfg.rankId = (uint16_t)rank;
    cfg.startConfigStore = rank == 0;
    cfg.initTimeout = 30;
    CHECK(smem_bm_get_rank_id() == UINT32_MAX, "rank before init");
    CHECK(smem_bm_init(url, 2, 0, &cfg) == 0, "smem_bm_init");
    CHECK(smem_bm_init(url, 2, 0, &cfg) == SMEM_REPEAT_INVOKE, "second init");
    CHECK(smem_bm_get_rank_id() == (uint32_t)rank, "rank id");
    CHECK(smem_bm_create(0, 3, SMEMB_DATA_OP_SDMA, PART, 0, 0) == NULL, "memberSize 3 refused");
    smem_bm_t bm = smem_bm_create(0, 2, SMEMB_DATA_OP_SDMA, PART, 0, 0);
    CHECK(bm != NULL, "create");
    if (bm == NULL) return 1;
    void *mine = NULL;
    CHECK(smem_bm_join(bm, 0, &mine) == 0, "join");
    CHECK(mine == smem_bm_ptr(bm, (uint16_t)rank), "join gives this rank's part");
    unsigned char *peer = smem_bm_ptr(bm, (uint16_t)(1 - rank));
    CHECK(peer != NULL, "peer part");
    CHECK(smem_bm_get_local_mem_size(bm) == PART, "local size");
    CHECK(smem_bm_get_rank_id_by_gva(bm, peer + 100) == (uint32_t)(1 - rank), "rank of a gva");

    unsigned char *buf = NULL;
    CHECK(posix_memalign((void **)&buf, 1u << 21, PART) == 0, "alloc");
    CHECK(smem_bm_register_user_mem(bm, (uint64_t)(uintptr_t)buf, PART) == 0, "register");
    for (size_t i = 0; i < PART; i++) buf[i] = pattern(rank, i);

    /* One copy of the whole part into the peer's, then each side checks. */
    CHECK(smem_bm_copy(bm, buf, peer, PART, SMEMB_COPY_H2G, 0) == 0, "H2G");
    CHECK(smem_bm_wait(bm) == 0, "wait");
    memset(buf, 0, PART);
    CHECK(smem_bm_copy(bm, mine, buf, PART, SMEMB_COPY_G2H, 0) == 0, "G2H of my part");
    CHECK(differing(buf, 1 - rank, PART, same) == 0, "the peer's bytes in my part");
    CHECK(smem_bm_copy(bm, peer, buf, PART, SMEMB_COPY_AUTO, 0) == 0, "G2H of the peer's part");
    CHECK(differing(buf, rank, PART, same) == 0, "my bytes in the peer's part");
    CHECK(smem_bm_wait(bm) == 0, "wait");

    /* Blocks in reverse order in one batch. */
    for (size_t i = 0; i < PART; i++) buf[i] = pattern(rank, i);
    size_t block = PART / BLOCKS;
    const void *src[BLOCKS];
    void *dst[BLOCKS];
    uint32_t sizes[BLOCKS];
    for (size_t b = 0; b < BLOCKS; b++) {
        src[b] = buf + b * block;
        dst[b] = peer + (BLOCKS - 1 - b) * block;
        sizes[b] = (uint32_t)block;
    }
    smem_batch_copy_params p = {src, dst, sizes, BLOCKS};
    CHECK(smem_bm_copy_batch(bm, &p, SMEMB_COPY_H2G, 0) == 0, "batch H2G");
    CHECK(smem_bm_wait(bm) == 0, "wait");
    memset(buf, 0, PART);
    CHECK(smem_bm_copy(bm, mine, buf, PART, SMEMB_COPY_G2H, 0) == 0, "G2H after the batch");
    CHECK(differing(buf, 1 - rank, PART, reversed) == 0, "batch blocks where addressed");

    /* Refusals. */
    CHECK(smem_bm_copy(bm, buf, peer + PART - 8, 16, SMEMB_COPY_H2G, 0) == MF_OUT_OF_BOUNDS, "past the part");
    CHECK(smem_bm_copy(bm, (void *)0x1000, peer, 8, SMEMB_COPY_H2G, 0) != 0, "bad local address");
    CHECK(smem_bm_copy(bm, buf, peer, 8, (smem_bm_copy_type)42, 0) == SMEM_INVALID_PARAM, "bad copy type");
    CHECK(smem_bm_ptr(bm, 5) == NULL, "rank 5");
    CHECK(smem_bm_copy((smem_bm_t)0x5eed, buf, peer, 8, SMEMB_COPY_H2G, 0) == SMEM_INVALID_PARAM, "made-up handle");
    CHECK(smem_bm_copy_batch(bm, NULL, SMEMB_COPY_H2G, 0) == SMEM_INVALID_PARAM, "NULL params");
    CHECK(smem_bm_wait(bm) == 0, "wait");

    CHECK(smem_bm_unregister_user_mem(bm, (uint64_t)(uintptr_t)buf) == 0, "unregister");
    CHECK(smem_bm_leave(bm, 0) == 0, "leave");
    smem_bm_destroy(bm);
    CHECK(smem_bm_copy(bm, buf, peer, 8, SMEMB_COPY_H2G, 0) == SMEM_INVALID_PARAM, "destroyed handle");
    smem_bm_uninit(0);
    CHECK(smem_bm_get_rank_id() == UINT32_MAX, "rank after uninit");
    free(buf);
    printf("rank %d: %s\n", rank, failures == 0 ? "parts, batch and refusals verified" : "FAILED");
    return failures == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s STORE_URL\n", argv[0]);
        return 2;
    }
    return run_ranks(2, run, argv[1]);
}
