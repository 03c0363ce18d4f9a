//! Big Memory through the C API (`smem_bm.h`), called as C calls it, in one process: every
//! call, the bytes it moves, and every refusal with its code and message.
//!
//! Big Memory has one runtime per process, so the tests take turns (`serial`).

use std::ffi::{c_char, c_void, CString};
use std::mem::{offset_of, size_of, MaybeUninit};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU32, Ordering};

mod common;
use common::{free_port, last_err, ok, refused, serial};

use mf_smem::bm::*;
use mf_smem::common::*;

const INVALID_PARAM: i32 = -2000;
const REPEAT_INVOKE: i32 = -2005;
const NOT_INIT: i32 = -2008;
const NOT_CONNECTED: i32 = -2014;
const OUT_OF_BOUNDS: i32 = -3002;
const UNSUPPORTED: i32 = -3006;

const SDMA: u32 = 1;
const COPY_G2H: u32 = 2;
const COPY_H2G: u32 = 3;
const COPY_AUTO: u32 = 9;
const PART: usize = 2 << 20;

fn default_config() -> SmemBmConfig {
    let mut c = MaybeUninit::<SmemBmConfig>::uninit();
    // SAFETY: a writable config.
    ok(unsafe { smem_bm_config_init(c.as_mut_ptr()) });
    // SAFETY: smem_bm_config_init writes every field.
    unsafe { c.assume_init() }
}

fn no_device() -> bool {
    memfabric::device::select().is_err()
}

fn fixed<const N: usize>(s: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (o, b) in out.iter_mut().zip(s.bytes()) {
        *o = b as c_char;
    }
    out
}

fn option(dram: u64) -> SmemBmCreateOption {
    SmemBmCreateOption {
        max_dram_size: dram,
        max_hbm_size: 0,
        local_dram_size: dram,
        local_hbm_size: 0,
        data_op_type: SDMA,
        enable_56bits_gva: false,
        flags: 0,
        tag: fixed("tag_1"),
        tag_op_info: [0; 256],
        dram_shm_fd: -1,
    }
}

#[test]
fn layouts_are_those_of_the_header() {
    // The numbers of upstream 1.3's smem_bm_def.h on x86_64 and aarch64 Linux.
    assert_eq!(size_of::<SmemTlsConfig>(), 1793);
    assert_eq!(size_of::<SmemBmConfig>(), 3680);
    assert_eq!(offset_of!(SmemBmConfig, auto_ranking), 16);
    assert_eq!(offset_of!(SmemBmConfig, rank_id), 20);
    assert_eq!(offset_of!(SmemBmConfig, flags), 24);
    assert_eq!(offset_of!(SmemBmConfig, hcom_url), 28);
    assert_eq!(offset_of!(SmemBmConfig, hcom_tls_config), 92);
    assert_eq!(offset_of!(SmemBmConfig, store_tls_config), 1885);
    assert_eq!(size_of::<SmemBmCreateOption>(), 336);
    assert_eq!(offset_of!(SmemBmCreateOption, data_op_type), 32);
    assert_eq!(offset_of!(SmemBmCreateOption, enable_56bits_gva), 36);
    assert_eq!(offset_of!(SmemBmCreateOption, flags), 40);
    assert_eq!(offset_of!(SmemBmCreateOption, tag), 44);
    assert_eq!(offset_of!(SmemBmCreateOption, tag_op_info), 76);
    assert_eq!(offset_of!(SmemBmCreateOption, dram_shm_fd), 332);
    assert_eq!(size_of::<SmemCopyParams>(), 32);
    assert_eq!(offset_of!(SmemCopyParams, stream), 24);
    assert_eq!(size_of::<SmemBatchCopyParams>(), 40);
    assert_eq!(offset_of!(SmemBatchCopyParams, batch_size), 24);
    assert_eq!(offset_of!(SmemBatchCopyParams, stream), 32);
    assert_eq!(size_of::<SmemBatchCopyResult>(), 16);
}

#[test]
fn config_init_writes_every_field_with_the_defaults() {
    let _turn = serial();
    // SAFETY: NULL is refused, not written.
    refused(
        unsafe { smem_bm_config_init(null_mut()) },
        INVALID_PARAM,
        "config is NULL",
    );
    let mut c = MaybeUninit::<SmemBmConfig>::uninit();
    // SAFETY: garbage in every byte first, as an uninitialized C struct may hold; only bytes
    // are written, no field is read before smem_bm_config_init.
    unsafe {
        c.as_mut_ptr()
            .cast::<u8>()
            .write_bytes(0xA5, size_of::<SmemBmConfig>())
    };
    // SAFETY: a writable config.
    ok(unsafe { smem_bm_config_init(c.as_mut_ptr()) });
    // SAFETY: written whole by smem_bm_config_init.
    let c = unsafe { c.assume_init() };
    assert_eq!(
        (
            c.init_timeout,
            c.create_timeout,
            c.control_operation_timeout
        ),
        (120, 120, 120)
    );
    assert!(c.start_config_store_server && c.unified_address_space && c.auto_ranking);
    assert!(!c.start_config_store_only && !c.dynamic_world_size);
    assert_eq!((c.rank_id, c.flags), (65535, 0));
    assert!(c.hcom_url.iter().all(|b| *b == 0));
    for tls in [&c.hcom_tls_config, &c.store_tls_config] {
        assert!(!tls.tls_enable);
        for path in [
            &tls.ca_path,
            &tls.crl_path,
            &tls.cert_path,
            &tls.key_path,
            &tls.key_pass_path,
            &tls.package_path,
            &tls.decrypter_lib_path,
        ] {
            assert!(path.iter().all(|b| *b == 0));
        }
    }
}

#[test]
fn every_call_before_init_and_every_bad_config_is_refused() {
    let _turn = serial();
    assert_eq!(smem_bm_get_rank_id(), u32::MAX);
    assert!(smem_bm_create(0, 1, SDMA, 2 << 20, 0, 0).is_null());
    assert!(last_err().contains("smem_bm_init"));
    let opt = option(2 << 20);
    // SAFETY (all calls below): null, NUL-terminated strings, or structs as the contracts ask.
    unsafe {
        assert!(smem_bm_create2(0, &opt).is_null());
        assert!(last_err().contains("smem_bm_init"));
        let url = CString::new("tcp://127.0.0.1:1").unwrap();
        refused(
            smem_bm_update_store_url(url.as_ptr()),
            NOT_INIT,
            "smem_bm_init",
        );
        let ip = CString::new("127.0.0.1").unwrap();
        refused(
            smem_bm_update_store_server(ip.as_ptr(), 1),
            NOT_INIT,
            "smem_bm_init",
        );

        let mut cfg = default_config();
        refused(
            smem_bm_init(null(), 1, 0, &cfg),
            INVALID_PARAM,
            "storeURL is NULL",
        );
        refused(
            smem_bm_init(url.as_ptr(), 1, 0, null()),
            INVALID_PARAM,
            "config is NULL",
        );
        refused(
            smem_bm_init(url.as_ptr(), 0, 0, &cfg),
            INVALID_PARAM,
            "world_size 0",
        );
        refused(
            smem_bm_init(url.as_ptr(), 1025, 0, &cfg),
            INVALID_PARAM,
            "world_size 1025",
        );
        cfg.init_timeout = 0;
        refused(
            smem_bm_init(url.as_ptr(), 1, 0, &cfg),
            INVALID_PARAM,
            "init_timeout",
        );
        cfg = default_config();
        cfg.auto_ranking = false;
        cfg.rank_id = 3;
        refused(
            smem_bm_init(url.as_ptr(), 2, 0, &cfg),
            INVALID_PARAM,
            "rank_id 3",
        );
        cfg = default_config();
        cfg.unified_address_space = false;
        refused(
            smem_bm_init(url.as_ptr(), 1, 0, &cfg),
            INVALID_PARAM,
            "unifiedAddressSpace",
        );
        cfg = default_config();
        cfg.hcom_url = [b'x' as c_char; 64];
        refused(
            smem_bm_init(url.as_ptr(), 1, 0, &cfg),
            INVALID_PARAM,
            "config.hcomUrl",
        );
        cfg = default_config();
        cfg.store_tls_config.tls_enable = true;
        refused(
            smem_bm_init(url.as_ptr(), 1, 0, &cfg),
            UNSUPPORTED,
            "smem_set_conf_store_tls",
        );
        cfg = default_config();
        cfg.hcom_tls_config.tls_enable = true;
        refused(
            smem_bm_init(url.as_ptr(), 1, 0, &cfg),
            UNSUPPORTED,
            "hcomTlsConfig",
        );
    }
    assert_eq!(smem_bm_get_rank_id(), u32::MAX, "nothing was initialized");
}

#[test]
fn leader_calls_say_there_is_no_leader_after_checking_their_arguments() {
    let _turn = serial();
    let mut ip = [b'x' as c_char; 64];
    let mut port: u16 = 77;
    let url = CString::new("tcp://127.0.0.1:8570").unwrap();
    // SAFETY (all calls below): buffers of the sizes given, or null where refused.
    unsafe {
        refused(
            smem_bm_get_bindable_leader_address(null_mut(), 64, &mut port),
            INVALID_PARAM,
            "ip is NULL",
        );
        refused(
            smem_bm_get_bindable_leader_address(ip.as_mut_ptr(), 0, &mut port),
            INVALID_PARAM,
            "ipLen is 0",
        );
        refused(
            smem_bm_get_bindable_leader_address(ip.as_mut_ptr(), 64, null_mut()),
            INVALID_PARAM,
            "port is NULL",
        );
        refused(
            smem_bm_get_bindable_leader_address(ip.as_mut_ptr(), 64, &mut port),
            UNSUPPORTED,
            "without leader election",
        );
        assert_eq!((ip[0], port), (0, 0), "outputs are cleared");

        let by_url = |u: *const c_char, world: u32, ip: *mut c_char, port: *mut u16| {
            smem_bm_get_bindable_leader_address_by_store_url(u, null(), world, ip, 64, port)
        };
        refused(
            by_url(null(), 256, ip.as_mut_ptr(), &mut port),
            INVALID_PARAM,
            "storeUrl is NULL",
        );
        let empty = CString::new("").unwrap();
        refused(
            by_url(empty.as_ptr(), 256, ip.as_mut_ptr(), &mut port),
            INVALID_PARAM,
            "storeUrl is empty",
        );
        refused(
            by_url(url.as_ptr(), 0, ip.as_mut_ptr(), &mut port),
            INVALID_PARAM,
            "worldSize 0",
        );
        refused(
            by_url(url.as_ptr(), 1025, ip.as_mut_ptr(), &mut port),
            INVALID_PARAM,
            "worldSize 1025",
        );
        refused(
            by_url(url.as_ptr(), 256, null_mut(), &mut port),
            INVALID_PARAM,
            "ip is NULL",
        );
        port = 9;
        refused(
            by_url(url.as_ptr(), 256, ip.as_mut_ptr(), &mut port),
            UNSUPPORTED,
            "no leader",
        );
        assert_eq!(port, 0);
    }
    smem_bm_release_leader_address_store();
    assert_eq!(last_err(), "", "releasing nothing is not an error");

    unsafe extern "C" fn on_change(_user_data: *mut c_void) {}
    refused(
        smem_bm_register_leader_change_callback(Some(on_change), null_mut()),
        UNSUPPORTED,
        "leader never changes",
    );
    ok(smem_bm_register_leader_change_callback(None, null_mut()));
}

/// Every call of a one-rank world: bytes moved and checked, refusals with code and message.
#[test]
fn one_rank_world_every_call() {
    let _turn = serial();
    let port = free_port();
    let url = CString::new(format!("tcp://127.0.0.1:{port}")).unwrap();
    let mut cfg = default_config();
    cfg.init_timeout = 2;
    // SAFETY: a NUL-terminated URL and a config.
    ok(unsafe { smem_bm_init(url.as_ptr(), 1, 0, &cfg) });
    // SAFETY: as above.
    refused(
        unsafe { smem_bm_init(url.as_ptr(), 1, 0, &cfg) },
        REPEAT_INVOKE,
        "already initialized",
    );
    assert_eq!(smem_bm_get_rank_id(), 0, "autoRanking assigned rank 0");

    assert!(smem_bm_create(0, 2, SDMA, PART as u64, 0, 0).is_null());
    assert!(last_err().contains("memberSize 2"));
    assert!(smem_bm_create(0, 1, 0, PART as u64, 0, 0).is_null());
    assert!(last_err().contains("dataOpType 0"));
    assert!(smem_bm_create(64, 1, SDMA, PART as u64, 0, 0).is_null());
    assert!(last_err().contains("object id 64"));
    assert!(smem_bm_create(0, 1, SDMA, 0, 0, 0).is_null());
    assert!(last_err().contains("nothing to contribute"));
    if no_device() {
        assert!(smem_bm_create(0, 1, SDMA, 0, 1 << 20, 0).is_null());
        assert!(last_err().contains("no device memory here"));
    }
    let bm = smem_bm_create(0, 1, SDMA, PART as u64, 0, 0);
    assert!(!bm.is_null(), "{}", last_err());
    assert!(smem_bm_create(0, 1, SDMA, PART as u64, 0, 0).is_null());
    assert!(last_err().contains("already exists"));
    ok(smem_bm_join(bm, 0));
    refused(
        smem_bm_join(0x77 as *mut c_void, 0),
        INVALID_PARAM,
        "not a live Big Memory handle",
    );

    sizes_and_addresses(bm);
    copies(bm);
    batches(bm);
    create2(bm);
    extend_and_events(bm);
    store_moves(port);

    ok(smem_bm_wait(bm));
    ok(smem_bm_leave(bm, 0));
    smem_bm_destroy(bm);
    assert_eq!(last_err(), "");
    let params = SmemCopyParams {
        src: [0u8; 8].as_ptr().cast(),
        dest: 0x1000 as *mut c_void,
        data_size: 8,
        stream: null_mut(),
    };
    // SAFETY: a valid params struct; the handle is refused first.
    refused(
        unsafe { smem_bm_copy(bm, &params, COPY_H2G, 0) },
        INVALID_PARAM,
        "not a live Big Memory handle",
    );
    smem_bm_destroy(bm);
    assert!(last_err().contains("not a live Big Memory handle"));
    smem_bm_uninit(0);
    assert_eq!(smem_bm_get_rank_id(), u32::MAX);
}

fn sizes_and_addresses(bm: SmemBm) {
    assert_eq!(
        smem_bm_get_local_mem_size_by_mem_type(bm, SMEM_MEM_TYPE_HOST),
        PART as u64
    );
    assert_eq!(
        smem_bm_get_local_mem_size_by_mem_type(bm, SMEM_MEM_TYPE_DEVICE),
        0
    );
    assert_eq!(last_err(), "", "no HBM part is a size of 0, not an error");
    assert_eq!(
        smem_bm_get_local_mem_size_by_mem_type(bm, SMEM_MEM_TYPE_LOCAL_HOST),
        0
    );
    assert!(last_err().contains("memory of this process"));
    assert_eq!(smem_bm_get_local_mem_size_by_mem_type(bm, 9), 0);
    assert!(last_err().contains("memType 9 is not a smem_bm_mem_type"));
    assert_eq!(
        smem_bm_get_local_mem_size_by_mem_type(null_mut(), SMEM_MEM_TYPE_HOST),
        0
    );
    assert!(last_err().contains("handle is NULL"));

    let gva = smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, 0);
    assert!(!gva.is_null(), "{}", last_err());
    assert!(smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, 1).is_null());
    assert!(last_err().contains("1"));
    assert!(smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_DEVICE, 0).is_null());
    assert!(last_err().contains("no HBM part"));
    assert!(smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_LOCAL_DEVICE, 0).is_null());
    assert!(last_err().contains("memory of this process"));

    let inside = gva.cast::<u8>().wrapping_add(100).cast::<c_void>();
    assert_eq!(smem_bm_get_rank_id_by_gva(bm, inside), 0);
    assert_eq!(
        smem_bm_get_rank_id_by_gva(bm, 0x1000 as *mut c_void),
        u32::MAX
    );
    assert!(!last_err().is_empty());

    let mut va: *mut c_void = null_mut();
    // SAFETY (gva_to_va calls): `va` is writable, or null where refused.
    unsafe {
        ok(smem_bm_gva_to_va(
            bm,
            inside,
            SMEM_MEM_TYPE_LOCAL_HOST,
            &mut va,
        ));
        assert_eq!(va, inside, "a DRAM part of this host is mapped at its GVA");
        refused(
            smem_bm_gva_to_va(bm, inside, SMEM_MEM_TYPE_LOCAL_DEVICE, &mut va),
            INVALID_PARAM,
            "DRAM part",
        );
        refused(
            smem_bm_gva_to_va(bm, inside, SMEM_MEM_TYPE_HOST, &mut va),
            INVALID_PARAM,
            "LOCAL_HOST (1)",
        );
        refused(
            smem_bm_gva_to_va(bm, inside, 7, &mut va),
            INVALID_PARAM,
            "vaMemType 7",
        );
        refused(
            smem_bm_gva_to_va(bm, null_mut(), SMEM_MEM_TYPE_LOCAL_HOST, &mut va),
            INVALID_PARAM,
            "gva is NULL",
        );
        refused(
            smem_bm_gva_to_va(bm, inside, SMEM_MEM_TYPE_LOCAL_HOST, null_mut()),
            INVALID_PARAM,
            "va is NULL",
        );
        let outside = 0x1000 as *mut c_void;
        assert_ne!(
            smem_bm_gva_to_va(bm, outside, SMEM_MEM_TYPE_LOCAL_HOST, &mut va),
            0
        );
        assert!(!last_err().is_empty());
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn copies(bm: SmemBm) {
    let gva = smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, 0);
    let src: Vec<u8> = (0..PART).map(pattern).collect();
    let mut back = vec![0u8; PART];
    let mut params = SmemCopyParams {
        src: src.as_ptr().cast(),
        dest: gva,
        data_size: PART,
        stream: null_mut(),
    };
    // SAFETY (all copies below): params of buffers of at least data_size bytes, or refused.
    unsafe {
        ok(smem_bm_copy(bm, &params, COPY_H2G, 0));
        params = SmemCopyParams {
            src: gva,
            dest: back.as_mut_ptr().cast(),
            data_size: PART,
            stream: null_mut(),
        };
        ok(smem_bm_copy(bm, &params, COPY_G2H, 0));
        assert!(back == src, "the bytes came back");

        // Without SMEM_BM_FLAG_USE_EXTERNAL_STREAM the stream field is not followed.
        back.fill(0);
        params.stream = 0x1000 as *mut c_void;
        ok(smem_bm_copy(bm, &params, COPY_AUTO, 0));
        assert!(back == src);
        if no_device() {
            refused(
                smem_bm_copy(bm, &params, COPY_G2H, SMEM_BM_FLAG_USE_EXTERNAL_STREAM),
                UNSUPPORTED,
                "SMEM_BM_FLAG_USE_EXTERNAL_STREAM",
            );
        }
        params.stream = null_mut();
        ok(smem_bm_copy(
            bm,
            &params,
            COPY_G2H,
            SMEM_BM_FLAG_USE_EXTERNAL_STREAM,
        ));

        refused(
            smem_bm_copy(bm, null(), COPY_G2H, 0),
            INVALID_PARAM,
            "params is NULL",
        );
        refused(
            smem_bm_copy(bm, &params, 42, 0),
            INVALID_PARAM,
            "copy type 42",
        );
        refused(
            smem_bm_copy(bm, &params, u32::MAX, 0),
            INVALID_PARAM,
            "copy type",
        );
        let mut bad = params;
        bad.src = null();
        refused(
            smem_bm_copy(bm, &bad, COPY_G2H, 0),
            INVALID_PARAM,
            "params->src is NULL",
        );
        bad = params;
        bad.dest = null_mut();
        refused(
            smem_bm_copy(bm, &bad, COPY_G2H, 0),
            INVALID_PARAM,
            "params->dest is NULL",
        );
        bad = params;
        bad.data_size = 0;
        refused(smem_bm_copy(bm, &bad, COPY_G2H, 0), INVALID_PARAM, "size 0");
        bad = params;
        bad.src = gva.cast::<u8>().wrapping_add(PART - 8).cast();
        bad.data_size = 16;
        refused(smem_bm_copy(bm, &bad, COPY_G2H, 0), OUT_OF_BOUNDS, "");
        bad = params;
        bad.data_size = usize::MAX;
        assert_ne!(
            smem_bm_copy(bm, &bad, COPY_G2H, 0),
            0,
            "an absurd size is refused"
        );
        assert!(!last_err().is_empty());
        bad = params;
        bad.dest = 0x1000 as *mut c_void;
        assert_ne!(
            smem_bm_copy(bm, &bad, COPY_G2H, 0),
            0,
            "a bad local address is an error"
        );
        assert!(!last_err().is_empty());
        refused(
            smem_bm_copy(null_mut(), &params, COPY_G2H, 0),
            INVALID_PARAM,
            "handle is NULL",
        );
    }

    let registered = back.as_mut_ptr() as u64;
    ok(smem_bm_register_user_mem(bm, registered, PART as u64));
    refused(
        smem_bm_register_user_mem(bm, 0, 8),
        INVALID_PARAM,
        "addr is 0",
    );
    ok(smem_bm_unregister_user_mem(bm, registered));
    refused(
        smem_bm_unregister_user_mem(bm, 0),
        INVALID_PARAM,
        "addr is 0",
    );
}

fn batches(bm: SmemBm) {
    const BLOCKS: usize = 8;
    let block = PART / BLOCKS;
    let gva = smem_bm_ptr_by_mem_type(bm, SMEM_MEM_TYPE_HOST, 0).cast::<u8>();
    let mut src: Vec<u8> = (0..PART).map(|i| pattern(i + 7)).collect();
    let mut sources: Vec<*mut c_void> = (0..BLOCKS)
        .map(|b| src.as_mut_ptr().wrapping_add(b * block).cast())
        .collect();
    let mut destinations: Vec<*mut c_void> = (0..BLOCKS)
        .map(|b| gva.wrapping_add((BLOCKS - 1 - b) * block).cast())
        .collect();
    let sizes = [block as u64; BLOCKS];
    let params = SmemBatchCopyParams {
        sources: sources.as_mut_ptr(),
        destinations: destinations.as_mut_ptr(),
        data_sizes: sizes.as_ptr(),
        batch_size: BLOCKS as u32,
        stream: null_mut(),
    };
    // SAFETY (all batches below): arrays of batch_size entries, or refused before reading.
    unsafe {
        ok(smem_bm_copy_batch(bm, &params, COPY_H2G, 0));
        for b in 0..BLOCKS {
            let got = std::slice::from_raw_parts(gva.add((BLOCKS - 1 - b) * block), block);
            assert!(
                got == &src[b * block..(b + 1) * block],
                "block {b} where addressed"
            );
        }
        refused(
            smem_bm_copy_batch(bm, null(), COPY_H2G, 0),
            INVALID_PARAM,
            "params is NULL",
        );
        let mut bad = params;
        bad.sources = null_mut();
        refused(
            smem_bm_copy_batch(bm, &bad, COPY_H2G, 0),
            INVALID_PARAM,
            "params->sources is NULL",
        );
        bad = params;
        bad.data_sizes = null();
        refused(
            smem_bm_copy_batch(bm, &bad, COPY_H2G, 0),
            INVALID_PARAM,
            "params->dataSizes is NULL",
        );
        bad = params;
        bad.batch_size = 0;
        refused(
            smem_bm_copy_batch(bm, &bad, COPY_H2G, 0),
            INVALID_PARAM,
            "batch size is 0",
        );
        bad = params;
        bad.batch_size = u32::MAX;
        refused(
            smem_bm_copy_batch(bm, &bad, COPY_H2G, 0),
            INVALID_PARAM,
            "batch size",
        );
        refused(
            smem_bm_copy_batch(bm, &params, 10, 0),
            INVALID_PARAM,
            "copy type 10",
        );
        let saved = sources[3];
        sources[3] = null_mut();
        refused(
            smem_bm_copy_batch(bm, &params, COPY_H2G, 0),
            INVALID_PARAM,
            "params->sources[3] is NULL",
        );
        sources[3] = saved;
        let saved = destinations[5];
        destinations[5] = gva.wrapping_add(PART - 8).cast();
        refused(
            smem_bm_copy_batch(bm, &params, COPY_H2G, 0),
            OUT_OF_BOUNDS,
            "copy 5",
        );
        destinations[5] = saved;
        if no_device() {
            let mut on_stream = params;
            on_stream.stream = 0x1000 as *mut c_void;
            refused(
                smem_bm_copy_batch(bm, &on_stream, COPY_H2G, SMEM_BM_FLAG_USE_EXTERNAL_STREAM),
                UNSUPPORTED,
                "stream",
            );
        }
    }
}

fn create2(first: SmemBm) {
    let first_gva = smem_bm_ptr_by_mem_type(first, SMEM_MEM_TYPE_HOST, 0);
    let good = option(PART as u64);
    // SAFETY (all creates below): options valid for the call, or NULL where refused.
    unsafe {
        assert!(smem_bm_create2(1, null()).is_null());
        assert!(last_err().contains("option is NULL"));
        let mut o = good;
        o.max_dram_size = PART as u64 / 2;
        assert!(smem_bm_create2(1, &o).is_null());
        assert!(last_err().contains("option.maxDramSize 1048576 is below option.localDRAMSize"));
        o = good;
        o.max_dram_size = 2 * PART as u64;
        assert!(smem_bm_create2(1, &o).is_null());
        let e = last_err();
        assert!(
            e.contains("smem_bm_extend_local_mem") && e.contains("unsupported"),
            "{e}"
        );
        o = good;
        o.flags = SMEM_BM_FLAG_CREATE_WITH_SHM;
        assert!(smem_bm_create2(1, &o).is_null());
        assert!(last_err().contains("needs dramShmFd >= 0"));
        o.dram_shm_fd = 0;
        assert!(smem_bm_create2(1, &o).is_null());
        assert!(last_err().contains("cannot be brought in this version"));
        o = good;
        o.tag = [b't' as c_char; 32];
        assert!(smem_bm_create2(1, &o).is_null());
        assert!(last_err().contains("option.tag is not NUL-terminated within its 32 bytes"));
        o = good;
        o.tag_op_info = [b't' as c_char; 256];
        assert!(smem_bm_create2(1, &o).is_null());
        assert!(last_err().contains("option.tagOpInfo"));
        o = good;
        o.data_op_type = 256;
        assert!(smem_bm_create2(1, &o).is_null());
        assert!(last_err().contains("dataOpType 256"));

        // dramShmFd is read only with SMEM_BM_FLAG_CREATE_WITH_SHM, as in 1.3.
        o = good;
        o.dram_shm_fd = 0;
        o.max_dram_size = 0;
        o.tag_op_info = fixed("tag_1:DEVICE_SDMA:tag_1");
        let second = smem_bm_create2(1, &o);
        assert!(!second.is_null(), "{}", last_err());
        assert_eq!(
            smem_bm_get_local_mem_size_by_mem_type(second, SMEM_MEM_TYPE_HOST),
            PART as u64
        );
        let gva = smem_bm_ptr_by_mem_type(second, SMEM_MEM_TYPE_HOST, 0);
        assert!(!gva.is_null() && gva != first_gva);
        assert_eq!(
            smem_bm_get_rank_id_by_gva(first, gva),
            u32::MAX,
            "objects do not overlap"
        );
        last_err();
        smem_bm_destroy(second);
        assert_eq!(last_err(), "");
    }
}

fn extend_and_events(bm: SmemBm) {
    refused(
        smem_bm_extend_local_mem(null_mut(), SMEM_MEM_TYPE_HOST, 4096),
        INVALID_PARAM,
        "handle is NULL",
    );
    refused(
        smem_bm_extend_local_mem(bm, SMEM_MEM_TYPE_LOCAL_HOST, 4096),
        INVALID_PARAM,
        "memory of this process",
    );
    refused(
        smem_bm_extend_local_mem(bm, 4, 4096),
        INVALID_PARAM,
        "memType 4",
    );
    refused(
        smem_bm_extend_local_mem(bm, SMEM_MEM_TYPE_HOST, 0),
        INVALID_PARAM,
        "size 0",
    );
    refused(
        smem_bm_extend_local_mem(bm, SMEM_MEM_TYPE_HOST, 4096),
        UNSUPPORTED,
        "fixed at create",
    );
    assert_eq!(
        smem_bm_get_local_mem_size_by_mem_type(bm, SMEM_MEM_TYPE_HOST),
        PART as u64
    );

    unsafe extern "C" fn on_event(_: SmemBm, _: u32, _: u32, _: *mut c_void) {}
    // SAFETY: a function of the documented signature; the context is never followed.
    unsafe {
        refused(
            smem_bm_set_group_event_handler(bm, Some(on_event), null_mut()),
            UNSUPPORTED,
            "dynamic_world_size",
        );
        refused(
            smem_bm_set_group_event_handler(0x77 as *mut c_void, Some(on_event), null_mut()),
            INVALID_PARAM,
            "not a live Big Memory handle",
        );
    }
}

fn store_moves(port: u16) {
    let ip = CString::new("127.0.0.1").unwrap();
    let bracketed = CString::new("[127.0.0.1]").unwrap();
    let not_ip = CString::new("store.example").unwrap();
    let nowhere = CString::new("tcp://127.0.0.1:1").unwrap();
    let malformed = CString::new("127.0.0.1:1").unwrap();
    // SAFETY (all calls below): NUL-terminated strings, or NULL where refused.
    unsafe {
        ok(smem_bm_update_store_server(ip.as_ptr(), port));
        refused(
            smem_bm_update_store_server(null(), port),
            INVALID_PARAM,
            "ip is NULL",
        );
        refused(
            smem_bm_update_store_server(not_ip.as_ptr(), port),
            INVALID_PARAM,
            "not an IP address",
        );
        refused(
            smem_bm_update_store_server(bracketed.as_ptr(), port),
            INVALID_PARAM,
            "not an IP address",
        );
        refused(
            smem_bm_update_store_server(ip.as_ptr(), 0),
            INVALID_PARAM,
            "port 0",
        );
        refused(
            smem_bm_update_store_url(malformed.as_ptr()),
            INVALID_PARAM,
            "tcp://",
        );
        refused(
            smem_bm_update_store_url(null()),
            INVALID_PARAM,
            "storeURL is NULL",
        );
        // IPv6 goes in brackets; nobody serves it here, so nothing moves.
        let v6 = CString::new("::1").unwrap();
        let rc = smem_bm_update_store_server(v6.as_ptr(), port);
        refused(rc, NOT_CONNECTED, &format!("[::1]:{port}"));
        // Nobody serves port 1: after initTimeout (2 s) nothing has moved.
        let rc = smem_bm_update_store_url(nowhere.as_ptr());
        refused(rc, NOT_CONNECTED, "");
        ok(smem_bm_update_store_server(ip.as_ptr(), port));
    }
}

#[test]
fn dynamic_world_takes_a_group_event_handler() {
    let _turn = serial();
    let url = CString::new(format!("tcp://127.0.0.1:{}", free_port())).unwrap();
    let mut cfg = default_config();
    cfg.dynamic_world_size = true;
    cfg.init_timeout = 5;
    // SAFETY: a NUL-terminated URL and a config.
    ok(unsafe { smem_bm_init(url.as_ptr(), 4, 0, &cfg) });
    let bm = smem_bm_create(2, 4, SDMA, PART as u64, 0, 0);
    assert!(!bm.is_null(), "{}", last_err());

    static EVENTS: AtomicU32 = AtomicU32::new(0);
    unsafe extern "C" fn on_event(_: SmemBm, _: u32, _: u32, context: *mut c_void) {
        // SAFETY: the context registered below is EVENTS.
        unsafe { &*context.cast::<AtomicU32>() }.fetch_add(1, Ordering::SeqCst);
    }
    // SAFETY: a function of the documented signature; the context is never followed.
    unsafe {
        ok(smem_bm_set_group_event_handler(
            bm,
            Some(on_event),
            std::ptr::from_ref(&EVENTS).cast_mut().cast(),
        ));
        ok(smem_bm_set_group_event_handler(bm, None, null_mut()));
    }
    refused(smem_bm_wait(bm), UNSUPPORTED, "dynamic_world_size");
    smem_bm_destroy(bm);
    smem_bm_uninit(0);
    assert_eq!(smem_bm_get_rank_id(), u32::MAX);
}
