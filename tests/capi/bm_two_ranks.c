/*
 * A C program on the Big Memory C API. Two ranks (forked before either touches the library)
 * create objects, write into each other's parts and check what landed on both sides, move to a
 * second config store, and see every refusal's code. Then a second pair of processes creates
 * an object with dynamicWorldSize, and rank 0's group event handler sees rank 1 join and leave.
 * Usage: bm_two_ranks tcp://127.0.0.1:STORE_PORT
 * (MF_TRANSPORT=tcp in the environment makes the ranks reach each other over the network path.)
 * Valid C11 and C++11, so that it builds on upstream 1.3.0's headers as well as on ours.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "smem/host/smem.h"
#include "smem/host/smem_bm.h"

/* This library's codes beyond upstream's smem.h (ours defines them). */
#ifndef MF_OUT_OF_BOUNDS
#define MF_OUT_OF_BOUNDS (-3002)
#endif
#ifndef MF_UNSUPPORTED
#define MF_UNSUPPORTED (-3006)
#endif

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

static void pause_ms(long ms) {
    struct timespec t;
    t.tv_sec = ms / 1000;
    t.tv_nsec = (ms % 1000) * 1000000L;
    nanosleep(&t, NULL);
}

static int32_t copy(smem_bm_t bm, const void *src, void *dest, size_t n, smem_bm_copy_type t) {
    smem_copy_params p = {src, dest, n, NULL};
    return smem_bm_copy(bm, &p, t, 0);
}

static int mentions(const char *what) { return strstr(smem_get_last_err_msg(), what) != NULL; }

/* A port nobody listens on now (the kernel's pick for an ephemeral bind). */
static uint16_t unused_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    uint16_t port = 0;
    if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(s, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (s >= 0) close(s);
    return port;
}

static int tcp_transport(void) {
    const char *t = getenv("MF_TRANSPORT");
    return t != NULL && strcmp(t, "tcp") == 0;
}

static void on_leader_change(void *userData) { (void)userData; }

/* Parts, copies, batches, create2, addresses and every refusal, on one world of two ranks. */
static int run(int rank, const char *url) {
    snprintf(who, sizeof who, "rank %d", rank);
    smem_bm_config_t cfg;
    CHECK(smem_bm_config_init(&cfg) == 0, "config_init");
    CHECK(cfg.autoRanking && cfg.unifiedAddressSpace && !cfg.hcomTlsConfig.tlsEnable, "defaults");
    cfg.autoRanking = false;
    cfg.rankId = (uint32_t)rank;
    cfg.startConfigStoreServer = rank == 0;
    cfg.initTimeout = 30;
    CHECK(smem_bm_get_rank_id() == UINT32_MAX, "rank before init");
    CHECK(smem_bm_init(url, 2, 0, &cfg) == 0, "smem_bm_init");
    CHECK(smem_bm_init(url, 2, 0, &cfg) == SMEM_REPEAT_INVOKE, "second init");
    CHECK(smem_bm_get_rank_id() == (uint32_t)rank, "rank id");
    CHECK(smem_bm_create(0, 3, SMEMB_DATA_OP_SDMA, PART, 0, 0) == NULL, "memberSize 3 refused");
    smem_bm_t bm = smem_bm_create(0, 2, SMEMB_DATA_OP_SDMA, PART, 0, 0);
    CHECK(bm != NULL, "create");
    if (bm == NULL) return 1;
    CHECK(smem_bm_join(bm, 0) == 0, "join");
    unsigned char *mine = (unsigned char *)smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, (uint16_t)rank);
    unsigned char *peer = (unsigned char *)smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, (uint16_t)(1 - rank));
    CHECK(mine != NULL && peer != NULL && mine != peer, "parts");
    CHECK(smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_DEVICE, 0) == NULL && mentions("no HBM part"), "no HBM part");
    CHECK(smem_bm_get_local_mem_size_by_mem_type(bm, SMEM_MEM_TYPE_HOST) == PART, "DRAM size");
    CHECK(smem_bm_get_local_mem_size_by_mem_type(bm, SMEM_MEM_TYPE_DEVICE) == 0, "HBM size");
    CHECK(smem_bm_get_rank_id_by_gva(bm, peer + 100) == (uint32_t)(1 - rank), "rank of a gva");

    void *va = NULL;
    CHECK(smem_bm_gva_to_va(bm, mine + 8, SMEM_MEM_TYPE_LOCAL_HOST, &va) == 0 && va == mine + 8, "my part's va");
    int32_t rc = smem_bm_gva_to_va(bm, peer, SMEM_MEM_TYPE_LOCAL_HOST, &va);
    if (tcp_transport())
        CHECK(rc == MF_UNSUPPORTED && mentions("another host"), "a part over the network has no va");
    else
        CHECK(rc == 0 && va == peer, "a same-host peer part is mapped at its gva");
    CHECK(smem_bm_gva_to_va(bm, mine, SMEM_MEM_TYPE_LOCAL_DEVICE, &va) == SMEM_INVALID_PARAM, "DRAM as device");

    unsigned char *buf = NULL;
    CHECK(posix_memalign((void **)&buf, 1u << 21, PART) == 0, "alloc");
    CHECK(smem_bm_register_user_mem(bm, (uint64_t)(uintptr_t)buf, PART) == 0, "register");
    for (size_t i = 0; i < PART; i++) buf[i] = pattern(rank, i);

    /* One copy of the whole part into the peer's, then each side checks. */
    CHECK(copy(bm, buf, peer, PART, SMEMB_COPY_H2G) == 0, "H2G");
    CHECK(smem_bm_wait(bm) == 0, "wait");
    memset(buf, 0, PART);
    CHECK(copy(bm, mine, buf, PART, SMEMB_COPY_G2H) == 0, "G2H of my part");
    CHECK(differing(buf, 1 - rank, PART, same) == 0, "the peer's bytes in my part");
    /* The stream field is read only with SMEM_BM_FLAG_USE_EXTERNAL_STREAM. */
    smem_copy_params back = {peer, buf, PART, (void *)0x1000};
    CHECK(smem_bm_copy(bm, &back, SMEMB_COPY_AUTO, ASYNC_COPY_FLAG) == 0, "G2H of the peer's part");
    CHECK(differing(buf, rank, PART, same) == 0, "my bytes in the peer's part");
    back.stream = NULL;
    CHECK(smem_bm_copy(bm, &back, SMEMB_COPY_G2H, SMEM_BM_FLAG_USE_EXTERNAL_STREAM) == 0, "NULL stream: now");
    CHECK(smem_bm_wait(bm) == 0, "wait");

    /* Blocks in reverse order in one batch. */
    for (size_t i = 0; i < PART; i++) buf[i] = pattern(rank, i);
    size_t block = PART / BLOCKS;
    void *src[BLOCKS];
    void *dst[BLOCKS];
    uint64_t sizes[BLOCKS];
    for (size_t b = 0; b < BLOCKS; b++) {
        src[b] = buf + b * block;
        dst[b] = peer + (BLOCKS - 1 - b) * block;
        sizes[b] = block;
    }
    smem_batch_copy_params p = {src, dst, sizes, BLOCKS, NULL};
    CHECK(smem_bm_copy_batch(bm, &p, SMEMB_COPY_H2G, 0) == 0, "batch H2G");
    CHECK(smem_bm_wait(bm) == 0, "wait");
    memset(buf, 0, PART);
    CHECK(copy(bm, mine, buf, PART, SMEMB_COPY_G2H) == 0, "G2H after the batch");
    CHECK(differing(buf, 1 - rank, PART, reversed) == 0, "batch blocks where addressed");

    /* A second object from an option struct: its own parts, bytes across. */
    smem_bm_create_option_t opt;
    memset(&opt, 0, sizeof opt);
    opt.maxDramSize = opt.localDRAMSize = PART / 2;
    opt.dataOpType = SMEMB_DATA_OP_SDMA;
    opt.dramShmFd = -1;
    snprintf(opt.tag, sizeof opt.tag, "tag_%d", 1);
    opt.maxDramSize = PART;
    CHECK(smem_bm_create2(1, &opt) == NULL && mentions("smem_bm_extend_local_mem"), "a max above local");
    opt.maxDramSize = PART / 2;
    opt.flags = SMEM_BM_FLAG_CREATE_WITH_SHM;
    CHECK(smem_bm_create2(1, &opt) == NULL && mentions("dramShmFd"), "an external segment");
    opt.flags = 0;
    CHECK(smem_bm_create2(1, NULL) == NULL && mentions("option is NULL"), "NULL option");
    smem_bm_t bm2 = smem_bm_create2(1, &opt);
    CHECK(bm2 != NULL, "create2");
    if (bm2 != NULL) {
        unsigned char *peer2 = (unsigned char *)smem_bm_ptr_by_mem_type(bm2, SMEM_MEM_TYPE_HOST, (uint16_t)(1 - rank));
        unsigned char *mine2 = (unsigned char *)smem_bm_ptr_by_mem_type(bm2, SMEM_MEM_TYPE_HOST, (uint16_t)rank);
        CHECK(smem_bm_get_local_mem_size_by_mem_type(bm2, SMEM_MEM_TYPE_HOST) == PART / 2, "create2 size");
        CHECK(smem_bm_get_rank_id_by_gva(bm, peer2) == UINT32_MAX, "objects apart");
        /* Registrations are per object. */
        CHECK(smem_bm_register_user_mem(bm2, (uint64_t)(uintptr_t)buf, PART) == 0, "register with the second");
        for (size_t i = 0; i < PART / 2; i++) buf[i] = pattern(rank + 2, i);
        CHECK(copy(bm2, buf, peer2, PART / 2, SMEMB_COPY_H2G) == 0, "H2G into the second object");
        CHECK(smem_bm_wait(bm2) == 0, "wait on the second object");
        CHECK(copy(bm2, mine2, buf, PART / 2, SMEMB_COPY_G2H) == 0, "G2H of the second object");
        CHECK(differing(buf, 1 - rank + 2, PART / 2, same) == 0, "the peer's bytes in my second part");
        CHECK(smem_bm_wait(bm2) == 0, "wait before destroy");
        CHECK(smem_bm_unregister_user_mem(bm2, (uint64_t)(uintptr_t)buf) == 0, "unregister from the second");
        smem_bm_destroy(bm2);
    }

    /* Parts are fixed at create; group events are for dynamicWorldSize objects. */
    CHECK(smem_bm_extend_local_mem(bm, SMEM_MEM_TYPE_HOST, 0) == SMEM_INVALID_PARAM, "extend by 0");
    CHECK(smem_bm_extend_local_mem(bm, SMEM_MEM_TYPE_LOCAL_HOST, 4096) == SMEM_INVALID_PARAM, "extend local");
    CHECK(smem_bm_extend_local_mem(bm, SMEM_MEM_TYPE_HOST, 4096) == MF_UNSUPPORTED, "extend");
    CHECK(smem_bm_get_local_mem_size_by_mem_type(bm, SMEM_MEM_TYPE_HOST) == PART, "size unchanged");
    CHECK(smem_bm_set_group_event_handler(bm, NULL, NULL) == MF_UNSUPPORTED && mentions("dynamic_world_size"),
          "events of a fixed world");

    /* No leader election here. */
    char ip[64];
    uint16_t port = 1;
    CHECK(smem_bm_get_bindable_leader_address(ip, sizeof ip, &port) == MF_UNSUPPORTED && ip[0] == 0 && port == 0,
          "no leader address");
    CHECK(smem_bm_get_bindable_leader_address_by_store_url(url, NULL, 2, ip, sizeof ip, &port) == MF_UNSUPPORTED,
          "no leader address by url");
    CHECK(smem_bm_get_bindable_leader_address(NULL, 64, &port) == SMEM_INVALID_PARAM, "NULL ip");
    smem_bm_release_leader_address_store();
    CHECK(smem_bm_register_leader_change_callback(on_leader_change, NULL) == MF_UNSUPPORTED, "leader callback");
    CHECK(smem_bm_register_leader_change_callback(NULL, NULL) == 0, "no leader callback");

    /* Both ranks move to a second store that rank 0 starts; rank 1 learns its port through
     * the object. Barriers and copies go on there. */
    uint16_t moved = 0;
    char url2[64] = "";
    if (rank == 0) {
        moved = unused_port();
        snprintf(url2, sizeof url2, "tcp://127.0.0.1:%u", (unsigned)moved);
        CHECK(smem_create_config_store(url2, 0) == 0, "second store at %s", url2);
        memcpy(buf, &moved, sizeof moved);
        CHECK(copy(bm, buf, peer, sizeof moved, SMEMB_COPY_H2G) == 0, "port to rank 1");
    }
    CHECK(smem_bm_wait(bm) == 0, "wait");
    if (rank == 1) {
        CHECK(copy(bm, mine, buf, sizeof moved, SMEMB_COPY_G2H) == 0, "port from rank 0");
        memcpy(&moved, buf, sizeof moved);
    }
    CHECK(smem_bm_update_store_server(NULL, moved) == SMEM_INVALID_PARAM, "NULL ip");
    CHECK(smem_bm_update_store_server("store.example", moved) == SMEM_INVALID_PARAM, "not an ip");
    CHECK(smem_bm_update_store_server("127.0.0.1", 0) == SMEM_INVALID_PARAM, "port 0");
    CHECK(moved != 0 && smem_bm_update_store_server("127.0.0.1", moved) == 0, "moved to port %u", (unsigned)moved);
    CHECK(smem_bm_wait(bm) == 0, "wait on the second store");
    CHECK(copy(bm, buf, peer, 4096, SMEMB_COPY_H2G) == 0, "a copy after the move");
    CHECK(smem_bm_wait(bm) == 0, "wait on the second store");

    /* Refusals. */
    CHECK(copy(bm, buf, peer + PART - 8, 16, SMEMB_COPY_H2G) == MF_OUT_OF_BOUNDS, "past the part");
    CHECK(copy(bm, (void *)0x1000, peer, 8, SMEMB_COPY_H2G) != 0, "bad local address");
    CHECK(copy(bm, buf, peer, 8, (smem_bm_copy_type)42) == SMEM_INVALID_PARAM, "bad copy type");
    CHECK(copy(bm, NULL, peer, 8, SMEMB_COPY_H2G) == SMEM_INVALID_PARAM, "NULL src");
    CHECK(smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, 5) == NULL, "rank 5");
    CHECK(smem_bm_ptr_by_mem_type(bm, (smem_bm_mem_type)9, 0) == NULL, "memType 9");
    CHECK(copy((smem_bm_t)0x5eed, buf, peer, 8, SMEMB_COPY_H2G) == SMEM_INVALID_PARAM, "made-up handle");
    CHECK(smem_bm_copy(bm, NULL, SMEMB_COPY_H2G, 0) == SMEM_INVALID_PARAM, "NULL params");
    CHECK(smem_bm_copy_batch(bm, NULL, SMEMB_COPY_H2G, 0) == SMEM_INVALID_PARAM, "NULL batch params");
    p.batchSize = 0;
    CHECK(smem_bm_copy_batch(bm, &p, SMEMB_COPY_H2G, 0) == SMEM_INVALID_PARAM, "batch of 0");
    CHECK(smem_bm_wait(bm) == 0, "wait");

    CHECK(smem_bm_unregister_user_mem(bm, (uint64_t)(uintptr_t)buf) == 0, "unregister");
    CHECK(smem_bm_leave(bm, 0) == 0, "leave");
    smem_bm_destroy(bm);
    CHECK(copy(bm, buf, peer, 8, SMEMB_COPY_H2G) == SMEM_INVALID_PARAM, "destroyed handle");
    smem_bm_uninit(0);
    CHECK(smem_bm_get_rank_id() == UINT32_MAX, "rank after uninit");
    if (rank == 0) smem_destroy_config_store(url2);
    free(buf);
    printf("rank %d: parts, batch and refusals verified\n", rank);
    return failures == 0 ? 0 : 1;
}

/* Rank 0 tells rank 1 through this pipe that its handler is in place. */
static int handler_set[2] = {-1, -1};

struct events {
    int joined; /* rank that joined, -1 before */
    int left;   /* rank that left, -1 before */
};

static void on_event(smem_bm_t handle, uint32_t rankId, smem_bm_group_event_t event, void *context) {
    (void)handle;
    struct events *seen = (struct events *)context;
    if (event == SMEM_GROUP_EVENT_JOIN) __atomic_store_n(&seen->joined, (int)rankId, __ATOMIC_SEQ_CST);
    if (event == SMEM_GROUP_EVENT_LEAVE) __atomic_store_n(&seen->left, (int)rankId, __ATOMIC_SEQ_CST);
}

/* Waits up to 30 s for *value to become want. */
static int became(int *value, int want) {
    for (int i = 0; i < 600; i++) {
        if (__atomic_load_n(value, __ATOMIC_SEQ_CST) == want) return 1;
        pause_ms(50);
    }
    return 0;
}

/* A dynamicWorldSize object: rank 0 sees rank 1 arrive and go. */
static int run_dynamic(int rank, const char *url) {
    snprintf(who, sizeof who, "dynamic rank %d", rank);
    smem_bm_config_t cfg;
    CHECK(smem_bm_config_init(&cfg) == 0, "config_init");
    cfg.autoRanking = false;
    cfg.rankId = (uint32_t)rank;
    cfg.startConfigStoreServer = rank == 0;
    cfg.dynamicWorldSize = true;
    cfg.initTimeout = 30;
    CHECK(smem_bm_init(url, 2, 0, &cfg) == 0, "smem_bm_init");
    static struct events seen = {-1, -1};
    char go = 1;
    if (rank == 1) {
        struct pollfd ready;
        ready.fd = handler_set[0];
        ready.events = POLLIN;
        CHECK(poll(&ready, 1, 30000) == 1 && read(handler_set[0], &go, 1) == 1, "rank 0's handler is set");
    }
    smem_bm_t bm = smem_bm_create(0, 2, SMEMB_DATA_OP_SDMA, 1u << 20, 0, 0);
    CHECK(bm != NULL, "create");
    if (bm == NULL) return 1;
    CHECK(smem_bm_wait(bm) == MF_UNSUPPORTED, "no barrier with dynamicWorldSize");
    unsigned char *note = NULL;
    CHECK(posix_memalign((void **)&note, 4096, 4096) == 0, "alloc");
    CHECK(smem_bm_register_user_mem(bm, (uint64_t)(uintptr_t)note, 4096) == 0, "register");
    if (rank == 0) {
        CHECK(smem_bm_set_group_event_handler(bm, on_event, &seen) == 0, "handler");
        CHECK(write(handler_set[1], &go, 1) == 1, "tell rank 1");
        CHECK(became(&seen.joined, 1), "rank 1 joined (seen %d)", seen.joined);
        /* Now rank 1 may go: a byte in its part says so. */
        unsigned char *peer = (unsigned char *)smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, 1);
        note[0] = 1;
        CHECK(copy(bm, note, peer, 1, SMEMB_COPY_H2G) == 0, "go to rank 1");
        CHECK(became(&seen.left, 1), "rank 1 left (seen %d)", seen.left);
        CHECK(smem_bm_set_group_event_handler(bm, NULL, NULL) == 0, "handler removed");
    } else {
        unsigned char *mine = (unsigned char *)smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, 1);
        note[0] = 0;
        for (int i = 0; i < 600 && note[0] != 1; i++) {
            CHECK(copy(bm, mine, note, 1, SMEMB_COPY_G2H) == 0, "read my part");
            if (note[0] != 1) pause_ms(50);
        }
        CHECK(note[0] == 1, "rank 0 said go");
    }
    CHECK(smem_bm_unregister_user_mem(bm, (uint64_t)(uintptr_t)note) == 0, "unregister");
    free(note);
    smem_bm_destroy(bm);
    smem_bm_uninit(0);
    printf("rank %d: group events verified\n", rank);
    return failures == 0 ? 0 : 1;
}

/* Runs the ranks of one part in processes of their own: forked from this process, which never
 * touches the library, so each part starts from a clean one. */
static int in_own_processes(int (*part)(int rank, const char *arg), const char *url) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) exit(run_ranks(2, part, url));
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s STORE_URL\n", argv[0]);
        return 2;
    }
    int rc = in_own_processes(run, argv[1]);
    if (pipe(handler_set) != 0) return 2;
    if (rc == 0) rc = in_own_processes(run_dynamic, argv[1]);
    return rc;
}
