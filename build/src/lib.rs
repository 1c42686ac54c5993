//! Build helper for mesh plugins: one call from `build.rs` turns `.proto` files into Rust with
//! protox (pure Rust, no system `protoc`) and tonic-prost-build, and writes the encoded
//! `FileDescriptorSet` that server reflection needs (`compile_fds` writes none of its own).
//!
//! ```ignore
//! // build.rs (Cargo.toml: `[build-dependencies] mesh-build = ...`)
//! fn main() {
//!     mesh_build::compile(&["proto/hello/v1/hello.proto"], &["proto"]).unwrap();
//! }
//! ```
//!
//! and in the crate, `mesh::include_proto!("hello.v1")` for the code and
//! `mesh::file_descriptor_set!()` for the descriptors.
//!
//! By default the generated code reaches tonic and prost through the `mesh` crate's
//! re-exports, so a plugin depends on `mesh` alone and its generated code always matches the
//! versions mesh is built with. A crate that `mesh` itself depends on (`mesh-proto`) uses
//! [`Compiler::direct_dependencies`].

use std::{
    fmt,
    path::{Path, PathBuf},
};

use prost::Message;

/// The file in `OUT_DIR` that holds the encoded `FileDescriptorSet` of everything compiled;
/// `mesh::file_descriptor_set!()` includes it.
pub const DESCRIPTOR_SET_FILE: &str = "file_descriptor_set.bin";

/// Compiles `protos` (paths of `.proto` files, each inside one of `includes`) with the default
/// [`Compiler`]: see the crate documentation.
pub fn compile<P: AsRef<Path>>(protos: &[P], includes: &[P]) -> Result<(), Error> {
    Compiler::new().compile(protos, includes)
}

/// How generated code is produced; [`compile`] uses the default.
#[derive(Debug, Clone)]
pub struct Compiler {
    through_mesh: bool,
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Compiler {
    /// Generated code that names tonic and prost through `::mesh` (a plugin depends on `mesh`
    /// alone).
    pub fn new() -> Self {
        Self { through_mesh: true }
    }

    /// Generated code that names `tonic`, `prost` and `tonic_prost` directly, for a crate that
    /// depends on them itself (and that `mesh` may depend on, as `mesh-proto` does).
    pub fn direct_dependencies(mut self) -> Self {
        self.through_mesh = false;
        self
    }

    /// Compiles `protos` into `OUT_DIR`: one `PACKAGE.rs` per proto package (clients take any
    /// channel, such as `mesh::Channel`; no tonic transport is needed) and
    /// [`DESCRIPTOR_SET_FILE`]. Cargo reruns the build when one of the files changes.
    pub fn compile<P: AsRef<Path>>(&self, protos: &[P], includes: &[P]) -> Result<(), Error> {
        let out = std::env::var_os("OUT_DIR")
            .map(PathBuf::from)
            .ok_or_else(|| Error::Io {
                path: "OUT_DIR".into(),
                source: std::io::Error::other("OUT_DIR is not set: call this from a build script"),
            })?;
        let includes: Vec<&Path> = includes.iter().map(AsRef::as_ref).collect();
        let fds = protox::compile(protos, &includes).map_err(|e| Error::Proto(Box::new(e)))?;
        for file in &fds.file {
            // Rerun on the crate's own files, not on well-known types protox carries inside.
            if let Some(path) = file
                .name
                .as_deref()
                .and_then(|name| includes.iter().map(|i| i.join(name)).find(|p| p.exists()))
            {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
        let packages: Vec<String> = fds
            .file
            .iter()
            .map(|f| f.package.clone().unwrap_or_else(|| "_".into()))
            .collect();
        let descriptors = out.join(DESCRIPTOR_SET_FILE);
        std::fs::write(&descriptors, fds.encode_to_vec()).map_err(|source| Error::Io {
            path: descriptors,
            source,
        })?;
        let mut config = prost_build::Config::new();
        let mut builder = tonic_prost_build::configure()
            .build_transport(false)
            .out_dir(&out);
        if self.through_mesh {
            config.prost_path("::mesh::__codegen::prost");
            builder = builder.codec_path("::mesh::__codegen::tonic_prost::ProstCodec");
        }
        builder
            .compile_fds_with_config(fds, config)
            .map_err(|source| Error::Io {
                path: out.clone(),
                source,
            })?;
        if self.through_mesh {
            for package in packages {
                let path = out.join(format!("{package}.rs"));
                let Ok(code) = std::fs::read_to_string(&path) else {
                    continue; // a package of well-known types only: nothing generated
                };
                std::fs::write(&path, through_mesh(&code))
                    .map_err(|source| Error::Io { path, source })?;
            }
        }
        Ok(())
    }
}

/// tonic-build names `tonic::` with no way to configure it: point those paths at mesh's
/// re-export.
fn through_mesh(code: &str) -> String {
    const FROM: &str = "tonic::";
    let mut out = String::with_capacity(code.len() + code.len() / 8);
    let mut rest = code;
    while let Some(at) = rest.find(FROM) {
        let before = rest[..at].chars().next_back();
        let (head, tail) = rest.split_at(at);
        out.push_str(head);
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            out.push_str(FROM);
        } else {
            out.push_str("::mesh::tonic::");
        }
        rest = &tail[FROM.len()..];
    }
    out.push_str(rest);
    out
}

/// Why the protos could not be compiled.
pub enum Error {
    /// A `.proto` file is missing or wrong (the message names the file and the line).
    Proto(Box<protox::Error>),
    /// Writing the generated code failed.
    Io {
        /// What was being written.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Proto(error) => write!(
                f,
                "{error}; check the path is inside one of the include directories"
            ),
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

// `build.rs` calls `.unwrap()`, which prints Debug: make that the readable message.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Proto(error) => Some(error.as_ref()),
            Self::Io { source, .. } => Some(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::through_mesh;

    #[test]
    fn tonic_paths_go_through_mesh_and_nothing_else_changes() {
        assert_eq!(
            through_mesh("use tonic::codegen::*;\n impl tonic::server::NamedService"),
            "use ::mesh::tonic::codegen::*;\n impl ::mesh::tonic::server::NamedService"
        );
        assert_eq!(
            through_mesh("my_tonic::x tonic_prost::y"),
            "my_tonic::x tonic_prost::y"
        );
        assert_eq!(through_mesh("<tonic::Status>"), "<::mesh::tonic::Status>");
    }
}
