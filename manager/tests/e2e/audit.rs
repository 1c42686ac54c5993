//! The audit log under attack from inside a plugin, through a real `mesh up`: a `host-probe`
//! started by plugin `atk` floods denied host calls with 4,000,000-byte paths, sends a path
//! built to turn the refusal's `mesh grant` hint into a shell command, and another plugin keeps
//! calling meanwhile. Each test asserts the log keeps its bound and its history, `mesh audit`
//! reads it, what a pasted hint runs, and that the other plugin is served throughout. And the
//! CA key `mesh certs init` writes, which a plugin of the owner's uid could read.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use tonic::Code;

use crate::support::{Mesh, Probe, echo_plugin, host_probe, mesh_bin, script};

/// The longest audit line (`manager/src/host/audit.rs`, `MAX_LINE`), newline included.
const MAX_LINE: usize = 4096;
/// The rotation bound these tests set.
const BOUND: u64 = 64 << 10;
/// The path of finding 7: a denied `Stat` of it wrote a 16 MB line.
const HUGE: usize = 4_000_000;

/// A mesh with plugins `atk` and `other`, each a probe beside echo-plugin.
struct Setup {
    mesh: Mesh,
    atk: Probe,
    other: Probe,
    audit: PathBuf,
    dir: tempfile::TempDir,
}

/// Starts `atk` with `atk_caps` and `other` with `read:**`, the log bounded by [`BOUND`];
/// `before` is written into the audit log first (an older version's log).
async fn setup(atk_caps: &str, before: Option<&[u8]>) -> Setup {
    let dir = crate::support::short_tempdir();
    let audit = dir.path().join("audit.log");
    if let Some(before) = before {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&audit)
            .unwrap()
            .write_all(before)
            .unwrap();
    }
    let mut plugins = String::new();
    for (name, caps) in [("atk", atk_caps), ("other", "\"read:**\"")] {
        let root = dir.path().join(format!("root-{name}"));
        std::fs::create_dir_all(&root).unwrap();
        let socket = dir.path().join(format!("{name}.sock"));
        let command = script(
            dir.path(),
            &format!("{name}.sh"),
            &format!(
                "{} {} &\nexec {}",
                host_probe().display(),
                socket.display(),
                echo_plugin().display()
            ),
        );
        plugins.push_str(&format!(
            "[[plugin]]\nname = \"{name}\"\ncommand = {command:?}\nroot = {root:?}\n\
             capabilities = [{caps}]\n"
        ));
    }
    let settings = format!("audit_log = {audit:?}\naudit_max_size = \"{BOUND}\"");
    let mesh = Mesh::start_with(&settings, &plugins).await;
    mesh.wait_lines("host-probe: listening", 2).await;
    let atk = Probe::connect(&dir.path().join("atk.sock")).await;
    let other = Probe::connect(&dir.path().join("other.sock")).await;
    Setup {
        mesh,
        atk,
        other,
        audit,
        dir,
    }
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn rotated(audit: &Path) -> PathBuf {
    PathBuf::from(format!("{}.1", audit.display()))
}

/// What `mesh audit` prints, each line parsed; fails the test unless it succeeds.
async fn mesh_audit(mesh: &Mesh) -> Vec<serde_json::Value> {
    mesh.cli_ok(&["audit"])
        .await
        .lines()
        .map(|l| {
            assert!(l.len() < MAX_LINE, "a line of {} bytes", l.len());
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))
        })
        .collect()
}

/// Both files within the bound, every line within its own.
fn assert_bounded(audit: &Path) {
    for file in [audit.to_owned(), rotated(audit)] {
        assert!(
            size(&file) <= BOUND,
            "{}: {} bytes",
            file.display(),
            size(&file)
        );
        let text = std::fs::read(&file).unwrap_or_default();
        for line in text.split(|&b| b == b'\n') {
            assert!(line.len() < MAX_LINE, "a line of {} bytes", line.len());
        }
    }
}

#[tokio::test]
async fn a_log_an_older_version_left_with_a_16_mb_line_is_readable() {
    // `mesh audit` failed on it ("decoded message length too large"): now a note stands in
    // for the line, and the lines around it are read.
    let old = format!(
        "{{\"plugin\":\"old\",\"resource\":\"{}\"}}\n{{\"plugin\":\"old\",\"resource\":\"kept\"}}\n",
        "z".repeat(16 << 20)
    );
    let Setup {
        mesh,
        mut other,
        dir: _dir,
        ..
    } = setup("\"read:allowed/**\"", Some(old.as_bytes())).await;
    let printed = mesh_audit(&mesh).await;
    assert!(
        printed[0]["note"].as_str().unwrap().contains("left out"),
        "{:?}",
        printed[0]
    );
    assert_eq!(printed[1]["resource"], "kept");
    // New lines follow it, and are read with it.
    other.ok("stat .").await;
    let printed = mesh_audit(&mesh).await;
    assert_eq!(printed.len(), 3, "{printed:?}");
    assert_eq!(printed[2]["plugin"], "other");
}

#[tokio::test]
async fn a_flood_of_huge_denials_keeps_the_log_bounded_readable_and_its_history() {
    let Setup {
        mesh,
        mut atk,
        mut other,
        audit,
        dir: _dir,
    } = setup("\"read:allowed/**\"", None).await;

    // History: the other plugin's decision before the flood.
    other.ok("stat .").await;

    // The flood, from inside atk: 30 denied Stats of a 4,000,000-byte path, then 2000 small
    // ones, while `other` keeps calling; each of its calls is answered well within its
    // deadline.
    let huge = format!("stat {}", "a".repeat(HUGE));
    let started = Instant::now();
    let flood = async {
        for _ in 0..30 {
            assert_eq!(
                atk.call(&huge).await.unwrap_err().0,
                Code::PermissionDenied as i32
            );
        }
        eprintln!("30 huge denials: {:?}", started.elapsed());
        for i in 0..2000 {
            atk.denied(&format!("stat denied-{i}")).await;
        }
        eprintln!("and 2000 small ones: {:?}", started.elapsed());
    };
    let served = async {
        let mut slowest = Duration::ZERO;
        for _ in 0..50 {
            let asked = Instant::now();
            other.ok("stat .").await;
            slowest = slowest.max(asked.elapsed());
        }
        slowest
    };
    let ((), slowest) = tokio::join!(flood, served);
    let flood_took = started.elapsed();
    eprintln!("other's slowest Stat during the flood: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(5),
        "other's slowest Stat: {slowest:?}"
    );
    // After the flood, other's call is served and logged; atk's next (allowed) line counts
    // the denials left out.
    other.ok("stat .").await;
    assert_eq!(
        atk.call("stat allowed/x").await.unwrap_err().0,
        Code::NotFound as i32
    );

    assert_bounded(&audit);
    let lines = mesh_audit(&mesh).await;
    let allowed_seconds = flood_took.as_secs() as usize + 2;
    let of = |plugin: &'static str| lines.iter().filter(move |l| l["plugin"] == plugin);
    // Nothing rotated away: other's lines before, during and after the flood.
    assert_eq!(of("other").count(), 52, "other's decisions");
    assert!(
        lines.len() < 52 + 20 + allowed_seconds + 2,
        "{} lines",
        lines.len()
    );
    // atk: a burst of 20 denials, then about one a second, and one line counting the rest.
    let denied = of("atk").filter(|l| l["allowed"] == false).count();
    assert!(
        (20..=20 + allowed_seconds).contains(&denied),
        "{denied} denied lines in {flood_took:?}"
    );
    let last = of("atk").next_back().unwrap();
    assert_eq!(last["allowed"], true, "{last}");
    assert!(last["denials_left_out"].as_u64().unwrap() > 0, "{last}");
    // Every denial is either a line or counted on a later one.
    let left_out: u64 = of("atk")
        .filter_map(|l| l["denials_left_out"].as_u64())
        .sum();
    assert_eq!(left_out as usize + denied, 2030);
    // The huge ones: cut, saying so, no grant command offered.
    let first = of("atk").next().unwrap();
    let resource = first["resource"].as_str().unwrap();
    assert!(
        resource.ends_with(&format!("[cut: {HUGE} bytes]")),
        "{resource}"
    );
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("no grant command is offered"),
        "{first}"
    );

    // Allowed lines are all written (4000-byte paths: a longer one is refused before any glob
    // runs): a log full of them rotates within twice the bound, and
    // `mesh audit` still reads every kept line.
    let long = "b".repeat(4000);
    let allowed_started = Instant::now();
    for _ in 0..200 {
        let answer = atk.call(&format!("stat allowed/{long}")).await;
        assert_ne!(answer.unwrap_err().0, Code::PermissionDenied as i32);
    }
    eprintln!(
        "200 allowed Stats of 4000-byte paths: {:?}",
        allowed_started.elapsed()
    );
    other.ok("stat .").await;
    assert_bounded(&audit);
    assert!(size(&rotated(&audit)) > BOUND / 2);
    let lines = mesh_audit(&mesh).await;
    assert!(lines.len() > 80, "{} lines", lines.len());
    assert_eq!(lines.last().unwrap()["plugin"], "other");
}

#[tokio::test]
async fn a_grant_hint_pasted_into_a_shell_runs_nothing_and_grants_exactly_that_path() {
    let Setup {
        mesh,
        mut atk,
        mut other,
        audit,
        dir,
    } = setup("\"read:allowed/**\"", None).await;
    // Finding 8's path (without spaces, which the probe's protocol splits on), its commands
    // aimed at the directory the hint is run in: each would make a file there.
    let path = "x'$(>PWNED)'`>PWNED2`";
    let message = atk.denied(&format!("stat {path}")).await;
    let expected = "grant it with mesh grant atk 'read:x'\\''$(>PWNED)'\\''`>PWNED2`'";
    assert!(message.ends_with(expected), "{message}");
    let logged = std::fs::read_to_string(&audit).unwrap();
    let line: serde_json::Value = serde_json::from_str(logged.lines().last().unwrap()).unwrap();
    assert_eq!(line["resource"], path);
    assert!(
        line["reason"].as_str().unwrap().ends_with(expected),
        "{line}"
    );
    let command = expected.strip_prefix("grant it with ").unwrap();

    // What a shell makes of it: `mesh` with exactly these arguments, and nothing run.
    let pasted = dir.path().join("pasted");
    std::fs::create_dir(&pasted).unwrap();
    let parsed = Command::new("sh")
        .arg("-c")
        .arg(format!("mesh() {{ printf '%s\\0' \"$@\"; }}\n{command}"))
        .current_dir(&pasted)
        .output()
        .unwrap();
    assert!(parsed.status.success(), "{parsed:?}");
    let args: Vec<&str> = std::str::from_utf8(&parsed.stdout)
        .unwrap()
        .split_terminator('\0')
        .collect();
    assert_eq!(args, ["grant", "atk", &format!("read:{path}")]);

    // Run for real, as the operator would: the real `mesh` on PATH, against this mesh.
    let path_var = format!(
        "{}:{}",
        mesh_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ran = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(&pasted)
        .env("PATH", path_var)
        .env("MESH_SOCKET", &mesh.socket)
        .output()
        .unwrap();
    assert!(ran.status.success(), "{ran:?}");
    assert_eq!(
        std::fs::read_dir(&pasted).unwrap().count(),
        0,
        "the hint ran a command"
    );
    let caps: serde_json::Value =
        serde_json::from_str(&mesh.cli_ok(&["caps", "atk", "--json"]).await).unwrap();
    let granted: Vec<&str> = caps["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["source"] == "granted")
        .map(|c| c["capability"].as_str().unwrap())
        .collect();
    assert_eq!(granted, [format!("read:{path}")]);
    // Granted exactly that path: it is no longer refused (it does not exist), others still are.
    let answer = atk.call(&format!("stat {path}")).await.unwrap_err();
    assert_eq!(answer.0, Code::NotFound as i32, "{answer:?}");
    atk.denied("stat x").await;
    // The other plugin was served throughout.
    other.ok("stat .").await;
}

#[tokio::test]
async fn a_direct_call_line_says_which_instance_reported_it() {
    let Setup {
        mesh,
        mut atk,
        audit,
        dir: _dir,
        ..
    } = setup("\"read:allowed/**\"", None).await;
    let other_socket = mesh.wait_instances("plugin.other", 1).await[0].socket();
    let message = atk
        .denied(&format!(
            "call plugin.other echo socket {}",
            other_socket.display()
        ))
        .await;
    assert!(
        message.contains("mesh grant atk 'call:plugin.other'"),
        "{message}"
    );
    atk.denied("call plugin.other echo router").await;
    let text = std::fs::read_to_string(&audit).unwrap();
    let calls: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["action"] == "call")
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["via"], "direct");
    assert_eq!(calls[0]["reported_by"], "other-0");
    assert_eq!(calls[0]["plugin"], "atk");
    assert_eq!(calls[1]["via"], "router");
    assert!(calls[1].get("reported_by").is_none());
}

#[tokio::test]
async fn the_ca_key_is_kept_apart_and_mesh_up_warns_of_keys_a_plugin_could_read() {
    // A plugin of the owner's uid reads what that uid reads: `mesh certs init` puts the CA key
    // in a directory of its own and says so; `mesh up` names every key beside [tls] ca but
    // its own.
    let dir = crate::support::short_tempdir();
    let certs = dir.path().join("certs");
    let mut init_stderr = String::new();
    for args in [&["init"][..], &["node", "a"], &["client", "ops"]] {
        let out = Command::new(mesh_bin())
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(&certs)
            .output()
            .unwrap();
        assert!(out.status.success(), "mesh certs {args:?}: {out:?}");
        if args == ["init"] {
            init_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        }
    }
    let ca_key = certs.join("ca-key/ca.key");
    assert!(
        init_stderr.contains(&format!("the CA key {}", ca_key.display()))
            && init_stderr.contains("unsandboxed plugins"),
        "{init_stderr}"
    );
    assert!(!certs.join("ca.key").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&certs.join("ca-key")), mode(&ca_key)), (0o700, 0o600));

    let tls = format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        certs.join("ca.pem"),
        certs.join("node-a.pem"),
        certs.join("node-a.key")
    );
    let plugins = format!("[[plugin]]\nname = \"echo\"\ncommand = \"{{echo}}\"\n{tls}");
    let mesh = Mesh::start_with("listen = \"127.0.0.1:0\"", &plugins).await;
    mesh.wait_instances("plugin.echo", 1).await;
    let warned = mesh.wait_lines("lies beside [tls] ca", 2).await;
    assert!(
        warned[0].contains(&ca_key.display().to_string()),
        "{warned:?}"
    );
    assert!(warned[1].contains("client-ops.key"), "{warned:?}");
    assert!(!mesh.output().contains("node-a.key lies beside"));
}
