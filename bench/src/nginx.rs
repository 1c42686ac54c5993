//! Debian's nginx as the well-known proxy to compare with: `grpc_pass` to one plugin instance's
//! Unix socket, with a pool of upstream keep-alive connections, started with its own prefix.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::process::Command;

use mesh_testkit::Supervised;

/// How long nginx may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running nginx; stopped (master and workers) when dropped.
pub(crate) struct Nginx {
    process: Supervised,
    /// Where it accepts HTTP/2 cleartext (h2c) gRPC calls.
    pub(crate) addr: SocketAddr,
    /// `nginx -v`.
    pub(crate) version: String,
    _dir: tempfile::TempDir,
}

/// The nginx binary on `PATH` or in `/usr/sbin`, if any.
pub(crate) fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

impl Nginx {
    /// Starts `binary` proxying to the gRPC server on the Unix socket `upstream`.
    pub(crate) async fn start(binary: &Path, upstream: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mbn")
            .tempdir_in("/tmp")
            .context("temporary directory for nginx")?;
        // A free port: bind, read it, release it for nginx (a race only with other binds).
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config_text(dir.path(), addr, upstream))?;
        let log = dir.path().join("nginx.log");
        let error_log = dir.path().join("error.log");
        let version = version(binary).await;
        let output = std::fs::File::create(&log)?;
        let mut command = Command::new(binary);
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let mut process = Supervised::spawn(command, "nginx")
            .with_context(|| format!("starting {}", binary.display()))?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            let why = if let Some(status) = process.exited() {
                format!("nginx exited with {status}")
            } else if Instant::now() > deadline {
                format!("nginx did not accept on {addr} within {START_DEADLINE:?}")
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let said = [&log, &error_log]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .collect::<Vec<_>>()
                .join("");
            bail!("{why}: {}", said.trim());
        }
        Ok(Self {
            process,
            addr,
            version,
            _dir: dir,
        })
    }

    /// The master's and the workers' pids.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let master = self.process.pid();
        let mut pids = vec![master];
        pids.extend(crate::procstat::children(master));
        pids
    }

    /// Stops nginx (fast shutdown of master and workers).
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        self.process.stop(Duration::from_secs(5)).await?;
        Ok(())
    }
}

async fn version(binary: &Path) -> String {
    match Command::new(binary).arg("-v").output().await {
        // nginx prints its version on stderr.
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.trim();
            said.strip_prefix("nginx version: ")
                .unwrap_or(said)
                .to_owned()
        }
        Err(error) => format!("unknown ({error})"),
    }
}

/// The configuration: one server, HTTP/2 cleartext, `grpc_pass` to the upstream socket over a
/// keep-alive pool; limits raised so that nginx is never the one refusing concurrency or
/// closing connections during a run.
fn config_text(prefix: &Path, addr: SocketAddr, upstream: &Path) -> String {
    let prefix = prefix.display();
    // Plugin sockets are 0600 in a 0700 directory: the worker must run as their owner.
    let user = if nix::unistd::geteuid().is_root() {
        "user root;\n"
    } else {
        ""
    };
    format!(
        r#"# Written by mesh-bench.
{user}daemon off;
master_process on;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    # Calls per client connection (HTTP/2 too, since nginx 1.19.7), then GOAWAY. nginx's
    # default, 1000, fails a call in every few hundred at 64 in flight (the client sees the
    # GOAWAY); unbounded, an HTTP/2 connection's memory grows with every call and throughput
    # falls round after round (to a quarter within 10 s). 10000 keeps nginx at its steady
    # rate, at the price of a failed call in a few hundred, which the report counts.
    keepalive_requests 10000;
    keepalive_timeout 300s;
    # Above every in-flight level measured, so nginx never queues streams (its default is 128).
    http2_max_concurrent_streams 1024;

    upstream echo {{
        server unix:{upstream};
        # nginx does not multiplex upstream gRPC: one connection per call in flight, so the
        # idle pool must hold as many as the most calls in flight measured.
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {addr} http2;
        location / {{
            grpc_pass grpc://echo;
        }}
    }}
}}
"#,
        upstream = upstream.display(),
    )
}
