/* memfabric_hybrid C API: Share Memory types. */
#ifndef MEMFABRIC_SMEM_SHM_DEF_H
#define MEMFABRIC_SMEM_SHM_DEF_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A Share Memory object, and a team of its ranks (the global team is named by the object's
 * handle). The library looks both up; a destroyed or made-up one is refused. */
typedef void *smem_shm_t;
typedef void *smem_shm_team_t;

/* Data paths (bit flags; the values of the Python API's ShmDataOpType): MTE load/store through
 * the GVA, SDMA a same-host copy, ROCE (RDMA) the network path. */
typedef enum {
    SMEMS_DATA_OP_MTE = 1U << 0,
    SMEMS_DATA_OP_SDMA = 1U << 1,
    SMEMS_DATA_OP_ROCE = 1U << 2,
    SMEMS_DATA_OP_RDMA = 1U << 2
} smem_shm_data_op_type;

typedef struct {
    uint32_t shmInitTimeout;          /* seconds for smem_shm_init, default 120 */
    uint32_t shmCreateTimeout;        /* seconds for smem_shm_create, default 120 */
    uint32_t controlOperationTimeout; /* seconds for barriers and gathers, default 120 */
    bool startConfigStore;            /* rank 0 may start the store, default true */
    uint32_t flags;                   /* reserved */
} smem_shm_config_t;

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_SHM_DEF_H */
