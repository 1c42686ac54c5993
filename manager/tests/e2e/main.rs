//! End-to-end tests: the real `mesh` and `echo-plugin` binaries, real Unix sockets, real grpcurl.

#![allow(unreachable_pub)] // a test crate: nothing here is exported

mod admin;
mod audit;
mod bad_input;
mod cancel;
mod cluster;
mod command_line;
mod deploy;
mod environment;
mod files_plugin;
mod hardening;
mod host;
mod host_starvation;
mod lifecycle;
mod loopback_identity;
mod mtls;
mod python_plugin;
mod router;
mod routing;
mod sandbox;
mod scaffold;
mod security;
mod status_page;
mod supervision;
mod support;
mod system_service;
mod telemetry;
mod transport;
