/*
 * memfabric_hybrid C API: the runtime, config stores, logging, TLS and the last error.
 * Link with -lmf_smem. Every call returns 0 on success or a negative error code
 * (SMEM_* and MF_* below); smem_get_last_err_msg() says what went wrong, on the calling thread.
 */
#ifndef MEMFABRIC_SMEM_H
#define MEMFABRIC_SMEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "smem_def.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Flags of the copy calls: ASYNC_COPY_FLAG and COPY_EXTEND_FLAG are accepted (copies are
 * ordered by their stream argument here); SMEM_BM_FLAG_USE_EXTERNAL_STREAM likewise. */
#define ASYNC_COPY_FLAG (1UL << (0))
#define COPY_EXTEND_FLAG (1UL << (1))
#define SMEM_BM_FLAG_USE_EXTERNAL_STREAM (1UL << (2))
#define SMEM_WORLD_SIZE_MAX 1024U
#define SMEM_INVALID_DEV_ID (-1)

/* smem_create_config_store flag: start empty (a store here always starts empty; clients
 * publish their keys again when they reconnect). */
#define SMEM_STORE_SKIP_RECOVER (1UL << (0))

/* Error codes (the same numbers as the Python API's). */
#define SMEM_OK (0)
#define SMEM_ERROR (-1)
#define SMEM_INVALID_PARAM (-2000)
#define SMEM_MALLOC_FAILED (-2001)
#define SMEM_NO_RESOURCES (-2002)
#define SMEM_NOT_STARTED (-2003)
#define SMEM_TIMEOUT (-2004)
#define SMEM_REPEAT_INVOKE (-2005)
#define SMEM_DUPLICATED (-2006)
#define SMEM_NOT_EXIST (-2007)
#define SMEM_NOT_INIT (-2008)
#define SMEM_RES_IN_USE (-2009)
#define SMEM_RECONNECTED (-2010)
#define SMEM_PARTIAL_FAILED (-2012)
#define SMEM_NOT_CONNECTED (-2014)
#define SMEM_BUFFER_TOO_SMALL (-2015)
#define MF_PEER_GONE (-3001)
#define MF_OUT_OF_BOUNDS (-3002)
#define MF_REFUSED (-3003)
#define MF_TLS (-3004)
#define MF_PROTOCOL (-3005)
#define MF_UNSUPPORTED (-3006)
#define MF_IO (-3007)

/* The ABI this library implements: major << 16 | minor (1.3: 0x00010003). */
uint32_t smem_get_abi_version(void);

/* Initializes the runtime; flags is reserved (0). */
int32_t smem_init(uint32_t flags);

/* Stops the config stores started by smem_create_config_store. */
void smem_uninit(void);

/* Starts a config store in this process at storeUrl ("tcp://ip:port", port not 0); flags 0 or
 * SMEM_STORE_SKIP_RECOVER. etcd:// stores are run by etcd itself, and reg:// (an external
 * backend) is MF_UNSUPPORTED. */
int32_t smem_create_config_store(const char *storeUrl, uint64_t flags);

/* Stops the config store that smem_create_config_store started at storeUrl. */
void smem_destroy_config_store(const char *storeUrl);

/* Registers an external key-value backend for reg:// URLs: not supported by this library
 * (MF_UNSUPPORTED); use a tcp:// store, or etcd://. */
int32_t smem_config_store_set_backend_op(const smem_conf_store_backend_op_t *backendOp);

/* Sends log messages to func(level, msg), level 0 debug, 1 info, 2 warn, 3 error; NULL: stderr.
 * func may be called from library threads. */
int32_t smem_set_extern_logger(void (*func)(int level, const char *msg));

/* Alarm callbacks: alarm(code, msg) when the config store connection of this process is
 * lost (code 1) and resume(code) when it is back. Either may be NULL. They run in order on a
 * library thread of their own. */
int32_t smem_set_extern_alarm(void (*alarm)(uint16_t code, const char *msg), void (*resume)(uint16_t code));

/* Sets the log level (0..3; default 2). */
int32_t smem_set_log_level(int level);

/* Turns config store TLS on ("ca=PATH;cert=PATH;key=PATH") or off, for stores and clients
 * created afterwards. */
int32_t smem_set_conf_store_tls(bool enable, const char *tls_info, const uint32_t tls_info_len);

/* Decrypts the private key's pass phrase into plainText; plainTextLen holds the room there on
 * entry and the pass phrase's length on return. Returns 0 on success. */
#ifdef __cplusplus
typedef int (*smem_decrypt_handler)(const char *cipherText, size_t cipherTextLen, char *plainText,
                                    size_t &plainTextLen);
#else
typedef int (*smem_decrypt_handler)(const char *cipherText, size_t cipherTextLen, char *plainText,
                                    size_t *plainTextLen);
#endif

/* Sets the TLS private key (PEM text or a path) and its pass phrase, decrypted by h when h is
 * not NULL. */
int32_t smem_set_config_store_tls_key(const char *tls_pk, const uint32_t tls_pk_len, const char *tls_pk_pw,
                                      const uint32_t tls_pk_pw_len, const smem_decrypt_handler h);

/* This thread's last error message ("" when none); valid until the thread's next call of one
 * of these two functions. */
const char *smem_get_last_err_msg(void);
const char *smem_get_and_clear_last_err_msg(void);

/* The code of this thread's last error (0 when none; cleared with the message). */
int32_t smem_get_last_err_code(void);

#ifdef __cplusplus
}
#endif

#endif /* MEMFABRIC_SMEM_H */
