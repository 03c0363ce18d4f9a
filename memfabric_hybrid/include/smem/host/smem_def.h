/*
 * memfabric_hybrid C API: definitions shared by smem.h and smem_config_store_api.h.
 */
#ifndef MEMFABRIC_SMEM_DEF_H
#define MEMFABRIC_SMEM_DEF_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Codes an external key-value backend's functions return (see smem_conf_store_backend_op_t).
 * This library has no reg:// backend (smem_config_store_set_backend_op is MF_UNSUPPORTED), so
 * none of its calls return these. Note that the same numbers are MF_* codes of this library. */
#define SMEM_STORE_BACKEND_CODE_OK (0)
#define SMEM_STORE_BACKEND_CODE_BASE (-3000)
#define SMEM_STORE_BACKEND_CODE_INTERNAL (SMEM_STORE_BACKEND_CODE_BASE)
#define SMEM_STORE_BACKEND_CODE_INVAL (SMEM_STORE_BACKEND_CODE_BASE - 1)
#define SMEM_STORE_BACKEND_CODE_BUFEX (SMEM_STORE_BACKEND_CODE_BASE - 2)
#define SMEM_STORE_BACKEND_CODE_PERM (SMEM_STORE_BACKEND_CODE_BASE - 3)
#define SMEM_STORE_BACKEND_CODE_NORES (SMEM_STORE_BACKEND_CODE_BASE - 4)
#define SMEM_STORE_BACKEND_CODE_NOENT (SMEM_STORE_BACKEND_CODE_BASE - 5)
#define SMEM_STORE_BACKEND_CODE_LOCKED (SMEM_STORE_BACKEND_CODE_BASE - 6)
#define SMEM_STORE_BACKEND_CODE_UNLOCKED (SMEM_STORE_BACKEND_CODE_BASE - 7)

/* A prefix query of an external backend: fill(key, value, size, context) for each key under
 * prefix that sorts after marker; fill returns false to stop. */
typedef struct smem_store_prefix_get_ctx {
    const char *prefix;
    const char *marker;
    void *context;
    bool (*fill)(const char *key, const void *value, uint64_t size, void *context);
} smem_store_prefix_get_ctx_t;

/* The operations of an external key-value backend for reg:// store URLs. */
typedef struct {
    bool (*distributed)(uint32_t flags);
    int32_t (*create)(const char *name, const char *prefix, uint32_t flags, void **handle);
    void (*destroy)(void *handle);
    int32_t (*put)(void *handle, const char *key, const void *value, uint64_t size, uint32_t flags);
    int32_t (*get)(void *handle, const char *key, void *value, uint64_t capacity, uint32_t flags, uint64_t *size);
    int32_t (*prefix_get)(void *handle, const smem_store_prefix_get_ctx_t *ctx, uint32_t flags);
    int32_t (*remove)(void *handle, const char *key, uint32_t flags);
    int32_t (*lock)(void *handle, const char *name, uint32_t flags);
    int32_t (*try_lock)(void *handle, const char *name, uint32_t flags);
    int32_t (*unlock)(void *handle, const char *name, uint32_t flags);
} smem_conf_store_backend_op_t;

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_DEF_H */
