//! Generates the Rust code for every `.proto` under this crate with `mesh-build` (protox, pure
//! Rust): no system `protoc` is needed or used. The same helper plugins build with.

fn main() -> Result<(), mesh_build::Error> {
    // `mesh` depends on this crate, so the code names tonic and prost directly.
    mesh_build::Compiler::new().direct_dependencies().compile(
        &[
            "mesh/v1/registry.proto",
            "mesh/v1/manager.proto",
            "mesh/v1/host.proto",
            "echo/v1/echo.proto",
        ],
        &["."],
    )
}
