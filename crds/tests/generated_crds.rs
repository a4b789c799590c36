//! The committed CRD YAML must be exactly what the types generate, and every example
//! must deserialize into the types (the API server's half of this is in the e2e tests).

use std::{fs, path::Path};

use serde::Deserialize;

use trimtab_api::{BalancerPolicy, LoadTest};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ has a parent")
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    for (file, generated) in trimtab_api::crd_manifests() {
        let path = repo_root().join("crds").join(file);
        let committed = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} is missing ({e}); run crdgen --write", path.display()));
        assert!(
            committed == generated,
            "{} is stale: run `cargo run -p trimtab-api --bin crdgen -- --write`",
            path.display()
        );
    }
}

#[test]
fn every_example_deserializes_into_the_api_types() {
    let mut seen = 0;
    for entry in fs::read_dir(repo_root().join("examples")).expect("examples/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable example");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(doc).expect("valid YAML");
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            let result = match kind.as_str() {
                "BalancerPolicy" => serde_yaml_ng::from_value::<BalancerPolicy>(value).map(drop),
                "LoadTest" => serde_yaml_ng::from_value::<LoadTest>(value).map(drop),
                _ => continue,
            };
            result
                .unwrap_or_else(|e| panic!("{}: {kind} does not deserialize: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 4,
        "expected at least four Trimtab resources in examples/, found {seen}"
    );
}
