//! `smem.h`'s store calls and `smem_config_store_api.h`, called as C calls them: servers by
//! handle, their callbacks, the status report, alarms, and every refusal with its code.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, last_err};

use mf_smem::common::*;
use mf_smem::config_store::*;
use mf_smem::trans::*;

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status() -> String {
    let mut buf = vec![0 as c_char; 4096];
    let mut len = 0u32;
    // SAFETY: a buffer of the length passed and a writable length.
    let rc = unsafe { smem_config_store_get_cluster_status(buf.as_mut_ptr(), 4096, &mut len) };
    assert_eq!(rc, 0, "{}", last_err());
    // SAFETY: NUL-terminated by the call.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert_eq!(text.len(), len as usize);
    text
}

static BROKEN: AtomicU32 = AtomicU32::new(0);
static LEADER: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn on_broken(context: *mut c_void, _link: u32, rank: u32) -> i32 {
    assert_eq!(context as usize, 7);
    assert_eq!(rank, u32::MAX);
    BROKEN.fetch_add(1, Ordering::SeqCst);
    0
}

unsafe extern "C" fn on_leader(context: *mut c_void, leader: *const SmemLeaderInfo) {
    assert_eq!(context as usize, 9);
    // SAFETY: the library passes a valid info whose string lives for the call.
    let info = unsafe { &*leader };
    assert_eq!(info.is_leader, 1);
    // SAFETY: as above.
    let addr = unsafe { CStr::from_ptr(info.bindable_leader_address) };
    assert!(addr.to_str().unwrap().starts_with("127.0.0.1:"));
    LEADER.fetch_add(1, Ordering::SeqCst);
}

static ALARMS: AtomicU32 = AtomicU32::new(0);
static RESUMES: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn on_alarm(code: u16, msg: *const c_char) {
    assert_eq!(code, ALARM_STORE_CONNECTION);
    // SAFETY: a NUL-terminated message valid for the call.
    assert!(unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .contains("unreachable"));
    ALARMS.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn on_resume(code: u16) {
    assert_eq!(code, ALARM_STORE_CONNECTION);
    RESUMES.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn servers_by_handle_report_connections_and_refuse_what_they_cannot_do() {
    assert_eq!(smem_get_abi_version(), 0x0001_0003);
    let url = CString::new(format!("tcp://127.0.0.1:{}", free_port())).unwrap();
    // SAFETY (all calls below): null, NUL-terminated strings, or buffers of the sizes passed.
    unsafe {
        assert!(smem_config_store_create_server(null()).is_null());
        assert_eq!(smem_get_last_err_code(), -2000);
        let reg = CString::new("reg://127.0.0.1:1").unwrap();
        assert!(smem_config_store_create_server(reg.as_ptr()).is_null());
        assert_eq!(smem_get_last_err_code(), -3006);
        assert!(last_err().contains("reg://"));
        assert_eq!(smem_get_last_err_code(), 0, "cleared with the message");
        let etcd = CString::new("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(smem_create_config_store(etcd.as_ptr(), 0), -2000);
        assert!(last_err().contains("etcd"));
        assert_eq!(smem_config_store_set_backend_op(null()), -2000);
        assert_eq!(smem_config_store_set_backend_op(8 as *const c_void), -3006);

        let server = smem_config_store_create_server(url.as_ptr());
        assert!(!server.is_null(), "{}", last_err());
        assert!(status().contains(&format!("\"url\":\"{}\"", url.to_str().unwrap())));
        smem_config_store_set_server_broken_handler(server, Some(on_broken), 7 as *mut c_void);
        let addr = url.to_str().unwrap().trim_start_matches("tcp://");
        drop(std::net::TcpStream::connect(addr).unwrap());
        wait_for("the broken handler", || BROKEN.load(Ordering::SeqCst) == 1);
        smem_config_store_set_server_broken_handler(server, None, null_mut());
        drop(std::net::TcpStream::connect(addr).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            BROKEN.load(Ordering::SeqCst),
            1,
            "removed handlers are not called"
        );

        assert_eq!(
            smem_config_store_set_leader_handler(server, Some(on_leader), 9 as *mut c_void),
            0
        );
        assert_eq!(LEADER.load(Ordering::SeqCst), 1);
        assert_eq!(
            smem_config_store_set_leader_handler(0x77 as *mut c_void, Some(on_leader), null_mut()),
            -2000
        );

        let mut small = [0 as c_char; 8];
        let mut len = 0u32;
        assert_eq!(
            smem_config_store_get_cluster_status(small.as_mut_ptr(), 8, &mut len),
            -2015
        );
        assert!(len > 8);
        assert_eq!(
            smem_config_store_get_cluster_status(null_mut(), 8, &mut len),
            -2000
        );

        let other = CString::new("tcp://127.0.0.1:1").unwrap();
        smem_config_store_destroy_server(server, other.as_ptr());
        assert!(last_err().contains("not the address"));
        smem_config_store_destroy_server(server, url.as_ptr());
        assert_eq!(smem_get_last_err_code(), 0, "{}", last_err());
        assert!(!status().contains(url.to_str().unwrap()));
        smem_config_store_destroy_server(server, null());
        assert!(last_err().contains("not a live config store server handle"));
        // The address is free again at once.
        let again = smem_config_store_create_server(url.as_ptr());
        assert!(!again.is_null(), "{}", last_err());
        smem_config_store_destroy_server(again, null());

        smem_destroy_config_store(url.as_ptr());
        assert_eq!(smem_get_last_err_code(), -2007);
        assert_eq!(smem_create_config_store(url.as_ptr(), 4), -2000);
    }
}

#[test]
fn tls_options_map_onto_the_store_setting_or_are_refused() {
    let empty = CString::new("").unwrap();
    let crl = CString::new("/etc/crl.pem").unwrap();
    let lib = CString::new("libdecrypt.so").unwrap();
    let mut o = SmemTlsOptions {
        enable_tls: 1,
        tls_top_path: null(),
        tls_cert: null(),
        tls_crl_path: null(),
        tls_ca_path: null(),
        tls_ca_file: null(),
        tls_crl_file: crl.as_ptr(),
        tls_private_key: null(),
        tls_private_key_password: null(),
    };
    // SAFETY (all calls below): options whose strings are null or NUL-terminated.
    unsafe {
        assert_eq!(smem_config_store_set_tls(null(), null(), null()), -2000);
        assert_eq!(smem_config_store_set_tls(&o, null(), null()), -3006);
        assert!(last_err().contains("revocation"));
        o.tls_crl_file = empty.as_ptr();
        assert_eq!(smem_config_store_set_tls(&o, null(), lib.as_ptr()), -3006);
        assert!(last_err().contains("decrypter"));
        assert_eq!(smem_config_store_set_tls(&o, null(), null()), -2000);
        assert!(last_err().contains("tls_ca_file is required"));
        o.enable_tls = 0;
        assert_eq!(smem_config_store_set_tls(&o, lib.as_ptr(), null()), 0);
    }
}

#[test]
fn alarms_tell_when_the_store_connection_is_lost_and_back() {
    let url = CString::new(format!("tcp://127.0.0.1:{}", free_port())).unwrap();
    let session = CString::new("127.0.0.1:0").unwrap();
    // SAFETY (all calls below): NUL-terminated strings and configs as the contracts ask.
    unsafe {
        assert_eq!(smem_set_extern_alarm(Some(on_alarm), Some(on_resume)), 0);
        let server = smem_config_store_create_server(url.as_ptr());
        assert!(!server.is_null(), "{}", last_err());
        let mut cfg = std::mem::MaybeUninit::<SmemTransConfig>::uninit();
        assert_eq!(smem_trans_config_init(cfg.as_mut_ptr()), 0);
        let mut cfg = cfg.assume_init();
        cfg.role = SMEM_TRANS_BOTH;
        cfg.init_timeout = 5;
        assert_eq!(smem_trans_init(&cfg), 0);
        let engine = smem_trans_create(url.as_ptr(), session.as_ptr(), &cfg);
        assert!(!engine.is_null(), "{}", last_err());

        smem_config_store_destroy_server(server, null());
        wait_for("the alarm", || ALARMS.load(Ordering::SeqCst) >= 1);
        let server = smem_config_store_create_server(url.as_ptr());
        assert!(!server.is_null(), "{}", last_err());
        wait_for("the resume", || RESUMES.load(Ordering::SeqCst) >= 1);
        assert_eq!(ALARMS.load(Ordering::SeqCst), 1, "one alarm per loss");
        // A second loss is told again.
        smem_config_store_destroy_server(server, null());
        wait_for("the second alarm", || ALARMS.load(Ordering::SeqCst) >= 2);
        let server = smem_config_store_create_server(url.as_ptr());
        assert!(!server.is_null(), "{}", last_err());
        wait_for("the second resume", || RESUMES.load(Ordering::SeqCst) >= 2);

        assert_eq!(smem_set_extern_alarm(None, None), 0);
        smem_trans_destroy(engine, 0);
        smem_trans_uninit(0);
        smem_config_store_destroy_server(server, null());
    }
}
