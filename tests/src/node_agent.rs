//! A stand-in kubelet (and one-node scheduler) for end-to-end tests, so that Pods made
//! by real controllers — the Job controller of kube-controller-manager above all — run.
//!
//! The agent registers a Ready [`Node`], binds every unscheduled Pod to it through the
//! `binding` subresource (what kube-scheduler does), and runs each Pod bound to it: every
//! app container's `command` + `args` as a local process, concurrently, with the
//! container's environment resolved as the kubelet resolves it (`value`, `fieldRef`
//! including `metadata.annotations[...]` — which is how `JOB_COMPLETION_INDEX` arrives —,
//! `configMapKeyRef`, `secretKeyRef`) and `$(VAR)` expanded in the command line. It
//! reports the Pod `Running`, then `Succeeded` or `Failed` with each container's exit
//! code, and kills the processes of a Pod that is deleted.
//!
//! # What is not real
//!
//! - No container runtime: the image is ignored. `command[0]` is looked up in the
//!   agent's table of binaries (e.g. `trimtab-bots` → the workspace's build), then taken
//!   as a path or a program on `PATH`. Each container runs in its own directory under the
//!   agent's work directory. `configMap` and `secret` volumes are written there (under
//!   their `mountPath`), and a command-line argument or env value that starts with a
//!   `mountPath` is pointed at that copy; any other volume (emptyDir, the projected
//!   service-account token) is an empty directory.
//! - No restarts: every `restartPolicy` behaves as `Never`, which is what Indexed Jobs of
//!   bot runners use.
//! - Networking is the host's: processes bind and connect on loopback, and the Pod's IP
//!   is reported as `127.0.0.1`.
//!
//! Processes' output goes to `<work dir>/<namespace>_<pod>_<container>.log`; a Pod the
//! agent cannot run (an unknown program, an env source it does not support) fails with
//! a message naming the container and field.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{Binding, ConfigMap, Container, EnvVar, Node, ObjectReference, Pod, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::{process::Command, task::JoinHandle};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeAgentError {
    /// The Node object could not be registered.
    #[error("registering node {node}: {source}")]
    Register {
        /// The node's name.
        node: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The work directory could not be made.
    #[error("creating the work directory {}: {source}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A running agent; dropping it stops the agent and kills every process it started.
#[derive(Debug)]
pub struct NodeAgent {
    node: String,
    work_dir: PathBuf,
    task: JoinHandle<()>,
    running: Running,
}

/// Processes by Pod UID, so a deleted Pod's processes can be killed.
type Running = Arc<Mutex<HashMap<String, JoinHandle<()>>>>;

impl NodeAgent {
    /// Registers node `node` and starts serving it. `binaries` maps the names that Pods
    /// use as `command[0]` to local executables; logs and working directories go under
    /// `work_dir`.
    pub async fn start(
        client: Client,
        node: &str,
        binaries: BTreeMap<String, PathBuf>,
        work_dir: &Path,
    ) -> Result<Self, NodeAgentError> {
        std::fs::create_dir_all(work_dir).map_err(|source| NodeAgentError::WorkDir {
            path: work_dir.to_path_buf(),
            source,
        })?;
        register(&client, node)
            .await
            .map_err(|source| NodeAgentError::Register {
                node: node.to_owned(),
                source,
            })?;
        let running = Running::default();
        let agent = Agent {
            client,
            node: node.to_owned(),
            binaries: Arc::new(binaries),
            work_dir: work_dir.to_path_buf(),
            running: Arc::clone(&running),
        };
        let task = tokio::spawn(agent.run());
        Ok(Self {
            node: node.to_owned(),
            work_dir: work_dir.to_path_buf(),
            task,
            running,
        })
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The log of one container of a Pod this agent ran.
    pub fn log(&self, namespace: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            self.work_dir
                .join(format!("{namespace}_{pod}_{container}.log")),
        )
        .unwrap_or_default()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.task.abort();
        // Aborting a Pod's task drops its children, which are spawned with kill_on_drop.
        for (_, pod) in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            pod.abort();
        }
    }
}

async fn register(client: &Client, node: &str) -> Result<(), kube::Error> {
    let nodes = Api::<Node>::all(client.clone());
    let params = PatchParams::apply("trimtab-test-node-agent").force();
    let object = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
    });
    nodes.patch(node, &params, &Patch::Apply(&object)).await?;
    let capacity = json!({"cpu": "2", "memory": "8Gi", "pods": "110"});
    let status = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "TestNodeAgentReady",
                "message": "trimtab's test node agent runs pods as local processes",
                "lastHeartbeatTime": now(),
                "lastTransitionTime": now(),
            }],
        },
    });
    nodes
        .patch_status(node, &params, &Patch::Apply(&status))
        .await?;
    Ok(())
}

fn now() -> Time {
    Time(Timestamp::now())
}

#[derive(Clone)]
struct Agent {
    client: Client,
    node: String,
    binaries: Arc<BTreeMap<String, PathBuf>>,
    work_dir: PathBuf,
    running: Running,
}

impl Agent {
    async fn run(self) {
        let pods = Api::<Pod>::all(self.client.clone());
        let mut events = watcher(pods, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        loop {
            match events.try_next().await {
                Ok(Some(pod)) => self.on_pod(pod).await,
                Ok(None) => return,
                Err(e) => tracing::debug!(error = %e, "node agent watch"),
            }
        }
    }

    async fn on_pod(&self, pod: Pod) {
        let (Some(namespace), name, Some(uid)) = (pod.namespace(), pod.name_any(), pod.uid())
        else {
            return;
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let api = Api::<Pod>::namespaced(self.client.clone(), &namespace);
        if pod.metadata.deletion_timestamp.is_some() {
            if let Some(task) = self.lock().remove(&uid) {
                task.abort();
            }
            if spec.node_name.as_deref() == Some(&self.node) {
                // The kubelet's last word: the Pod is gone from the node.
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
            }
            return;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        match spec.node_name.as_deref() {
            None if spec
                .scheduler_name
                .as_deref()
                .unwrap_or("default-scheduler")
                == "default-scheduler" =>
            {
                let binding = Binding {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    target: ObjectReference {
                        kind: Some("Node".into()),
                        name: Some(self.node.clone()),
                        ..Default::default()
                    },
                };
                if let Err(e) = api
                    .create_subresource::<_, serde_json::Value>(
                        "binding",
                        &name,
                        &PostParams::default(),
                        &binding,
                    )
                    .await
                {
                    tracing::debug!(pod = %name, error = %e, "binding");
                }
            }
            Some(node) if node == self.node => {
                let finished = matches!(phase.as_deref(), Some("Succeeded" | "Failed"));
                let mut running = self.lock();
                if finished || running.contains_key(&uid) {
                    return;
                }
                let agent = self.clone();
                running.insert(uid, tokio::spawn(async move { agent.run_pod(pod).await }));
            }
            _ => {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs every app container of `pod` and reports its phases.
    async fn run_pod(self, pod: Pod) {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api = Api::<Pod>::namespaced(self.client.clone(), &namespace);
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let mut children = Vec::new();
        for container in &containers {
            match self.spawn(&pod, container).await {
                Ok(child) => children.push((container.name.clone(), child)),
                Err(message) => {
                    let statuses: Vec<_> = containers
                        .iter()
                        .map(|c| terminated(c, 128, "StartError", Some(&message)))
                        .collect();
                    self.report(&api, &name, "Failed", Some(&message), statuses)
                        .await;
                    return;
                }
            }
        }
        let started = now();
        let statuses: Vec<_> = containers
            .iter()
            .map(|c| {
                json!({
                    "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                    "ready": true, "restartCount": 0, "started": true,
                    "state": {"running": {"startedAt": started}},
                })
            })
            .collect();
        self.report(&api, &name, "Running", None, statuses).await;

        let mut statuses = Vec::new();
        let mut failed = false;
        for (container, mut child) in children {
            let code = match child.wait().await {
                Ok(status) => status.code().unwrap_or(137),
                Err(_) => 137,
            };
            failed |= code != 0;
            let spec = containers.iter().find(|c| c.name == container);
            if let Some(spec) = spec {
                let reason = if code == 0 { "Completed" } else { "Error" };
                statuses.push(terminated(spec, code, reason, None));
            }
        }
        let phase = if failed { "Failed" } else { "Succeeded" };
        self.report(&api, &name, phase, None, statuses).await;
    }

    async fn spawn(
        &self,
        pod: &Pod,
        container: &Container,
    ) -> Result<tokio::process::Child, String> {
        let namespace = pod.namespace().unwrap_or_default();
        let base = format!("{namespace}_{}_{}", pod.name_any(), container.name);
        let dir = self.work_dir.join(&base);
        std::fs::create_dir_all(&dir).map_err(|e| format!("container {}: {e}", container.name))?;
        let mounts = self.mount(pod, container, &dir).await?;
        let relocate = |text: String| {
            mounts
                .iter()
                .find_map(|(at, copy)| {
                    text.strip_prefix(at.as_str())
                        .map(|rest| format!("{}{rest}", copy.display()))
                })
                .unwrap_or(text)
        };
        let env: Vec<(String, String)> = self
            .environment(pod, container)
            .await?
            .into_iter()
            .map(|(k, v)| (k, relocate(v)))
            .collect();
        let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
        argv.extend(container.args.clone().unwrap_or_default());
        let argv: Vec<String> = argv.iter().map(|a| relocate(expand(a, &env))).collect();
        let Some(program) = argv.first() else {
            return Err(format!(
                "container {}: no command (the agent runs no image entrypoints)",
                container.name
            ));
        };
        let executable = self
            .binaries
            .get(program)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(program));
        let log = std::fs::File::create(self.work_dir.join(format!("{base}.log")))
            .map_err(|e| format!("container {}: log file: {e}", container.name))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("container {}: log file: {e}", container.name))?;
        Command::new(&executable)
            .args(&argv[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "container {}: command[0] {program:?} ({}): {e}",
                    container.name,
                    executable.display()
                )
            })
    }

    /// Writes the container's configMap and secret volumes under `dir`; returns each
    /// mount path with the directory that stands for it.
    async fn mount(
        &self,
        pod: &Pod,
        container: &Container,
        dir: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let namespace = pod.namespace().unwrap_or_default();
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let mut mounts = Vec::new();
        for (i, mount) in container.volume_mounts.iter().flatten().enumerate() {
            let field = format!(
                "container {}: volumeMounts[{i}] ({})",
                container.name, mount.name
            );
            let volume = volumes
                .iter()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| format!("{field}: no such volume"))?;
            let files: BTreeMap<String, Vec<u8>> = if let Some(source) = &volume.config_map {
                let map = Api::<ConfigMap>::namespaced(self.client.clone(), &namespace)
                    .get(&source.name)
                    .await
                    .map_err(|e| format!("{field}: configMap {}: {e}", source.name))?;
                map.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect()
            } else if let Some(source) = &volume.secret {
                let name = source.secret_name.clone().unwrap_or_default();
                let secret = Api::<Secret>::namespaced(self.client.clone(), &namespace)
                    .get(&name)
                    .await
                    .map_err(|e| format!("{field}: secret {name}: {e}"))?;
                secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()
            } else {
                // emptyDir, and the projected service-account token the admission plugin
                // adds to every Pod that does not opt out: an empty directory.
                BTreeMap::new()
            };
            let copy = dir.join(mount.mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(&copy).map_err(|e| format!("{field}: {e}"))?;
            for (key, bytes) in files {
                std::fs::write(copy.join(&key), bytes)
                    .map_err(|e| format!("{field}: {key}: {e}"))?;
            }
            mounts.push((mount.mount_path.clone(), copy));
        }
        Ok(mounts)
    }

    /// The container's environment, in order, as the kubelet resolves it.
    async fn environment(
        &self,
        pod: &Pod,
        container: &Container,
    ) -> Result<Vec<(String, String)>, String> {
        let namespace = pod.namespace().unwrap_or_default();
        let mut env: Vec<(String, String)> = Vec::new();
        for (i, var) in container.env.iter().flatten().enumerate() {
            let field = format!("container {}: env[{i}] ({})", container.name, var.name);
            let value = self
                .resolve(pod, &namespace, var)
                .await
                .map_err(|e| format!("{field}: {e}"))?;
            let value = expand(&value, &env);
            env.push((var.name.clone(), value));
        }
        Ok(env)
    }

    async fn resolve(&self, pod: &Pod, namespace: &str, var: &EnvVar) -> Result<String, String> {
        let Some(from) = &var.value_from else {
            return Ok(var.value.clone().unwrap_or_default());
        };
        if let Some(field) = &from.field_ref {
            return field_value(pod, &field.field_path);
        }
        if let Some(key) = &from.config_map_key_ref {
            let map = Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
                .get(&key.name)
                .await
                .map_err(|e| format!("configMapKeyRef {}: {e}", key.name))?;
            return map
                .data
                .unwrap_or_default()
                .remove(&key.key)
                .ok_or_else(|| format!("configMapKeyRef {}: no key {}", key.name, key.key));
        }
        if let Some(key) = &from.secret_key_ref {
            let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
                .get(&key.name)
                .await
                .map_err(|e| format!("secretKeyRef {}: {e}", key.name))?;
            let bytes = secret
                .data
                .unwrap_or_default()
                .remove(&key.key)
                .ok_or_else(|| format!("secretKeyRef {}: no key {}", key.name, key.key))?;
            return String::from_utf8(bytes.0)
                .map_err(|_| format!("secretKeyRef {}: key {} is not UTF-8", key.name, key.key));
        }
        Err("valueFrom: only fieldRef, configMapKeyRef and secretKeyRef are supported".into())
    }

    async fn report(
        &self,
        api: &Api<Pod>,
        name: &str,
        phase: &str,
        message: Option<&str>,
        containers: Vec<serde_json::Value>,
    ) {
        let ready = if phase == "Running" { "True" } else { "False" };
        let status = json!({
            "status": {
                "phase": phase,
                "message": message,
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": now(),
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
                    {"type": "ContainersReady", "status": ready, "lastTransitionTime": now()},
                    {"type": "Ready", "status": ready, "lastTransitionTime": now()},
                ],
                "containerStatuses": containers,
            }
        });
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            tracing::debug!(pod = %name, phase, error = %e, "reporting pod status");
        }
    }
}

fn terminated(
    container: &Container,
    code: i32,
    reason: &str,
    message: Option<&str>,
) -> serde_json::Value {
    json!({
        "name": container.name,
        "image": container.image.clone().unwrap_or_default(),
        "imageID": "",
        "ready": false,
        "restartCount": 0,
        "started": false,
        "state": {"terminated": {
            "exitCode": code, "reason": reason, "message": message,
            "startedAt": now(), "finishedAt": now(),
        }},
    })
}

/// A `fieldRef` path of the downward API.
fn field_value(pod: &Pod, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone()),
        "status.podIP" | "status.hostIP" => Some("127.0.0.1".into()),
        _ => keyed("metadata.annotations['", &meta.annotations)
            .or_else(|| keyed("metadata.labels['", &meta.labels)),
    };
    value.ok_or_else(|| format!("fieldRef {path:?} is not supported"))
}

/// Kubernetes' `$(VAR)` expansion of command lines and env values: a defined variable is
/// replaced, an undefined reference is kept as written, and `$$` escapes a `$`.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after
            .strip_prefix('(')
            .and_then(|inner| inner.split_once(')'))
        {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, value)) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = vec![
            ("INDEX".to_owned(), "3".to_owned()),
            ("N".to_owned(), "4".to_owned()),
        ];
        assert_eq!(expand("--shard=$(INDEX)/$(N)", &env), "--shard=3/4");
        assert_eq!(
            expand("$(MISSING) $$(INDEX) $5", &env),
            "$(MISSING) $(INDEX) $5"
        );
    }

    #[test]
    fn reads_annotations_through_field_refs() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("runner-0".into()),
                annotations: Some(BTreeMap::from([(
                    "batch.kubernetes.io/job-completion-index".to_owned(),
                    "0".to_owned(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            field_value(
                &pod,
                "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            ),
            Ok("0".into())
        );
        assert_eq!(field_value(&pod, "metadata.name"), Ok("runner-0".into()));
        assert!(field_value(&pod, "status.phase").is_err());
    }
}
