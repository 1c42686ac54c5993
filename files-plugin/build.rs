//! Generates `files.v1` with `mesh-build` (protox: no system `protoc`), and the descriptors
//! for reflection.

fn main() -> Result<(), mesh_build::Error> {
    mesh_build::compile(&["proto/files/v1/files.proto"], &["proto"])
}
