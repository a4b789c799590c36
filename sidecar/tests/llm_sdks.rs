//! The official Python SDKs (`openai`, `anthropic`, pinned below) pointed at the gateway
//! with `base_url`, unmodified: plain, streaming, tool calls and a tool-result turn, for
//! each app dialect both with a provider of the same dialect and with the other one.
//!
//! The test builds its own virtualenv under Cargo's target tmp directory and installs
//! the pinned versions from PyPI the first time; it fails (never skips) when Python or
//! the install is missing. The SDK traffic itself stays on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod support;

use std::{path::PathBuf, process::Stdio, time::Duration};

use mock_llm::MockProvider;
use support::llm::{PRIORITY, gateway, p};
use tokio::process::Command;

/// The SDK versions the gateway is checked against.
const OPENAI_SDK: &str = "openai==3.57.0";
const ANTHROPIC_SDK: &str = "anthropic==2.14.0";

async fn run(program: &std::path::Path, args: &[&str], limit: Duration) -> (bool, String) {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, child).await {
        Err(_) => (
            false,
            format!(
                "{} {args:?} did not finish within {limit:?}",
                program.display()
            ),
        ),
        Ok(Err(e)) => (false, format!("{} cannot run: {e}", program.display())),
        Ok(Ok(out)) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
    }
}

/// The venv's python with the pinned SDKs, installed on first use.
async fn sdk_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("llm-sdk-venv");
    let python = venv.join("bin").join("python");
    let pinned = format!(
        "import openai, anthropic; assert openai.__version__ == {:?} and anthropic.__version__ == {:?}",
        OPENAI_SDK.split("==").nth(1).unwrap(),
        ANTHROPIC_SDK.split("==").nth(1).unwrap()
    );
    if run(&python, &["-c", &pinned], Duration::from_secs(60))
        .await
        .0
    {
        return python;
    }
    let (ok, out) = run(
        std::path::Path::new("python3"),
        &["-m", "venv", venv.to_str().unwrap()],
        Duration::from_secs(120),
    )
    .await;
    assert!(ok, "creating the venv failed: {out}");
    let (ok, out) = run(
        &python,
        &["-m", "pip", "install", "--quiet", OPENAI_SDK, ANTHROPIC_SDK],
        Duration::from_secs(600),
    )
    .await;
    assert!(ok, "installing the SDKs failed: {out}");
    let (ok, out) = run(&python, &["-c", &pinned], Duration::from_secs(60)).await;
    assert!(ok, "the SDKs do not import: {out}");
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdks_work_unmodified_in_both_dialects_and_both_directions() {
    let python = sdk_python().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/llm_sdks.py");
    let mut failures = Vec::new();
    for (app, kind) in [
        ("openai", "openai"),
        ("openai", "anthropic"),
        ("anthropic", "anthropic"),
        ("anthropic", "openai"),
    ] {
        let mock = MockProvider::start(kind, 0).await.unwrap();
        let name = format!("{kind}-provider");
        let gw = gateway(app, &[p(&name, kind, &mock)], PRIORITY).await;
        let port = gw.port.to_string();
        let (ok, out) = run(
            &python,
            &[script, app, &port, &name],
            Duration::from_secs(120),
        )
        .await;
        eprintln!("{app} SDK -> {kind} provider: {}", out.trim());
        if !ok {
            failures.push(format!("{app} SDK -> {kind} provider: {out}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
