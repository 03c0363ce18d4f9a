/* memfabric_hybrid C API: definitions shared with Big Memory. */
#ifndef MEMFABRIC_SMEM_BM_DEF_H
#define MEMFABRIC_SMEM_BM_DEF_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A Big Memory object. The library looks handles up; a destroyed or made-up one is refused
 * with SMEM_INVALID_PARAM. */
typedef void *smem_bm_t;

/* Memory kinds: LOCAL_* are memory of this process, the others parts of the global space. */
typedef enum {
    SMEM_MEM_TYPE_LOCAL_DEVICE = 0,
    SMEM_MEM_TYPE_LOCAL_HOST,
    SMEM_MEM_TYPE_DEVICE,
    SMEM_MEM_TYPE_HOST,
    SMEM_MEM_TYPE_BUTT
} smem_bm_mem_type;

/* Kinds of data path a caller asks for (bit flags). On a host each maps to the path that plays
 * its role: SDMA a same-host copy, the RDMA kinds the network path. */
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

/* Copy directions (the values of the Python API's BmCopyType): L local (device) memory of this
 * process, H its host memory, G the global space, GH its host part. */
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

typedef struct {
    uint32_t initTimeout;             /* seconds for smem_bm_init, default 120 */
    uint32_t createTimeout;           /* seconds for smem_bm_create, default 120 */
    uint32_t controlOperationTimeout; /* seconds for copies and barriers, default 120 */
    bool startConfigStore;            /* rank 0 may start the store, default true */
    bool startConfigStoreOnly;        /* only host the store; take no rank */
    bool dynamicWorldSize;            /* ranks come and go (worldSize is the most) */
    bool unifiedAddressSpace;         /* always true here: a GVA is the same in every rank */
    bool autoRanking;                 /* ranks in join order, default false */
    uint16_t rankId;                  /* this rank when autoRanking is false */
    uint32_t flags;                   /* reserved */
    char hcomUrl[64];                 /* accepted, unused: peers are found through the store */
} smem_bm_config_t;

typedef struct {
    const void **sources;
    void **destinations;
    const uint32_t *dataSizes;
    uint32_t batchSize;
} smem_batch_copy_params;

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_BM_DEF_H */
