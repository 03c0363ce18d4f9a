/* memfabric_hybrid C API: Transfer Engine types. */
#ifndef MEMFABRIC_SMEM_TRANS_DEF_H
#define MEMFABRIC_SMEM_TRANS_DEF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "smem_bm_def.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A transfer object. The library looks handles up; a destroyed or made-up one is refused
 * with SMEM_INVALID_PARAM. */
typedef void *smem_trans_t;

/* The engine's role label (any engine may reach any other). */
typedef enum {
    SMEM_TRANS_NONE = 0,
    SMEM_TRANS_SENDER,
    SMEM_TRANS_RECEIVER,
    SMEM_TRANS_BOTH,
    SMEM_TRANS_BUTT
} smem_trans_role_t;

/* Most transfer objects one store serves at once in upstream's design; not a limit here. */
#define SMEM_TRANS_RANK_COUNT_MAX (512U)

typedef struct {
    smem_trans_role_t role;          /* required: SENDER, RECEIVER or BOTH */
    uint32_t initTimeout;            /* seconds for store calls, default 120 */
    uint32_t deviceId;               /* device, default UINT32_MAX (none chosen) */
    uint32_t flags;                  /* reserved */
    smem_bm_data_op_type dataOpType; /* requested path kind, default SDMA */
    char nic[64];                    /* accepted, unused: the uniqueId's IP picks the interface */
    smem_tls_config hcomTlsConfig;   /* must be off: data connections prove the job's secret */
} smem_trans_config_t;

/* A batch write that quantizes float16/bfloat16 blocks to int8 (smem_trans_batch_quant_write). */
typedef struct {
    const char *remoteUniqueId;
    void **localAddrs;
    void **remoteAddrs;
    size_t *dataSizes;
    float **scale;
    float **offset;
    uint32_t batchSize;
    uint32_t unitNum;
    void *stream;
    uint32_t inputType;
    uint32_t flags;
} smem_trans_quant_copy_param_t;

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_TRANS_DEF_H */
