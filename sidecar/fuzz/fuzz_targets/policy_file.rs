//! A policy file (`--policy FILE`, hot-reloaded): any bytes give routes or an error
//! naming the field, never a panic; whatever parses also survives validation.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use trimtab_api::sidecar_config::SidecarConfig;
use trimtab_sidecar::config_source::parse_policies;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(routes) = parse_policies(text, Path::new("fuzz.yaml")) {
        let _ = SidecarConfig { version: 1, routes }.validate();
    }
});
