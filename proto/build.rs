//! Generates the Rust code for every `.proto` under this crate with protox (pure Rust):
//! no system `protoc` is needed or used.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "mesh/v1/registry.proto",
    "mesh/v1/manager.proto",
    "mesh/v1/host.proto",
    "echo/v1/echo.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // compile_fds writes no descriptor set of its own; reflection needs one.
    fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    // Clients take any channel (mesh::Channel); no dependency on tonic's own transport.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
