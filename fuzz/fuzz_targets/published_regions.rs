//! The region list a Transfer Engine publishes in the config store (with its device section):
//! any engine admitted by the store writes it, and every peer decodes it before a transfer.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use memfabric::device::IpcHandle;
use memfabric::error::Error;
use memfabric::trans::device_path::{decode_published, encode_published};

fuzz_target!(|data: &[u8]| {
    match decode_published(data) {
        Ok(table) => {
            // Every device entry names a listed region, and re-encoding decodes to the same.
            let ipc: HashMap<u64, IpcHandle> = table
                .device
                .iter()
                .map(|(&start, r)| {
                    assert!(table.regions.check(start, 1).is_ok());
                    assert_eq!(table.regions.device_at(start), Some(r.device));
                    (
                        start,
                        IpcHandle {
                            kind: r.kind,
                            device: r.device,
                            bytes: r.ipc.clone(),
                        },
                    )
                })
                .collect();
            let again = decode_published(&encode_published(&table.regions, &ipc))
                .expect("a decoded table re-encodes to a valid value");
            assert_eq!(again.regions.snapshot(), table.regions.snapshot());
            assert_eq!(again.device.len(), table.device.len());
        }
        Err(e) => assert!(
            matches!(
                e,
                Error::Protocol(_) | Error::InvalidParam(_) | Error::Duplicated(_)
            ),
            "{e}"
        ),
    }
});
