/*
 * memfabric_hybrid C API: Share Memory. Symmetric memory: every rank contributes the same
 * number of bytes at gva + rank * stride, the same address in every rank; same-host ranks'
 * parts are mapped into each other's processes. Barriers and gathers go through the store.
 */
#ifndef MEMFABRIC_SMEM_SHM_H
#define MEMFABRIC_SMEM_SHM_H

#include "smem.h"
#include "smem_shm_def.h"

#ifdef __cplusplus
extern "C" {
#endif

int32_t smem_shm_config_init(smem_shm_config_t *config);

/* Joins as rank rankId of worldSize (at most 1024) through the store at configStoreIpPort.
 * gvaSpaceSize is accepted and unused: each object reserves its own range at create. */
int32_t smem_shm_init(const char *configStoreIpPort, uint32_t worldSize, uint32_t rankId, uint16_t deviceId,
                      uint64_t gvaSpaceSize, smem_shm_config_t *config);

/* Destroys every object still alive and leaves. */
void smem_shm_uninit(uint32_t flags);

/* Object id (0..63) of rankSize ranks, collective; symmetricSize a multiple of 2 MiB in
 * [2 MiB, 4 GiB]. *gva (when not NULL) is its address. NULL on error. */
smem_shm_t smem_shm_create(uint32_t id, uint32_t rankSize, uint32_t rankId, uint64_t symmetricSize,
                           smem_shm_data_op_type dataOpType, uint32_t flags, void **gva);

int32_t smem_shm_destroy(smem_shm_t handle, uint32_t flags);

/* User context (at most 64 KiB) every rank can read. */
int32_t smem_shm_set_extra_context(smem_shm_t handle, const void *context, uint32_t size);

smem_shm_team_t smem_shm_get_global_team(smem_shm_t handle);
uint32_t smem_shm_team_get_rank(smem_shm_team_t team); /* UINT32_MAX for a bad team */
uint32_t smem_shm_team_get_size(smem_shm_team_t team); /* UINT32_MAX for a bad team */

/* MF_PEER_GONE at once when a rank died, SMEM_TIMEOUT after controlOperationTimeout. */
int32_t smem_shm_control_barrier(smem_shm_team_t team);

/* sendSize bytes from every rank into recvBuf in rank order; recvSize must hold
 * sendSize * rank count (SMEM_BUFFER_TOO_SMALL otherwise). */
int32_t smem_shm_control_allgather(smem_shm_team_t team, const char *sendBuf, uint32_t sendSize, char *recvBuf,
                                   uint32_t recvSize);

/* *reachInfo: smem_shm_data_op_type bits of the paths that reach remoteRank. */
int32_t smem_shm_topology_can_reach(smem_shm_t handle, uint32_t remoteRank, uint32_t *reachInfo);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_SHM_H */
