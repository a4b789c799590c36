//! A tour of the Trimtab API on a real, throwaway kube-apiserver: install the CRDs with
//! `kubectl apply`, apply the examples, list them, read a field's documentation, and
//! watch the API server refuse a bad policy with a message that names the problem.
//!
//! `cargo run -p trimtab-tests --bin api-demo`
#![forbid(unsafe_code)]

use std::{error::Error, process::Command};

use trimtab_tests::{cluster::TestCluster, crds};

fn run(title: &str, command: &mut Command) -> Result<String, Box<dyn Error>> {
    println!("\n$ {title}");
    let output = command.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{}", text.trim_end());
    Ok(text)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    println!(
        "Starting etcd and kube-apiserver on loopback (the first run builds them from the Go module proxy)..."
    );
    let cluster = TestCluster::start().await?;
    println!("API server at {}", cluster.server_url());
    crds::install(&cluster).await?;
    for ns in ["shop", "assistant"] {
        cluster.ensure_namespace(ns).await?;
    }
    let examples = crds::repo_root().join("examples");

    run("kubectl get crds", cluster.kubectl().args(["get", "crds"]))?;
    run(
        "kubectl apply -f examples/",
        cluster.kubectl().args(["apply", "-f"]).arg(&examples),
    )?;
    run(
        "kubectl get bp,lt -A",
        cluster.kubectl().args(["get", "bp,lt", "-A"]),
    )?;
    run(
        "kubectl explain balancerpolicy.spec.weighting.maxLoad",
        cluster
            .kubectl()
            .args(["explain", "balancerpolicy.spec.weighting.maxLoad"]),
    )?;

    let bad = tempfile::NamedTempFile::new()?;
    std::fs::write(
        bad.path(),
        r#"apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: bad, namespace: default}
spec:
  clients: {podSelector: {}}
  listener: {port: 15001}
  endpoints: ["127.0.0.1:8080"]
  algorithm: cpuWeighted
  weighting: {maxLoad: 0.9, criticalLoad: 0.8, interval: 10 seconds}
"#,
    )?;
    let refused = run(
        "kubectl apply -f bad-policy.yaml   # criticalLoad below maxLoad, a duration in words",
        cluster.kubectl().args(["apply", "-f"]).arg(bad.path()),
    )?;
    if !refused.contains("criticalLoad must exceed maxLoad") {
        return Err("the API server admitted an invalid policy".into());
    }
    println!("\nThe API server refused the bad policy. Tearing the cluster down.");
    Ok(())
}
