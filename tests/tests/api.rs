//! The API contract against a real kube-apiserver: the CRDs install with plain
//! `kubectl apply`, every example is admitted, `kubectl explain` and `kubectl get` show
//! what the types document, and every validation rule refuses a bad resource with a
//! message a person understands.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use kube::{
    Api,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use trimtab_api::{BalancerPolicy, LoadTest};
use trimtab_tests::{cluster::TestCluster, crds};

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn cluster_with_crds() -> TestCluster {
    let cluster = TestCluster::start().await.expect("test cluster starts");
    crds::install(&cluster).await.expect("CRDs install");
    cluster
}

#[tokio::test]
async fn crds_install_and_examples_apply_and_kubectl_shows_them() {
    let cluster = cluster_with_crds().await;
    for ns in ["shop", "assistant"] {
        cluster.ensure_namespace(ns).await.expect("namespace");
    }
    let examples = crds::repo_root().join("examples");

    // Every example passes a server-side dry run: admission, defaults and CEL included.
    let dry_run = cluster
        .kubectl()
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&examples)
        .output()
        .expect("kubectl runs");
    let out = stdout_of(&dry_run);
    for name in [
        "balancerpolicy.trimtab.dev/inventory",
        "balancerpolicy.trimtab.dev/shop-local",
        "balancerpolicy.trimtab.dev/llm",
        "loadtest.trimtab.dev/black-friday",
    ] {
        assert!(out.contains(name), "dry run did not admit {name}:\n{out}");
    }

    // Now for real, and the schema's defaults are filled in by the API server.
    stdout_of(
        &cluster
            .kubectl()
            .args(["apply", "-f"])
            .arg(&examples)
            .output()
            .expect("kubectl runs"),
    );
    let policies: Api<BalancerPolicy> = Api::namespaced(cluster.client(), "default");
    let local = policies.get("shop-local").await.expect("policy exists");
    assert_eq!(
        local.spec.retries.budget_percent, 20,
        "schema default for retries.budgetPercent"
    );
    assert_eq!(
        local.spec.timeouts.connect.to_string(),
        "1s",
        "schema default for timeouts.connect"
    );

    // Printer columns, with a status the operator would write.
    let tests: Api<LoadTest> = Api::namespaced(cluster.client(), "shop");
    let status = json!({"status": {
        "phase": "Running",
        "users": {"active": 1500, "target": 2000},
        "requests": {"total": 90000, "failed": 12, "rps": 812.5},
        "latency": {"p50": "8ms", "p90": "20ms", "p99": "41ms", "p999": "90ms", "max": "130ms"},
    }});
    tests
        .patch_status(
            "black-friday",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect("status subresource accepts a status");
    let table = stdout_of(
        &cluster
            .kubectl()
            .args(["get", "bp,lt", "-A"])
            .output()
            .expect("kubectl runs"),
    );
    for header in [
        "ALGORITHM",
        "ENDPOINTS",
        "READY",
        "AGE",
        "PHASE",
        "USERS",
        "RPS",
        "P99",
    ] {
        assert!(
            table.contains(header),
            "kubectl get bp,lt lacks column {header}:\n{table}"
        );
    }
    let row = table
        .lines()
        .find(|l| l.contains("black-friday"))
        .expect("the load test is listed");
    for cell in ["Running", "1500", "812.5", "41ms"] {
        assert!(row.contains(cell), "row lacks {cell}: {row}");
    }
    let row = table
        .lines()
        .find(|l| l.contains("shop-local"))
        .expect("policy listed");
    assert!(row.contains("peakEwma"), "algorithm column: {row}");

    // Short names and the category work too.
    let by_category = stdout_of(
        &cluster
            .kubectl()
            .args(["get", "trimtab", "-A", "-o", "name"])
            .output()
            .expect("kubectl runs"),
    );
    // One per BalancerPolicy or LoadTest in examples/*.yaml (four policies, one test).
    assert_eq!(
        by_category.lines().count(),
        5,
        "kubectl get trimtab:\n{by_category}"
    );

    // kubectl explain shows the doc comment; the published OpenAPI can lag the CRD by
    // a moment, so poll briefly.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster
            .kubectl()
            .args(["explain", "balancerpolicy.spec.weighting.maxLoad"])
            .output()
            .expect("kubectl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("above which an endpoint is Throttled") {
            assert!(text.contains("number"), "explain shows the type: {text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl explain never showed the field doc: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn valid_policy() -> Value {
    json!({
        "apiVersion": "trimtab.dev/v1alpha1",
        "kind": "BalancerPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "clients": {"podSelector": {"matchLabels": {"app": "web"}}},
            "listener": {"port": 15001},
            "endpoints": ["127.0.0.1:8080", "127.0.0.1:8081"],
        },
    })
}

fn valid_llm_policy() -> Value {
    json!({
        "apiVersion": "trimtab.dev/v1alpha1",
        "kind": "BalancerPolicy",
        "metadata": {"name": "llm", "namespace": "default"},
        "spec": {
            "clients": {"podSelector": {}},
            "listener": {"port": 15100, "protocol": "openai"},
            "providers": [
                {"name": "a", "type": "openai", "baseUrl": "http://127.0.0.1:9001/v1", "model": "m", "contextWindow": 128000},
                {"name": "b", "type": "anthropic", "baseUrl": "http://127.0.0.1:9002", "model": "c", "contextWindow": 200000},
            ],
        },
    })
}

fn valid_load_test() -> Value {
    json!({
        "apiVersion": "trimtab.dev/v1alpha1",
        "kind": "LoadTest",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {
            "target": {"url": "http://127.0.0.1:8080"},
            "workload": {"users": 10, "duration": "1m"},
            "scenario": {
                "start": "home",
                "states": [
                    {"name": "home", "request": {"path": "/"}, "next": [{"state": "cart"}]},
                    {"name": "cart", "request": {"method": "POST", "path": "/cart", "json": {"id": 1}}},
                ],
            },
        },
    })
}

/// One resource that must be refused, and a fragment of the message it must get.
struct Refusal {
    what: &'static str,
    object: Value,
    message: &'static str,
}

fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let target = object.pointer_mut(parent).expect("parent exists");
    match target {
        Value::Array(items) => {
            let index: usize = key.parse().expect("array index");
            if index < items.len() {
                items[index] = value;
            } else {
                items.push(value);
            }
        }
        Value::Object(map) => {
            map.insert(key.to_owned(), value);
        }
        other => panic!("cannot set {key} in {other}"),
    }
    object
}

fn refusals() -> Vec<Refusal> {
    let p = valid_policy;
    let llm = valid_llm_policy;
    let lt = valid_load_test;
    vec![
        Refusal {
            what: "both service and endpoints",
            object: with(p(), "/spec/service", json!({"name": "web", "port": 80})),
            message: "exactly one of service, endpoints or providers must be set",
        },
        Refusal {
            what: "no backends at all",
            object: {
                let mut o = p();
                o["spec"].as_object_mut().expect("spec").remove("endpoints");
                o
            },
            message: "exactly one of service, endpoints or providers must be set",
        },
        Refusal {
            what: "criticalLoad below maxLoad",
            object: with(
                p(),
                "/spec/weighting",
                json!({"maxLoad": 0.9, "criticalLoad": 0.8}),
            ),
            message: "criticalLoad must exceed maxLoad",
        },
        Refusal {
            what: "minWeight above maxWeight",
            object: with(
                p(),
                "/spec/weighting",
                json!({"minWeight": 50, "maxWeight": 10}),
            ),
            message: "minWeight must not exceed maxWeight",
        },
        Refusal {
            what: "maxLoad above 1",
            object: with(
                p(),
                "/spec/weighting",
                json!({"maxLoad": 1.5, "criticalLoad": 2}),
            ),
            message: "spec.weighting.maxLoad: Invalid value: 1.5: spec.weighting.maxLoad in body should be less than or equal to 1",
        },
        Refusal {
            what: "a duration in words",
            object: with(p(), "/spec/weighting", json!({"interval": "10 seconds"})),
            message: "spec.weighting.interval: Invalid value: \"10 seconds\": must be a duration such as 500ms, 10s, 2m or 1h30m",
        },
        Refusal {
            what: "an unknown algorithm",
            object: with(p(), "/spec/algorithm", json!("random")),
            message: "spec.algorithm: Unsupported value: \"random\"",
        },
        Refusal {
            what: "listener port 0",
            object: with(p(), "/spec/listener/port", json!(0)),
            message: "spec.listener.port in body should be greater than or equal to 1",
        },
        Refusal {
            what: "an unknown retry condition",
            object: with(
                p(),
                "/spec/retries",
                json!({"retryOn": ["reset", "sometimes"]}),
            ),
            message: "spec.retries.retryOn[1]: Invalid value: \"sometimes\": must be connect-failure, reset, timeout, 5xx, gateway-error or a 4xx/5xx status code",
        },
        Refusal {
            what: "a retry status code that is not an error",
            object: with(p(), "/spec/retries", json!({"retryOn": [200]})),
            message: "spec.retries.retryOn[0]: Invalid value",
        },
        Refusal {
            what: "health check timeout longer than its interval",
            object: with(
                p(),
                "/spec/healthCheck",
                json!({"interval": "1s", "timeout": "2s"}),
            ),
            message: "healthCheck.timeout must be shorter than healthCheck.interval",
        },
        Refusal {
            what: "prometheus source without a server",
            object: with(p(), "/spec/weighting", json!({"source": "prometheus"})),
            message: "source prometheus requires weighting.prometheus.url",
        },
        Refusal {
            what: "LLM routing on a plain HTTP policy",
            object: with(p(), "/spec/routing", json!({"strategy": "priority"})),
            message: "routing, failover and contextFitting apply only to LLM policies",
        },
        Refusal {
            what: "an endpoint that is not host:port",
            object: with(p(), "/spec/endpoints/1", json!("http://10.0.0.1")),
            message: "spec.endpoints[1] in body should match",
        },
        Refusal {
            what: "duplicate provider names",
            object: with(llm(), "/spec/providers/1/name", json!("a")),
            message: "spec.providers[1]: Duplicate value",
        },
        Refusal {
            what: "providers behind an http listener",
            object: with(llm(), "/spec/listener/protocol", json!("http")),
            message: "providers require listener.protocol openai or anthropic",
        },
        Refusal {
            what: "a context window smaller than the output reserve",
            object: with(
                llm(),
                "/spec/contextFitting",
                json!({"reserveOutputTokens": 150000}),
            ),
            message: "every provider's contextWindow must exceed contextFitting.reserveOutputTokens",
        },
        Refusal {
            what: "an API key from two sources",
            object: with(
                llm(),
                "/spec/providers/0/apiKey",
                json!({"env": "KEY", "file": "/k"}),
            ),
            message: "apiKey needs exactly one of secretKeyRef, file or env",
        },
        Refusal {
            what: "cpuWeighted over LLM providers",
            object: with(llm(), "/spec/algorithm", json!("cpuWeighted")),
            message: "algorithm cpuWeighted balances service or endpoints backends",
        },
        Refusal {
            what: "scenario.start names no state",
            object: with(lt(), "/spec/scenario/start", json!("landing")),
            message: "scenario.start must name one of scenario.states",
        },
        Refusal {
            what: "a transition to an undefined state",
            object: with(
                lt(),
                "/spec/scenario/states/0/next/0/state",
                json!("checkout"),
            ),
            message: "every states[].next[].state must name one of scenario.states",
        },
        Refusal {
            what: "duplicate state names",
            object: with(lt(), "/spec/scenario/states/1/name", json!("home")),
            message: "spec.scenario.states[1]: Duplicate value",
        },
        Refusal {
            what: "both users and arrivalRate",
            object: with(lt(), "/spec/workload/arrivalRate", json!("50/s")),
            message: "set exactly one of workload.users (closed model) or workload.arrivalRate (open model)",
        },
        Refusal {
            what: "more runners than users",
            object: with(lt(), "/spec/runners", json!({"parallelism": 11})),
            message: "runners.parallelism must not exceed workload.users",
        },
        Refusal {
            what: "zero runners",
            object: with(lt(), "/spec/runners", json!({"parallelism": 0})),
            message: "spec.runners.parallelism in body should be greater than or equal to 1",
        },
        Refusal {
            what: "an arrival rate without a unit",
            object: {
                let mut o = with(lt(), "/spec/workload/arrivalRate", json!("fast"));
                o["spec"]["workload"]
                    .as_object_mut()
                    .expect("workload")
                    .remove("users");
                o
            },
            message: "spec.workload.arrivalRate in body should match",
        },
        Refusal {
            what: "critical CPU below max CPU",
            object: with(
                lt(),
                "/spec/guards",
                json!({"maxLoad": {"cpu": 0.9}, "criticalLoad": {"cpu": 0.8}}),
            ),
            message: "guards.criticalLoad.cpu must exceed guards.maxLoad.cpu",
        },
        Refusal {
            what: "a CPU guard without target pods",
            object: with(lt(), "/spec/guards", json!({"criticalLoad": {"cpu": 0.9}})),
            message: "cpu guards read the target pods' CPU: set target.podSelector",
        },
        Refusal {
            what: "load reports as the guards' CPU source",
            object: with(
                lt(),
                "/spec/guards",
                json!({"criticalLoad": {"errorRate": 0.5}, "cpuSource": "loadReports"}),
            ),
            message: "guards.cpuSource is metricsServer or prometheus",
        },
        Refusal {
            what: "a Prometheus CPU source without a server",
            object: with(
                lt(),
                "/spec/guards",
                json!({"criticalLoad": {"errorRate": 0.5}, "cpuSource": "prometheus"}),
            ),
            message: "guards.cpuSource prometheus requires guards.prometheus.url",
        },
        Refusal {
            what: "a guard window longer than 5m",
            object: with(
                lt(),
                "/spec/guards",
                json!({"criticalLoad": {"errorRate": 0.5}, "window": "10m"}),
            ),
            message: "guards.window must be at most 5m",
        },
        Refusal {
            what: "an empty load limit",
            object: with(lt(), "/spec/guards", json!({"maxLoad": {}})),
            message: "a load limit needs at least one of cpu, errorRate or p99",
        },
        Refusal {
            what: "a request with two bodies",
            object: with(lt(), "/spec/scenario/states/1/request/body", json!("raw")),
            message: "a request has at most one of json, form or body",
        },
        Refusal {
            what: "a uniform think time without bounds",
            object: with(
                lt(),
                "/spec/scenario/thinkTime",
                json!({"distribution": "uniform"}),
            ),
            message: "a uniform think time needs min and max",
        },
        Refusal {
            what: "a target that is not a URL",
            object: with(lt(), "/spec/target/url", json!("storefront:8080")),
            message: "spec.target.url in body should match",
        },
    ]
}

#[tokio::test]
async fn invalid_resources_are_refused_with_a_message_naming_the_problem() {
    let cluster = cluster_with_crds().await;
    let client = cluster.client();
    let policies: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::erase::<BalancerPolicy>(&()),
    );
    let load_tests: Api<DynamicObject> =
        Api::namespaced_with(client, "default", &ApiResource::erase::<LoadTest>(&()));
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };

    // The bases themselves are valid, so each refusal is caused by its one change.
    for base in [valid_policy(), valid_llm_policy()] {
        let object: DynamicObject = serde_json::from_value(base).expect("dynamic object");
        policies
            .create(&dry_run, &object)
            .await
            .expect("the valid policy is admitted");
    }
    let object: DynamicObject = serde_json::from_value(valid_load_test()).expect("dynamic object");
    load_tests
        .create(&dry_run, &object)
        .await
        .expect("the valid load test is admitted");

    let cases = refusals();
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for case in cases {
        let api = if case.object["kind"] == "LoadTest" {
            &load_tests
        } else {
            &policies
        };
        let object: DynamicObject = serde_json::from_value(case.object).expect("dynamic object");
        match api.create(&dry_run, &object).await {
            Ok(_) => failures.push(format!("{}: was admitted", case.what)),
            Err(kube::Error::Api(status))
                if status.code == 422 && status.message.contains(case.message) => {}
            Err(e) => failures.push(format!(
                "{}: expected a 422 containing {:?}, got {e}",
                case.what, case.message
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} refusal(s) wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
