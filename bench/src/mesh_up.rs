//! A real `mesh up` (the release binary) with a temporary config and runtime directory, and
//! what the harness needs from it: where it listens and what its registry says.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh::{Address, Channel};
use mesh_proto::mesh::v1::Instance;
use mesh_proto::mesh::v1::{WatchRequest, registry_client::RegistryClient};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

use crate::{Bins, child::Supervised};

/// The service the echo plugin registers as.
pub(crate) const SERVICE: &str = "plugin.echo";
/// How long `mesh up` may take to print where it listens.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);
/// How long a stopping `mesh up` may take before it is killed (it stops its plugins first).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How to configure one `mesh up`.
#[derive(Debug, Clone)]
pub(crate) struct MeshSpec {
    /// `instances` of the echo plugin.
    pub(crate) instances: u32,
    /// `backoff_base` of the echo plugin; `None` keeps the default.
    pub(crate) backoff_base: Option<String>,
    /// Whether the router also listens on TCP (`listen = "127.0.0.1:0"`).
    pub(crate) tcp: bool,
}

/// A running `mesh up`; stopped (with its plugins) when dropped.
pub(crate) struct MeshUp {
    process: Supervised,
    /// When the process was started.
    pub(crate) spawned_at: Instant,
    /// The router's Unix socket.
    pub(crate) socket: PathBuf,
    /// The router's TCP address (`127.0.0.1:PORT`), when asked for.
    pub(crate) tcp: Option<String>,
    log: PathBuf,
    // Last, so the directory outlives the process using it.
    _dir: tempfile::TempDir,
}

impl MeshUp {
    /// Writes the config, starts `mesh up`, and waits until it prints where it listens.
    pub(crate) async fn start(bins: &Bins, spec: &MeshSpec) -> anyhow::Result<Self> {
        // Short, so that socket paths stay far below the 108-byte limit.
        let dir = tempfile::Builder::new()
            .prefix("mb")
            .tempdir_in("/tmp")
            .context("temporary directory for mesh up")?;
        let config = dir.path().join("mesh.toml");
        std::fs::write(&config, config_text(bins, spec, dir.path()))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = dir.path().join("mesh-up.log");
        let stderr = std::fs::File::create(&log)?;
        let mut command = Command::new(&bins.mesh);
        command
            .arg("up")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let spawned_at = Instant::now();
        let mut process = Supervised::spawn(command, "mesh up")
            .with_context(|| format!("starting {}", bins.mesh.display()))?;
        let stdout = process.take_stdout().context("mesh up stdout")?;

        let mut lines = BufReader::new(stdout).lines();
        let mut unix = false;
        let mut tcp = None;
        let listening = tokio::time::timeout(LISTEN_DEADLINE, async {
            while !(unix && (tcp.is_some() || !spec.tcp)) {
                let Some(line) = lines.next_line().await? else {
                    return Ok::<bool, std::io::Error>(false);
                };
                if line.contains("router listening on unix:") {
                    unix = true;
                } else if let Some(addr) = line.split("router listening on http://").nth(1) {
                    tcp = Some(addr.trim().to_owned());
                }
            }
            Ok(true)
        })
        .await;
        // Keep reading stdout into the log, so mesh up never writes into a closed pipe.
        let tail_log = log.clone();
        tokio::spawn(async move {
            let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(&tail_log) else {
                return;
            };
            // A few short lines in a run: writing them synchronously blocks nothing that matters.
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(file, "stdout: {line}");
            }
        });
        let mesh = Self {
            process,
            spawned_at,
            socket: dir.path().join("run/mesh.sock"),
            tcp,
            log,
            _dir: dir,
        };
        match listening {
            Ok(Ok(true)) => Ok(mesh),
            Ok(Ok(false)) => bail!("mesh up exited before listening\n{}", mesh.log_tail()),
            Ok(Err(error)) => bail!("reading mesh up's output: {error}\n{}", mesh.log_tail()),
            Err(_) => bail!(
                "mesh up did not say where it listens within {LISTEN_DEADLINE:?}\n{}",
                mesh.log_tail()
            ),
        }
    }

    /// A channel to the router's own API.
    pub(crate) fn router(&self) -> Channel {
        Channel::to_server(Address::Unix(self.socket.clone()))
    }

    /// Watches the registry (`mesh.v1.Registry/Watch` on the router) until `done` holds for the
    /// echo plugin's instances; returns when it first held, and those instances.
    pub(crate) async fn wait_registry(
        &self,
        within: Duration,
        done: impl Fn(&[Instance]) -> bool,
    ) -> anyhow::Result<(Instant, Vec<Instance>)> {
        let mut updates = self.watch().await?;
        self.wait_on(&mut updates, within, done).await
    }

    /// Opens a watch of the echo plugin's instances; its first message is the set now.
    pub(crate) async fn watch(&self) -> anyhow::Result<tonic::Streaming<WatchResponse>> {
        let request = WatchRequest {
            service: SERVICE.into(),
        };
        let mut registry = RegistryClient::new(self.router());
        let stream = tokio::time::timeout(Duration::from_secs(5), registry.watch(request))
            .await
            .context("Registry.Watch did not answer within 5 s")?
            .context("Registry.Watch")?;
        Ok(stream.into_inner())
    }

    /// Reads `updates` until `done` holds; see [`MeshUp::wait_registry`].
    pub(crate) async fn wait_on(
        &self,
        updates: &mut tonic::Streaming<WatchResponse>,
        within: Duration,
        done: impl Fn(&[Instance]) -> bool,
    ) -> anyhow::Result<(Instant, Vec<Instance>)> {
        let found = tokio::time::timeout(within, async {
            while let Some(update) = updates.message().await? {
                if done(&update.instances) {
                    return Ok(Some((Instant::now(), update.instances)));
                }
            }
            Ok::<_, tonic::Status>(None)
        })
        .await;
        match found {
            Ok(Ok(Some(found))) => Ok(found),
            Ok(Ok(None)) => bail!("the router ended the registry watch\n{}", self.log_tail()),
            Ok(Err(status)) => bail!("registry watch failed: {status}\n{}", self.log_tail()),
            Err(_) => bail!(
                "the registry did not reach the expected state within {within:?}\n{}",
                self.log_tail()
            ),
        }
    }

    /// The manager's pid (the router runs in this process).
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops `mesh up` (SIGTERM: it deregisters and stops its plugins) and waits for it.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        // The directory (with the log) lives until the end of this function.
        let Self {
            process, log, _dir, ..
        } = self;
        let status = process.stop(STOP_GRACE).await?;
        if !status.success() {
            bail!("mesh up ended with {status} when stopped\n{}", tail(&log));
        }
        Ok(())
    }

    /// The last lines mesh up wrote, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

/// The last lines of `log`, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    format!("last lines of {}:\n  {tail}", log.display())
}

pub(crate) use mesh_proto::mesh::v1::WatchResponse;

/// The process id the manager put in an instance's labels.
pub(crate) fn pid_of(instance: &Instance) -> Option<u32> {
    instance.labels.get("pid")?.parse().ok()
}

/// The Unix socket an instance serves on.
pub(crate) fn socket_of(instance: &Instance) -> anyhow::Result<PathBuf> {
    match instance.endpoint.parse::<Address>() {
        Ok(Address::Unix(path)) => Ok(path),
        _ => bail!(
            "instance {} has endpoint {:?}, not a Unix socket",
            instance.id,
            instance.endpoint
        ),
    }
}

fn config_text(bins: &Bins, spec: &MeshSpec, dir: &Path) -> String {
    let mut text = format!(
        "# Written by mesh-bench.\n[mesh]\nruntime_dir = {:?}\n",
        dir.join("run").display().to_string()
    );
    if spec.tcp {
        text.push_str("listen = \"127.0.0.1:0\"\n");
    }
    if mesh::tuning::busy_poll_from_env() {
        text.push_str("busy_poll = true\n");
    }
    text.push_str(&format!(
        "\n[[plugin]]\nname = \"echo\"\ncommand = {:?}\ninstances = {}\nstop_grace = \"2s\"\n\
         # Every kill measures the first restart: the delay starts over after 1 ms of readiness,\n\
         # and repeated kills never count as a crash loop.\n\
         backoff_reset = \"1ms\"\nmax_failures = 1000000\n",
        bins.echo_plugin.display().to_string(),
        spec.instances,
    ));
    if let Some(base) = &spec.backoff_base {
        text.push_str(&format!("backoff_base = {base:?}\n"));
    }
    text
}
