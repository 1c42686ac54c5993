//! The plugin guide's walk, as written: `mesh new hello`, `cargo build`, `mesh up` in the new
//! crate (its mesh.toml holds the `[[plugin]]` table), and grpcurl calling it by name.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command, time::Instant};

use crate::support::{Mesh, grpcurl_ok, mesh_bin, short_tempdir};

#[tokio::test]
async fn a_new_plugin_builds_and_answers_by_name_under_mesh_up() {
    let dir = short_tempdir();
    let made = Command::new(mesh_bin())
        .args(["new", "hello"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "mesh new hello: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let crate_dir = dir.path().join("hello");

    // The one step beyond the guide: the crate's target/ is a directory kept under this
    // workspace's, so its dependencies compile once, not on every run.
    let cache = mesh_bin()
        .parent()
        .and_then(Path::parent)
        .expect("the workspace target dir")
        .join("scaffold-test");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(&cache, crate_dir.join("target")).unwrap();

    let started = Instant::now();
    let built = Command::new(env!("CARGO"))
        .arg("build")
        .current_dir(&crate_dir)
        // This test's own cargo settings are not the new crate's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "cargo build of the new plugin failed after {:?}:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&built.stderr)
    );

    // `mesh up` in the crate's directory, its runtime directory private to this test.
    let runtime = dir.path().join("xdg");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = runtime.join("mesh/mesh.sock");
    let config = crate_dir.join("mesh.toml");
    let mesh = Mesh::launch_with(dir, config, socket.clone(), |command| {
        command
            .current_dir(&crate_dir)
            .env("XDG_RUNTIME_DIR", &runtime);
    })
    .await;
    mesh.wait_instances("plugin.hello", 1).await;

    let socket = socket.display().to_string();
    let reply = grpcurl_ok(&[
        "-unix",
        "-authority",
        "plugin.hello",
        "-d",
        r#"{"name": "world"}"#,
        &socket,
        "hello.v1.Hello/SayHello",
    ]);
    assert!(reply.contains(r#""message": "Hello, world!""#), "{reply}");
}
