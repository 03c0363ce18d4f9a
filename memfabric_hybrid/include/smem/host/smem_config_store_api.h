/*
 * memfabric_hybrid C API: config store servers held by handle, with their TLS settings and
 * event callbacks. A store here is one server (no replication): it is its own leader.
 */
#ifndef MEMFABRIC_SMEM_CONFIG_STORE_API_H
#define MEMFABRIC_SMEM_CONFIG_STORE_API_H

#include "smem_config_store_def.h"
#include "smem.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Sets TLS for config stores and clients created afterwards, from files (see
 * smem_tls_options_t; enable_tls 0 turns it off). TLS is built in, so tls_library is not
 * needed and is ignored; a decrypter_library is MF_UNSUPPORTED (give the pass phrase in
 * tls_private_key_password, or use smem_set_config_store_tls_key with a handler). */
int32_t smem_config_store_set_tls(const smem_tls_options_t *tls, const char *tls_library,
                                  const char *decrypter_library);

/* Starts a config store server at url ("tcp://ip:port"); NULL on error. */
smem_config_store_t smem_config_store_create_server(const char *url);

/* Stops a server started by smem_config_store_create_server (url: NULL, or the url it was
 * started with). Once it returns, the address can be served again. */
void smem_config_store_destroy_server(smem_config_store_t store, const char *url);

/* callback(context, link_id, rank_id) runs on a library thread after each client connection
 * of the server ends (rank_id is UINT32_MAX: the server does not know ranks). NULL removes it. */
void smem_config_store_set_server_broken_handler(smem_config_store_t store, smem_config_store_broken_cb callback,
                                                 void *context);

/* A one-server store is its own leader: callback runs once, before this returns, with
 * is_leader 1 and the server's address. */
int32_t smem_config_store_set_leader_handler(smem_config_store_t store, smem_config_store_leader_change_cb callback,
                                             void *context);

/* Writes a JSON description of the config store servers this process runs into json
 * (NUL-terminated); *outLen gets its length without the NUL. SMEM_BUFFER_TOO_SMALL, with
 * *outLen set, when bufLen is not enough. */
int32_t smem_config_store_get_cluster_status(char *json, uint32_t bufLen, uint32_t *outLen);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_CONFIG_STORE_API_H */
