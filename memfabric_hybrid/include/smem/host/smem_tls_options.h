/*
 * memfabric_hybrid C API: TLS files of a config store server (smem_config_store_set_tls).
 */
#ifndef MEMFABRIC_SMEM_TLS_OPTIONS_H
#define MEMFABRIC_SMEM_TLS_OPTIONS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Relative file names are taken under tls_top_path (when not NULL). The CA is tls_ca_file
 * under tls_ca_path; the CRL fields are refused when set (no revocation lists here). */
typedef struct {
    uint8_t enable_tls;
    const char *tls_top_path;
    const char *tls_cert;
    const char *tls_crl_path;
    const char *tls_ca_path;
    const char *tls_ca_file;
    const char *tls_crl_file;
    const char *tls_private_key;
    const char *tls_private_key_password;
} smem_tls_options_t;

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_TLS_OPTIONS_H */
