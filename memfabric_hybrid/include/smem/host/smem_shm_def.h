/* memfabric_hybrid C API: Share Memory types (the layout and values of the 1.3.0 release). */
#ifndef MEMFABRIC_SMEM_SHM_DEF_H
#define MEMFABRIC_SMEM_SHM_DEF_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A Share Memory object. The library looks every handle up; a destroyed or made-up one is
 * refused (SMEM_INVALID_PARAM), never followed. */
typedef void *smem_shm_t;

/* Largest timeout of smem_shm_config_t, in seconds. */
#define SMEM_SHM_TIMEOUT_MAX UINT32_MAX
/* Largest limit of smem_shm_atomic_alloc_value: values are below 1024. */
#define SMEM_SHM_ATOMIC_NUM_LIMIT 1024U

/* Data paths, as bits: MTE loads and stores through the GVA (parts of same-host ranks are
 * mapped in every rank), SDMA copies between same-host parts, RDMA network copies to ranks on
 * other hosts. */
typedef enum {
    SMEMS_DATA_OP_MTE = 1U << 0,
    SMEMS_DATA_OP_SDMA = 1U << 1,
    SMEMS_DATA_OP_RDMA = 1U << 2,
} smem_shm_data_op_type;

/* smem_shm_config_init writes every field. Timeouts are seconds in [1, SMEM_SHM_TIMEOUT_MAX]. */
typedef struct {
    uint32_t shmInitTimeout;          /* smem_shm_init: joining the store and the other ranks; 120 */
    uint32_t shmCreateTimeout;        /* smem_shm_create: the collective creation; 120 */
    uint32_t controlOperationTimeout; /* barriers, gathers, sub-groups, values, exit; 120 */
    bool startConfigStoreServer;      /* rank 0 starts the store at the URL when it is free on its
                                         host; true */
    uint32_t flags;                   /* reserved; 0 */
} smem_shm_config_t;

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_SHM_DEF_H */
