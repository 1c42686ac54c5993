//! `mesh new NAME`: a plugin crate that builds and runs under `mesh up` as it is.
//!
//! Nothing of mesh is published to a registry, so the crate depends on `mesh` and `mesh-build`
//! by path, in a mesh source tree: by default the one this `mesh` was built from (known at
//! compile time), else `--mesh-path DIR`. Its `Cargo.lock` is copied too, so the plugin builds
//! with the versions mesh was tested with, from the local registry cache when they are there.

use std::path::{Path, PathBuf};

/// The mesh source tree this binary was built from (the workspace root).
const BUILT_FROM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Why a plugin crate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a plugin's (and a crate's, and a proto package's) name.
    #[error(
        "{name:?} is not a plugin name: {why}; use lowercase letters, digits and '-', starting with a letter (such as hello or my-plugin)"
    )]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The target directory exists: nothing is overwritten.
    #[error("{} already exists; pick another name or remove it", .0.display())]
    Exists(PathBuf),
    /// No mesh source tree to depend on.
    #[error(
        "no mesh source tree at {}: {why}; pass --mesh-path DIR, a checkout of mesh (the directory with build/ and mesh/)",
        .path.display()
    )]
    NoSource {
        /// Where it was looked for.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// Writing a file failed.
    #[error("cannot write {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The default `--mesh-path`: the source tree this `mesh` was built from.
pub fn default_mesh_path() -> PathBuf {
    PathBuf::from(BUILT_FROM)
}

/// Makes the plugin crate `name` in `parent/name`, depending on the mesh source tree at
/// `mesh_path`; returns the crate's directory.
pub fn new_plugin(parent: &Path, name: &str, mesh_path: &Path) -> Result<PathBuf, ScaffoldError> {
    check_name(name)?;
    let source = mesh_source(mesh_path)?;
    let dir = parent.join(name);
    if dir.symlink_metadata().is_ok() {
        return Err(ScaffoldError::Exists(dir));
    }
    let files = Files::new(name, &source);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ScaffoldError::Io { path, source }
    };
    std::fs::create_dir(&dir).map_err(io(&dir))?;
    for (path, text) in files.all() {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    // Optional: without it, cargo resolves the newest compatible versions.
    let lock = source.join("Cargo.lock");
    if lock.is_file() {
        let to = dir.join("Cargo.lock");
        std::fs::copy(&lock, &to).map_err(io(&to))?;
    }
    Ok(dir)
}

/// A plugin name that is also a crate name and, with '-' as '_', a proto package.
fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let invalid = |why| ScaffoldError::InvalidName {
        name: name.to_owned(),
        why,
    };
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid("it must start with a lowercase letter"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(invalid("it may hold only a-z, 0-9 and '-'"));
    }
    if name.ends_with('-') || name.contains("--") {
        return Err(invalid("a '-' must sit between two letters or digits"));
    }
    if name.len() > 40 {
        return Err(invalid("it is longer than 40 bytes"));
    }
    if mesh::ServiceName::plugin(name).is_err() {
        return Err(invalid("it is not a service name segment"));
    }
    const TAKEN: [&str; 5] = ["mesh", "mesh-build", "tonic", "prost", "test"];
    if TAKEN.contains(&name) || is_keyword(name) {
        return Err(invalid(
            "it is a Rust keyword or the name of a crate the plugin depends on",
        ));
    }
    Ok(())
}

fn is_keyword(name: &str) -> bool {
    const KEYWORDS: [&str; 51] = [
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
        "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
        "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub",
        "ref", "return", "self", "static", "struct", "super", "trait", "true", "try", "type",
        "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
    ];
    KEYWORDS.contains(&name)
}

/// The mesh source tree at `path`, made absolute; an error if it has no `mesh` or `mesh-build`.
fn mesh_source(path: &Path) -> Result<PathBuf, ScaffoldError> {
    let no_source = |why: String| ScaffoldError::NoSource {
        path: path.to_owned(),
        why,
    };
    let source = path.canonicalize().map_err(|e| no_source(e.to_string()))?;
    for (dir, package) in [
        ("mesh", "name = \"mesh\""),
        ("build", "name = \"mesh-build\""),
    ] {
        let manifest = source.join(dir).join("Cargo.toml");
        match std::fs::read_to_string(&manifest) {
            Ok(text) if text.contains(package) => {}
            _ => {
                return Err(no_source(format!(
                    "{} is not the {} crate",
                    manifest.display(),
                    package.trim_start_matches("name = ")
                )));
            }
        }
    }
    Ok(source)
}

/// The files of a new plugin crate.
struct Files {
    /// `hello`, `my-plugin`: crate, binary and plugin name.
    name: String,
    /// `hello`, `my_plugin`: the proto package's first segment and the Rust modules' prefix.
    snake: String,
    /// `Hello`, `MyPlugin`: the service.
    service: String,
    /// The mesh source tree.
    source: PathBuf,
}

impl Files {
    fn new(name: &str, source: &Path) -> Self {
        let service = name
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars.next().map_or(String::new(), |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect();
        Self {
            name: name.to_owned(),
            snake: name.replace('-', "_"),
            service,
            source: source.to_owned(),
        }
    }

    fn proto_path(&self) -> String {
        format!("proto/{0}/v1/{0}.proto", self.snake)
    }

    fn all(&self) -> [(String, String); 6] {
        [
            ("Cargo.toml".into(), self.cargo_toml()),
            ("build.rs".into(), self.build_rs()),
            (self.proto_path(), self.proto()),
            ("src/main.rs".into(), self.main_rs()),
            ("mesh.toml".into(), self.mesh_toml()),
            ("README.md".into(), self.readme()),
        ]
    }

    fn cargo_toml(&self) -> String {
        let path = |dir: &str| toml_string(&self.source.join(dir));
        format!(
            r#"[package]
name = "{name}"
edition = "2024"

[dependencies]
mesh = {{ path = {mesh} }}

[build-dependencies]
mesh-build = {{ path = {build} }}

# A crate of its own, even inside another workspace's directory.
[workspace]
"#,
            name = self.name,
            mesh = path("mesh"),
            build = path("build"),
        )
    }

    fn build_rs(&self) -> String {
        format!(
            r#"fn main() {{
    mesh_build::compile(&["{proto}"], &["proto"]).unwrap();
}}
"#,
            proto = self.proto_path()
        )
    }

    fn proto(&self) -> String {
        format!(
            r#"syntax = "proto3";

package {snake}.v1;

// The {name} plugin's API: add methods here, then implement them in src/main.rs.
service {service} {{
  // Answers with a greeting for `name`.
  rpc SayHello(SayHelloRequest) returns (SayHelloReply);
}}

message SayHelloRequest {{
  string name = 1;
}}

message SayHelloReply {{
  string message = 1;
}}
"#,
            snake = self.snake,
            name = self.name,
            service = self.service,
        )
    }

    fn main_rs(&self) -> String {
        format!(
            r#"//! The {name} plugin: `{snake}.v1.{service}` ({proto}), run by `mesh up`.

use mesh::tonic::{{Request, Response, Status}};

mesh::include_proto!("{snake}.v1");

/// The service: one method per rpc of the .proto.
struct {service};

#[mesh::tonic::async_trait]
impl {snake}_server::{service} for {service} {{
    async fn say_hello(
        &self,
        request: Request<SayHelloRequest>,
    ) -> Result<Response<SayHelloReply>, Status> {{
        let name = request.into_inner().name;
        Ok(Response::new(SayHelloReply {{
            message: format!("Hello, {{name}}!"),
        }}))
    }}
}}

mesh::plugin::main!({snake}_server::{service}Server::new({service}));
"#,
            name = self.name,
            snake = self.snake,
            service = self.service,
            proto = self.proto_path(),
        )
    }

    fn plugin_table(&self) -> String {
        format!(
            "[[plugin]]\nname = \"{name}\"\ncommand = \"target/debug/{name}\"\n",
            name = self.name
        )
    }

    fn mesh_toml(&self) -> String {
        format!(
            "# `mesh up` in this directory runs the plugin; `command` is relative to this file.\n{}",
            self.plugin_table()
        )
    }

    fn readme(&self) -> String {
        format!(
            r#"# {name}

A mesh plugin serving `{snake}.v1.{service}` ({proto}), made by `mesh new {name}`.

```sh
cargo build
mesh up        # reads mesh.toml here; prints where the router listens
grpcurl -plaintext -unix -authority plugin.{name} -d '{{"name": "world"}}' \
  "${{MESH_SOCKET:-$XDG_RUNTIME_DIR/mesh/mesh.sock}}" {snake}.v1.{service}/SayHello
```

To run it from another mesh config, add (with `command` relative to that file, or absolute):

```toml
{table}```

The API is in `{proto}`; its implementation in `src/main.rs`. `build.rs` generates the code
and the descriptors for reflection (`mesh-build`), and `mesh::plugin::main!` serves it on the
socket `mesh up` hands out, with health and reflection. The plugin depends on the mesh source
tree at `{source}`.
"#,
            name = self.name,
            snake = self.snake,
            service = self.service,
            proto = self.proto_path(),
            table = self.plugin_table(),
            source = self.source.display(),
        )
    }
}

/// `path` as a TOML string.
fn toml_string(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_crates_and_packages_are_refused() {
        for good in ["hello", "my-plugin", "a1", "x-2y"] {
            check_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "", "Hello", "1x", "-x", "x-", "a--b", "a_b", "a.b", "mesh", "fn", "héllo",
        ] {
            let error = check_name(bad).expect_err(bad).to_string();
            assert!(error.contains("is not a plugin name"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_dashed_name_makes_a_snake_package_and_a_pascal_service() {
        let files = Files::new("my-plugin", Path::new("/src/mesh"));
        assert_eq!(files.proto_path(), "proto/my_plugin/v1/my_plugin.proto");
        let main = files.main_rs();
        assert!(
            main.contains("mesh::include_proto!(\"my_plugin.v1\")"),
            "{main}"
        );
        assert!(
            main.contains("my_plugin_server::MyPluginServer::new(MyPlugin)"),
            "{main}"
        );
        assert!(files.proto().contains("service MyPlugin {"));
        assert!(
            files
                .cargo_toml()
                .contains("mesh = { path = \"/src/mesh/mesh\" }")
        );
    }

    #[test]
    fn an_existing_directory_or_a_missing_source_tree_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("taken")).unwrap();
        let error = new_plugin(dir.path(), "taken", &default_mesh_path()).unwrap_err();
        assert!(matches!(error, ScaffoldError::Exists(_)), "{error}");
        let error = new_plugin(dir.path(), "fresh", dir.path()).unwrap_err();
        assert!(
            error.to_string().contains("pass --mesh-path DIR"),
            "{error}"
        );
        assert!(!dir.path().join("fresh").exists());
    }
}
