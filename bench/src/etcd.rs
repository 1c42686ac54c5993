//! A throwaway etcd on loopback (Debian's `etcd-server`): free ports, a temporary data
//! directory, stopped with SIGTERM when dropped. For the router → router row and `etcd-sim`.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh::{Address, Channel};
use mesh_router::cluster::etcd::pb;

/// A running etcd.
pub(crate) struct LocalEtcd {
    child: Child,
    /// `host:port` of its client endpoint.
    pub(crate) endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// A free loopback port, for servers that cannot be handed a bound socket.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether an `etcd` binary is on `PATH`.
pub(crate) fn installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts etcd and waits (at most 20 s) until it answers.
pub(crate) async fn start() -> anyhow::Result<LocalEtcd> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .arg("--name=bench")
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=bench={peer_url}"))
        .arg("--quota-backend-bytes=8589934592")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("run etcd (Debian's etcd-server)")?;
    let endpoint = format!("127.0.0.1:{client}");
    let etcd = LocalEtcd {
        child,
        endpoint: endpoint.clone(),
        _dir: dir,
    };
    let started = Instant::now();
    let mut kv = pb::kv_client::KvClient::new(Channel::to_server(Address::Tcp(endpoint)));
    loop {
        let probe = pb::RangeRequest {
            key: b"probe".to_vec(),
            ..Default::default()
        };
        if kv.range(probe).await.is_ok() {
            return Ok(etcd);
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("etcd did not answer within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
