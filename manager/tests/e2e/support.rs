//! Starting real `mesh up` processes with real plugins, and waiting on what they report: the
//! `mesh-testkit` harness (shared with mesh-bench), with the names these tests use and a test
//! failure instead of an error.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::Duration,
};

use mesh::Channel;
use mesh_proto::mesh::v1::{InstanceInfo, PluginRequest, manager_client::ManagerClient};
use mesh_testkit::MeshUp;

pub use mesh_testkit::alive;

/// How long any wait in these tests may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The `mesh` binary under test.
pub fn mesh_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh"))
}

/// The `echo-plugin` binary, built (once per test process) so it is never stale.
pub fn echo_plugin() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("echo-plugin", "echo-plugin"))
}

/// The `host-probe` test helper (mesh-testkit), built once per test process.
pub fn host_probe() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("mesh-testkit", "host-probe"))
}

/// The `files-plugin` example (the file lister), built once per test process.
pub fn files_plugin() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("files-plugin", "files-plugin"))
}

/// Builds `bin` of `package` beside the `mesh` binary under test.
fn build(package: &str, bin: &str) -> PathBuf {
    let target = mesh_bin().parent().expect("target dir");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if target.ends_with("release") {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let path = target.join(bin);
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// A short temporary directory (socket paths must stay under 108 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    mesh_testkit::short_tempdir().expect("temp dir")
}

/// Writes an executable shell script into `dir`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Fails the test with `error` and its causes.
fn fail(error: anyhow::Error) -> ! {
    panic!("{error:#}")
}

/// `{echo}` in a plugin table stands for the echo-plugin binary.
fn plugins(plugins: &str) -> String {
    plugins.replace("{echo}", &echo_plugin().display().to_string())
}

/// A running `mesh up`, killed when dropped.
pub struct Mesh {
    up: MeshUp,
    settings: String,
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
        let up = MeshUp::builder(mesh_bin())
            .settings(settings)
            .plugins(&self::plugins(plugins))
            .start()
            .await
            .unwrap_or_else(|e| fail(e));
        Mesh::wrap(up, settings)
    }

    fn wrap(up: MeshUp, settings: &str) -> Mesh {
        Mesh {
            socket: up.socket.clone(),
            config: up.config.clone(),
            settings: settings.to_owned(),
            up,
        }
    }

    /// Rewrites the config file with `plugins` (for reloads), keeping the `[mesh]` settings.
    pub fn rewrite(&self, plugins: &str) {
        self.up
            .rewrite(&self.settings, &self::plugins(plugins))
            .unwrap_or_else(|e| fail(e));
    }

    /// Starts `mesh up` again on the same config and directories (after this one was killed).
    pub async fn relaunch(self) -> Mesh {
        let up = self.up.relaunch().await.unwrap_or_else(|e| fail(e));
        Mesh::wrap(up, &self.settings)
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
        let up = MeshUp::launch_with(mesh_bin().to_owned(), dir, config, socket, customize)
            .await
            .unwrap_or_else(|e| fail(e));
        Mesh::wrap(up, "")
    }

    /// Waits until the manager prints a line containing `needle`; returns that line.
    pub async fn wait_line(&self, needle: &str) -> String {
        self.up
            .wait_line(needle, DEADLINE)
            .await
            .unwrap_or_else(|e| fail(e))
    }

    /// Waits until the manager printed `n` lines containing `needle`; returns them.
    pub async fn wait_lines(&self, needle: &str, n: usize) -> Vec<String> {
        self.up
            .wait_lines(needle, n, DEADLINE)
            .await
            .unwrap_or_else(|e| fail(e))
    }

    /// The router's TCP address (`127.0.0.1:PORT`), as `mesh up` printed it (needs `listen`).
    pub async fn tcp_address(&self) -> String {
        self.up
            .tcp_address(DEADLINE)
            .await
            .unwrap_or_else(|e| fail(e))
    }

    /// Everything the manager printed so far.
    pub fn output(&self) -> String {
        self.up.output()
    }

    /// A channel to the router itself.
    pub fn router(&self) -> Channel {
        self.up.router()
    }

    /// A `mesh::connect` channel to `service` through this mesh's router.
    pub async fn connect(&self, service: &str) -> Channel {
        self.up.connect(service).await.unwrap_or_else(|e| fail(e))
    }

    /// Waits (on Registry.Watch) until `service` has `n` instances; returns them.
    pub async fn wait_instances(&self, service: &str, n: usize) -> Vec<Registered> {
        self.wait_registry(service, |found| found.len() == n).await
    }

    /// Waits (on Registry.Watch) until `done` holds for `service`'s instances; returns them.
    /// Wait for the state wanted, never for a step on the way: the watch coalesces changes.
    pub async fn wait_registry(
        &self,
        service: &str,
        done: impl Fn(&[Registered]) -> bool,
    ) -> Vec<Registered> {
        let registered = |found: &[mesh_proto::mesh::v1::Instance]| -> Vec<Registered> {
            found.iter().map(Registered::from).collect()
        };
        let (_, found) = self
            .up
            .wait_registry(service, DEADLINE, |found| done(&registered(found)))
            .await
            .unwrap_or_else(|e| fail(e));
        registered(&found)
    }

    /// Asks the Manager API (`Get`) until instance `id` of `plugin` is in `state`; returns it.
    ///
    /// For states that last (`failed`, `stopped`, `ready`): the API has no stream of instance
    /// states, so a state that passes quickly may be missed between two questions.
    pub async fn wait_state(&self, plugin: &str, id: &str, state: &str) -> InstanceInfo {
        let mut manager = ManagerClient::new(self.router());
        let mut last = None;
        let asking = async {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let request = PluginRequest {
                    name: plugin.into(),
                };
                let answer = match manager.get(request).await {
                    Ok(answer) => answer,
                    // `mesh up` listens before it has started every plugin.
                    Err(status) if status.code() == tonic::Code::NotFound => continue,
                    Err(status) => panic!("Manager.Get: {status}"),
                };
                let found = answer
                    .into_inner()
                    .instances
                    .into_iter()
                    .find(|i| i.id == id);
                if let Some(found) = &found
                    && found.state == state
                {
                    return found.clone();
                }
                last = found;
            }
        };
        match tokio::time::timeout(DEADLINE, asking).await {
            Ok(found) => found,
            Err(_) => panic!(
                "{id} not {state} within {DEADLINE:?}; last seen: {last:?}\n{}",
                self.up.tail(30)
            ),
        }
    }

    /// Runs the `mesh` command against this mesh's socket.
    pub async fn cli(&self, args: &[&str]) -> Output {
        self.up
            .cli(args, DEADLINE)
            .await
            .unwrap_or_else(|e| fail(e))
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
        self.up.pid()
    }

    /// Whether the manager is still running.
    pub fn is_running(&mut self) -> bool {
        self.up.is_running()
    }

    /// Sends `signal` and waits for the manager to exit; returns its exit status.
    pub async fn stop_with(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> std::process::ExitStatus {
        self.up
            .signal_and_wait(signal, DEADLINE)
            .await
            .unwrap_or_else(|e| fail(e))
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
    mesh_testkit::write_config(
        &dir.path().join("mesh.toml"),
        dir.path(),
        settings,
        &self::plugins(plugins),
    )
    .unwrap_or_else(|e| fail(e));
}

/// Polls `condition` every 10 ms until it holds; fails the test after `within`.
pub async fn eventually(what: &str, within: Duration, condition: impl FnMut() -> bool) {
    mesh_testkit::assert_eventually(what, within, condition).await;
}

/// Waits until none of `pids` is alive.
pub async fn wait_gone(pids: &[u32], within: Duration) {
    mesh_testkit::assert_gone(pids, within).await;
}

/// Runs grpcurl (plaintext) with `args`.
pub fn grpcurl(args: &[&str]) -> Output {
    mesh_testkit::grpcurl(args).unwrap_or_else(|e| fail(e))
}

/// Runs grpcurl and returns its stdout, failing the test with its stderr if it failed.
pub fn grpcurl_ok(args: &[&str]) -> String {
    mesh_testkit::grpcurl_ok(args).unwrap_or_else(|e| fail(e))
}

/// Talks to a `host-probe` (testkit/src/bin/host-probe.rs) over its Unix socket: one line
/// out, one line back (`ok TEXT` or `err CODE MESSAGE`).
pub struct Probe {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Probe {
    pub async fn connect(path: &Path) -> Probe {
        use tokio::io::AsyncBufReadExt;
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect the probe");
        let (read, write) = stream.into_split();
        Probe {
            lines: tokio::io::BufReader::new(read).lines(),
            write,
        }
    }

    /// Sends one call; the probe's answer: `Ok(text)` or `Err((code, message))` (a gRPC code,
    /// or an errno for the probe's own system calls).
    pub async fn call(&mut self, line: &str) -> Result<String, (i32, String)> {
        use tokio::io::AsyncWriteExt;
        self.write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let answer = tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("the probe answers in time")
            .unwrap()
            .expect("the probe is alive");
        if let Some(ok) = answer.strip_prefix("ok ") {
            return Ok(ok.to_owned());
        }
        let rest = answer.strip_prefix("err ").expect("ok or err");
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Err((code.parse().unwrap(), message.to_owned()))
    }

    /// A call the test expects to succeed; its answer.
    pub async fn ok(&mut self, line: &str) -> String {
        self.call(line)
            .await
            .unwrap_or_else(|e| panic!("{line}: expected ok, got {e:?}"))
    }

    /// The errno of a system call the test expects to fail.
    pub async fn errno(&mut self, line: &str) -> i32 {
        match self.call(line).await {
            Err((code, _)) => code,
            Ok(text) => panic!("{line}: expected a failure, got ok {text}"),
        }
    }

    /// A call the test expects to be refused with PERMISSION_DENIED; its message.
    pub async fn denied(&mut self, line: &str) -> String {
        match self.call(line).await {
            Err((code, message)) if code == tonic::Code::PermissionDenied as i32 => message,
            other => panic!("{line}: expected PERMISSION_DENIED, got {other:?}"),
        }
    }
}
