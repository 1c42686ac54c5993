//! The command line people expect: `--version` with the commit, shell completions, a man page,
//! all generated from the same clap definitions that parse the command.

use std::process::Command;

use crate::support::mesh_bin;

fn mesh_ok(args: &[&str]) -> String {
    let out = Command::new(mesh_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "mesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let version = mesh_ok(&["--version"]);
    assert!(
        version.starts_with(&format!("mesh {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    // The test builds from the same checkout: its HEAD is the binary's commit.
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(head) if head.status.success() => {
            let head = String::from_utf8(head.stdout).unwrap();
            assert!(
                version.contains(&format!("(commit {})", head.trim())),
                "{version:?} names HEAD {head:?}"
            );
        }
        // Outside a git checkout build.rs says so.
        _ => assert!(version.contains("(commit unknown)"), "{version:?}"),
    }
}

#[test]
fn completions_cover_the_subcommands_in_every_shell() {
    // Bash itself, with the script loaded, completes `mesh <TAB>` and `mesh completions <TAB>`.
    let complete = |words: &str, cword: usize| {
        let script = format!(
            "source <({mesh} completions bash) && COMP_WORDS=({words}) && COMP_CWORD={cword} \
             && _mesh mesh \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\" \
             && echo \"${{COMPREPLY[@]}}\"",
            mesh = mesh_bin().display()
        );
        let out = Command::new("bash").args(["-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let words = complete("mesh ''", 1);
    for subcommand in [
        "up",
        "status",
        "scale",
        "logs",
        "reload",
        "completions",
        "--socket",
    ] {
        assert!(
            words.split_whitespace().any(|w| w == subcommand),
            "bash completes `mesh {subcommand}`: {words}"
        );
    }
    let shells = complete("mesh completions ''", 2);
    assert!(
        shells.contains("bash") && shells.contains("zsh") && shells.contains("fish"),
        "{shells}"
    );
    let zsh = mesh_ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef mesh"), "{zsh}");
    let fish = mesh_ok(&["completions", "fish"]);
    assert!(fish.contains("complete -c mesh"), "{fish}");

    let out = Command::new(mesh_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values: bash"),
        "names the shells it knows"
    );
}

#[test]
fn man_page_is_roff_from_the_clap_definitions() {
    let page = mesh_ok(&["man"]);
    let title = page
        .lines()
        .find(|l| l.starts_with(".TH"))
        .unwrap_or_else(|| panic!("no .TH line:\n{page}"));
    assert!(title.starts_with(".TH mesh 1"), "{title}");
    assert!(page.contains("A plugin mesh for gRPC services"));
    assert!(page.contains("completions"), "lists the subcommands");
    // Hidden from --help, where it would only be noise.
    let help = mesh_ok(&["--help"]);
    assert!(!help.contains("\n  man "), "{help}");
}
