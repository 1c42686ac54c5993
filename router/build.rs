//! Generates the client of etcd's v3 API (the subset in `proto/etcd/rpc.proto`) with
//! `mesh-build` (protox, pure Rust): no system `protoc`, unlike the `etcd-client` crate.

fn main() -> Result<(), mesh_build::Error> {
    mesh_build::Compiler::new()
        .direct_dependencies()
        .compile(&["etcd/rpc.proto"], &["../proto"])
}
