/*
 * memfabric_hybrid C API: types of smem_config_store_api.h.
 */
#ifndef MEMFABRIC_SMEM_CONFIG_STORE_DEF_H
#define MEMFABRIC_SMEM_CONFIG_STORE_DEF_H

#include <stdint.h>

#include "smem_tls_options.h"

/* A config store server started by smem_config_store_create_server. */
typedef void *smem_config_store_t;

/* Who leads a replicated store, and the address a new leader would bind. */
typedef struct {
    uint8_t is_leader;
    const char *bindable_leader_address;
} smem_config_store_leader_info_t;

/* Called when a client's connection to the server breaks (link_id: the connection; rank_id:
 * the rank it served, UINT32_MAX when unknown). */
typedef int32_t (*smem_config_store_broken_cb)(void *context, uint32_t link_id, uint32_t rank_id);

/* Called when the store's leader changes. */
typedef void (*smem_config_store_leader_change_cb)(void *context, const smem_config_store_leader_info_t *leader);

#endif /* MEMFABRIC_SMEM_CONFIG_STORE_DEF_H */
