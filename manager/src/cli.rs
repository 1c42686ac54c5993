//! The `mesh` subcommands that control a running `mesh up` through `mesh.v1.Manager`.

use std::{path::Path, time::Duration};

use anyhow::bail;
use mesh::{Address, Channel};
use mesh_proto::mesh::v1::{
    BackendRequest, BackendResponse, CapabilityRequest, CapsResponse, ListPluginsRequest,
    LogsRequest, Plugin, PluginRequest, ReadAuditRequest, ReloadRequest, ScaleRequest,
    manager_client::ManagerClient, registry_client::RegistryClient,
};
use serde::Serialize;

fn client(socket: &Path) -> ManagerClient<Channel> {
    ManagerClient::new(Channel::to_server(Address::Unix(socket.to_owned())))
}

/// Turns a failed call into one line: what the manager said, or how to reach it.
fn explain(socket: &Path, status: tonic::Status) -> anyhow::Error {
    if status.code() == tonic::Code::Unavailable {
        anyhow::anyhow!(
            "cannot reach mesh up at {}: {}; is it running? (set MESH_SOCKET or --socket)",
            socket.display(),
            status.message()
        )
    } else {
        anyhow::anyhow!("{}", status.message())
    }
}

/// `mesh status [--json]`.
pub(crate) async fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let plugins = client(socket)
        .list(ListPluginsRequest {})
        .await
        .map_err(|s| explain(socket, s))?
        .into_inner()
        .plugins;
    // A router without the call (older) or a failure here must not hide the plugins.
    let backend = RegistryClient::new(Channel::to_server(Address::Unix(socket.to_owned())))
        .backend(BackendRequest {})
        .await
        .ok()
        .map(tonic::Response::into_inner)
        .filter(|b| b.kind != "embedded");
    if json {
        let report = StatusJson {
            plugins: plugins.iter().map(PluginJson::from).collect(),
            registry: backend.as_ref().map(RegistryJson::from),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&plugins));
        if let Some(backend) = &backend {
            println!("{}", registry_line(backend));
        }
    }
    Ok(())
}

/// One line on the registry backend: `registry: etcd, node a at 10.0.0.1:7700, connected
/// for 12s; other nodes: b, c`.
fn registry_line(b: &BackendResponse) -> String {
    let state = if b.state == "unreachable" {
        format!(
            "UNREACHABLE for {}s ({}); routing from the last view",
            b.since_seconds, b.error
        )
    } else {
        format!("{} for {}s", b.state, b.since_seconds)
    };
    let nodes = if b.nodes.is_empty() {
        "none".to_owned()
    } else {
        b.nodes.join(", ")
    };
    format!(
        "registry: {}, node {} at {}, {state}; other nodes: {nodes}; registered again {} times",
        b.kind, b.node, b.advertise, b.reregistrations
    )
}

/// `mesh start|stop|restart NAME` and `mesh scale NAME N`: act, then show the plugin.
pub(crate) async fn act(socket: &Path, action: Action, name: &str) -> anyhow::Result<()> {
    let mut manager = client(socket);
    let request = PluginRequest { name: name.into() };
    let plugin = match action {
        Action::Start => manager.start(request).await,
        Action::Stop => manager.stop(request).await,
        Action::Restart => manager.restart(request).await,
        Action::Scale(instances) => {
            manager
                .scale(ScaleRequest {
                    name: name.into(),
                    instances,
                })
                .await
        }
    }
    .map_err(|s| explain(socket, s))?
    .into_inner();
    print!("{}", table(std::slice::from_ref(&plugin)));
    let failed: Vec<&str> = plugin
        .instances
        .iter()
        .filter(|i| i.state == "failed")
        .map(|i| i.id.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{name}: {} failed; `mesh logs {name}` shows why",
            failed.join(", ")
        );
    }
    Ok(())
}

/// What `act` does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    Start,
    Stop,
    Restart,
    Scale(u32),
}

/// `mesh logs NAME [-f] [-n N]`.
pub(crate) async fn logs(socket: &Path, name: &str, follow: bool, tail: u32) -> anyhow::Result<()> {
    let request = LogsRequest {
        name: name.into(),
        follow,
        tail,
    };
    let mut lines = client(socket)
        .logs(request)
        .await
        .map_err(|s| explain(socket, s))?
        .into_inner();
    while let Some(line) = lines.message().await.map_err(|s| explain(socket, s))? {
        println!("{} {}: {}", line.instance, line.stream, line.text);
    }
    Ok(())
}

/// What `caps` does.
#[derive(Debug, Clone)]
pub(crate) enum CapsAction {
    Grant(String),
    Revoke(String),
    Show,
}

/// `mesh grant|revoke NAME CAP` and `mesh caps NAME [--json]`: act, then show the plugin's
/// capabilities.
pub(crate) async fn caps(
    socket: &Path,
    action: CapsAction,
    name: &str,
    json: bool,
) -> anyhow::Result<()> {
    let mut manager = client(socket);
    let request = |capability: String| CapabilityRequest {
        name: name.into(),
        capability,
    };
    let caps = match action {
        CapsAction::Grant(cap) => manager.grant(request(cap)).await,
        CapsAction::Revoke(cap) => manager.revoke(request(cap)).await,
        CapsAction::Show => manager.caps(PluginRequest { name: name.into() }).await,
    }
    .map_err(|s| explain(socket, s))?
    .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&CapsJson::from(&caps))?);
    } else {
        print!("{}", caps_text(&caps));
    }
    Ok(())
}

/// `mesh caps --json`.
#[derive(Serialize)]
struct CapsJson<'a> {
    name: &'a str,
    root: &'a str,
    capabilities: Vec<CapJson<'a>>,
    revoked: &'a [String],
    reload: &'a str,
    sandbox: &'a str,
}

#[derive(Serialize)]
struct CapJson<'a> {
    capability: &'a str,
    source: &'a str,
}

impl<'a> From<&'a CapsResponse> for CapsJson<'a> {
    fn from(caps: &'a CapsResponse) -> Self {
        Self {
            name: &caps.name,
            root: &caps.root,
            capabilities: caps
                .effective
                .iter()
                .map(|c| CapJson {
                    capability: &c.capability,
                    source: &c.source,
                })
                .collect(),
            revoked: &caps.revoked,
            reload: &caps.reload,
            sandbox: &caps.sandbox,
        }
    }
}

fn caps_text(caps: &CapsResponse) -> String {
    let mut text = format!("plugin {}, root {}\n", caps.name, caps.root);
    if caps.effective.is_empty() {
        text.push_str("  no capabilities\n");
    }
    for cap in &caps.effective {
        text.push_str(&format!("  {:<40} {}\n", cap.capability, cap.source));
    }
    for cap in &caps.revoked {
        text.push_str(&format!("  {cap:<40} config, revoked\n"));
    }
    text.push_str(&format!("({})\n", caps.reload));
    if !caps.sandbox.is_empty() {
        text.push_str(&format!("sandbox: {}\n", caps.sandbox));
    }
    text
}

/// `mesh audit [-f]`: the audit log's JSON lines.
pub(crate) async fn audit(socket: &Path, follow: bool) -> anyhow::Result<()> {
    let mut lines = client(socket)
        .read_audit(ReadAuditRequest { follow })
        .await
        .map_err(|s| explain(socket, s))?
        .into_inner();
    let mut out = std::io::stdout();
    while let Some(line) = lines.message().await.map_err(|s| explain(socket, s))? {
        use std::io::Write;
        // `mesh audit -f | head` ends quietly when its reader goes.
        match writeln!(out, "{}", line.json).and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}

/// `mesh reload`.
pub(crate) async fn reload(socket: &Path) -> anyhow::Result<()> {
    let report = client(socket)
        .reload(ReloadRequest {})
        .await
        .map_err(|s| explain(socket, s))?
        .into_inner();
    let show = |what: &str, names: &[String]| {
        if !names.is_empty() {
            println!("{what}: {}", names.join(", "));
        }
    };
    show("added", &report.added);
    show("removed", &report.removed);
    show("restarted", &report.restarted);
    show("scaled", &report.scaled);
    show("ignored", &report.ignored);
    if report.added.is_empty()
        && report.removed.is_empty()
        && report.restarted.is_empty()
        && report.scaled.is_empty()
        && report.failed.is_empty()
    {
        println!("no change");
    }
    if !report.failed.is_empty() {
        bail!(
            "reload applied, but {} action(s) failed: {}",
            report.failed.len(),
            report.failed.join("; ")
        );
    }
    Ok(())
}

/// A plain text table, columns padded to their widest cell.
fn table(plugins: &[Plugin]) -> String {
    let mut rows = vec![
        [
            "PLUGIN",
            "INSTANCE",
            "PID",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "LAST EXIT",
            "DETAIL",
        ]
        .map(String::from),
    ];
    for plugin in plugins {
        if plugin.instances.is_empty() {
            rows.push([
                plugin.name.clone(),
                "-".into(),
                "-".into(),
                "scaled to 0".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                String::new(),
            ]);
        }
        for i in &plugin.instances {
            rows.push([
                plugin.name.clone(),
                i.id.clone(),
                if i.pid == 0 {
                    "-".into()
                } else {
                    i.pid.to_string()
                },
                i.state.clone(),
                if i.pid == 0 {
                    "-".into()
                } else {
                    human(Duration::from_millis(i.uptime_ms))
                },
                i.restarts.to_string(),
                if i.last_exit.is_empty() {
                    "-".into()
                } else {
                    i.last_exit.clone()
                },
                detail_beyond(&i.detail, &i.last_exit).to_owned(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// What DETAIL says beyond LAST EXIT, so that the table never says a thing twice: a failure's
/// reason often starts with how the last run ended (`…exited with status 3; last stderr: x`).
fn detail_beyond<'a>(detail: &'a str, last_exit: &str) -> &'a str {
    if last_exit.is_empty() {
        return detail;
    }
    match detail.strip_prefix(last_exit) {
        Some(rest) => rest.trim_start_matches(';').trim_start(),
        None => detail,
    }
}

/// `42s`, `3m07s`, `2h05m`, `3d04h`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `mesh status --json`: a stable shape for scripts.
#[derive(Serialize)]
struct StatusJson {
    plugins: Vec<PluginJson>,
    /// Absent for the embedded registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    registry: Option<RegistryJson>,
}

#[derive(Serialize)]
struct RegistryJson {
    kind: String,
    node: String,
    advertise: String,
    state: String,
    since_seconds: u64,
    error: Option<String>,
    nodes: Vec<String>,
    reregistrations: u64,
}

impl From<&BackendResponse> for RegistryJson {
    fn from(b: &BackendResponse) -> Self {
        Self {
            kind: b.kind.clone(),
            node: b.node.clone(),
            advertise: b.advertise.clone(),
            state: b.state.clone(),
            since_seconds: b.since_seconds,
            error: (!b.error.is_empty()).then(|| b.error.clone()),
            nodes: b.nodes.clone(),
            reregistrations: b.reregistrations,
        }
    }
}

#[derive(Serialize)]
struct PluginJson {
    name: String,
    service: String,
    desired: u32,
    instances: Vec<InstanceJson>,
}

#[derive(Serialize)]
struct InstanceJson {
    id: String,
    state: String,
    pid: Option<u32>,
    uptime_ms: Option<u64>,
    restarts: u32,
    last_exit: Option<String>,
    detail: Option<String>,
}

impl From<&Plugin> for PluginJson {
    fn from(p: &Plugin) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Self {
            name: p.name.clone(),
            service: p.service.clone(),
            desired: p.desired,
            instances: p
                .instances
                .iter()
                .map(|i| InstanceJson {
                    id: i.id.clone(),
                    state: i.state.clone(),
                    pid: (i.pid != 0).then_some(i.pid),
                    uptime_ms: (i.pid != 0).then_some(i.uptime_ms),
                    restarts: i.restarts,
                    last_exit: some(&i.last_exit),
                    detail: some(&i.detail),
                })
                .collect(),
        }
    }
}

/// Reads the socket argument: `--socket`, `$MESH_SOCKET`, else the default.
pub(crate) fn socket(flag: Option<std::path::PathBuf>) -> std::path::PathBuf {
    flag.unwrap_or_else(mesh::runtime::router_socket)
}
