//! Prints or writes the CustomResourceDefinitions generated from the Rust types.
//!
//! `cargo run -p trimtab-api --bin crdgen -- --write` regenerates `crds/*.yaml`;
//! a test fails when the committed files differ from what the types generate.
#![forbid(unsafe_code)]

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let write = env::args().any(|a| a == "--write");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for (file, yaml) in trimtab_api::crd_manifests() {
        if write {
            let path = dir.join(file);
            if let Err(e) = fs::write(&path, yaml) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("crdgen: wrote {}", path.display());
        } else {
            print!("---\n{yaml}");
        }
    }
    ExitCode::SUCCESS
}
