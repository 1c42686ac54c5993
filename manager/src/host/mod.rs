//! Host services and capabilities: what plugins may reach on the host, checked in one place.
//!
//! - [`caps`]: the capability syntax (`read:GLOB`, `write:GLOB`, `env:NAME`, `call:…`) and
//!   each plugin's [`Policy`], held by [`Policies`] and swapped whole on a grant, a revoke or a
//!   reload;
//! - [`fs`]: paths normalized for the check and opened beneath the plugin's root by the kernel;
//! - [`audit`]: every decision as one JSON line;
//! - [`service`]: `mesh.v1.Host`, served by the router to plugin callers only, its file
//!   operations on [`pool`]: the host services' own threads, each plugin's bounded share of
//!   them, and a deadline on each operation;
//! - [`calls`]: calls to plugins, by the router or directly, under the callers' `call:`
//!   capabilities and the targets' rate limits ([`rates`]), decided in one place;
//! - [`direct`]: the manager's end of each instance's private channel, over which the SDK asks
//!   about the callers on the plugin's own socket.

pub mod audit;
pub mod calls;
pub mod caps;
#[cfg(test)]
mod cost;
pub mod direct;
pub mod fs;
pub mod pool;
pub mod rates;
pub mod service;

pub use audit::Audit;
pub use calls::CallGate;
pub use caps::{Capability, Policies, Policy};
pub use direct::DirectGate;
pub use rates::{Rate, RateLimits};
pub use service::HostService;
