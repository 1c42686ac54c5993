//! The kernel sandbox (`sandbox = true`), through a real `mesh up`: a `host-probe` under a
//! sandboxed plugin makes its own system calls — open files, dial sockets, connect over TCP,
//! open a packet socket, add a route — and the same probe under a plugin without the sandbox
//! makes the same calls, which succeed there: what fails in the sandbox fails because of it.

use std::path::{Path, PathBuf};

use crate::support::{Mesh, Probe, echo_plugin, grpcurl_ok, host_probe, script, short_tempdir};

const EACCES: i32 = 13;
const ENOENT: i32 = 2;
const EPERM: i32 = 1;

/// A `[[plugin]]` table running a probe beside echo-plugin; `extra` adds settings.
fn probe_plugin(dir: &Path, name: &str, root: &Path, extra: &str) -> String {
    // The probe binds beside the instance's own socket (`-`): the one directory a sandboxed
    // plugin may make a socket in.
    let command = script(
        dir,
        &format!("{name}.sh"),
        &format!(
            "{} - &\nexec {}",
            host_probe().display(),
            echo_plugin().display()
        ),
    );
    format!(
        "[[plugin]]\nname = {name:?}\ncommand = {:?}\nroot = {:?}\n\
         capabilities = [\"read:docs/**\", \"call:plugin.echo\"]\n{extra}\n",
        command.display().to_string(),
        root.display().to_string(),
    )
}

#[tokio::test]
async fn a_sandboxed_plugin_opens_only_what_it_may_and_reaches_plugins_only_by_the_router() {
    let dir = short_tempdir();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("docs/readme.txt"), "read me").unwrap();
    std::fs::write(root.join("secret.txt"), "secret").unwrap();
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, "outside").unwrap();
    let other_root = dir.path().join("other");
    std::fs::create_dir_all(&other_root).unwrap();
    std::fs::write(other_root.join("theirs.txt"), "theirs").unwrap();
    // Its programs (the probe, echo-plugin) live in target/debug: read and execute there.
    let binaries = host_probe().parent().unwrap().display().to_string();
    let sandboxed = probe_plugin(
        dir.path(),
        "files",
        &root,
        &format!("sandbox = true\nsandbox_paths = [{binaries:?}]"),
    );
    let plain = probe_plugin(dir.path(), "plain", &other_root, "");
    let plugins =
        format!("{sandboxed}{plain}[[plugin]]\nname = \"echo\"\ncommand = \"{{echo}}\"\n");
    let mesh = Mesh::start(&plugins).await;
    let line = mesh.wait_line("plugin files: sandboxed").await;
    assert!(line.contains("fully enforced"), "{line}");
    assert!(line.contains("other plugins' sockets hidden"), "{line}");
    mesh.wait_state("files", "files-0", "ready").await;
    mesh.wait_state("plain", "plain-0", "ready").await;
    let echo = mesh.wait_state("echo", "echo-0", "ready").await;
    mesh.wait_lines("host-probe: listening", 2).await;
    let runtime = mesh.socket.parent().unwrap().to_owned();
    let mut files = Probe::connect(&runtime.join("files/probe.sock")).await;
    let mut plain = Probe::connect(&runtime.join("plain/probe.sock")).await;

    let echo_socket = runtime.join("echo/echo-0.sock");
    let through_proc: PathBuf = format!("/proc/{}/root", echo.pid)
        .parse::<PathBuf>()
        .unwrap()
        .join(echo_socket.strip_prefix("/").unwrap());
    let outside = outside.display().to_string();
    let secret = root.join("secret.txt").display().to_string();
    let theirs = other_root.join("theirs.txt").display().to_string();
    let readme = root.join("docs/readme.txt").display().to_string();

    // Without the sandbox every one of these works: the failures below are the sandbox's.
    assert_eq!(plain.ok(&format!("open {outside}")).await, "7");
    assert_eq!(plain.ok(&format!("open {secret}")).await, "6");
    assert_ne!(plain.ok("open /etc/passwd").await, "0");
    assert_eq!(
        plain.ok(&format!("dial {}", echo_socket.display())).await,
        "connected"
    );
    assert_eq!(plain.ok("connect plugin.echo").await, "connected");

    // Its own open(2) of anything outside its rules: EACCES from Landlock, or ENOENT where
    // the file lies in a directory emptied for the sandbox (the test's, under /tmp).
    for path in [&outside, &secret, &theirs] {
        let errno = files.errno(&format!("open {path}")).await;
        assert!(errno == EACCES || errno == ENOENT, "{path}: errno {errno}");
    }
    assert_eq!(files.errno("open /etc/passwd").await, EACCES);
    // What its read: capability names, it may open itself, and read through Host.
    assert_eq!(files.ok(&format!("open {readme}")).await, "7");
    assert_eq!(files.ok("read docs/readme.txt").await, "read me");
    // And Host still refuses what no capability names, sandbox or not.
    assert!(files.call("read secret.txt").await.is_err());

    // Another plugin's socket is not there to dial (a tmpfs hides the runtime directory) ...
    let dialed = files
        .errno(&format!("dial {}", echo_socket.display()))
        .await;
    assert!(dialed == ENOENT || dialed == EACCES, "errno {dialed}");
    // ... nor through the echo process's view of the file system (Landlock's ptrace rule).
    assert_ne!(
        files
            .call(&format!("dial {}", through_proc.display()))
            .await
            .map_err(|e| e.0),
        Ok("connected".into())
    );
    // ... nor the router's audit log beside them.
    let audit = runtime.join("audit.log").display().to_string();
    assert!(files.call(&format!("open {audit}")).await.is_err());
    // But the router is reachable, with the call: policy applied: by the router directly, and
    // by mesh::connect, which routes for a sandboxed plugin (MESH_DIRECT=0).
    assert_eq!(files.ok("call plugin.echo echo").await, "probe");
    assert_eq!(files.ok("connect plugin.echo").await, "connected");

    // TCP: no connect at all from the sandbox.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    assert_eq!(plain.ok(&format!("tcp {address}")).await, "connected");
    assert_eq!(files.errno(&format!("tcp {address}")).await, EACCES);

    // Abstract Unix sockets made outside the sandbox, and signals to processes outside it
    // (another instance's are not even in its PID namespace): scoped by Landlock (EPERM).
    let name = format!("mesh-sandbox-test-{}", std::process::id());
    let abstract_listener = {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&address).unwrap()
    };
    assert_eq!(plain.ok(&format!("abstract {name}")).await, "connected");
    assert_eq!(files.errno(&format!("abstract {name}")).await, EPERM);
    drop(abstract_listener);
    // Pid 1 of each instance's PID namespace is its init, outside the sandbox.
    assert_eq!(plain.ok("signal 1").await, "signalled");
    assert_eq!(files.errno("signal 1").await, EPERM);

    // Its own socket serves: health made it ready above, and grpcurl reaches it by name.
    let socket = mesh.socket.display().to_string();
    let reply = grpcurl_ok(&[
        "-unix",
        "-authority",
        "plugin.files",
        "-d",
        r#"{"message":"sandboxed"}"#,
        &socket,
        "echo.v1.Echo/Echo",
    ]);
    assert!(reply.contains("files-0"), "{reply}");
    // mesh caps says what the sandbox does for each.
    let caps = mesh.cli_ok(&["caps", "files"]).await;
    assert!(
        caps.contains("sandbox: on: file and TCP rules fully enforced"),
        "{caps}"
    );
    let caps = mesh.cli_ok(&["caps", "plain", "--json"]).await;
    let caps: serde_json::Value = serde_json::from_str(&caps).unwrap();
    assert_eq!(caps["sandbox"], "off", "{caps}");
    let logs = mesh.cli_ok(&["logs", "files"]).await;
    assert!(logs.contains("mesh: sandboxed:"), "{logs}");
}

#[tokio::test]
async fn sandbox_settings_are_checked_with_file_and_line() {
    let dir = short_tempdir();
    let config = dir.path().join("mesh.toml");
    for (table, wanted) in [
        ("sandbox = \"yes\"", "sandbox = \"yes\": write true"),
        (
            "sandbox_paths = [\"/opt\"]",
            "sandbox_paths without sandbox = true",
        ),
    ] {
        std::fs::write(
            &config,
            format!(
                "[[plugin]]\nname = \"files\"\ncommand = {:?}\n{table}\n",
                echo_plugin().display().to_string()
            ),
        )
        .unwrap();
        let error = mesh_manager::Config::load(&config).unwrap_err().to_string();
        assert!(error.contains(":4:"), "{error}");
        assert!(error.contains(wanted), "{error}");
    }
}

/// A supervisor without `mesh __init` stands for a machine without user namespaces (and not
/// root): no sandbox can be set up there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_the_kernel_cannot_sandbox_sandbox_true_is_refused_and_best_effort_runs_warned() {
    use mesh_manager::{Config, Supervisor, supervisor::SupervisorError};
    let dir = short_tempdir();
    let path = dir.path().join("mesh.toml");
    let echo = echo_plugin().display().to_string();
    let text = format!(
        "[mesh]\nruntime_dir = {:?}\n\n[[plugin]]\nname = \"strict\"\ncommand = {echo:?}\nsandbox = true\n\n\
         [[plugin]]\nname = \"loose\"\ncommand = {echo:?}\nsandbox = \"best-effort\"\n",
        dir.path().join("run").display().to_string()
    );
    std::fs::write(&path, &text).unwrap();
    let config = Config::parse(&path, &text).unwrap();
    let registry = mesh_router::registry::Registry::new();
    let supervisor = Supervisor::new(registry.clone(), dir.path().join("run/mesh.sock"));
    assert!(!supervisor.sandbox_support().full());
    let mut plugins = config.plugins.into_iter();
    let strict = plugins.next().unwrap();
    match supervisor.add(strict) {
        Err(SupervisorError::Sandbox(message)) => {
            assert!(
                message.starts_with(&format!("{}:7: ", path.display())),
                "{message}"
            );
            assert!(message.contains("not started"), "{message}");
            assert!(message.contains("sandbox = \"best-effort\""), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(supervisor.get("strict").is_err(), "not added");
    // Best effort: it runs, unconfined here, and `mesh up` warned (the log line is tested by
    // the message above; here, that it serves).
    supervisor.add(plugins.next().unwrap()).unwrap();
    let status = supervisor.settled("loose").await.unwrap();
    assert_eq!(status.instances[0].state.name(), "ready", "{status:?}");
    supervisor.shutdown().await;
}

/// `Cap*` lines of `/proc/PID/status`: `CapEff` → the hex mask.
fn capabilities(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.starts_with("Cap"))
        .map(|(name, mask)| (name.to_owned(), mask.trim().to_owned()))
        .collect()
}

#[tokio::test]
async fn a_sandboxed_plugin_holds_no_capability_and_no_socket_outside_its_own_directories() {
    let dir = short_tempdir();
    let (root, other_root) = (dir.path().join("root"), dir.path().join("other"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&other_root).unwrap();
    let binaries = host_probe().parent().unwrap().display().to_string();
    let plugins = [
        probe_plugin(
            dir.path(),
            "boxed",
            &root,
            &format!("sandbox = true\nsandbox_paths = [{binaries:?}]"),
        ),
        probe_plugin(dir.path(), "plain", &other_root, ""),
        "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n".to_owned(),
    ]
    .concat();
    // Sockets of the kind the system and the owner's agents keep in /tmp, /run, /dev/shm
    // (where this uid may make one: root here and in CI).
    let agents: Vec<_> = ["/tmp", "/run", "/dev/shm"]
        .into_iter()
        .filter_map(|dir| {
            let made = tempfile::Builder::new()
                .prefix("mesh-agent-")
                .tempdir_in(dir)
                .ok()?;
            let socket = made.path().join("agent.sock");
            let listener = std::os::unix::net::UnixListener::bind(&socket).ok()?;
            Some((made, socket, listener))
        })
        .collect();
    assert!(!agents.is_empty(), "a socket in /tmp at least");

    let mesh = Mesh::start(&plugins).await;
    let boxed = mesh.wait_state("boxed", "boxed-0", "ready").await;
    let plain = mesh.wait_state("plain", "plain-0", "ready").await;
    mesh.wait_state("echo", "echo-0", "ready").await;
    mesh.wait_lines("host-probe: listening", 2).await;
    let runtime = mesh.socket.parent().unwrap().to_owned();
    let mut boxed_probe = Probe::connect(&runtime.join("boxed/probe.sock")).await;
    let mut plain_probe = Probe::connect(&runtime.join("plain/probe.sock")).await;

    // No capability in any set, though mesh up (and so the plugin's uid) is root here.
    let caps = capabilities(boxed.pid);
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(caps[set], "0000000000000000", "{set}: {caps:?}");
    }
    let logs = mesh.cli_ok(&["logs", "boxed"]).await;
    assert!(logs.contains("no capabilities"), "{logs}");
    let root_here = nix::unistd::Uid::effective().is_root();
    if root_here {
        // The same probe unsandboxed, as root, has them: what fails below fails for lack of them.
        assert_ne!(capabilities(plain.pid)["CapEff"], "0000000000000000");
        assert_eq!(plain_probe.ok("packet -").await, "opened");
    }
    // A packet socket (sniffing another user's traffic on lo) and a route in the host's table.
    assert_eq!(boxed_probe.errno("packet -").await, EPERM);
    assert_eq!(boxed_probe.errno("route -").await, EPERM);

    // A socket under /tmp, /run, /dev/shm: there for the plain plugin, not there at all for
    // the sandboxed one.
    for (_, socket, _) in &agents {
        let dial = format!("dial {}", socket.display());
        assert_eq!(plain_probe.ok(&dial).await, "connected");
        assert_eq!(boxed_probe.errno(&dial).await, ENOENT, "{dial}");
    }

    // Meanwhile everyone is served: the sandboxed plugin through the router (its socket
    // directory and the router socket are bound back), and each plugin by name.
    assert_eq!(boxed_probe.ok("call plugin.echo echo").await, "probe");
    let socket = mesh.socket.display().to_string();
    for name in ["boxed", "plain", "echo"] {
        let reply = grpcurl_ok(&[
            "-unix",
            "-max-time",
            "5",
            "-authority",
            &format!("plugin.{name}"),
            "-d",
            r#"{"message":"served"}"#,
            &socket,
            "echo.v1.Echo/Echo",
        ]);
        assert!(reply.contains(&format!("{name}-0")), "{reply}");
    }
}
