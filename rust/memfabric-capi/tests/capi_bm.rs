//! Big Memory through the C API (`smem_bm.h`), called as C calls it, in one process.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};

use mf_smem::common::*;

fn last_err() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(smem_get_and_clear_last_err_msg()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn big_memory_refuses_calls_before_init_and_bad_arguments() {
    use mf_smem::bm::*;
    assert_eq!(smem_bm_get_rank_id(), u32::MAX);
    assert!(smem_bm_create(0, 1, 1, 2 << 20, 0, 0).is_null());
    assert!(last_err().contains("smem_bm_init"));
    let url = CString::new("tcp://127.0.0.1:1").unwrap();
    // SAFETY (all calls below): null, NUL-terminated strings, or configs as the contracts ask.
    unsafe {
        assert_eq!(smem_bm_update_store_url(url.as_ptr()), -2008);
        assert_eq!(smem_bm_config_init(null_mut()), -2000);
        let mut cfg = std::mem::MaybeUninit::<SmemBmConfig>::uninit();
        assert_eq!(smem_bm_config_init(cfg.as_mut_ptr()), 0);
        let mut cfg = cfg.assume_init();
        assert_eq!(
            (
                cfg.init_timeout,
                cfg.start_config_store,
                cfg.auto_ranking,
                cfg.rank_id
            ),
            (120, true, false, 0)
        );
        assert_eq!(smem_bm_init(null(), 1, 0, &cfg), -2000);
        assert_eq!(smem_bm_init(url.as_ptr(), 1, 0, null()), -2000);
        cfg.rank_id = 3;
        assert_eq!(smem_bm_init(url.as_ptr(), 2, 0, &cfg), -2000);
        assert!(last_err().contains("rank_id 3"));
    }
    assert_eq!(smem_bm_copy(null_mut(), null(), null_mut(), 8, 3, 0), -2000);
    assert!(smem_bm_ptr(0x77 as *mut c_void, 0).is_null());
    assert!(last_err().contains("not a live Big Memory handle"));
}
