/*
 * memfabric_hybrid C API: Big Memory. Every rank contributes memory to one global address
 * space (a GVA is the same number in every rank) and copies move bytes in any direction.
 * Every copy is checked: a range outside a rank's part, crossing into the next rank, or a bad
 * local address is an error code (MF_OUT_OF_BOUNDS, ...), never a crash.
 */
#ifndef MEMFABRIC_SMEM_BM_H
#define MEMFABRIC_SMEM_BM_H

#include "smem.h"
#include "smem_bm_def.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fills config with the defaults. */
int32_t smem_bm_config_init(smem_bm_config_t *config);

/* Joins as one of worldSize ranks (at most 1024) through the store at storeURL. */
int32_t smem_bm_init(const char *storeURL, uint32_t worldSize, uint16_t deviceId, const smem_bm_config_t *config);

/* Destroys every object still alive and leaves. */
void smem_bm_uninit(uint32_t flags);

/* This rank, UINT32_MAX before smem_bm_init. */
uint32_t smem_bm_get_rank_id(void);

/* Moves this rank (and its objects' engines) to the store now at storeURL, after the store came
 * back at another address. Nothing moves on error. */
int32_t smem_bm_update_store_url(const char *storeURL);

/* Object id (0..63), collective: every rank contributes localDRAMSize bytes (localHBMSize of
 * device memory needs a device backend). memberSize is the world size. NULL on error. */
smem_bm_t smem_bm_create(uint32_t id, uint32_t memberSize, smem_bm_data_op_type dataOpType, uint64_t localDRAMSize,
                         uint64_t localHBMSize, uint32_t flags);

void smem_bm_destroy(smem_bm_t handle);

/* Makes the object usable; *localGvaAddress (when not NULL) is this rank's part. */
int32_t smem_bm_join(smem_bm_t handle, uint32_t flags, void **localGvaAddress);
int32_t smem_bm_leave(smem_bm_t handle, uint32_t flags);

/* Bytes this rank contributes (its HBM part when it has one). */
uint64_t smem_bm_get_local_mem_size(smem_bm_t handle);

/* The GVA of a rank's part; NULL (and a message) for a rank outside the object. */
void *smem_bm_ptr(smem_bm_t handle, uint16_t peerRankId);

/* The rank whose part holds gva; UINT32_MAX when none does. */
uint32_t smem_bm_get_rank_id_by_gva(smem_bm_t handle, void *gva);

int32_t smem_bm_copy(smem_bm_t handle, const void *src, void *dest, uint64_t size, smem_bm_copy_type t,
                     uint32_t flags);
int32_t smem_bm_copy_batch(smem_bm_t handle, smem_batch_copy_params *params, smem_bm_copy_type t, uint32_t flags);

/* A barrier over the object's ranks. */
int32_t smem_bm_wait(smem_bm_t handle);

/* Registers (unregisters) memory of this process for copies to ranks on other hosts. */
int32_t smem_bm_register_user_mem(smem_bm_t handle, uint64_t addr, uint64_t size);
int32_t smem_bm_unregister_user_mem(smem_bm_t handle, uint64_t addr);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_BM_H */
