/* memfabric_hybrid C API: Big Memory types (the 1.3 names, values and layouts). */
#ifndef MEMFABRIC_SMEM_BM_DEF_H
#define MEMFABRIC_SMEM_BM_DEF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A Big Memory object. The library looks handles up; a destroyed or made-up one is refused
 * with SMEM_INVALID_PARAM. */
typedef void *smem_bm_t;

/* The largest timeout (seconds) a config may give. */
#define SMEM_BM_TIMEOUT_MAX UINT32_MAX
/* Bytes of each path in smem_tls_config, the terminating NUL included. */
#define SMEM_TLS_PATH_SIZE  256

/* Bits of smem_bm_create's flags. NUMA binding and the performance mode are accepted and have
 * no effect: parts are placed by the kernel. */
#define SMEM_BM_BIND_NUMA_FLAG_INDEX        0
#define SMEM_BM_BIND_NUMA_FLAG_LEN          7
#define SMEM_BM_PERFORMANCE_MODE_FLAG_INDEX 7
#define SMEM_BM_PERFORMANCE_MODE_FLAG_LEN   1
#define SMEM_BM_BIND_NUMA_AUTO_AFFINITY_FLAG ((1U << SMEM_BM_BIND_NUMA_FLAG_LEN) - 1)
/* The DRAM part is an existing shared memory segment (dramShmFd): refused with MF_UNSUPPORTED,
 * this library makes its own segments. */
#define SMEM_BM_FLAG_CREATE_WITH_SHM         (1U << 8)
/* Accepted, no effect: DRAM parts are always host memory mapped into this process. */
#define SMEM_BM_FLAG_DRAM_MAP_HOST_VA (1U << 9)
/* Accepted, no effect: a part is allocated whole or the create fails. */
#define SMEM_BM_FLAG_DRAM_BEST_EFFORT (1U << 10)

/* Memory kinds. LOCAL_* are memory of this process (device or host), DEVICE and HOST the HBM
 * and DRAM parts of the global space. */
typedef enum {
    SMEM_MEM_TYPE_LOCAL_DEVICE = 0,
    SMEM_MEM_TYPE_LOCAL_HOST,
    SMEM_MEM_TYPE_DEVICE,
    SMEM_MEM_TYPE_HOST,

    SMEM_MEM_TYPE_BUTT
} smem_bm_mem_type;
typedef smem_bm_mem_type smem_bm_mem_type_t;

/* Data path kinds a caller asks for (bit flags). Copies here take the path that reaches the
 * peer: a memory copy on the same host, the network path to another host. */
typedef enum {
    SMEMB_DATA_OP_SDMA = 1U << 0,
    SMEMB_DATA_OP_HOST_RDMA = 1U << 1,
    SMEMB_DATA_OP_HOST_TCP = 1U << 2,
    SMEMB_DATA_OP_DEVICE_RDMA = 1U << 3,
    SMEMB_DATA_OP_HOST_URMA = 1U << 4,
    SMEMB_DATA_OP_HOST_SHM = 1U << 5,
    SMEMB_DATA_OP_DEVICE_URMA = 1U << 6,
    SMEMB_DATA_OP_DEVICE_UBOE = 1U << 7,
    SMEMB_DATA_OP_BUTT
} smem_bm_data_op_type;
typedef smem_bm_data_op_type smem_bm_data_op_type_t;

/* Copy directions: L is device memory of this process, H its host memory, G a GVA, GH a GVA
 * of a DRAM part. AUTO tells by the addresses. */
typedef enum {
    SMEMB_COPY_L2G = 0,
    SMEMB_COPY_G2L = 1,
    SMEMB_COPY_G2H = 2,
    SMEMB_COPY_H2G = 3,
    SMEMB_COPY_L2GH = 4,
    SMEMB_COPY_GH2L = 5,
    SMEMB_COPY_GH2H = 6,
    SMEMB_COPY_H2GH = 7,
    SMEMB_COPY_G2G = 8,
    SMEMB_COPY_AUTO = 9,
    SMEMB_COPY_BUTT
} smem_bm_copy_type;
typedef smem_bm_copy_type smem_bm_copy_type_t;

/* TLS files of a link. Paths are NUL-terminated within their arrays. */
typedef struct {
    bool tlsEnable;
    char caPath[SMEM_TLS_PATH_SIZE];
    char crlPath[SMEM_TLS_PATH_SIZE];
    char certPath[SMEM_TLS_PATH_SIZE];
    char keyPath[SMEM_TLS_PATH_SIZE];
    char keyPassPath[SMEM_TLS_PATH_SIZE];
    char packagePath[SMEM_TLS_PATH_SIZE];
    char decrypterLibPath[SMEM_TLS_PATH_SIZE];
} smem_tls_config;
typedef smem_tls_config smem_tls_config_t;

/* Fill with smem_bm_config_init, then change what differs. */
typedef struct {
    uint32_t initTimeout;             /* seconds for smem_bm_init, default 120 (1..SMEM_BM_TIMEOUT_MAX) */
    uint32_t createTimeout;           /* seconds for smem_bm_create, default 120 */
    uint32_t controlOperationTimeout; /* seconds for copies and barriers, default 120 */
    bool startConfigStoreServer;      /* this process may serve the store at storeURL, default true */
    bool startConfigStoreOnly;        /* only serve the store; take no rank */
    bool dynamicWorldSize;            /* ranks come and go; worldSize is the most there may be */
    bool unifiedAddressSpace;         /* must be true: a GVA is the same number in every rank */
    bool autoRanking;                 /* the store assigns ranks in join order, default true */
    uint32_t rankId;                  /* this rank when autoRanking is false */
    uint32_t flags;                   /* reserved, default 0 */
    char hcomUrl[64];                 /* accepted, unused: peers find each other through the store */
    smem_tls_config hcomTlsConfig;    /* must be off: see smem_set_conf_store_tls */
    smem_tls_config storeTlsConfig;   /* must be off: see smem_set_conf_store_tls */
} smem_bm_config_t;

/* What smem_bm_create2 makes. Contributions are fixed at create here, so each max size must be
 * 0 or equal its local size. */
typedef struct {
    uint64_t maxDramSize;            /* DRAM bytes a rank may contribute, at most */
    uint64_t maxHbmSize;             /* HBM (device) bytes a rank may contribute, at most */
    uint64_t localDRAMSize;          /* DRAM bytes this rank contributes */
    uint64_t localHBMSize;           /* HBM bytes this rank contributes (needs a device) */
    smem_bm_data_op_type dataOpType; /* requested path kinds (not 0) */
    bool enable56BitsGva;            /* accepted: the GVA space is as large as the parts need */
    uint32_t flags;                  /* SMEM_BM_FLAG_* bits */
    char tag[32];                    /* accepted label, NUL-terminated */
    char tagOpInfo[256];             /* accepted, NUL-terminated: paths go by where a peer is */
    int dramShmFd;                   /* used only with SMEM_BM_FLAG_CREATE_WITH_SHM */
} smem_bm_create_option_t;

/* One copy. stream is used only when the call's flags have SMEM_BM_FLAG_USE_EXTERNAL_STREAM
 * (bit 2); then NULL copies now and a device stream (which needs a device backend) orders the
 * copy after the work queued there. */
typedef struct {
    const void *src;
    void *dest;
    size_t dataSize;
    void *stream;
} smem_copy_params;
typedef smem_copy_params smem_copy_params_t;

/* batchSize copies: sources[i] to destinations[i], dataSizes[i] bytes; stream as above. */
typedef struct {
    void **sources;
    void **destinations;
    const uint64_t *dataSizes;
    uint32_t batchSize;
    void *stream;
} smem_batch_copy_params;
typedef smem_batch_copy_params smem_batch_copy_params_t;

/* A result code per copy of a batch. */
typedef struct {
    int32_t *results;
    uint32_t batchSize;
} smem_batch_copy_result;
typedef smem_batch_copy_result smem_batch_copy_result_t;

/* A rank joined or left an object created with dynamicWorldSize. */
typedef enum {
    SMEM_GROUP_EVENT_JOIN,
    SMEM_GROUP_EVENT_LEAVE,
    SMEM_MEMBER_EVENT_BUTT
} smem_bm_group_event_t;

/* Called on a library thread for each event, with the context given at registration. */
typedef void (*smem_bm_group_event_cb)(smem_bm_t handle, uint32_t rankId, smem_bm_group_event_t event, void *context);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_BM_DEF_H */
