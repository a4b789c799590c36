//! The sidecar's own settings, layered as every Trimtab binary layers them:
//! defaults < settings file (`--config`) < environment (`TRIMTAB_*`) < flags.
//! `--print-config` shows the result (nothing here is secret).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use trimtab_api::Duration;

/// Where the pod's CA bundle for the config server is mounted (the injector's volume).
pub const DEFAULT_CONTROL_PLANE_CA: &str = "/var/run/secrets/trimtab/ca.crt";

/// Where the projected service-account token with audience `trimtab` is mounted.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/trimtab/token";

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Command line; each flag also reads its `TRIMTAB_*` environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "trimtab-sidecar",
    version,
    about = "The Trimtab sidecar proxy: balances an application's outbound HTTP calls"
)]
pub struct Cli {
    /// A YAML settings file (camelCase keys of the settings, as --print-config shows them).
    #[arg(long, env = "TRIMTAB_CONFIG")]
    pub config: Option<PathBuf>,
    /// BalancerPolicy YAML files with static `endpoints:` (multi-document allowed);
    /// hot-reloaded when they change.
    #[arg(long = "policy", env = "TRIMTAB_POLICY", value_delimiter = ',', num_args = 1..)]
    pub policies: Vec<PathBuf>,
    /// HTTPS URL of the operator's config server (e.g.
    /// `https://trimtab-operator.trimtab-system.svc:8443`): the sidecar long-polls it for
    /// its routes and posts load reports. Excludes --policy.
    #[arg(long, env = "TRIMTAB_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// PEM CA bundle that signs the config server's certificate
    /// [default: /var/run/secrets/trimtab/ca.crt].
    #[arg(long, env = "TRIMTAB_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,
    /// The same CA bundle as PEM text instead of a file (the injector sets it, so no
    /// Secret or ConfigMap has to be copied into every namespace). Excludes
    /// --control-plane-ca.
    #[arg(
        long,
        env = "TRIMTAB_CONTROL_PLANE_CA_PEM",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub control_plane_ca_pem: Option<String>,
    /// The projected service-account token (audience `trimtab`) sent to the config
    /// server; re-read on every request, as the kubelet rotates it
    /// [default: /var/run/secrets/trimtab/token].
    #[arg(long, env = "TRIMTAB_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Directory keeping the last good config, served at start when no source answers.
    #[arg(long, env = "TRIMTAB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Port of /metrics, /live, /ready and /config [default: 15020].
    #[arg(long, env = "TRIMTAB_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// Address the admin port binds [default: 0.0.0.0, so Prometheus can scrape the pod].
    #[arg(long, env = "TRIMTAB_ADMIN_ADDRESS")]
    pub admin_address: Option<IpAddr>,
    /// Address route listeners bind [default: 127.0.0.1: only the pod's application].
    #[arg(long, env = "TRIMTAB_LISTEN_ADDRESS")]
    pub listen_address: Option<IpAddr>,
    /// Log format [default: text].
    #[arg(long, env = "TRIMTAB_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `trimtab_sidecar=debug` [default: info].
    #[arg(long, env = "TRIMTAB_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Largest request body in bytes; larger requests get 413 [default: 67108864].
    #[arg(long, env = "TRIMTAB_MAX_REQUEST_BODY_BYTES")]
    pub max_request_body_bytes: Option<u64>,
    /// Largest request head in bytes; larger get 431 [default: 65536].
    #[arg(long, env = "TRIMTAB_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// How often policy files are re-read even without a file-system event [default: 2s].
    #[arg(long, env = "TRIMTAB_RELOAD_POLL_INTERVAL")]
    pub reload_poll_interval: Option<Duration>,
    /// Threads serving requests [default: one per CPU, or TOKIO_WORKER_THREADS]; 1 runs a
    /// single event loop.
    #[arg(long, env = "TRIMTAB_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Print the effective settings as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The effective settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Policy files.
    pub policies: Vec<PathBuf>,
    /// The config server's URL; `None` serves policy files instead.
    pub control_plane: Option<String>,
    /// CA bundle for the config server's certificate.
    pub control_plane_ca: PathBuf,
    /// The CA bundle as PEM text; when set, used instead of `control_plane_ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_ca_pem: Option<String>,
    /// The token file sent to the config server.
    pub token_file: PathBuf,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Admin port.
    pub admin_port: u16,
    /// Admin bind address.
    pub admin_address: IpAddr,
    /// Route listener bind address.
    pub listen_address: IpAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Largest request body in bytes.
    pub max_request_body_bytes: u64,
    /// Largest request head in bytes.
    pub max_header_bytes: usize,
    /// Policy file poll interval.
    pub reload_poll_interval: Duration,
    /// Request-serving threads; `None` lets the runtime choose (one per CPU).
    pub worker_threads: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policies: Vec::new(),
            control_plane: None,
            control_plane_ca: PathBuf::from(DEFAULT_CONTROL_PLANE_CA),
            control_plane_ca_pem: None,
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            state_dir: None,
            admin_port: 15020,
            admin_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            listen_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            max_request_body_bytes: 64 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            reload_poll_interval: Duration::from_secs(2),
            worker_threads: None,
        }
    }
}

/// The settings file: every key optional.
#[allow(missing_docs)] // the same fields as `Settings`
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSettings {
    pub policies: Option<Vec<PathBuf>>,
    pub control_plane: Option<String>,
    pub control_plane_ca: Option<PathBuf>,
    pub control_plane_ca_pem: Option<String>,
    pub token_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub admin_port: Option<u16>,
    pub admin_address: Option<IpAddr>,
    pub listen_address: Option<IpAddr>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub max_request_body_bytes: Option<u64>,
    pub max_header_bytes: Option<usize>,
    pub reload_poll_interval: Option<Duration>,
    pub worker_threads: Option<usize>,
}

/// A settings file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Unreadable.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid settings YAML.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// Two config sources at once: the sidecar serves one, so which would win is unclear.
    #[error(
        "--policy ({policies}) and --control-plane ({control_plane}) are mutually exclusive: serve static policy files or the operator's config, not both"
    )]
    TwoSources {
        /// The policy files, comma-separated.
        policies: String,
        /// The control-plane URL.
        control_plane: String,
    },
    /// The CA given twice: which one the sidecar trusts would be unclear.
    #[error(
        "--control-plane-ca ({path}) and --control-plane-ca-pem (TRIMTAB_CONTROL_PLANE_CA_PEM) are mutually exclusive: give the CA bundle as a file or as PEM text, not both"
    )]
    TwoCas {
        /// The CA file given.
        path: String,
    },
}

impl Settings {
    /// Defaults, overridden by the file, overridden by environment and flags (clap has
    /// already given flags precedence over the environment).
    pub fn layered(file: FileSettings, cli: &Cli) -> Self {
        let d = Self::default();
        Self {
            policies: if cli.policies.is_empty() {
                file.policies.unwrap_or(d.policies)
            } else {
                cli.policies.clone()
            },
            control_plane: cli
                .control_plane
                .clone()
                .or(file.control_plane)
                .or(d.control_plane),
            control_plane_ca: cli
                .control_plane_ca
                .clone()
                .or(file.control_plane_ca)
                .unwrap_or(d.control_plane_ca),
            control_plane_ca_pem: cli
                .control_plane_ca_pem
                .clone()
                .or(file.control_plane_ca_pem)
                .or(d.control_plane_ca_pem),
            token_file: cli
                .token_file
                .clone()
                .or(file.token_file)
                .unwrap_or(d.token_file),
            state_dir: cli.state_dir.clone().or(file.state_dir).or(d.state_dir),
            admin_port: cli.admin_port.or(file.admin_port).unwrap_or(d.admin_port),
            admin_address: cli
                .admin_address
                .or(file.admin_address)
                .unwrap_or(d.admin_address),
            listen_address: cli
                .listen_address
                .or(file.listen_address)
                .unwrap_or(d.listen_address),
            log_format: cli.log_format.or(file.log_format).unwrap_or(d.log_format),
            log_level: cli
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or(d.log_level),
            max_request_body_bytes: cli
                .max_request_body_bytes
                .or(file.max_request_body_bytes)
                .unwrap_or(d.max_request_body_bytes),
            max_header_bytes: cli
                .max_header_bytes
                .or(file.max_header_bytes)
                .unwrap_or(d.max_header_bytes),
            reload_poll_interval: cli
                .reload_poll_interval
                .or(file.reload_poll_interval)
                .unwrap_or(d.reload_poll_interval),
            worker_threads: cli
                .worker_threads
                .or(file.worker_threads)
                .or(d.worker_threads),
        }
    }

    /// Reads the settings file named by `--config`, if any, and layers.
    pub fn load(cli: &Cli) -> Result<Self, SettingsError> {
        let file = match &cli.config {
            None => FileSettings::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                    path: path.clone(),
                    source,
                })?;
                serde_yaml_ng::from_str(&text).map_err(|e| SettingsError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
        };
        // Checked before layering, which fills in the default CA path.
        let explicit_ca = cli
            .control_plane_ca
            .clone()
            .or(file.control_plane_ca.clone());
        let pem = cli.control_plane_ca_pem.is_some() || file.control_plane_ca_pem.is_some();
        if let (Some(path), true) = (explicit_ca, pem) {
            return Err(SettingsError::TwoCas {
                path: path.display().to_string(),
            });
        }
        let settings = Self::layered(file, cli);
        settings.check()?;
        Ok(settings)
    }

    /// Refuses settings that contradict each other, whichever layer set them.
    pub fn check(&self) -> Result<(), SettingsError> {
        if let Some(url) = &self.control_plane
            && !self.policies.is_empty()
        {
            let policies: Vec<String> = self
                .policies
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            return Err(SettingsError::TwoSources {
                policies: policies.join(","),
                control_plane: url.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("trimtab-sidecar").chain(args.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: FileSettings =
            serde_yaml_ng::from_str("adminPort: 9000\nlogFormat: json\nlogLevel: debug\n")
                .expect("valid");
        let s = Settings::layered(
            file,
            &cli(&["--admin-port", "9100", "--policy", "a.yaml", "b.yaml"]),
        );
        assert_eq!(s.admin_port, 9100);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.log_level, "debug");
        assert_eq!(
            s.policies,
            [PathBuf::from("a.yaml"), PathBuf::from("b.yaml")]
        );
        assert_eq!(s.listen_address, Settings::default().listen_address);
    }

    #[test]
    fn refuses_unknown_keys_in_the_settings_file() {
        let err =
            serde_yaml_ng::from_str::<FileSettings>("adminPortt: 1\n").expect_err("unknown key");
        assert!(err.to_string().contains("adminPortt"), "{err}");
    }

    #[test]
    fn control_plane_settings_layer_like_the_others() {
        let file: FileSettings = serde_yaml_ng::from_str(
            "controlPlane: https://file.example:8443\ntokenFile: /file/token\n",
        )
        .expect("valid");
        let s = Settings::layered(
            file,
            &cli(&["--control-plane", "https://flag.example:8443"]),
        );
        assert_eq!(
            s.control_plane.as_deref(),
            Some("https://flag.example:8443")
        );
        assert_eq!(s.token_file, PathBuf::from("/file/token"));
        assert_eq!(s.control_plane_ca, PathBuf::from(DEFAULT_CONTROL_PLANE_CA));
        assert!(s.check().is_ok());
    }

    #[test]
    fn refuses_policy_files_and_a_control_plane_together() {
        // From different layers too: the file names policies, the flag a control plane.
        let file: FileSettings = serde_yaml_ng::from_str("policies: [a.yaml]\n").expect("valid");
        let s = Settings::layered(file, &cli(&["--control-plane", "https://op:8443"]));
        let err = s.check().expect_err("two sources");
        assert_eq!(
            err.to_string(),
            "--policy (a.yaml) and --control-plane (https://op:8443) are mutually exclusive: serve static policy files or the operator's config, not both"
        );
    }

    #[test]
    fn the_ca_comes_from_a_file_or_pem_text_never_both() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let s = Settings::load(&cli(&["--control-plane-ca-pem", pem])).expect("pem alone");
        assert_eq!(s.control_plane_ca_pem.as_deref(), Some(pem));
        let err = Settings::load(&cli(&[
            "--control-plane-ca",
            "/etc/ca.crt",
            "--control-plane-ca-pem",
            pem,
        ]))
        .expect_err("both");
        assert_eq!(
            err.to_string(),
            "--control-plane-ca (/etc/ca.crt) and --control-plane-ca-pem (TRIMTAB_CONTROL_PLANE_CA_PEM) are mutually exclusive: give the CA bundle as a file or as PEM text, not both"
        );
    }

    #[test]
    fn printed_settings_read_back_as_a_settings_file() {
        let yaml = serde_yaml_ng::to_string(&Settings::default()).expect("serializes");
        let file: FileSettings = serde_yaml_ng::from_str(&yaml).expect("reads back");
        assert_eq!(Settings::layered(file, &cli(&[])), Settings::default());
    }
}
