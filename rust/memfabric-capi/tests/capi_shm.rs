//! Share Memory through the C API (`smem_shm.h`), called as C calls it, in one process: one
//! rank uses every call, and every refusal comes with its code and a message. Share Memory is
//! process-wide, so the tests take turns.

use std::ffi::{c_char, c_int, c_void, CString};
use std::mem::{offset_of, size_of, MaybeUninit};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

mod common;
use common::{free_port, last_err, refused, said, serial};

use mf_smem::shm::*;

const SIZE: u64 = 2 << 20;
const MADE_UP: SmemShm = 0x5eed as SmemShm;

fn config() -> SmemShmConfig {
    let mut c = MaybeUninit::<SmemShmConfig>::uninit();
    // SAFETY: a writable config.
    assert_eq!(unsafe { smem_shm_config_init(c.as_mut_ptr()) }, 0);
    // SAFETY: initialized by smem_shm_config_init.
    unsafe { c.assume_init() }
}

#[test]
fn the_headers_declare_what_the_library_has() {
    let def = include_str!("../../../memfabric_hybrid/include/smem/host/smem_shm_def.h");
    let define = |name: &str| {
        def.lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} is not defined"))
            .split("/*")
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(define("SMEM_SHM_TIMEOUT_MAX"), "UINT32_MAX");
    assert_eq!(SMEM_SHM_TIMEOUT_MAX, u32::MAX);
    assert_eq!(define("SMEM_SHM_ATOMIC_NUM_LIMIT"), "1024U");
    assert_eq!(SMEM_SHM_ATOMIC_NUM_LIMIT, 1024);
    for (name, bit, value) in [
        ("SMEMS_DATA_OP_MTE", 0, SMEMS_DATA_OP_MTE),
        ("SMEMS_DATA_OP_SDMA", 1, SMEMS_DATA_OP_SDMA),
        ("SMEMS_DATA_OP_RDMA", 2, SMEMS_DATA_OP_RDMA),
    ] {
        let line = format!("    {name} = 1U << {bit},");
        assert!(
            def.lines().any(|l| l == line),
            "{line:?} is not in the header"
        );
        assert_eq!(value, 1 << bit);
    }
    // The config's fields, in order, and the mirror's layout.
    let body = def
        .split("typedef struct {")
        .nth(1)
        .and_then(|s| s.split("} smem_shm_config_t;").next())
        .expect("smem_shm_config_t");
    let fields: Vec<(String, String)> = body
        .lines()
        .filter_map(|l| l.split("/*").next())
        .filter_map(|l| l.trim().strip_suffix(';'))
        .map(|l| {
            let (t, n) = l.split_once(' ').unwrap();
            (t.to_string(), n.trim().to_string())
        })
        .collect();
    let expected = [
        (
            "uint32_t",
            "shmInitTimeout",
            offset_of!(SmemShmConfig, shm_init_timeout),
        ),
        (
            "uint32_t",
            "shmCreateTimeout",
            offset_of!(SmemShmConfig, shm_create_timeout),
        ),
        (
            "uint32_t",
            "controlOperationTimeout",
            offset_of!(SmemShmConfig, control_operation_timeout),
        ),
        (
            "bool",
            "startConfigStoreServer",
            offset_of!(SmemShmConfig, start_config_store_server),
        ),
        ("uint32_t", "flags", offset_of!(SmemShmConfig, flags)),
    ];
    let names: Vec<(&str, &str)> = fields
        .iter()
        .map(|(t, n)| (t.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        names,
        expected
            .iter()
            .map(|(t, n, _)| (*t, *n))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        expected.iter().map(|e| e.2).collect::<Vec<_>>(),
        vec![0, 4, 8, 12, 16]
    );
    assert_eq!(size_of::<SmemShmConfig>(), 20);

    // Every function of smem_shm.h is exported (naming one here that the library lacks would
    // not compile), and the header declares no other.
    let exported: &[(&str, *const ())] = &[
        ("smem_shm_config_init", smem_shm_config_init as *const ()),
        ("smem_shm_init", smem_shm_init as *const ()),
        ("smem_shm_uninit", smem_shm_uninit as *const ()),
        (
            "smem_shm_query_support_data_operation",
            smem_shm_query_support_data_operation as *const (),
        ),
        ("smem_shm_create", smem_shm_create as *const ()),
        (
            "smem_shm_get_symmetric_size",
            smem_shm_get_symmetric_size as *const (),
        ),
        ("smem_shm_destroy", smem_shm_destroy as *const ()),
        (
            "smem_shm_set_extra_context",
            smem_shm_set_extra_context as *const (),
        ),
        (
            "smem_shm_get_global_rank",
            smem_shm_get_global_rank as *const (),
        ),
        (
            "smem_shm_get_global_rank_size",
            smem_shm_get_global_rank_size as *const (),
        ),
        (
            "smem_shm_control_barrier",
            smem_shm_control_barrier as *const (),
        ),
        (
            "smem_shm_control_allgather",
            smem_shm_control_allgather as *const (),
        ),
        (
            "smem_shm_subgroup_barrier",
            smem_shm_subgroup_barrier as *const (),
        ),
        (
            "smem_shm_subgroup_allgather",
            smem_shm_subgroup_allgather as *const (),
        ),
        (
            "smem_shm_topology_can_reach",
            smem_shm_topology_can_reach as *const (),
        ),
        (
            "smem_shm_atomic_alloc_value",
            smem_shm_atomic_alloc_value as *const (),
        ),
        (
            "smem_shm_atomic_release_value",
            smem_shm_atomic_release_value as *const (),
        ),
        (
            "smem_shm_register_exit",
            smem_shm_register_exit as *const (),
        ),
        ("smem_shm_global_exit", smem_shm_global_exit as *const ()),
    ];
    let header = include_str!("../../../memfabric_hybrid/include/smem/host/smem_shm.h");
    let mut declared: Vec<&str> = header
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('/') && !l.starts_with('#'))
        .filter_map(|l| l.split('(').next()?.split_whitespace().last())
        .map(|n| n.trim_start_matches('*'))
        .filter(|n| n.starts_with("smem_shm_"))
        .collect();
    declared.sort();
    let mut names: Vec<&str> = exported.iter().map(|(n, _)| *n).collect();
    names.sort();
    assert_eq!(declared, names);
}

#[test]
fn every_call_refuses_before_init() {
    let _turn = serial();
    // SAFETY (all calls below): pointers are null, NUL-terminated strings, or buffers of the
    // sizes passed, as the functions' contracts ask.
    unsafe {
        refused(smem_shm_config_init(null_mut()), -2000, "config is NULL");
        let mut gva = null_mut();
        assert!(smem_shm_create(0, 1, 0, SIZE, SMEMS_DATA_OP_MTE, 0, &mut gva).is_null());
        said("call smem_shm_init first");
        refused(smem_shm_control_barrier(MADE_UP), -2008, "smem_shm_init");
        refused(
            smem_shm_control_barrier(null_mut()),
            -2000,
            "handle is NULL",
        );
        refused(smem_shm_destroy(MADE_UP, 0), -2008, "not initialized");
        assert_eq!(smem_shm_get_global_rank(MADE_UP), u32::MAX);
        said("not initialized");
        assert_eq!(smem_shm_get_global_rank_size(null_mut()), u32::MAX);
        said("NULL");
        assert_eq!(smem_shm_get_symmetric_size(MADE_UP), 0);
        said("not initialized");
        let key = CString::new("k").unwrap();
        refused(
            smem_shm_subgroup_barrier(MADE_UP, key.as_ptr(), 1, 0),
            -2008,
            "not initialized",
        );
        let mut v = 0;
        refused(
            smem_shm_atomic_alloc_value(MADE_UP, 4, &mut v),
            -2008,
            "not initialized",
        );
        refused(
            smem_shm_atomic_release_value(MADE_UP, 0),
            -2008,
            "not initialized",
        );
        refused(
            smem_shm_register_exit(MADE_UP, Some(record_exit)),
            -2008,
            "not initialized",
        );
        smem_shm_global_exit(MADE_UP, 1);
        said("not initialized");
        // uninit without init is harmless.
        smem_shm_uninit(0);
        assert_eq!(smem_shm_query_support_data_operation(), 7);
    }
}

#[test]
fn init_refuses_bad_arguments_and_a_second_init() {
    let _turn = serial();
    let url = CString::new(format!("tcp://127.0.0.1:{}", free_port())).unwrap();
    // SAFETY (all calls below): as in the test above.
    unsafe {
        // config_init writes every field, whatever was there.
        let mut c = MaybeUninit::<SmemShmConfig>::uninit();
        std::ptr::write_bytes(
            c.as_mut_ptr().cast::<u8>(),
            0xab,
            size_of::<SmemShmConfig>(),
        );
        assert_eq!(smem_shm_config_init(c.as_mut_ptr()), 0);
        let c = c.assume_init();
        assert_eq!(
            (
                c.shm_init_timeout,
                c.shm_create_timeout,
                c.control_operation_timeout,
                c.start_config_store_server,
                c.flags
            ),
            (120, 120, 120, true, 0)
        );
        let cfg = config();
        refused(
            smem_shm_init(null(), 1, 0, 0, &cfg),
            -2000,
            "configStoreIpPort is NULL",
        );
        refused(
            smem_shm_init(url.as_ptr(), 1, 0, 0, null()),
            -2000,
            "config is NULL",
        );
        refused(
            smem_shm_init(url.as_ptr(), 2, 2, 0, &cfg),
            -2000,
            "rank_id 2",
        );
        refused(
            smem_shm_init(url.as_ptr(), 0, 0, 0, &cfg),
            -2000,
            "world_size 0",
        );
        refused(
            smem_shm_init(url.as_ptr(), 1025, 0, 0, &cfg),
            -2000,
            "world_size 1025",
        );
        for field in 0..3 {
            let mut zero = cfg;
            match field {
                0 => zero.shm_init_timeout = 0,
                1 => zero.shm_create_timeout = 0,
                _ => zero.control_operation_timeout = 0,
            }
            refused(
                smem_shm_init(url.as_ptr(), 1, 0, 0, &zero),
                -2000,
                "at least 1 second",
            );
        }
        let bad = CString::new("http://127.0.0.1:1").unwrap();
        assert_eq!(smem_shm_init(bad.as_ptr(), 1, 0, 0, &cfg), -2000);
        last_err();

        assert_eq!(
            smem_shm_init(url.as_ptr(), 1, 0, 3, &cfg),
            0,
            "{}",
            last_err()
        );
        refused(
            smem_shm_init(url.as_ptr(), 1, 0, 3, &cfg),
            -2005,
            "already initialized",
        );
        smem_shm_uninit(0);
    }
}

static EXIT_STATUS: AtomicI32 = AtomicI32::new(i32::MIN);
static EXIT_ON_LIBRARY_THREAD: AtomicBool = AtomicBool::new(false);

extern "C" fn record_exit(status: c_int) {
    let on_library_thread = std::thread::current().name() == Some("mf-shm-exit");
    EXIT_ON_LIBRARY_THREAD.store(on_library_thread, Ordering::SeqCst);
    EXIT_STATUS.store(status, Ordering::SeqCst);
}

#[test]
fn one_rank_uses_every_call_and_each_refuses_bad_input() {
    let _turn = serial();
    let url = CString::new(format!("tcp://127.0.0.1:{}", free_port())).unwrap();
    let cfg = config();
    // SAFETY (all calls below): pointers are null, NUL-terminated strings, or buffers of the
    // sizes passed, as the functions' contracts ask.
    unsafe {
        assert_eq!(
            smem_shm_init(url.as_ptr(), 1, 0, 0, &cfg),
            0,
            "{}",
            last_err()
        );

        // Creation.
        let mut gva: *mut c_void = null_mut();
        let create = |id, ranks, rank, size, op, gva: *mut *mut c_void| {
            smem_shm_create(id, ranks, rank, size, op, 0, gva)
        };
        for (op, says) in [(0, "dataOpType 0x0"), (8, "dataOpType 0x8")] {
            assert!(create(0, 1, 0, SIZE, op, &mut gva).is_null());
            said(says);
        }
        assert!(create(0, 1, 0, SIZE, SMEMS_DATA_OP_MTE, null_mut()).is_null());
        said("gva is NULL");
        assert!(create(0, 1, 0, SIZE + 4096, SMEMS_DATA_OP_MTE, &mut gva).is_null());
        said("multiple of 2 MiB");
        assert!(create(0, 1, 0, 8 << 30, SMEMS_DATA_OP_MTE, &mut gva).is_null());
        said("multiple of 2 MiB");
        assert!(create(64, 1, 0, SIZE, SMEMS_DATA_OP_MTE, &mut gva).is_null());
        said("object id 64");
        assert!(create(0, 0, 0, SIZE, SMEMS_DATA_OP_MTE, &mut gva).is_null());
        said("rank_size 0");
        assert!(create(0, 2, 2, SIZE, SMEMS_DATA_OP_MTE, &mut gva).is_null());
        said("rank_id 2");
        assert!(gva.is_null(), "a failed create writes no address");
        let shm = create(
            0,
            1,
            0,
            SIZE,
            SMEMS_DATA_OP_MTE | SMEMS_DATA_OP_RDMA,
            &mut gva,
        );
        assert!(!shm.is_null() && !gva.is_null(), "{}", last_err());
        assert!(create(0, 1, 0, SIZE, SMEMS_DATA_OP_MTE, &mut gva).is_null());
        said("already exists");

        // What it is.
        let symmetric = smem_shm_get_symmetric_size(shm);
        assert!(
            symmetric >= SIZE && symmetric.is_multiple_of(SIZE),
            "{symmetric}"
        );
        std::ptr::write_bytes(gva.cast::<u8>(), 0x5a, SIZE as usize);
        assert_eq!(*gva.cast::<u8>().add(SIZE as usize - 1), 0x5a);
        assert_eq!(smem_shm_get_global_rank(shm), 0);
        assert_eq!(smem_shm_get_global_rank_size(shm), 1);
        assert_eq!(smem_shm_get_global_rank(MADE_UP), u32::MAX);
        said("not a live Share Memory handle");
        assert_eq!(smem_shm_get_global_rank_size(MADE_UP), u32::MAX);
        assert_eq!(smem_shm_get_symmetric_size(MADE_UP), 0);
        said("not a live Share Memory handle");
        assert_eq!(
            smem_shm_query_support_data_operation(),
            SMEMS_DATA_OP_MTE | SMEMS_DATA_OP_SDMA | SMEMS_DATA_OP_RDMA
        );
        let mut reach = 0u32;
        assert_eq!(smem_shm_topology_can_reach(shm, 0, &mut reach), 0);
        assert_eq!(reach, SMEMS_DATA_OP_MTE | SMEMS_DATA_OP_SDMA);
        refused(
            smem_shm_topology_can_reach(shm, 1, &mut reach),
            -2000,
            "rank 1 is outside [0, 1)",
        );
        refused(
            smem_shm_topology_can_reach(shm, 0, null_mut()),
            -2000,
            "reachInfo is NULL",
        );
        refused(
            smem_shm_topology_can_reach(MADE_UP, 0, &mut reach),
            -2000,
            "not a live",
        );

        // Context.
        let hello = b"hello";
        assert_eq!(smem_shm_set_extra_context(shm, hello.as_ptr().cast(), 5), 0);
        refused(
            smem_shm_set_extra_context(shm, null(), 5),
            -2000,
            "context is NULL",
        );
        let big = vec![0u8; 65537];
        refused(
            smem_shm_set_extra_context(shm, big.as_ptr().cast(), 65537),
            -2000,
            "1 to 65536",
        );
        refused(
            smem_shm_set_extra_context(shm, big.as_ptr().cast(), 0),
            -2000,
            "1 to 65536",
        );
        assert_eq!(
            smem_shm_set_extra_context(shm, big.as_ptr().cast(), 65536),
            0
        );

        // Barrier and gather.
        assert_eq!(smem_shm_control_barrier(shm), 0);
        refused(smem_shm_control_barrier(MADE_UP), -2000, "not a live");
        let mine = *b"r0xyzwvu";
        let mut all = [0u8; 8];
        let send = mine.as_ptr().cast::<c_char>();
        let recv = all.as_mut_ptr().cast::<c_char>();
        assert_eq!(smem_shm_control_allgather(shm, send, 8, recv, 8), 0);
        assert_eq!(all, mine);
        refused(
            smem_shm_control_allgather(shm, send, 8, recv, 7),
            -2015,
            "recvSize 7",
        );
        refused(
            smem_shm_control_allgather(shm, null(), 8, recv, 8),
            -2000,
            "sendBuf is NULL",
        );
        refused(
            smem_shm_control_allgather(shm, send, 8, null_mut(), 8),
            -2000,
            "recvBuf is NULL",
        );
        refused(
            smem_shm_control_allgather(shm, send, 0, recv, 8),
            -2000,
            "sendSize 0",
        );
        refused(
            smem_shm_control_allgather(shm, big.as_ptr().cast(), 65537, recv, u32::MAX),
            -2000,
            "sendSize 65537",
        );

        // Sub-groups (of this one rank).
        let key = CString::new("solo").unwrap();
        assert_eq!(smem_shm_subgroup_barrier(shm, key.as_ptr(), 1, 0), 0);
        assert_eq!(smem_shm_subgroup_barrier(shm, key.as_ptr(), 1, 0), 0);
        all = [0; 8];
        assert_eq!(
            smem_shm_subgroup_allgather(shm, key.as_ptr(), 1, 0, send, 8, recv, 8),
            0,
            "{}",
            last_err()
        );
        assert_eq!(all, mine);
        refused(
            smem_shm_subgroup_allgather(shm, key.as_ptr(), 1, 0, send, 8, recv, 4),
            -2015,
            "recvSize 4",
        );
        refused(
            smem_shm_subgroup_allgather(shm, key.as_ptr(), 1, 0, null(), 8, recv, 8),
            -2000,
            "sendBuf is NULL",
        );
        refused(
            smem_shm_subgroup_barrier(shm, null(), 1, 0),
            -2000,
            "key is NULL",
        );
        refused(
            smem_shm_subgroup_barrier(shm, key.as_ptr(), 2, 0),
            -2000,
            "rankSize 2 is outside [1, 1]",
        );
        refused(
            smem_shm_subgroup_barrier(shm, key.as_ptr(), 1, 1),
            -2000,
            "rankId 1 is outside [0, 1)",
        );
        let long = CString::new("k".repeat(64)).unwrap();
        refused(
            smem_shm_subgroup_barrier(shm, long.as_ptr(), 1, 0),
            -2000,
            "at most 63",
        );
        let not_utf8 = CString::new(vec![0xffu8, 0xfe]).unwrap();
        refused(
            smem_shm_subgroup_barrier(shm, not_utf8.as_ptr(), 1, 0),
            -2000,
            "key is not UTF-8",
        );
        refused(
            smem_shm_subgroup_barrier(MADE_UP, key.as_ptr(), 1, 0),
            -2000,
            "not a live",
        );

        // Values.
        let mut v = -1;
        assert_eq!(smem_shm_atomic_alloc_value(shm, 2, &mut v), 0);
        assert_eq!(v, 0);
        assert_eq!(smem_shm_atomic_alloc_value(shm, 2, &mut v), 0);
        assert_eq!(v, 1);
        refused(
            smem_shm_atomic_alloc_value(shm, 2, &mut v),
            -2002,
            "every value below 2 is held",
        );
        assert_eq!(smem_shm_atomic_release_value(shm, 0), 0);
        refused(
            smem_shm_atomic_release_value(shm, 0),
            -2007,
            "value 0 is not held by this rank",
        );
        assert_eq!(smem_shm_atomic_alloc_value(shm, 2, &mut v), 0);
        assert_eq!(v, 0, "a released value comes back");
        refused(
            smem_shm_atomic_release_value(shm, -1),
            -2000,
            "value -1 is negative",
        );
        refused(
            smem_shm_atomic_release_value(shm, 1024),
            -2000,
            "value 1024 is outside [0, 1024)",
        );
        refused(
            smem_shm_atomic_alloc_value(shm, 0, &mut v),
            -2000,
            "limit 0",
        );
        refused(
            smem_shm_atomic_alloc_value(shm, 1025, &mut v),
            -2000,
            "limit 1025",
        );
        refused(
            smem_shm_atomic_alloc_value(shm, 4, null_mut()),
            -2000,
            "value is NULL",
        );
        assert_eq!(
            smem_shm_atomic_alloc_value(shm, SMEM_SHM_ATOMIC_NUM_LIMIT, &mut v),
            0
        );
        assert_eq!(v, 2);

        // Exit.
        refused(
            smem_shm_register_exit(shm, None),
            -2000,
            "exit function is NULL",
        );
        assert_eq!(smem_shm_register_exit(shm, Some(record_exit)), 0);
        refused(
            smem_shm_register_exit(shm, Some(record_exit)),
            -2005,
            "registered on this object",
        );
        smem_shm_global_exit(shm, 42);
        assert_eq!(last_err(), "");
        assert_eq!(
            EXIT_STATUS.load(Ordering::SeqCst),
            42,
            "ran before returning"
        );
        assert!(EXIT_ON_LIBRARY_THREAD.load(Ordering::SeqCst));
        smem_shm_global_exit(MADE_UP, 1);
        said("not a live");
        smem_shm_global_exit(null_mut(), 1);
        said("NULL");

        // Destruction; the id can be created again.
        assert_eq!(smem_shm_destroy(shm, 0), 0);
        refused(smem_shm_destroy(shm, 0), -2000, "not a live");
        assert_eq!(smem_shm_get_global_rank_size(shm), u32::MAX);
        refused(smem_shm_control_barrier(shm), -2000, "not a live");
        let again = create(0, 1, 0, SIZE, SMEMS_DATA_OP_SDMA, &mut gva);
        assert!(!again.is_null(), "{}", last_err());
        // A new object: every value is free again.
        assert_eq!(smem_shm_atomic_alloc_value(again, 1, &mut v), 0);
        assert_eq!(v, 0);

        // uninit destroys what is left; afterwards every call finds Share Memory gone.
        smem_shm_uninit(0);
        refused(smem_shm_control_barrier(again), -2008, "smem_shm_init");
        assert_eq!(smem_shm_get_global_rank(again), u32::MAX);
        said("not initialized");
    }
}

static OWN_HANDLE: AtomicUsize = AtomicUsize::new(0);
static DESTROYED_FROM_EXIT: AtomicI32 = AtomicI32::new(i32::MIN);

extern "C" fn destroy_own_object(_status: c_int) {
    let handle = OWN_HANDLE.load(Ordering::SeqCst) as SmemShm;
    DESTROYED_FROM_EXIT.store(smem_shm_destroy(handle, 0), Ordering::SeqCst);
}

/// One rank of a new store, and an object of it.
fn one_rank_object() -> SmemShm {
    let url = CString::new(format!("tcp://127.0.0.1:{}", free_port())).unwrap();
    let cfg = config();
    let mut gva: *mut c_void = null_mut();
    // SAFETY: a NUL-terminated URL, a config, and a writable address.
    unsafe {
        assert_eq!(
            smem_shm_init(url.as_ptr(), 1, 0, 0, &cfg),
            0,
            "{}",
            last_err()
        );
        let shm = smem_shm_create(0, 1, 0, SIZE, SMEMS_DATA_OP_MTE, 0, &mut gva);
        assert!(!shm.is_null(), "{}", last_err());
        shm
    }
}

#[test]
fn an_exit_function_may_destroy_its_object() {
    let _turn = serial();
    let shm = one_rank_object();
    OWN_HANDLE.store(shm as usize, Ordering::SeqCst);
    assert_eq!(smem_shm_register_exit(shm, Some(destroy_own_object)), 0);
    // Returns once the function (and so the destroy in it) has returned.
    smem_shm_global_exit(shm, 7);
    assert_eq!(
        DESTROYED_FROM_EXIT.load(Ordering::SeqCst),
        0,
        "{}",
        last_err()
    );
    assert_eq!(smem_shm_get_global_rank_size(shm), u32::MAX);
    said("not a live");
    smem_shm_uninit(0);
}

static SLOW_EXIT_STARTED: AtomicBool = AtomicBool::new(false);
static SLOW_EXIT_FINISHED: AtomicBool = AtomicBool::new(false);

extern "C" fn slow_exit(_status: c_int) {
    SLOW_EXIT_STARTED.store(true, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(300));
    SLOW_EXIT_FINISHED.store(true, Ordering::SeqCst);
}

#[test]
fn destroy_waits_for_an_exit_function_that_is_running() {
    let _turn = serial();
    let shm = one_rank_object();
    assert_eq!(smem_shm_register_exit(shm, Some(slow_exit)), 0);
    let handle = shm as usize;
    let exit = std::thread::spawn(move || smem_shm_global_exit(handle as SmemShm, 9));
    while !SLOW_EXIT_STARTED.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(smem_shm_destroy(shm, 0), 0, "{}", last_err());
    // The header: the function is not called after the object is destroyed here; the one
    // that was running has returned.
    assert!(SLOW_EXIT_FINISHED.load(Ordering::SeqCst));
    exit.join().unwrap();
    smem_shm_uninit(0);
}
