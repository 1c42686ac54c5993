//! Puts the git commit into `mesh --version` (`MESH_GIT_COMMIT`): `git rev-parse --short HEAD`
//! where the sources are a git checkout and git is installed, `unknown` anywhere else (a
//! tarball, a crate, a container build without `.git`). A `MESH_GIT_COMMIT` in the build's
//! environment wins (the container build passes it in). It never fails the build.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MESH_GIT_COMMIT");
    if let Ok(commit) = std::env::var("MESH_GIT_COMMIT")
        && !commit.is_empty()
    {
        println!("cargo:rustc-env=MESH_GIT_COMMIT={commit}");
        return;
    }
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    if commit.is_some() {
        // HEAD moves on checkout; the branch it names moves on commit (a loose ref, or
        // packed-refs after `git gc`). Watch only paths that exist: cargo reruns a script on
        // every build when a watched path is missing.
        let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(branch);
        }
        for name in watched {
            if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
                && std::path::Path::new(&path).exists()
            {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let commit = commit.unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=MESH_GIT_COMMIT={commit}");
}
