//! The file lister (`files-plugin`) as `deploy/local.toml` runs it: its plugin tables taken
//! from that file, its root a copy of `deploy/files`. One survey is allowed step by step (list,
//! read, write a report, call plugin.echo), one is denied at the read its capabilities do not
//! name, and `mesh audit` shows both, as the README says.

use std::path::{Path, PathBuf};

use crate::support::{Mesh, echo_plugin, files_plugin, grpcurl, grpcurl_ok, short_tempdir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The demo's plugin tables (`deploy/local.toml`: echo and the file lister), with this build's
/// binaries and `root` a fresh copy of `deploy/files` (without its report).
pub(crate) fn demo_plugins(root: &Path) -> String {
    copy_tree(&repo().join("deploy/files"), root);
    let _ = std::fs::remove_file(root.join("reports/docs.txt"));
    let demo = std::fs::read_to_string(repo().join("deploy/local.toml")).unwrap();
    let plugins = &demo[demo.find("[[plugin]]").expect("the demo has plugins")..];
    plugins
        .replace(
            "\"../target/debug/echo-plugin\"",
            &format!("{:?}", echo_plugin().display().to_string()),
        )
        .replace(
            "\"../target/debug/files-plugin\"",
            &format!("{:?}", files_plugin().display().to_string()),
        )
        .replace(
            "root = \"files\"",
            &format!("root = {:?}", root.display().to_string()),
        )
}

#[tokio::test]
async fn the_file_lister_of_the_demo_is_allowed_and_denied_as_its_capabilities_say() {
    let dir = short_tempdir();
    let root = dir.path().join("files");
    let plugins = demo_plugins(&root);
    assert!(plugins.contains("sandbox = true"), "{plugins}");
    let mesh = Mesh::start(&plugins).await;
    mesh.wait_state("files", "files-0", "ready").await;
    mesh.wait_state("echo", "echo-0", "ready").await;
    let socket = mesh.socket.display().to_string();
    let survey = |request: &str| {
        let args = [
            "-unix",
            "-authority",
            "plugin.files",
            "-d",
            request,
            socket.as_str(),
            "files.v1.Files/Survey",
        ];
        args.map(str::to_owned)
    };

    let reply = grpcurl_ok(&survey(r#"{"dir":"docs"}"#).each_ref().map(String::as_str));
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(
        reply["entries"],
        serde_json::json!(["guide.md", "readme.txt"])
    );
    assert_eq!(reply["file"], "docs/guide.md");
    assert_eq!(reply["firstLine"], "# Guide");
    assert_eq!(reply["report"], "reports/docs.txt");
    assert!(
        reply["echoed"]
            .as_str()
            .unwrap()
            .starts_with("docs: 2 entries"),
        "{reply}"
    );
    assert!(
        reply["echoInstance"].as_str().unwrap().starts_with("echo-"),
        "{reply}"
    );
    let report = std::fs::read_to_string(root.join("reports/docs.txt")).unwrap();
    assert!(report.starts_with("docs: 2 entries"), "{report}");

    let denied = grpcurl(
        &survey(r#"{"dir":"docs","file":"private/notes.txt"}"#)
            .each_ref()
            .map(String::as_str),
    );
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    assert!(
        stderr.contains("reading private/notes.txt: plugin \"files\" lacks read:private/notes.txt"),
        "{stderr}"
    );

    let audit = mesh.cli_ok(&["audit"]).await;
    let decisions: Vec<(String, String, bool)> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["plugin"] == "files")
        .map(|l| {
            (
                l["action"].as_str().unwrap().to_owned(),
                l["resource"].as_str().unwrap().to_owned(),
                l["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("read_dir", "docs", true),
        ("read_file", "docs/guide.md", true),
        ("write_file", "reports/docs.txt", true),
        ("call", "plugin.echo/echo.v1.Echo/Echo", true),
        ("read_dir", "docs", true),
        ("read_file", "private/notes.txt", false),
    ]
    .map(|(a, r, ok)| (a.to_owned(), r.to_owned(), ok));
    assert_eq!(decisions, expected, "{audit}");
}
