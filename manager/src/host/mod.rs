//! Host services and capabilities: what plugins may reach on the host, checked in one place.
//!
//! - [`caps`]: the capability syntax (`read:GLOB`, `write:GLOB`, `env:NAME`, `call:…`) and
//!   each plugin's [`Policy`], held by [`Policies`] and swapped whole on a grant, a revoke or a
//!   reload;
//! - [`fs`]: paths normalized for the check and opened beneath the plugin's root by the kernel;
//! - [`audit`]: every decision as one JSON line;
//! - [`service`]: `mesh.v1.Host`, served by the router to plugin callers only;
//! - [`calls`]: calls a plugin forwards through the router, under its `call:` capabilities.

pub mod audit;
pub mod calls;
pub mod caps;
pub mod fs;
pub mod service;

pub use audit::Audit;
pub use calls::CallGate;
pub use caps::{Capability, Policies, Policy};
pub use service::HostService;
