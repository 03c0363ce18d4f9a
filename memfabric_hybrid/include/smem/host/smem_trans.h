/*
 * memfabric_hybrid C API: the Transfer Engine. Point-to-point writes and reads between the
 * registered memory of engines that found each other through one config store.
 *
 * A transfer's local range must lie in memory registered with this engine, the remote range
 * in one region the peer registered; anything else is MF_OUT_OF_BOUNDS, checked before a byte
 * moves. An unknown peer is SMEM_INVALID_PARAM, a dead one MF_PEER_GONE; every call ends
 * within its deadline.
 */
#ifndef MEMFABRIC_SMEM_TRANS_H
#define MEMFABRIC_SMEM_TRANS_H

#include <stddef.h>
#include "smem.h"
#include "smem_trans_def.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fills config with the defaults (role SMEM_TRANS_NONE: set one before smem_trans_create). */
int32_t smem_trans_config_init(smem_trans_config_t *config);

/* Prepares the process for transfer objects; call before smem_trans_create. */
int32_t smem_trans_init(const smem_trans_config_t *config);

/* Destroys every transfer object still alive. */
void smem_trans_uninit(uint32_t flags);

/* A transfer object that peers reach as uniqueId ("ip:port"; "ip" or "ip:0" picks the port),
 * published in the config store at storeUrl before it returns. NULL on error. */
smem_trans_t smem_trans_create(const char *storeUrl, const char *uniqueId, const smem_trans_config_t *config);

void smem_trans_destroy(smem_trans_t handle, uint32_t flags);

int32_t smem_trans_register_mem(smem_trans_t handle, void *address, size_t capacity, uint32_t flags);
int32_t smem_trans_batch_register_mem(smem_trans_t handle, void *addresses[], size_t capacities[], uint32_t count,
                                      uint32_t flags);
int32_t smem_trans_deregister_mem(smem_trans_t handle, void *address);

int32_t smem_trans_write(smem_trans_t handle, const void *localAddr, const char *remoteUniqueId, void *remoteAddr,
                         size_t dataSize, uint32_t flags);
int32_t smem_trans_batch_write(smem_trans_t handle, const void *localAddrs[], const char *remoteUniqueId,
                               void *remoteAddrs[], size_t dataSizes[], uint32_t batchSize, uint32_t flags);
int32_t smem_trans_read(smem_trans_t handle, void *localAddr, const char *remoteUniqueId, const void *remoteAddr,
                        size_t dataSize, uint32_t flags);
int32_t smem_trans_batch_read(smem_trans_t handle, void *localAddrs[], const char *remoteUniqueId,
                              const void *remoteAddrs[], size_t dataSizes[], uint32_t batchSize, uint32_t flags);

/* The same in order with the work on a device stream (a CUDA stream with the CUDA backend);
 * stream NULL runs the transfer now. Without a device backend a stream is MF_UNSUPPORTED. */
int32_t smem_trans_read_submit(smem_trans_t handle, void *localAddr, const char *remoteUniqueId,
                               const void *remoteAddr, size_t dataSize, void *stream, uint32_t flags);
int32_t smem_trans_write_submit(smem_trans_t handle, const void *localAddr, const char *remoteUniqueId,
                                void *remoteAddr, size_t dataSize, void *stream, uint32_t flags);
int32_t smem_trans_batch_read_submit(smem_trans_t handle, void *localAddrs[], const char *remoteUniqueId,
                                     const void *remoteAddrs[], size_t dataSizes[], uint32_t batchSize,
                                     void *stream, uint32_t flags);
int32_t smem_trans_batch_write_submit(smem_trans_t handle, const void *localAddrs[], const char *remoteUniqueId,
                                      void *remoteAddrs[], size_t dataSizes[], uint32_t batchSize, void *stream,
                                      uint32_t flags);

/* Quantizing batch write: the quantization runs as an Ascend device kernel, which this library
 * does not have, so it is MF_UNSUPPORTED (after the arguments are checked). */
int32_t smem_trans_batch_quant_write(smem_trans_t handle, smem_trans_quant_copy_param_t *params);

/* callback(peerUniqueId, userData) runs once for each peer this object has transferred with
 * that stops or dies (its record leaves the config store; checked every 300 ms on a library
 * thread). A new callback replaces the old one; NULL removes it. */
typedef void (*smem_trans_peer_down_callback_t)(const char *peerUniqueId, void *userData);
int32_t smem_trans_set_peer_down_callback(smem_trans_t handle, smem_trans_peer_down_callback_t callback,
                                          void *userData);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_TRANS_H */
