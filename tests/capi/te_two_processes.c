/*
 * A C program on the C API: a receiver process and a sender process (forked before either
 * touches the library) move bytes through smem_trans_* and check them on both sides.
 * Usage: te_two_processes tcp://127.0.0.1:STORE_PORT 127.0.0.1:RECEIVER_PORT
 * Prints what it checked; exits 0 when every check held.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "smem/host/smem.h"
#include "smem/host/smem_trans.h"

#define SIZE (8u << 20)
#define BLOCKS 256u

static unsigned char pattern(size_t i) { return (unsigned char)((i * 7 + i / 4096) % 251); }

static int full_read(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

/* What the peer-down callback saw. */
static volatile int downs = 0;
static char down_peer[64] = "";

static void on_peer_down(const char *peer, void *user) {
    snprintf(down_peer, sizeof down_peer, "%s", peer);
    *(int *)user += 1;
    downs++;
}

static smem_trans_t make(const char *url, const char *session, smem_trans_role_t role) {
    smem_trans_config_t cfg;
    CHECK(smem_trans_config_init(&cfg) == 0, "config_init");
    cfg.role = role;
    cfg.initTimeout = 20;
    CHECK(smem_init(0) == 0, "smem_init");
    CHECK(smem_trans_init(&cfg) == 0, "smem_trans_init");
    smem_trans_t h = smem_trans_create(url, session, &cfg);
    CHECK(h != NULL, "smem_trans_create(%s)", session);
    return h;
}

static int receiver(const char *url, const char *session, int to_sender, int from_sender) {
    snprintf(who, sizeof who, "receiver");
    unsigned char *buf = NULL;
    CHECK(posix_memalign((void **)&buf, 2u << 20, SIZE) == 0, "alloc");
    memset(buf, 0, SIZE);
    smem_trans_t h = make(url, session, SMEM_TRANS_RECEIVER);
    CHECK(smem_trans_register_mem(h, buf, SIZE, 0) == 0, "register");
    unsigned long long addr = (unsigned long long)(uintptr_t)buf;
    if (write(to_sender, &addr, sizeof addr) != sizeof addr) return 1;
    char cmd = 0;
    if (full_read(from_sender, &cmd, 1) != 0) return 1;
    /* The sender wrote the pattern with one call and then blocks in reverse order. */
    size_t wrong = 0;
    size_t block = SIZE / BLOCKS;
    for (size_t b = 0; b < BLOCKS; b++)
        for (size_t j = 0; j < block; j++)
            if (buf[(BLOCKS - 1 - b) * block + j] != pattern(b * block + j)) wrong++;
    CHECK(wrong == 0, "%zu bytes differ on the receiving side", wrong);
    printf("receiver: %u blocks landed where addressed\n", BLOCKS);
    char done = wrong == 0 ? 'y' : 'n';
    if (write(to_sender, &done, 1) != 1) return 1;
    if (full_read(from_sender, &cmd, 1) != 0) return 1;
    smem_trans_destroy(h, 0);
    smem_trans_uninit(0);
    smem_uninit();
    free(buf);
    return failures == 0 ? 0 : 1;
}

static int sender(const char *url, const char *peer, int from_receiver, int to_receiver) {
    snprintf(who, sizeof who, "sender");
    CHECK(smem_init(0) == 0, "smem_init");
    CHECK(smem_get_abi_version() == ((1u << 16) | 3u), "ABI version %#x", smem_get_abi_version());
    CHECK(smem_create_config_store(url, 2) == SMEM_INVALID_PARAM, "unknown store flag");
    CHECK(smem_get_last_err_code() == SMEM_INVALID_PARAM, "last error code");
    CHECK(smem_create_config_store(url, SMEM_STORE_SKIP_RECOVER) == 0, "create_config_store");
    unsigned long long raddr = 0;
    if (full_read(from_receiver, &raddr, sizeof raddr) != 0) {
        fprintf(stderr, "receiver did not start\n");
        return 1;
    }
    unsigned char *remote = (unsigned char *)(uintptr_t)raddr;
    unsigned char *buf = NULL;
    CHECK(posix_memalign((void **)&buf, 2u << 20, SIZE) == 0, "alloc");
    for (size_t i = 0; i < SIZE; i++) buf[i] = pattern(i);
    smem_trans_t h = make(url, "127.0.0.1:0", SMEM_TRANS_SENDER);
    void *addrs[1] = {buf};
    size_t caps[1] = {SIZE};
    CHECK(smem_trans_batch_register_mem(h, addrs, caps, 1, 0) == 0, "batch_register");

    /* One write of everything, read back into a zeroed buffer. */
    CHECK(smem_trans_write(h, buf, peer, remote, SIZE, 0) == 0, "write");
    memset(buf, 0, SIZE);
    CHECK(smem_trans_read(h, buf, peer, remote, SIZE, 0) == 0, "read");
    size_t wrong = 0;
    for (size_t i = 0; i < SIZE; i++)
        if (buf[i] != pattern(i)) wrong++;
    CHECK(wrong == 0, "%zu bytes differ after write+read", wrong);

    /* Blocks written in reverse order in one batch, then read back in order. */
    size_t block = SIZE / BLOCKS;
    const void *src[BLOCKS];
    void *dst[BLOCKS];
    void *back[BLOCKS];
    const void *from[BLOCKS];
    size_t sizes[BLOCKS];
    for (size_t b = 0; b < BLOCKS; b++) {
        src[b] = buf + b * block;
        dst[b] = remote + (BLOCKS - 1 - b) * block;
        back[b] = buf + b * block;
        from[b] = dst[b];
        sizes[b] = block;
    }
    CHECK(smem_trans_batch_write_submit(h, src, peer, dst, sizes, BLOCKS, NULL, 0) == 0, "batch_write");
    char go = 'g', verdict = 0;
    if (write(to_receiver, &go, 1) != 1 || full_read(from_receiver, &verdict, 1) != 0) return 1;
    CHECK(verdict == 'y', "the receiver saw wrong bytes");
    memset(buf, 0, SIZE);
    CHECK(smem_trans_batch_read(h, back, peer, from, sizes, BLOCKS, 0) == 0, "batch_read");
    wrong = 0;
    for (size_t i = 0; i < SIZE; i++)
        if (buf[i] != pattern(i)) wrong++;
    CHECK(wrong == 0, "%zu bytes differ after the batch read", wrong);
    printf("sender: %u MiB written and read back, %u blocks each way, all verified\n", SIZE >> 20, BLOCKS);

    /* Refusals: each a code and a message, nothing moved. */
    CHECK(smem_trans_write(h, buf, peer, remote + SIZE - 8, 16, 0) == MF_OUT_OF_BOUNDS, "past the region");
    CHECK(strstr(smem_get_last_err_msg(), "peer") != NULL, "message names the peer side");
    CHECK(smem_trans_write(h, buf, "127.0.0.1:9", remote, 8, 0) == SMEM_INVALID_PARAM, "unknown peer");
    CHECK(smem_trans_write((smem_trans_t)0x5eed, buf, peer, remote, 8, 0) == SMEM_INVALID_PARAM, "made-up handle");
    CHECK(smem_trans_write_submit(h, buf, peer, remote, 8, (void *)0x1000, 0) == MF_UNSUPPORTED, "stream");
    CHECK(smem_trans_batch_write(h, NULL, peer, dst, sizes, BLOCKS, 0) == SMEM_INVALID_PARAM, "NULL array");
    smem_trans_quant_copy_param_t quant;
    memset(&quant, 0, sizeof quant);
    quant.remoteUniqueId = peer;
    CHECK(smem_trans_batch_quant_write(h, &quant) == MF_UNSUPPORTED, "quantizing write");
    CHECK(smem_get_last_err_code() == MF_UNSUPPORTED, "its code");
    printf("sender: refusals: %s\n", failures == 0 ? "as expected" : "WRONG");

    /* The receiver stops: the peer-down callback names it, once. */
    int seen = 0;
    CHECK(smem_trans_set_peer_down_callback(h, on_peer_down, &seen) == 0, "peer-down callback");
    if (write(to_receiver, &go, 1) != 1) return 1;
    int status = 0;
    wait(&status);
    for (int i = 0; i < 100 && downs == 0; i++) {
        struct timespec tick = {0, 50 * 1000 * 1000};
        nanosleep(&tick, NULL);
    }
    /* Once: the watcher looks again every 300 ms; a peer gone for good is not reported again. */
    struct timespec three_ticks = {1, 0};
    nanosleep(&three_ticks, NULL);
    CHECK(downs == 1 && seen == 1 && strcmp(down_peer, peer) == 0, "peer down: %d call(s), peer \"%s\"", downs,
          down_peer);
    if (downs == 1) printf("sender: peer-down callback named %s\n", down_peer);
    smem_trans_destroy(h, 0);
    smem_trans_uninit(0);
    (void)smem_get_and_clear_last_err_msg();
    smem_destroy_config_store(url);
    CHECK(smem_get_last_err_code() == 0, "destroy_config_store");
    smem_uninit();
    free(buf);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "receiver exit status %d", status);
    return failures == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s STORE_URL RECEIVER_SESSION\n", argv[0]);
        return 2;
    }
    int up[2], down[2];
    if (pipe(up) != 0 || pipe(down) != 0) return 2;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) return receiver(argv[1], argv[2], up[1], down[0]);
    return sender(argv[1], argv[2], up[0], down[1]);
}
