//! What a plugin finds in its own environment, through a real `mesh up` started with a secret
//! in its environment: only the variables the allow-list names, the config's `env` and the
//! plugin contract, sandboxed or not; the secret only through `GetEnv` with `env:` (the one
//! door the capability guards); and no config entry overrides the contract.

use std::{collections::BTreeMap, path::Path, time::Duration};

use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};

use crate::support::{
    DEADLINE, Mesh, Probe, echo_plugin, host_probe, script, short_tempdir, write_config,
};

const SECRET: &str = "SECRET_TOKEN";

/// `/proc/PID/environ` as a map.
fn environ(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (key, value) = entry.split_once('=')?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// A plugin table running echo-plugin itself (so its environ is exactly what mesh up gave).
fn echo_table(name: &str, extra: &str) -> String {
    format!(
        "[[plugin]]\nname = {name:?}\ncommand = {:?}\n{extra}\n",
        echo_plugin().display().to_string()
    )
}

#[tokio::test]
async fn a_plugin_gets_a_clean_environment_and_a_secret_only_through_its_capability() {
    let dir = short_tempdir();
    // A probe beside echo-plugin, as a plugin that wants the secret would run.
    let asker = |name: &str, capabilities: &str| {
        let command = script(
            dir.path(),
            &format!("{name}.sh"),
            &format!(
                "{} - &\nexec {}",
                host_probe().display(),
                echo_plugin().display()
            ),
        );
        format!(
            "[[plugin]]\nname = {name:?}\ncommand = {:?}\ncapabilities = [{capabilities}]\n",
            command.display().to_string()
        )
    };
    let plugins = [
        echo_table(
            "plain",
            "env = { GREETING = \"hello\", LANG = \"C.UTF-8\" }",
        ),
        echo_table("boxed", "sandbox = true"),
        echo_table("extra", "env_allow = [\"EXTRA_*\"]"),
        asker("denied", ""),
        asker("granted", &format!("\"env:{SECRET}\"")),
    ]
    .concat();
    // [mesh] env_allow: the default list (PATH LANG LC_* TZ) spelled out, less TZ.
    write_config(&dir, "env_allow = [\"PATH\", \"LANG\", \"LC_*\"]", &plugins);
    let config = dir.path().join("mesh.toml");
    let socket = dir.path().join("run/mesh.sock");
    let mesh = Mesh::launch_with(dir, config, socket.clone(), |command| {
        command
            .env(SECRET, "s3cret-value")
            .env("EXTRA_ONE", "1")
            .env("TZ", "Europe/Berlin")
            .env("LANG", "de_DE.UTF-8")
            .env("LC_TIME", "C")
            // The manager's own MESH_DIRECT and a forged contract variable reach no plugin.
            .env("MESH_DIRECT", "1")
            .env("PLUGIN_NAME", "forged")
            .env("HOME", "/root");
    })
    .await;
    let mut pids = BTreeMap::new();
    for name in ["plain", "boxed", "extra", "denied", "granted"] {
        let id = format!("{name}-0");
        pids.insert(name, mesh.wait_state(name, &id, "ready").await.pid);
    }
    let runtime = socket.parent().unwrap().to_owned();

    let contract = [
        "PLUGIN_SOCKET",
        "PLUGIN_NAME",
        "PLUGIN_INSTANCE",
        "MESH_SOCKET",
        "MESH_CALLERS_FD",
        "MESH_MAX_MESSAGE_SIZE",
    ];
    for (name, pid) in &pids {
        let env = environ(*pid);
        assert!(!env.contains_key(SECRET), "{name}: {env:?}");
        assert!(!env.contains_key("HOME"), "{name}: {env:?}");
        assert!(!env.contains_key("TZ"), "{name}: not allowed here: {env:?}");
        assert_eq!(env.get("PLUGIN_NAME").map(String::as_str), Some(*name));
        assert_eq!(
            env.get("PLUGIN_SOCKET").map(Path::new),
            Some(runtime.join(name).join(format!("{name}-0.sock")).as_path())
        );
        let mut allowed: Vec<&str> = contract.to_vec();
        allowed.extend(["PATH", "LANG", "LC_TIME"]);
        match *name {
            "plain" => allowed.push("GREETING"),
            "boxed" => allowed.push("MESH_DIRECT"),
            "extra" => allowed.push("EXTRA_ONE"),
            // The wrapper script's shell adds its working directory.
            _ => allowed.push("PWD"),
        }
        let mut names: Vec<&str> = env.keys().map(String::as_str).collect();
        names.sort_unstable();
        allowed.sort_unstable();
        assert_eq!(names, allowed, "{name}: {env:?}");
    }
    let plain = environ(pids["plain"]);
    assert_eq!(plain["GREETING"], "hello");
    assert_eq!(
        plain["LANG"], "C.UTF-8",
        "the config's env wins over the manager's"
    );
    assert_eq!(environ(pids["extra"])["LANG"], "de_DE.UTF-8");
    assert_eq!(environ(pids["boxed"])["MESH_DIRECT"], "0");

    // The secret: refused through GetEnv without env:, given with it; in neither's environment.
    let mut denied = Probe::connect(&runtime.join("denied/probe.sock")).await;
    let mut granted = Probe::connect(&runtime.join("granted/probe.sock")).await;
    let message = denied.denied(&format!("env {SECRET}")).await;
    assert!(message.contains(&format!("env:{SECRET}")), "{message}");
    assert_eq!(granted.ok(&format!("env {SECRET}")).await, "s3cret-value");

    // Every plugin serves, each within a deadline.
    for name in pids.keys() {
        let mut client = EchoClient::new(mesh.connect(&format!("plugin.{name}")).await);
        let mut request = tonic::Request::new(EchoRequest {
            message: "still here".into(),
        });
        request.set_timeout(Duration::from_secs(5));
        let reply = client.echo(request).await.unwrap().into_inner();
        assert_eq!(reply.instance, format!("{name}-0"));
    }
}

#[tokio::test]
async fn a_config_env_naming_a_contract_variable_is_refused_with_its_line() {
    let dir = short_tempdir();
    let config = dir.path().join("mesh.toml");
    for (table, wanted) in [
        (
            "env = { MESH_DIRECT = \"1\" }",
            "env MESH_DIRECT is set by the manager",
        ),
        (
            "env = { PLUGIN_SOCKET = \"/tmp/elsewhere.sock\" }",
            "env PLUGIN_SOCKET is set by the manager",
        ),
        (
            "env = { MESH_CALLERS_FD = \"0\" }",
            "env MESH_CALLERS_FD is set by the manager",
        ),
        (
            "env_allow = [\"PLUGIN_INSTANCE\"]",
            "env_allow entry \"PLUGIN_INSTANCE\" is set by the manager",
        ),
        ("env_allow = [\"*\"]", "secrets included"),
    ] {
        std::fs::write(&config, echo_table("echo", table)).unwrap();
        let error = mesh_manager::Config::load(&config).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{}:4: ", config.display())),
            "{error}"
        );
        assert!(error.contains(wanted), "{error}");
        // mesh up refuses it too, before it starts anything.
        let up = tokio::process::Command::new(crate::support::mesh_bin())
            .args(["up", "--config"])
            .arg(&config)
            .env_remove("MESH_SOCKET")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(DEADLINE, up)
            .await
            .expect("mesh up refuses the config at once")
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(":4:") && stderr.contains(wanted),
            "{stderr}"
        );
    }
}
