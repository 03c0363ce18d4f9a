/*
 * memfabric_hybrid C API: Share Memory (the calls of the 1.3.0 release). Symmetric memory:
 * every rank of an object contributes the same number of bytes, rank i's at
 * gva + i * smem_shm_get_symmetric_size(), the same address in every rank; same-host ranks'
 * parts are mapped into each other's processes. Control operations (barriers, gathers,
 * sub-groups, values, exit) go through the config store and end by the controlOperationTimeout:
 * SMEM_TIMEOUT then, MF_PEER_GONE at once when a rank they wait for died or destroyed the object.
 * Calls return 0 or a negative code (smem.h); smem_get_last_err_msg() says why.
 */
#ifndef MEMFABRIC_SMEM_SHM_H
#define MEMFABRIC_SMEM_SHM_H

#include "smem.h"
#include "smem_shm_def.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Writes the defaults into every field of *config. */
int32_t smem_shm_config_init(smem_shm_config_t *config);

/* Joins as rank rankId of worldSize (at most SMEM_WORLD_SIZE_MAX) through the config store at
 * configStoreIpPort ("tcp://ip:port" or "etcd://..."); returns when all ranks joined, or after
 * shmInitTimeout. deviceId is recorded. A second init in a process is SMEM_REPEAT_INVOKE. */
int32_t smem_shm_init(const char *configStoreIpPort, uint32_t worldSize, uint32_t rankId, uint16_t deviceId,
                      smem_shm_config_t *config);

/* Destroys every object still alive and leaves; flags is reserved. */
void smem_shm_uninit(uint32_t flags);

/* The smem_shm_data_op_type bits this library can use: MTE, SDMA and RDMA. */
uint32_t smem_shm_query_support_data_operation(void);

/* Creates object id (0..63) of rankSize ranks, collectively: every rank calls it with its
 * rankId. localSize is a multiple of 2 MiB in [2 MiB, 4 GiB]; dataOpType a non-empty set of
 * smem_shm_data_op_type bits; flags reserved. *gva is the object's address. NULL on error. */
smem_shm_t smem_shm_create(uint32_t id, uint32_t rankSize, uint32_t rankId, uint64_t localSize,
                           smem_shm_data_op_type dataOpType, uint32_t flags, void **gva);

/* The distance between ranks' parts (rank i's is at gva + i * this); 0 for a bad handle. */
uint64_t smem_shm_get_symmetric_size(smem_shm_t handle);

/* Destroys the object here: its mapping, values and exit function go, and other ranks' waits
 * on it fail. flags is reserved. */
int32_t smem_shm_destroy(smem_shm_t handle, uint32_t flags);

/* Attaches size bytes (1 to 65536) of user context to the object. */
int32_t smem_shm_set_extra_context(smem_shm_t handle, const void *context, uint32_t size);

/* This process's rank in the object; UINT32_MAX for a bad handle. */
uint32_t smem_shm_get_global_rank(smem_shm_t handle);

/* The object's number of ranks; UINT32_MAX for a bad handle. */
uint32_t smem_shm_get_global_rank_size(smem_shm_t handle);

/* Waits until every rank of the object reaches the barrier. */
int32_t smem_shm_control_barrier(smem_shm_t handle);

/* Gathers sendSize bytes (1 to 65536) from every rank into recvBuf in rank order; recvSize
 * must hold sendSize * rank count (SMEM_BUFFER_TOO_SMALL otherwise, before anything is sent). */
int32_t smem_shm_control_allgather(smem_shm_t handle, const char *sendBuf, uint32_t sendSize, char *recvBuf,
                                   uint32_t recvSize);

/* A barrier of the rankSize ranks that call it with the same key (at most 63 bytes), this one
 * being rankId among them; no setup needed. A key names one sub-group: the same ranks with the
 * same rankSize and rankIds every time; another sub-group needs another key. The members meet
 * on their first call: a member that dies after that fails the others' waits at once with
 * MF_PEER_GONE, and the next call meets afresh (SMEM_TIMEOUT if the member never comes back). */
int32_t smem_shm_subgroup_barrier(smem_shm_t handle, const char *key, uint32_t rankSize, uint32_t rankId);

/* smem_shm_control_allgather among the ranks of sub-group key (see smem_shm_subgroup_barrier),
 * in sub-group rank order; recvSize must hold sendSize * rankSize. */
int32_t smem_shm_subgroup_allgather(smem_shm_t handle, const char *key, uint32_t rankSize, uint32_t rankId,
                                    const char *sendBuf, uint32_t sendSize, char *recvBuf, uint32_t recvSize);

/* *reachInfo: the smem_shm_data_op_type bits of the paths that reach remoteRank from here. */
int32_t smem_shm_topology_can_reach(smem_shm_t handle, uint32_t remoteRank, uint32_t *reachInfo);

/* *value: a number in [0, limit) that no other rank of the object holds (the lowest free one
 * unless another rank takes it at the same moment), held by this rank until released or the
 * object is destroyed here. limit is in [1, SMEM_SHM_ATOMIC_NUM_LIMIT]. SMEM_NO_RESOURCES when
 * every number below limit is held by a live rank (those of dead ranks are taken back). */
int32_t smem_shm_atomic_alloc_value(smem_shm_t handle, uint32_t limit, int32_t *value);

/* Gives back a number this rank holds (SMEM_NOT_EXIST for one it does not). */
int32_t smem_shm_atomic_release_value(smem_shm_t handle, int32_t value);

/* Registers exit, called as exit(status) on a thread of the library when any rank calls
 * smem_shm_global_exit on the object (at once if one did already). One per object and process
 * (SMEM_REPEAT_INVOKE for a second). It may end the process; it is not called after the object
 * is destroyed here. */
int32_t smem_shm_register_exit(smem_shm_t handle, void (*exit)(int));

/* Makes every rank's registered exit function run with status. When this process registered
 * one on the object, returns after it has run (if it returns). Errors: smem_get_last_err_msg. */
void smem_shm_global_exit(smem_shm_t handle, int status);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_SHM_H */
