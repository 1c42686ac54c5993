//! The admin HTTP listener of `mesh up` (`[admin] listen`): `/metrics` (Prometheus text),
//! `/healthz`, `/readyz`, the status page at `/` and the JSON it reads (`/api/status`,
//! `/api/logs?instance=ID`).
//!
//! It has no authentication, so it binds loopback unless the config explicitly allows
//! otherwise, and treats every byte as hostile: HTTP/1.1 only, request heads bounded
//! ([`MAX_HEAD`]) and due within [`HEAD_TIMEOUT`], connections bounded in number and
//! lifetime, `GET`/`HEAD` only, exact paths (nothing maps to a file), and on loopback a `Host`
//! that is an IP address or `localhost` (a DNS-rebinding page cannot read it). Everything a
//! plugin wrote reaches the page as JSON text, rendered with `textContent` under a strict
//! Content-Security-Policy.
//!
//! Any local user can connect to a loopback port, so who is on the other end is decided from
//! the kernel's word (`mesh_router::peer`, the lookup the router's TCP listener uses) when a connection is accepted, before it takes a slot
//! ([`Peer`]): the owner's and root's processes, served everything, have their own
//! [`MAX_CONNECTIONS`] slots, which nobody else can take; another local user (refused unless
//! `allow_other_users = true`) or a remote client shares [`MAX_OTHER_CONNECTIONS`]; a managed
//! plugin's process (of the owner's uid or not), which is served `/healthz` only since the
//! rest shows every plugin's logs and status, shares [`MAX_PLUGIN_CONNECTIONS`]. A connection
//! refused anything is answered once and closed.

mod metrics;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};

pub use metrics::{Metrics, MetricsError};

use crate::{Supervisor, supervisor::State};

/// Most connections of the owner's (and root's) processes open at once; more are closed on
/// accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Most connections of other users' processes and remote clients open at once.
pub const MAX_OTHER_CONNECTIONS: usize = 16;
/// Most connections of managed plugins' processes open at once.
pub const MAX_PLUGIN_CONNECTIONS: usize = 8;
/// The request line and headers must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head hyper buffers (its minimum); past it the request is refused (431).
pub const MAX_HEAD: usize = 8192;
/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Log lines `/api/logs` returns, the newest.
const LOG_LINES: usize = 200;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// What every answer carries: nothing may be framed, sniffed, cached, or loaded from
/// elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The admin listener's state: what it reports on.
pub struct Admin {
    supervisor: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    /// Any `Host` header is accepted (`allow_non_loopback = true`).
    any_host: bool,
    /// Loopback clients of any uid are served (`allow_other_users = true`).
    other_users: bool,
    /// The uid served besides root: `mesh up`'s own.
    owner: u32,
}

impl Admin {
    /// Reports on `supervisor` and `metrics`; `any_host` accepts requests for any host name
    /// (only for a listener that is not loopback, which the config allowed explicitly);
    /// `other_users` serves loopback clients whatever their uid.
    pub fn new(
        supervisor: Arc<Supervisor>,
        metrics: Arc<Metrics>,
        any_host: bool,
        other_users: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            supervisor,
            metrics,
            any_host,
            other_users,
            owner: nix::unistd::geteuid().as_raw(),
        })
    }

    /// Who the client at `peer` is, as the kernel says: asked once per connection, before
    /// it takes a slot. Reads `/proc`: call it off the runtime's workers.
    fn identify(&self, peer: SocketAddr, local: Option<SocketAddr>) -> Peer {
        if !peer.ip().is_loopback() {
            return Peer::Remote;
        }
        // The router's lookup: the kernel's socket table, then the processes holding it.
        let Some(socket) = local.and_then(|local| mesh_router::peer::socket_of(peer, local).ok())
        else {
            return Peer::Stranger { uid: None };
        };
        let uid = socket.uid;
        let trusted = uid == self.owner || uid == 0;
        if !trusted && !self.other_users {
            // Refused whoever it is: no need to find its process.
            return Peer::Stranger { uid: Some(uid) };
        }
        // Any holder that is a plugin's process makes the connection that plugin's.
        let Ok(holders) = mesh_router::peer::holders(socket.inode, uid) else {
            // Past the scan's bounds: not known, so not the owner.
            return Peer::Stranger { uid: Some(uid) };
        };
        let plugin = holders
            .into_iter()
            .find_map(|holder| Some((holder.pid, self.supervisor.identify(holder.pid)?)));
        match plugin {
            Some((pid, identity)) => Peer::Plugin {
                plugin: identity.plugin.to_string(),
                pid,
            },
            None if trusted => Peer::Owner,
            None => Peer::Stranger { uid: Some(uid) },
        }
    }

    /// Serves `listener` until `shutdown` completes; samples the metrics for the status
    /// page meanwhile.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let slots = [
            MAX_CONNECTIONS,
            MAX_OTHER_CONNECTIONS,
            MAX_PLUGIN_CONNECTIONS,
        ]
        .map(|n| Arc::new(Semaphore::new(n)));
        let mut connections = JoinSet::new();
        let mut sampling = tokio::time::interval(metrics::SAMPLE_EVERY);
        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD)
            .max_headers(64);
        let mut once = http.clone();
        once.keep_alive(false);
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                _ = sampling.tick() => {
                    self.metrics.sample();
                    continue;
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Who it is, before it takes a slot: strangers and plugins never take the owner's.
            let identify = {
                let admin = self.clone();
                let local = stream.local_addr().ok();
                tokio::task::spawn_blocking(move || admin.identify(peer, local))
            };
            let peer = identify.await.unwrap_or(Peer::Stranger { uid: None });
            let Ok(slot) = slots[peer.pool()].clone().try_acquire_owned() else {
                // Full: closed at once, the ones open keep being served.
                continue;
            };
            // Answered once and closed when it may not be served everything: it holds a slot
            // of its pool no longer than one request takes.
            let http = match refusal(&peer, "/", self.other_users).is_some() {
                true => &once,
                false => &http,
            };
            let admin = self.clone();
            let peer = Arc::new(peer);
            let service = hyper::service::service_fn(move |request| {
                let (admin, peer) = (admin.clone(), peer.clone());
                async move { Ok::<_, Infallible>(admin.respond(&request, &peer)) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            connections.spawn(async move {
                tokio::pin!(conn);
                let ended = tokio::select! {
                    ended = conn.as_mut() => Some(ended),
                    () = tokio::time::sleep(CONNECTION_LIFETIME) => None,
                };
                if let Some(Err(error)) = ended {
                    tracing::debug!(%error, "admin connection ended");
                }
                drop(slot);
            });
        }
        connections.shutdown().await;
    }

    fn respond(&self, request: &Request<Incoming>, peer: &Peer) -> Response<Full<Bytes>> {
        let mut response = match refusal(peer, request.uri().path(), self.other_users) {
            None => self.route(request),
            Some(why) => text(StatusCode::FORBIDDEN, &why),
        };
        if request.method() == Method::HEAD {
            *response.body_mut() = Full::default();
        }
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    fn route(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.any_host && !local_host(request) {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                "this admin listener answers only requests for localhost or an IP address\n",
            );
        }
        let path = request.uri().path();
        let known = matches!(
            path,
            "/" | "/app.js"
                | "/app.css"
                | "/metrics"
                | "/healthz"
                | "/readyz"
                | "/api/status"
                | "/api/logs"
        );
        if !known {
            return text(StatusCode::NOT_FOUND, "not found; try / or /metrics\n");
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match path {
            "/" => asset(INDEX_HTML, "text/html; charset=utf-8"),
            "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
            "/app.css" => asset(APP_CSS, "text/css; charset=utf-8"),
            "/metrics" => body(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.prometheus_text(),
            ),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.unready() {
                problems if problems.is_empty() => text(StatusCode::OK, "ready\n"),
                problems => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {}\n", problems.join("; ")),
                ),
            },
            "/api/status" => json_body(StatusCode::OK, &self.status()),
            _ => match query_value(request.uri().query(), "instance") {
                Some(instance) => match self.logs(instance) {
                    Some(lines) => json_body(StatusCode::OK, &lines),
                    None => text(StatusCode::NOT_FOUND, "no such instance\n"),
                },
                None => text(StatusCode::BAD_REQUEST, "ask /api/logs?instance=ID\n"),
            },
        }
    }

    /// Plugins below their desired number of ready instances, each saying which are not
    /// ready and what they are doing. An instance stopped on request is not wanted ready.
    pub fn unready(&self) -> Vec<String> {
        self.supervisor
            .status()
            .iter()
            .filter_map(|plugin| {
                let wanted = plugin
                    .instances
                    .iter()
                    .filter(|i| i.state != State::Stopped)
                    .count()
                    .min(plugin.desired as usize);
                let ready = ready_count(&plugin.instances);
                if ready >= wanted {
                    return None;
                }
                let others: Vec<String> = plugin
                    .instances
                    .iter()
                    .filter(|i| !matches!(i.state, State::Ready { .. } | State::Stopped))
                    .map(|i| format!("{} {}", i.id, i.state.name()))
                    .collect();
                Some(format!(
                    "{} {ready}/{wanted} ready ({})",
                    plugin.config.name,
                    others.join(", ")
                ))
            })
            .collect()
    }

    fn status(&self) -> Value {
        let window = self.metrics.window();
        let stats = |service: &str, instance: &str| {
            window
                .get(&(service.to_owned(), instance.to_owned()))
                .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
                .unwrap_or(Value::Null)
        };
        let now = SystemTime::now();
        let plugins: Vec<Value> = self
            .supervisor
            .status()
            .iter()
            .map(|plugin| {
                let service = plugin.config.service.as_str();
                let instances: Vec<Value> = plugin
                    .instances
                    .iter()
                    .map(|i| {
                        json!({
                            "id": i.id,
                            "state": i.state.name(),
                            "detail": i.state.to_string(),
                            "pid": i.state.pid(),
                            "uptime_s": i.started
                                .filter(|_| i.state.pid().is_some())
                                .and_then(|s| now.duration_since(s).ok())
                                .map(|d| d.as_secs()),
                            "restarts": i.restarts,
                            "last_exit": i.last_exit,
                            "calls": stats(service, &i.id),
                        })
                    })
                    .collect();
                json!({
                    "name": plugin.config.name,
                    "service": service,
                    "desired": plugin.desired,
                    "ready": ready_count(&plugin.instances),
                    "calls": stats(service, "*"),
                    "instances": instances,
                })
            })
            .collect();
        json!({
            "metrics": self.metrics.router().is_on(),
            "window_s": metrics::WINDOW.as_secs(),
            "plugins": plugins,
        })
    }

    /// The newest lines of `instance`, if it is one the supervisor runs.
    fn logs(&self, instance: &str) -> Option<Value> {
        let plugin = self
            .supervisor
            .status()
            .into_iter()
            .find(|p| p.instances.iter().any(|i| i.id == instance))?;
        let book = self.supervisor.logs(&plugin.config.name).ok()?;
        let mut lines: Vec<Value> = book
            .lines()
            .into_iter()
            .rev()
            .filter(|l| l.instance == instance)
            .take(LOG_LINES)
            .map(|l| {
                json!({
                    "seq": l.seq,
                    "at_ms": l.at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                    "stream": l.stream.as_str(),
                    "text": l.text,
                })
            })
            .collect();
        lines.reverse();
        Some(json!({ "instance": instance, "lines": lines }))
    }
}

/// Why `peer` is not served `path`, if it is not: the one place this listener decides who
/// sees what (`docs/security.md`'s table of listeners).
fn refusal(peer: &Peer, path: &str, other_users: bool) -> Option<String> {
    match peer {
        Peer::Owner | Peer::Remote => None,
        Peer::Stranger { .. } if other_users => None,
        Peer::Stranger { .. } => Some(
            "this admin listener serves mesh up's own user and root only; \
             set allow_other_users = true in [admin] to serve every local user\n"
                .to_owned(),
        ),
        Peer::Plugin { .. } if path == "/healthz" => None,
        Peer::Plugin { plugin, pid } => Some(format!(
            "this admin listener serves managed plugins' processes /healthz only (this \
             connection is process {pid}'s, of plugin {plugin:?}): the rest shows every \
             plugin's logs and status\n"
        )),
    }
}

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    /// A process of `mesh up`'s own uid, or root's, that no managed instance started.
    Owner,
    /// A managed plugin instance, or a process it started (whatever its uid).
    Plugin {
        /// The plugin's name.
        plugin: String,
        /// The connecting process.
        pid: u32,
    },
    /// A process of another local uid (`None`: the kernel no longer lists the connection).
    Stranger {
        /// Its uid.
        uid: Option<u32>,
    },
    /// A client on another machine (only on a listener the config allowed off loopback).
    Remote,
}

impl Peer {
    /// Its pool of connection slots (an index into `serve`'s).
    fn pool(&self) -> usize {
        match self {
            Peer::Owner => 0,
            Peer::Stranger { .. } | Peer::Remote => 1,
            Peer::Plugin { .. } => 2,
        }
    }
}

fn ready_count(instances: &[crate::supervisor::InstanceStatus]) -> usize {
    instances
        .iter()
        .filter(|i| matches!(i.state, State::Ready { .. }))
        .count()
}

/// A `Host` a DNS-rebinding page cannot send: an IP address or `localhost` (or none, as an
/// HTTP/1.0 client may send).
fn local_host(request: &Request<Incoming>) -> bool {
    let Some(host) = request.headers().get(header::HOST) else {
        return request.uri().host().is_none();
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// The value of `key` in a query string, if it is a plain id (`[A-Za-z0-9._-]`, short).
fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 253
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

fn body(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    body(
        status,
        "text/plain; charset=utf-8",
        message.as_bytes().to_vec(),
    )
}

fn asset(content: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(content.as_bytes())));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_body(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    body(
        status,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

/// Binds the admin listener; the error names the address and the fix.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_see_healthz_only_and_strangers_nothing_unless_allowed() {
        let plugin = Peer::Plugin {
            plugin: "spy".into(),
            pid: 42,
        };
        let stranger = Peer::Stranger { uid: Some(65534) };
        for path in ["/", "/healthz", "/api/logs", "/api/status", "/metrics"] {
            for other_users in [false, true] {
                assert_eq!(refusal(&Peer::Owner, path, other_users), None);
                assert_eq!(refusal(&Peer::Remote, path, other_users), None);
                assert_eq!(
                    refusal(&stranger, path, other_users).is_some(),
                    !other_users,
                    "{path}"
                );
                let seen = refusal(&plugin, path, other_users);
                assert_eq!(seen.is_none(), path == "/healthz", "{path}");
                if let Some(why) = seen {
                    assert!(why.contains("process 42's, of plugin \"spy\""), "{why}");
                }
            }
        }
        // Each has its own slots: nobody else's connections fill the owner's.
        assert_eq!(Peer::Owner.pool(), 0);
        assert_ne!(stranger.pool(), Peer::Owner.pool());
        assert_ne!(plugin.pool(), Peer::Owner.pool());
        assert_ne!(plugin.pool(), stranger.pool());
    }

    #[test]
    fn only_plain_ids_are_taken_from_the_query() {
        assert_eq!(
            query_value(Some("instance=echo-0"), "instance"),
            Some("echo-0")
        );
        assert_eq!(
            query_value(Some("a=b&instance=echo-1"), "instance"),
            Some("echo-1")
        );
        for bad in [
            "instance=../etc",
            "instance=",
            "instance=a%2Fb",
            "instance=a/b",
            "other=1",
        ] {
            assert_eq!(query_value(Some(bad), "instance"), None, "{bad}");
        }
        assert_eq!(query_value(None, "instance"), None);
    }
}
