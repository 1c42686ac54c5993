//! The mesh manager: configuration, the supervisor that keeps plugins alive, and `mesh up`.
//!
//! The `mesh` command is a thin layer over this library (see `main.rs`).

pub mod admin;
pub mod api;
pub mod certs;
pub mod config;
pub mod host;
pub mod scaffold;
pub mod supervisor;
mod systemd;
pub mod telemetry;
pub mod up;

pub use config::{AdminConfig, Config, ConfigError, PluginConfig, Transport};
pub use supervisor::Supervisor;
