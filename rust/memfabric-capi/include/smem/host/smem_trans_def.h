/* memfabric_hybrid C API: Transfer Engine types. */
#ifndef MEMFABRIC_SMEM_TRANS_DEF_H
#define MEMFABRIC_SMEM_TRANS_DEF_H

#include <stdbool.h>
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

typedef struct {
    smem_trans_role_t role;          /* required: SENDER, RECEIVER or BOTH */
    uint32_t initTimeout;            /* seconds for store calls, default 120 */
    uint32_t deviceId;               /* device, default UINT32_MAX (none chosen) */
    uint32_t flags;                  /* reserved */
    smem_bm_data_op_type dataOpType; /* requested path kind, default SDMA */
    bool startConfigServer;          /* start the config store at storeUrl if nobody serves it */
} smem_trans_config_t;

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_TRANS_DEF_H */
