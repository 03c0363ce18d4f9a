//! The C API called as C calls it (through the exported functions), in one process: two
//! transfer objects on one store, bytes verified, and every kind of bad input refused with a
//! code and a message.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};

mod common;
use common::{free_port, last_err};

use mf_smem::common::*;
use mf_smem::trans::*;

const SIZE: usize = 4 << 20;

fn config(role: u32) -> SmemTransConfig {
    let mut c = std::mem::MaybeUninit::<SmemTransConfig>::uninit();
    // SAFETY: a writable config.
    assert_eq!(unsafe { smem_trans_config_init(c.as_mut_ptr()) }, 0);
    // SAFETY: initialized by smem_trans_config_init.
    let mut c = unsafe { c.assume_init() };
    assert_eq!(c.role, SMEM_TRANS_NONE);
    c.role = role;
    c
}

/// The macros of smem.h that are not error codes.
const NOT_CODES: [&str; 4] = [
    "SMEM_WORLD_SIZE_MAX",
    "SMEM_INVALID_DEV_ID",
    "SMEM_STORE_SKIP_RECOVER",
    "SMEM_BM_FLAG_USE_EXTERNAL_STREAM",
];

#[test]
fn header_codes_match_the_library() {
    let header = include_str!("../../../memfabric_hybrid/include/smem/host/smem.h");
    let mut found = 0;
    for (code, name) in memfabric::error::CODES {
        let line = header
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} is not defined in smem.h"));
        let value: i32 = line
            .trim_start_matches(&format!("#define {name} "))
            .trim_matches(|c| c == '(' || c == ')')
            .parse()
            .unwrap();
        assert_eq!(value, *code, "{name}");
        found += 1;
    }
    assert_eq!(
        found,
        header
            .lines()
            .filter(|l| l.starts_with("#define SMEM_") || l.starts_with("#define MF_"))
            .filter(|l| !NOT_CODES
                .iter()
                .any(|n| l.starts_with(&format!("#define {n} "))))
            .count(),
        "smem.h defines a code the library does not have"
    );
}

#[test]
fn two_engines_move_verified_bytes_and_refuse_bad_input() {
    let url = CString::new(format!("tcp://127.0.0.1:{}", free_port())).unwrap();
    assert_eq!(smem_init(0), 0);
    assert_eq!(smem_init(1), -2000);
    assert!(last_err().contains("reserved"));
    // SAFETY (all calls below): pointers are null, NUL-terminated strings, or buffers and
    // arrays of the sizes passed, as the functions' contracts ask.
    unsafe {
        assert_eq!(smem_create_config_store(url.as_ptr(), 0), 0);
        assert_eq!(smem_create_config_store(null(), 0), -2000);
        let zero = CString::new("tcp://127.0.0.1:0").unwrap();
        assert_eq!(smem_create_config_store(zero.as_ptr(), 0), -2000);
        assert!(last_err().contains("port"), "port 0 is refused");

        let cfg = config(SMEM_TRANS_SENDER);
        assert_eq!(smem_trans_init(null()), -2000);
        assert_eq!(smem_trans_init(&cfg), 0);
        let s1 = CString::new("127.0.0.1:0").unwrap();
        let none = config(SMEM_TRANS_NONE);
        assert!(smem_trans_create(url.as_ptr(), s1.as_ptr(), &none).is_null());
        assert!(last_err().contains("SMEM_TRANS_NONE"));
        assert!(smem_trans_create(null(), s1.as_ptr(), &cfg).is_null());
        assert!(last_err().contains("storeUrl is NULL"));
        let sender = smem_trans_create(url.as_ptr(), s1.as_ptr(), &cfg);
        assert!(!sender.is_null(), "{}", last_err());
        let rport = free_port();
        let rsession = CString::new(format!("127.0.0.1:{rport}")).unwrap();
        let receiver = smem_trans_create(
            url.as_ptr(),
            rsession.as_ptr(),
            &config(SMEM_TRANS_RECEIVER),
        );
        assert!(!receiver.is_null(), "{}", last_err());

        let mut local = vec![0u8; SIZE];
        let mut remote = vec![0u8; SIZE];
        let (l, r) = (
            local.as_mut_ptr().cast::<c_void>(),
            remote.as_mut_ptr().cast::<c_void>(),
        );
        assert_eq!(
            smem_trans_register_mem(sender, l, SIZE, 0),
            0,
            "{}",
            last_err()
        );
        let mut addrs = [r];
        let mut caps = [SIZE];
        assert_eq!(
            smem_trans_batch_register_mem(receiver, addrs.as_mut_ptr(), caps.as_mut_ptr(), 1, 0),
            0,
            "{}",
            last_err()
        );
        for (i, b) in local.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let rs = rsession.as_ptr();
        assert_eq!(
            smem_trans_write(sender, l, rs, r, SIZE, 0),
            0,
            "{}",
            last_err()
        );
        assert_eq!(remote, local);
        // 64 scattered blocks, written reversed, read back in order.
        let block = SIZE / 64;
        let srcs: Vec<*const c_void> = (0..64)
            .map(|i| l.cast::<u8>().add(i * block).cast_const().cast())
            .collect();
        let dsts: Vec<*mut c_void> = (0..64)
            .map(|i| r.cast::<u8>().add((63 - i) * block).cast())
            .collect();
        let sizes = vec![block; 64];
        for (i, b) in local.iter_mut().enumerate() {
            *b = (i / block) as u8;
        }
        assert_eq!(
            smem_trans_batch_write(
                sender,
                srcs.as_ptr(),
                rs,
                dsts.as_ptr(),
                sizes.as_ptr(),
                64,
                0
            ),
            0,
            "{}",
            last_err()
        );
        for i in 0..64 {
            assert!(remote[(63 - i) * block..(64 - i) * block]
                .iter()
                .all(|b| *b == i as u8));
        }
        local.fill(0);
        let l = local.as_mut_ptr().cast::<c_void>();
        let back: Vec<*mut c_void> = (0..64)
            .map(|i| l.cast::<u8>().add(i * block).cast())
            .collect();
        let from: Vec<*const c_void> = dsts.iter().map(|p| p.cast_const()).collect();
        assert_eq!(
            smem_trans_batch_read(
                sender,
                back.as_ptr(),
                rs,
                from.as_ptr(),
                sizes.as_ptr(),
                64,
                0
            ),
            0,
            "{}",
            last_err()
        );
        for i in 0..64 {
            assert!(local[i * block..(i + 1) * block]
                .iter()
                .all(|b| *b == i as u8));
        }
        assert_eq!(smem_trans_read(sender, l, rs, r, 4096, 0), 0);
        // A NULL stream runs now; a stream without a device backend is refused, saying why.
        assert_eq!(
            smem_trans_write_submit(sender, l, rs, r, 4096, null_mut(), 0),
            0
        );
        let bogus_stream = 0x1000 as *mut c_void;
        assert_eq!(
            smem_trans_read_submit(sender, l, rs, r, 4096, bogus_stream, 0),
            -3006
        );
        assert!(last_err().contains("stream"));

        // Bad input: nothing moves, every refusal says why.
        let before = remote.clone();
        let e = |rc: i32, want: i32, says: &str| {
            assert_eq!(rc, want);
            let m = last_err();
            assert!(m.contains(says), "{m:?} should mention {says:?}");
        };
        e(
            smem_trans_write(sender, l, rs, r.cast::<u8>().add(SIZE - 8).cast(), 16, 0),
            -3002,
            "peer",
        );
        e(
            smem_trans_write(sender, l, rs, 0x1000 as *mut c_void, 8, 0),
            -3002,
            "",
        );
        let unregistered = [0u8; 64];
        e(
            smem_trans_write(sender, unregistered.as_ptr().cast(), rs, r, 64, 0),
            -3002,
            "local",
        );
        e(smem_trans_write(sender, l, rs, r, 0, 0), -2000, "");
        e(smem_trans_write(null_mut(), l, rs, r, 8, 0), -2000, "NULL");
        e(
            smem_trans_write(0x5eed as *mut c_void, l, rs, r, 8, 0),
            -2000,
            "not a live transfer handle",
        );
        e(
            smem_trans_write(sender, l, null(), r, 8, 0),
            -2000,
            "remoteUniqueId is NULL",
        );
        let stranger = CString::new("127.0.0.1:9").unwrap();
        e(
            smem_trans_write(sender, l, stranger.as_ptr(), r, 8, 0),
            -2000,
            "unknown peer",
        );
        let bad_utf8 = [0xffu8 as c_char, 0];
        e(
            smem_trans_write(sender, l, bad_utf8.as_ptr(), r, 8, 0),
            -2000,
            "UTF-8",
        );
        e(
            smem_trans_batch_write(sender, null(), rs, dsts.as_ptr(), sizes.as_ptr(), 64, 0),
            -2000,
            "localAddrs is NULL",
        );
        e(
            smem_trans_batch_write(
                sender,
                srcs.as_ptr(),
                rs,
                dsts.as_ptr(),
                sizes.as_ptr(),
                0,
                0,
            ),
            -2000,
            "batch size is 0",
        );
        e(
            smem_trans_batch_write(
                sender,
                srcs.as_ptr(),
                rs,
                dsts.as_ptr(),
                sizes.as_ptr(),
                u32::MAX,
                0,
            ),
            -2000,
            "above",
        );
        e(
            smem_trans_register_mem(sender, null_mut(), 64, 0),
            -2000,
            "",
        );
        e(
            smem_trans_deregister_mem(sender, 0x1234 as *mut c_void),
            -2007,
            "",
        );
        assert_eq!(remote, before);

        // The logger sees messages at its level; a bad level is refused.
        assert_eq!(smem_set_log_level(9), -2000);
        assert_eq!(smem_set_extern_logger(Some(count_messages)), 0);
        assert_eq!(smem_set_log_level(0), 0);
        assert_eq!(
            smem_trans_write(sender, l, rs, 0x1000 as *mut c_void, 8, 0),
            -3002
        );
        assert!(MESSAGES.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert_eq!(smem_set_extern_logger(None), 0);
        assert_eq!(smem_set_log_level(2), 0);

        // Destroyed handles are refused, not followed; uninit destroys the rest.
        assert_eq!(smem_trans_deregister_mem(sender, l), 0);
        smem_trans_destroy(sender, 0);
        e(
            smem_trans_write(sender, l, rs, r, 8, 0),
            -2000,
            "not a live transfer handle",
        );
        smem_trans_destroy(sender, 0);
        assert!(last_err().contains("not a live transfer handle"));
        smem_trans_uninit(0);
        e(
            smem_trans_read(receiver, r, rs, r, 8, 0),
            -2000,
            "not a live transfer handle",
        );
        assert!(smem_trans_create(url.as_ptr(), s1.as_ptr(), &cfg).is_null());
        assert!(last_err().contains("smem_trans_init"));
        smem_uninit();
        // The store's address is free again when smem_uninit returns.
        assert_eq!(
            smem_create_config_store(url.as_ptr(), 0),
            0,
            "{}",
            last_err()
        );
        smem_uninit();
    }
}

static MESSAGES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe extern "C" fn count_messages(_level: std::ffi::c_int, msg: *const c_char) {
    // SAFETY: the library passes a NUL-terminated message valid for the call.
    if !unsafe { CStr::from_ptr(msg) }.to_bytes().is_empty() {
        MESSAGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
