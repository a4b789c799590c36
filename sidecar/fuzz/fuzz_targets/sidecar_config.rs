//! The resolved config as JSON (what the fail-static state file and the control plane
//! hold): deserialization and validation never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trimtab_api::sidecar_config::SidecarConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = serde_json::from_slice::<SidecarConfig>(data) {
        let _ = config.validate();
    }
});
