//! A test helper that calls `mesh.v1.Host` as the plugin it runs under, as told over a Unix
//! socket: started by a plugin command (`host-probe SOCKET & exec echo-plugin`), it is a
//! descendant of the instance, and the router must know it as that plugin.
//!
//! Each line it reads is one call, `OP ARG [DATA]` (`read`, `stream`, `write`, `delete`, `stat`,
//! `list`, `env`; `manager` lists plugins through the Manager API; `stats N` times N Stat calls
//! of `.`; `call SERVICE echo|expand [router|connect|socket PATH]` calls that echo method of
//! SERVICE through the router (the default), through `mesh::connect` (a direct dial), on the
//! socket PATH, or `tcp ADDR [FROM]` through the router's TCP listener at ADDR from the source
//! address FROM); `connect SERVICE` calls its `Echo` through `mesh::connect`, as a plugin would; and, to
//! test the kernel sandbox, the process's own system calls: `open PATH` reads a file, `dial
//! PATH` connects to a Unix socket, `abstract NAME` to an abstract one, `tcp HOST:PORT`
//! connects over TCP, `packet -` opens a packet socket, `route -` adds a blackhole route to
//! 192.0.2.1, `signal PID` sends signal 0, each answering `ok` or `err ERRNO MESSAGE`),
//! To attack host services from inside a plugin: `flood N OP PATH` makes N calls at once (OP
//! `read`, `stat`, `list`) on one connection and answers how many ended with each code
//! (`9=590 8=10`); `hold N PATH` opens N `ReadFileStream`s of PATH on one HTTP/2 connection
//! whose window is zero, reads none, keeps them open until `release`, and answers how many
//! were answered with headers only and which status (`open=8 8=592`); `mkfifo PATH`, `link
//! FROM TO` and `listen PATH` (a Unix socket kept open) make such files with the process's
//! own system calls;
//! and each answer is one line:
//! `ok TEXT` or `err CODE MESSAGE`, newlines escaped. Every call also sends headers that claim
//! another plugin's name: they must change nothing.

use std::time::Instant;

use mesh_proto::mesh::v1::{
    DeleteFileRequest, GetEnvRequest, ReadDirRequest, ReadFileRequest, StatRequest,
    WriteFileRequest,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};
use tonic::Request;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(mut path) = std::env::args().nth(1) else {
        eprintln!("usage: host-probe SOCKET (- for probe.sock beside PLUGIN_SOCKET)");
        std::process::exit(64);
    };
    // Beside the instance's own socket: the one directory a sandboxed plugin may bind in.
    if path == "-"
        && let Some(dir) = std::env::var_os("PLUGIN_SOCKET")
            .map(std::path::PathBuf::from)
            .and_then(|p| p.parent().map(|d| d.join("probe.sock")))
    {
        path = dir.display().to_string();
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the probe socket");
    println!("host-probe: listening on {path}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut answer = call(&line).await.replace('\n', "\\n");
                answer.push('\n');
                if write.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// `RTM_NEWROUTE` for a blackhole route to 192.0.2.1/32 in the main table, and the kernel's
/// answer: `Ok` if it was added, else its errno (EPERM without CAP_NET_ADMIN).
fn add_route() -> std::io::Result<String> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let mut message = Vec::with_capacity(36);
    message.extend(36u32.to_ne_bytes()); // nlmsghdr: length,
    message.extend(24u16.to_ne_bytes()); // RTM_NEWROUTE,
    message.extend((0x1u16 | 0x4 | 0x200 | 0x400).to_ne_bytes()); // REQUEST|ACK|EXCL|CREATE,
    message.extend(1u32.to_ne_bytes()); // sequence,
    message.extend(0u32.to_ne_bytes()); // port id;
    // rtmsg: AF_INET, /32, no source, tos 0, main table, boot, universe, blackhole, no flags;
    message.extend([2u8, 32, 0, 0, 254, 3, 0, 6]);
    message.extend(0u32.to_ne_bytes());
    message.extend(8u16.to_ne_bytes()); // rtattr RTA_DST: 192.0.2.1.
    message.extend(1u16.to_ne_bytes());
    message.extend([192u8, 0, 2, 1]);
    sendto(
        fd.as_raw_fd(),
        &message,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut answer = [0u8; 256];
    let n = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty())?;
    // NLMSG_ERROR (2) carries the errno, negated; 0 is the acknowledgement of success.
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if n < 20 || kind != 2 {
        return Err(std::io::Error::other(format!(
            "unexpected answer of {n} bytes"
        )));
    }
    match i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]) {
        0 => Ok("added".into()),
        errno => Err(std::io::Error::from_raw_os_error(-errno)),
    }
}

/// A request that claims, in every header a caller can set, to be another plugin.
fn forged<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    for (key, value) in [
        ("mesh-plugin", "other"),
        ("mesh-instance", "other-0"),
        ("x-mesh-caller", "plugin.other"),
        ("mesh-service", "localhost"),
    ] {
        request
            .metadata_mut()
            .insert(key, value.parse().expect("ascii"));
    }
    request
}

/// [`forged`], but keeping the call's route: a forged `mesh-service` would send it to the
/// router itself.
fn routed<T>(message: T) -> Request<T> {
    let mut request = forged(message);
    request.metadata_mut().remove("mesh-service");
    request
}

async fn call(line: &str) -> String {
    let mut parts = line.splitn(3, ' ');
    let (op, arg, data) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let os = |result: std::io::Result<String>| match result {
        Ok(text) => format!("ok {text}"),
        Err(e) => format!("err {} {e}", e.raw_os_error().unwrap_or(0)),
    };
    match op {
        "open" => return os(std::fs::read(&arg).map(|d| d.len().to_string())),
        "dial" => {
            return os(std::os::unix::net::UnixStream::connect(&arg).map(|_| "connected".into()));
        }
        "tcp" => return os(std::net::TcpStream::connect(&arg).map(|_| "connected".into())),
        "abstract" => {
            use std::os::linux::net::SocketAddrExt;
            return os(
                std::os::unix::net::SocketAddr::from_abstract_name(arg.as_bytes())
                    .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
                    .map(|_| "connected".into()),
            );
        }
        // A packet socket, which needs CAP_NET_RAW (Landlock does not cover it): sniffing.
        "packet" => {
            use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
            return os(socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .map(|_| "opened".into())
            .map_err(std::io::Error::from));
        }
        // Adds a blackhole route to 192.0.2.1 (TEST-NET-1) over rtnetlink: CAP_NET_ADMIN.
        "route" => return os(add_route()),
        "mkfifo" => {
            return os(nix::unistd::mkfifo(
                arg.as_str(),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .map(|()| "made".into())
            .map_err(std::io::Error::from));
        }
        "link" => return os(std::fs::hard_link(&arg, &data).map(|()| "linked".into())),
        "listen" => {
            return os(
                std::os::unix::net::UnixListener::bind(&arg).map(|listener| {
                    // Kept open (never accepting) for the probe's life.
                    std::mem::forget(listener);
                    "listening".into()
                }),
            );
        }
        "hold" => return hold(arg.parse().unwrap_or(1), &data).await,
        "release" => {
            let held = std::mem::take(&mut *HELD.lock().unwrap_or_else(|e| e.into_inner()));
            return format!("ok {}", held.len());
        }
        "flood" => return flood(arg.parse().unwrap_or(1), &data).await,
        // Signal 0 to a pid: whether this process may signal it at all.
        "signal" => {
            let pid = nix::unistd::Pid::from_raw(arg.parse().unwrap_or(0));
            return os(nix::sys::signal::kill(pid, None)
                .map(|()| "signalled".into())
                .map_err(std::io::Error::from));
        }
        _ => {}
    }
    let mut host = mesh::plugin::host();
    let path = arg.clone();
    let result = match op {
        "read" => host
            .read_file(forged(ReadFileRequest { path }))
            .await
            .map(|r| String::from_utf8_lossy(&r.into_inner().data).into_owned()),
        "stream" => match host
            .read_file_stream(forged(ReadFileRequest { path }))
            .await
        {
            Ok(response) => {
                let mut stream = response.into_inner();
                let (mut chunks, mut bytes, mut largest) = (0, 0, 0);
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            chunks += 1;
                            bytes += chunk.data.len();
                            largest = largest.max(chunk.data.len());
                        }
                        Ok(None) => break Ok(format!("{chunks} {bytes} {largest}")),
                        Err(status) => break Err(status),
                    }
                }
            }
            Err(status) => Err(status),
        },
        "write" => host
            .write_file(forged(WriteFileRequest {
                path,
                data: data.into_bytes(),
                append: false,
            }))
            .await
            .map(|r| r.into_inner().written.to_string()),
        "delete" => host
            .delete_file(forged(DeleteFileRequest { path }))
            .await
            .map(|_| String::new()),
        "stat" => host.stat(forged(StatRequest { path })).await.map(|r| {
            let stat = r.into_inner();
            format!("{} {} {:o}", stat.kind, stat.size, stat.mode)
        }),
        "list" => host
            .read_dir(forged(ReadDirRequest { path }))
            .await
            .map(|r| {
                let names: Vec<String> =
                    r.into_inner().entries.into_iter().map(|e| e.name).collect();
                names.join(",")
            }),
        "env" => host
            .get_env(forged(GetEnvRequest { name: arg }))
            .await
            .map(|r| r.into_inner().value),
        "stats" => {
            let n: usize = arg.parse().unwrap_or(1000).max(1);
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                if let Err(status) = host.stat(StatRequest { path: ".".into() }).await {
                    return format!("err {} {}", status.code() as i32, status.message());
                }
                times.push(start.elapsed().as_micros());
            }
            Ok(quantiles(times))
        }
        // The same number of unary echo calls forwarded by the router to this plugin: the
        // baseline a host call compares with, measured in the same run.
        "echoes" => {
            use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
            let n: usize = arg.parse().unwrap_or(1000).max(1);
            let router = mesh::Address::Unix(mesh::runtime::router_socket());
            let name = std::env::var("PLUGIN_NAME").unwrap_or_default();
            let channel = match mesh::Channel::to_address(router, &format!("plugin.{name}")) {
                Ok(channel) => channel,
                Err(error) => return format!("err 3 {error}"),
            };
            let mut echo = EchoClient::new(channel);
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                let request = EchoRequest {
                    message: "x".repeat(64),
                };
                if let Err(status) = echo.echo(request).await {
                    return format!("err {} {}", status.code() as i32, status.message());
                }
                times.push(start.elapsed().as_micros());
            }
            Ok(quantiles(times))
        }
        // One echo call to another service through the router, under `call:` capabilities:
        // `Echo` answers its message, `Expand` the number of replies it streamed.
        "call" => {
            use mesh_proto::echo::v1::{EchoRequest, ExpandRequest, echo_client::EchoClient};
            let mut words = data.split_whitespace();
            let (method, via, path) = (words.next(), words.next(), words.next());
            let (channel, direct) = match (via, path) {
                (None | Some("router"), _) => {
                    let router = mesh::Address::Unix(mesh::runtime::router_socket());
                    match mesh::Channel::to_address(router, &arg) {
                        Ok(channel) => (channel, false),
                        Err(error) => return format!("err 3 {error}"),
                    }
                }
                // mesh::connect: from inside a plugin, a direct dial of the instances.
                (Some("connect"), _) => match mesh::connect(&arg).await {
                    Ok(channel) => (channel, true),
                    Err(error) => return format!("err 14 {error}"),
                },
                // The router's TCP listener at ADDR, from the source address FROM if given
                // (`tcp 127.0.0.1:PORT 127.0.0.2`): as a plugin that tries the TCP door.
                (Some("tcp"), Some(addr)) => {
                    let from = words.next().map(str::to_owned);
                    match tcp_channel(addr, from, &arg) {
                        Ok(channel) => (channel, false),
                        Err(error) => return format!("err 3 {error}"),
                    }
                }
                // The target's socket, dialed by hand.
                (Some("socket"), Some(path)) => (
                    mesh::Channel::to_server(mesh::Address::Unix(path.into())),
                    true,
                ),
                _ => return format!("err 3 unknown path {data:?}"),
            };
            // Direct calls claim another plugin in every header, the route's included.
            let mut echo = EchoClient::new(channel);
            let message = "probe".to_owned();
            match method.unwrap_or_default() {
                "echo" => echo
                    .echo(dress_echo(direct, EchoRequest { message }))
                    .await
                    .map(|r| r.into_inner().message),
                "expand" => match echo
                    .expand(dress_echo(direct, ExpandRequest { message, count: 2 }))
                    .await
                {
                    Ok(response) => {
                        let mut stream = response.into_inner();
                        let mut replies = 0;
                        loop {
                            match stream.message().await {
                                Ok(Some(_)) => replies += 1,
                                Ok(None) => break Ok(replies.to_string()),
                                Err(status) => break Err(status),
                            }
                        }
                    }
                    Err(status) => Err(status),
                },
                other => return format!("err 3 unknown method {other:?}"),
            }
        }
        // As a plugin calls another: direct dial, or through the router (MESH_DIRECT=0).
        "connect" => {
            use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
            match mesh::connect(&arg).await {
                Ok(channel) => EchoClient::new(channel)
                    .echo(routed(EchoRequest {
                        message: "connected".into(),
                    }))
                    .await
                    .map(|r| r.into_inner().message),
                Err(error) => return format!("err 14 {error}"),
            }
        }
        // The Manager API, which a plugin must not get though it runs as the owner's uid.
        "manager" => mesh_proto::mesh::v1::manager_client::ManagerClient::new(
            mesh::Channel::to_server(mesh::Address::Unix(mesh::runtime::router_socket())),
        )
        .list(forged(mesh_proto::mesh::v1::ListPluginsRequest {}))
        .await
        .map(|r| r.into_inner().plugins.len().to_string()),
        other => return format!("err 3 unknown op {other:?}"),
    };
    match result {
        Ok(text) => format!("ok {text}"),
        Err(status) => format!("err {} {}", status.code() as i32, status.message()),
    }
}

/// A channel to `service` through the router's TCP listener at `addr`, on one connection
/// from the source address `from` (any port), or the kernel's choice.
fn tcp_channel(
    addr: &str,
    from: Option<String>,
    service: &str,
) -> Result<mesh::Channel, Box<dyn std::error::Error>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// Dials `addr` from `from`.
    struct From {
        addr: std::net::SocketAddr,
        from: Option<std::net::IpAddr>,
    }
    impl mesh::transport::Dial for From {
        fn dial(&self) -> mesh::transport::Dialing {
            let (addr, from) = (self.addr, self.from);
            Box::pin(async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                if let Some(from) = from {
                    socket.bind(std::net::SocketAddr::new(from, 0))?;
                }
                let stream = socket.connect(addr).await?;
                Ok(Box::new(stream) as Box<dyn mesh::transport::Connection>)
            })
        }
    }
    static DIALED: AtomicUsize = AtomicUsize::new(0);
    let name = format!("probe.tcp-{}", DIALED.fetch_add(1, Ordering::Relaxed));
    let dialer = From {
        addr: addr.parse()?,
        from: from.map(|f| f.parse()).transpose()?,
    };
    // Registered for this one channel's life: leaked, as the probe makes only a few.
    std::mem::forget(mesh::transport::register(&name, dialer)?);
    Ok(mesh::Channel::to_address(
        mesh::Address::Dialer(name),
        service,
    )?)
}

/// An echo request dressed for its path: [`forged`] for a direct call, [`routed`] otherwise.
fn dress_echo<T>(direct: bool, message: T) -> Request<T> {
    if direct {
        forged(message)
    } else {
        routed(message)
    }
}

/// `median_us=.. p99_us=.. max_us=..` of call times.
fn quantiles(mut times: Vec<u128>) -> String {
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    format!(
        "median_us={} p99_us={} max_us={}",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// `CODE=COUNT` for each code seen, in code order.
fn counts(codes: impl IntoIterator<Item = String>) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for code in codes {
        *counts.entry(code).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(c, n)| format!("{c}={n}")).collect();
    format!("ok {}", counts.join(" "))
}

/// `n` calls `OP PATH` at once on one connection; the count of each status code.
async fn flood(n: usize, what: &str) -> String {
    let (op, path) = what.split_once(' ').unwrap_or((what, ""));
    let host = mesh::plugin::host();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n.min(10_000) {
        let (mut host, op, path) = (host.clone(), op.to_owned(), path.to_owned());
        calls.spawn(async move {
            let answer = match op.as_str() {
                "read" => host.read_file(ReadFileRequest { path }).await.map(drop),
                "stat" => host.stat(StatRequest { path }).await.map(drop),
                "list" => host.read_dir(ReadDirRequest { path }).await.map(drop),
                _ => return "unknown-op".to_owned(),
            };
            match answer {
                Ok(()) => "0".to_owned(),
                Err(status) => (status.code() as i32).to_string(),
            }
        });
    }
    counts(calls.join_all().await)
}

/// Streams opened by `hold`, kept until `release`: the connection and each stream's halves.
type Held = (
    h2::client::SendRequest<bytes::Bytes>,
    Vec<(http::Response<h2::RecvStream>, h2::SendStream<bytes::Bytes>)>,
);
static HELD: std::sync::Mutex<Vec<Held>> = std::sync::Mutex::new(Vec::new());

/// `n` ReadFileStream calls of `path` on one HTTP/2 connection to the router whose stream
/// window is zero: the router can send each answer's headers and nothing more, and this
/// probe reads nothing. Answers `open=K` for the streams that started and `CODE=COUNT` for
/// those answered with a status at once.
async fn hold(n: usize, path: &str) -> String {
    use prost::Message;
    let stream = match tokio::net::UnixStream::connect(mesh::runtime::router_socket()).await {
        Ok(stream) => stream,
        Err(error) => return format!("err 14 {error}"),
    };
    let (mut client, connection) = match h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(stream)
        .await
    {
        Ok(handshake) => handshake,
        Err(error) => return format!("err 14 {error}"),
    };
    tokio::spawn(connection);
    let message = ReadFileRequest { path: path.into() }.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let frame = bytes::Bytes::from(frame);
    let mut pending = Vec::new();
    for _ in 0..n.min(10_000) {
        client = match client.ready().await {
            Ok(client) => client,
            Err(error) => return format!("err 14 {error}"),
        };
        let request = http::Request::post("http://localhost/mesh.v1.Host/ReadFileStream")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("a valid request");
        let (response, mut body) = match client.send_request(request, false) {
            Ok(sent) => sent,
            Err(error) => return format!("err 14 {error}"),
        };
        if let Err(error) = body.send_data(frame.clone(), true) {
            return format!("err 14 {error}");
        }
        pending.push((response, body));
    }
    let mut codes = Vec::new();
    let mut open = Vec::new();
    for (response, body) in pending {
        match tokio::time::timeout(std::time::Duration::from_secs(20), response).await {
            Ok(Ok(response)) => {
                match response.headers().get("grpc-status") {
                    Some(code) => codes.push(String::from_utf8_lossy(code.as_bytes()).into()),
                    None => codes.push("open".into()),
                }
                open.push((response, body));
            }
            Ok(Err(error)) => codes.push(format!("h2:{error}")),
            Err(_) => codes.push("no-answer".into()),
        }
    }
    HELD.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((client, open));
    counts(codes)
}
