//! A real `mesh up` with a config and runtime directory in a short temporary directory, and
//! what tests and the benchmark ask of it: what it printed, what its registry says, its CLI.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh::{Address, Channel};
use mesh_proto::mesh::v1::{
    Instance, WatchRequest, WatchResponse, registry_client::RegistryClient,
};
use nix::sys::signal::Signal;
use tokio::{io::AsyncBufReadExt, process::Command, sync::watch};

use crate::process::Supervised;

/// How long `mesh up` may take to say where it listens.
const LISTEN_DEADLINE: Duration = Duration::from_secs(20);

/// How to start a [`MeshUp`]: the binary, the `[mesh]` settings and the `[[plugin]]` tables.
#[derive(Debug, Clone)]
pub struct Builder {
    bin: PathBuf,
    settings: String,
    plugins: String,
    drop_grace: Duration,
}

impl Builder {
    /// More `[mesh]` settings, as TOML lines (`listen = "127.0.0.1:0"`); `runtime_dir` is set.
    pub fn settings(mut self, settings: &str) -> Self {
        self.settings = settings.to_owned();
        self
    }

    /// The `[[plugin]]` tables, as TOML.
    pub fn plugins(mut self, plugins: &str) -> Self {
        self.plugins = plugins.to_owned();
        self
    }

    /// How long a dropped `MeshUp` may take to stop after SIGTERM; zero (the default) kills it
    /// at once, which is what a test wants.
    pub fn drop_grace(mut self, grace: Duration) -> Self {
        self.drop_grace = grace;
        self
    }

    /// Writes the config into a fresh short temporary directory, starts `mesh up` and waits
    /// until its router listens on its Unix socket.
    pub async fn start(self) -> anyhow::Result<MeshUp> {
        let dir = crate::short_tempdir()?;
        let config = dir.path().join("mesh.toml");
        write_config(&config, dir.path(), &self.settings, &self.plugins)?;
        MeshUp::launch(self.bin, self.drop_grace, dir, config).await
    }
}

/// A running `mesh up`; its process group is stopped when this is dropped.
#[derive(Debug)]
pub struct MeshUp {
    process: Supervised,
    bin: PathBuf,
    drop_grace: Duration,
    lines: watch::Receiver<Vec<String>>,
    /// When the process was started.
    pub spawned_at: Instant,
    /// The router's Unix socket.
    pub socket: PathBuf,
    /// The config file `mesh up` was started with.
    pub config: PathBuf,
    // Last, so the directory outlives the process using it.
    dir: tempfile::TempDir,
}

impl MeshUp {
    /// How to start `mesh up` from the binary `bin`, with no plugin until told.
    pub fn builder(bin: impl Into<PathBuf>) -> Builder {
        Builder {
            bin: bin.into(),
            settings: String::new(),
            plugins: String::new(),
            drop_grace: Duration::ZERO,
        }
    }

    async fn launch(
        bin: PathBuf,
        drop_grace: Duration,
        dir: tempfile::TempDir,
        config: PathBuf,
    ) -> anyhow::Result<MeshUp> {
        MeshUp::spawn(bin, drop_grace, dir, config, None, |_| {}).await
    }

    /// Starts `mesh up` from `bin` with the config file `config` already written in `dir`
    /// (see [`write_config`]), changed by `customize` (more arguments, environment), and waits
    /// until its router listens on `socket`.
    pub async fn launch_with(
        bin: PathBuf,
        dir: tempfile::TempDir,
        config: PathBuf,
        socket: PathBuf,
        customize: impl FnOnce(&mut Command),
    ) -> anyhow::Result<MeshUp> {
        MeshUp::spawn(bin, Duration::ZERO, dir, config, Some(socket), customize).await
    }

    async fn spawn(
        bin: PathBuf,
        drop_grace: Duration,
        dir: tempfile::TempDir,
        config: PathBuf,
        socket: Option<PathBuf>,
        customize: impl FnOnce(&mut Command),
    ) -> anyhow::Result<MeshUp> {
        let mut command = Command::new(&bin);
        command
            .arg("up")
            .arg("--config")
            .arg(&config)
            // `mesh up` listens on $MESH_SOCKET: never the one of whoever runs the tests.
            .env_remove("MESH_SOCKET");
        customize(&mut command);
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned_at = Instant::now();
        let mut process = Supervised::spawn(command, "mesh up")
            .with_context(|| format!("starting {}", bin.display()))?
            .drop_grace(drop_grace);
        let (tx, lines) = watch::channel(Vec::new());
        let tx = Arc::new(tx);
        read_lines(
            process.take_stdout().context("mesh up's stdout")?,
            tx.clone(),
        );
        read_lines(process.take_stderr().context("mesh up's stderr")?, tx);
        let expected = socket.clone();
        let mut mesh = MeshUp {
            process,
            bin,
            drop_grace,
            lines,
            spawned_at,
            socket: socket.unwrap_or_default(),
            config,
            dir,
        };
        // Where it listens is what it prints (the config may name any socket).
        let listening = match &expected {
            Some(socket) => format!("router listening on unix:{}", socket.display()),
            None => "router listening on unix:".to_owned(),
        };
        let line = mesh.wait_line(&listening, LISTEN_DEADLINE).await?;
        if expected.is_none() {
            let (_, path) = line
                .split_once("router listening on unix:")
                .context("the listening line names the socket")?;
            mesh.socket = PathBuf::from(path.trim());
        }
        Ok(mesh)
    }

    /// Rewrites the config file (for reloads); `runtime_dir` stays.
    pub fn rewrite(&self, settings: &str, plugins: &str) -> anyhow::Result<()> {
        write_config(&self.config, self.dir.path(), settings, plugins)
    }

    /// Kills this `mesh up` (if it still runs) and starts another on the same config and
    /// directories, as an operator restarting it would.
    pub async fn relaunch(self) -> anyhow::Result<MeshUp> {
        let MeshUp {
            mut process,
            bin,
            drop_grace,
            config,
            dir,
            ..
        } = self;
        process.kill().await?;
        drop(process);
        MeshUp::launch(bin, drop_grace, dir, config).await
    }

    /// The temporary directory holding the config and the runtime directory (`run/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything `mesh up` printed so far (stdout and stderr, one line each).
    pub fn output(&self) -> String {
        self.lines.borrow().join("\n")
    }

    /// The last `n` lines `mesh up` printed, indented, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.borrow();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n  ");
        format!("mesh up's last lines:\n  {tail}")
    }

    /// Waits until `mesh up` printed a line containing `needle`; returns that line.
    pub async fn wait_line(&self, needle: &str, within: Duration) -> anyhow::Result<String> {
        Ok(self.wait_lines(needle, 1, within).await?.remove(0))
    }

    /// Waits until `mesh up` printed `n` lines containing `needle`; returns them.
    pub async fn wait_lines(
        &self,
        needle: &str,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let matching = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect()
        };
        let mut lines = self.lines.clone();
        let found = tokio::time::timeout(within, lines.wait_for(|l| matching(l).len() >= n)).await;
        match found {
            Ok(Ok(lines)) => Ok(matching(&lines)),
            Ok(Err(_)) => bail!(
                "mesh up closed its output before {n} lines containing {needle:?}\n{}",
                self.tail(30)
            ),
            Err(_) => bail!(
                "not {n} lines containing {needle:?} within {within:?}\n{}",
                self.tail(30)
            ),
        }
    }

    /// The router's TCP address (`127.0.0.1:PORT`), once `mesh up` printed it (with `listen`).
    pub async fn tcp_address(&self, within: Duration) -> anyhow::Result<String> {
        let line = self
            .wait_line("router listening on http://", within)
            .await?;
        Ok(line
            .rsplit("http://")
            .next()
            .unwrap_or("")
            .trim()
            .to_owned())
    }

    /// The router's mTLS address (`127.0.0.1:PORT`), once `mesh up` printed it (with `listen`
    /// and `[tls]`).
    pub async fn tls_address(&self, within: Duration) -> anyhow::Result<String> {
        let line = self
            .wait_line("router listening on https://", within)
            .await?;
        Ok(line
            .rsplit("https://")
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("")
            .to_owned())
    }

    /// A channel to the router's own API (registry, manager).
    pub fn router(&self) -> Channel {
        Channel::to_server(Address::Unix(self.socket.clone()))
    }

    /// A `mesh::connect` channel to `service` through this mesh's router.
    pub async fn connect(&self, service: &str) -> anyhow::Result<Channel> {
        mesh::Connector::local(&self.socket)
            .connect(service)
            .await
            .with_context(|| format!("mesh::connect({service:?})"))
    }

    /// Opens a `Registry.Watch` of `service`; its first message is the instance set now.
    pub async fn watch(&self, service: &str) -> anyhow::Result<tonic::Streaming<WatchResponse>> {
        let request = WatchRequest {
            service: service.into(),
        };
        let mut registry = RegistryClient::new(self.router());
        let stream = tokio::time::timeout(Duration::from_secs(5), registry.watch(request))
            .await
            .context("Registry.Watch did not answer within 5 s")?
            .context("Registry.Watch")?;
        Ok(stream.into_inner())
    }

    /// Reads `updates` until `done` holds for the instance set; returns when it first held,
    /// and that set. Waits for the state itself, never for a step on the way: a watch may
    /// coalesce changes that come close together.
    pub async fn wait_on(
        &self,
        updates: &mut tonic::Streaming<WatchResponse>,
        within: Duration,
        done: impl Fn(&[Instance]) -> bool,
    ) -> anyhow::Result<(Instant, Vec<Instance>)> {
        let mut last = None;
        let found = tokio::time::timeout(within, async {
            while let Some(update) = updates.message().await? {
                if done(&update.instances) {
                    return Ok(Some((Instant::now(), update.instances)));
                }
                last = Some(update.instances);
            }
            Ok::<_, tonic::Status>(None)
        })
        .await;
        match found {
            Ok(Ok(Some(found))) => Ok(found),
            Ok(Ok(None)) => bail!("the router ended the registry watch\n{}", self.tail(30)),
            Ok(Err(status)) => bail!("registry watch failed: {status}\n{}", self.tail(30)),
            Err(_) => bail!(
                "the registry did not reach the expected state within {within:?}; last seen: {}\n{}",
                describe(last.as_deref()),
                self.tail(30)
            ),
        }
    }

    /// Watches `service` until `done` holds for its instances; see [`MeshUp::wait_on`].
    pub async fn wait_registry(
        &self,
        service: &str,
        within: Duration,
        done: impl Fn(&[Instance]) -> bool,
    ) -> anyhow::Result<(Instant, Vec<Instance>)> {
        let mut updates = self.watch(service).await?;
        self.wait_on(&mut updates, within, done).await
    }

    /// Watches `service` until it has exactly `n` instances; returns them.
    pub async fn wait_instances(
        &self,
        service: &str,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<Instance>> {
        let (_, instances) = self
            .wait_registry(service, within, |found| found.len() == n)
            .await
            .with_context(|| format!("{service} did not reach {n} instances"))?;
        Ok(instances)
    }

    /// Runs the `mesh` command against this mesh's socket, for at most `within`.
    pub async fn cli(&self, args: &[&str], within: Duration) -> anyhow::Result<Output> {
        let output = Command::new(&self.bin)
            .args(args)
            .env("MESH_SOCKET", &self.socket)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(within, output)
            .await
            .with_context(|| format!("mesh {args:?} did not finish within {within:?}"))?
            .with_context(|| format!("running mesh {args:?}"))
    }

    /// The manager's pid (the router runs in this process).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether `mesh up` still runs.
    pub fn is_running(&mut self) -> bool {
        self.process.exited().is_none()
    }

    /// Sends `signal` to `mesh up` (not to its group) and waits at most `within` for it to
    /// exit; returns how it exited.
    pub async fn signal_and_wait(
        &mut self,
        signal: Signal,
        within: Duration,
    ) -> anyhow::Result<ExitStatus> {
        self.process.signal(signal)?;
        self.process
            .wait(within)
            .await
            .with_context(|| format!("mesh up after {signal}\n{}", self.tail(30)))
    }

    /// Stops `mesh up` (SIGTERM: it deregisters and stops its plugins; SIGKILL after `grace`)
    /// and fails unless it exited successfully.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        let status = self.process.stop(grace).await?;
        if !status.success() {
            bail!(
                "mesh up ended with {status} when stopped\n{}",
                self.tail(30)
            );
        }
        Ok(())
    }
}

fn describe(instances: Option<&[Instance]>) -> String {
    match instances {
        None => "nothing".into(),
        Some(instances) => {
            let each: Vec<String> = instances
                .iter()
                .map(|i| {
                    let pid = i.labels.get("pid").map_or("?", String::as_str);
                    format!("{} (pid {pid})", i.id)
                })
                .collect();
            format!("[{}]", each.join(", "))
        }
    }
}

/// Writes the config file `config` for a mesh in `dir`: its runtime directory `dir/run`,
/// `settings` in `[mesh]`, then the `plugins` tables.
pub fn write_config(
    config: &Path,
    dir: &Path,
    settings: &str,
    plugins: &str,
) -> anyhow::Result<()> {
    let text = format!(
        "[mesh]\nruntime_dir = {:?}\n{settings}\n\n{plugins}",
        dir.join("run").display().to_string()
    );
    std::fs::write(config, text).with_context(|| format!("writing {}", config.display()))
}

fn read_lines(
    output: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    lines: Arc<watch::Sender<Vec<String>>>,
) {
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(output).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.send_modify(|l| l.push(line));
        }
    });
}
