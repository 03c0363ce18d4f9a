/*
 * memfabric_hybrid C API: Big Memory. Every rank contributes memory to one global address
 * space (a GVA is the same number in every rank) and copies move bytes in any direction.
 * Every copy is checked: a range outside a rank's part, crossing into the next rank, or a bad
 * local address is an error code (MF_OUT_OF_BOUNDS, ...), never a crash. Calls return 0 or a
 * negative code; smem_get_last_err_msg() says why.
 */
#ifndef MEMFABRIC_SMEM_BM_H
#define MEMFABRIC_SMEM_BM_H

#include "smem.h"
#include "smem_bm_def.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Writes every field of config: 120 s timeouts, store server allowed, autoRanking, rankId
 * 65535 (unused while autoRanking), unified addressing, TLS off, empty strings. */
int32_t smem_bm_config_init(smem_bm_config_t *config);

/* Joins as one of worldSize ranks (1..1024) through the store at storeURL ("tcp://ip:port",
 * "tcp://[ipv6]:port" or "etcd://..."). A second call in the process is SMEM_REPEAT_INVOKE. */
int32_t smem_bm_init(const char *storeURL, uint32_t worldSize, uint16_t deviceId, const smem_bm_config_t *config);

/* Destroys every object still alive and leaves; flags is reserved. */
void smem_bm_uninit(uint32_t flags);

/* This rank; UINT32_MAX before smem_bm_init (or with startConfigStoreOnly). */
uint32_t smem_bm_get_rank_id(void);

/* smem_bm_update_store_url("tcp://ip:port"); an IPv6 ip is put in brackets. */
int32_t smem_bm_update_store_server(const char *ip, uint16_t port);

/* The store here is one server without leader election, so no leader publishes an address:
 * after checking the arguments (and clearing ip and port) these return MF_UNSUPPORTED. */
int32_t smem_bm_get_bindable_leader_address(char *ip, size_t ipLen, uint16_t *port);
int32_t smem_bm_get_bindable_leader_address_by_store_url(const char *storeUrl, const smem_tls_config *tlsOption,
                                                         uint32_t worldSize, char *ip, size_t ipLen, uint16_t *port);

/* Nothing is ever cached for leader discovery here: does nothing. */
void smem_bm_release_leader_address_store(void);

/* The leader never changes here: a callback is refused with MF_UNSUPPORTED; NULL (remove the
 * callback) returns 0. */
typedef void (*smem_bm_leader_change_cb)(void *userData);
int32_t smem_bm_register_leader_change_callback(smem_bm_leader_change_cb callback, void *userData);

/* Object id (0..63), collective: every rank contributes localDRAMSize bytes of DRAM and
 * localHBMSize bytes of device memory (which needs a device backend). memberSize must be the
 * world size. NULL on error. */
smem_bm_t smem_bm_create(uint32_t id, uint32_t memberSize, smem_bm_data_op_type_t dataOpType, uint64_t localDRAMSize,
                         uint64_t localHBMSize, uint32_t flags);

/* smem_bm_create with an option struct (see smem_bm_create_option_t). NULL on error. */
smem_bm_t smem_bm_create2(uint32_t id, const smem_bm_create_option_t *option);

/* Releases the object; it waits for copies still running on other threads. */
void smem_bm_destroy(smem_bm_t handle);

/* Peers are mapped at create: these check the handle and return 0. */
int32_t smem_bm_join(smem_bm_t handle, uint32_t flags);
int32_t smem_bm_leave(smem_bm_t handle, uint32_t flags);

/* Contributions are fixed at create: a valid request is refused with MF_UNSUPPORTED. */
int32_t smem_bm_extend_local_mem(smem_bm_t handle, smem_bm_mem_type_t memType, uint64_t size);

/* Bytes this rank contributes: memType SMEM_MEM_TYPE_DEVICE its HBM part (0 without one),
 * SMEM_MEM_TYPE_HOST its DRAM part. 0 (and a message) for another memType. */
uint64_t smem_bm_get_local_mem_size_by_mem_type(smem_bm_t handle, smem_bm_mem_type_t memType);

/* The GVA of peerRankId's HBM (SMEM_MEM_TYPE_DEVICE) or DRAM (SMEM_MEM_TYPE_HOST) part; NULL
 * (and a message) for a rank outside the object or a part the object does not have. */
void *smem_bm_ptr_by_mem_type(smem_bm_t handle, smem_bm_mem_type_t memType, uint16_t peerRankId);

/* *va is the address of gva in this process: for a DRAM part of this host (vaMemType
 * SMEM_MEM_TYPE_LOCAL_HOST) the GVA itself, for an HBM part of this host
 * (SMEM_MEM_TYPE_LOCAL_DEVICE) its device pointer. Parts on other hosts have none. */
int32_t smem_bm_gva_to_va(smem_bm_t handle, void *gva, smem_bm_mem_type_t vaMemType, void **va);

/* Copies params->dataSize bytes in direction t. With SMEM_BM_FLAG_USE_EXTERNAL_STREAM in flags
 * and a stream in params, the copy is queued there (see smem_copy_params); otherwise it is done
 * when the call returns, ASYNC_COPY_FLAG or not. */
int32_t smem_bm_copy(smem_bm_t handle, smem_copy_params_t *params, smem_bm_copy_type_t t, uint32_t flags);

/* params->batchSize copies in direction t; stops at the first failure, naming its index. */
int32_t smem_bm_copy_batch(smem_bm_t handle, smem_batch_copy_params_t *params, smem_bm_copy_type_t t, uint32_t flags);

/* A barrier over the object's ranks (copies are done when they return, so after it every
 * rank's copies issued before it are done). Refused on dynamicWorldSize objects. */
int32_t smem_bm_wait(smem_bm_t handle);

/* Registers (unregisters) memory of this process for copies to ranks on other hosts. */
int32_t smem_bm_register_user_mem(smem_bm_t handle, uint64_t addr, uint64_t size);
int32_t smem_bm_unregister_user_mem(smem_bm_t handle, uint64_t addr);

/* The rank whose part holds gva; UINT32_MAX when none does. */
uint32_t smem_bm_get_rank_id_by_gva(smem_bm_t handle, void *gva);

/* Moves this rank (and its objects' engines) to the store now at storeURL, after the store came
 * back at another address. Every rank calls it. Nothing moves on error. */
int32_t smem_bm_update_store_url(const char *storeURL);

/* Calls cb(handle, rank, event, context) on a library thread as ranks join and leave an object
 * created with dynamicWorldSize (MF_UNSUPPORTED on other objects); cb NULL removes it.
 * context must stay valid until the handler is replaced or the object destroyed. */
int32_t smem_bm_set_group_event_handler(smem_bm_t handle, smem_bm_group_event_cb cb, void *context);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_BM_H */
