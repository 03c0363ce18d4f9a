/* memfabric_hybrid C API: definitions shared with Big Memory. */
#ifndef MEMFABRIC_SMEM_BM_DEF_H
#define MEMFABRIC_SMEM_BM_DEF_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

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

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_BM_DEF_H */
