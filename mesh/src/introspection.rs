//! Health and server reflection for a gRPC server, built in one place for the router and for
//! plugins: `grpc.health.v1.Health` (overall and per service) and reflection v1 and v1alpha
//! (grpcurl 1.8 speaks only v1alpha, newer tools v1). Only the services actually served are
//! advertised, with health's own, so `grpcurl list` shows what answers.
//!
//! ```no_run
//! # async fn run() -> Result<(), mesh::introspection::InvalidDescriptors> {
//! let mut routes = tonic::service::RoutesBuilder::default();
//! // routes.add_service(EchoServer::new(echo));
//! let health = mesh::introspection::Introspection::new()
//!     .file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
//!     .service("echo.v1.Echo")
//!     .add_to(&mut routes)
//!     .await?;
//! // `health` flips the statuses later; every one starts SERVING.
//! # let _ = health; Ok(()) }
//! ```

use tonic::service::RoutesBuilder;
use tonic_health::{ServingStatus, server::HealthReporter};
use tonic_reflection::server::Builder;

/// Health and reflection for the services of one server: what reflection describes and which
/// services health reports.
#[derive(Debug, Clone, Default)]
pub struct Introspection {
    descriptors: Vec<&'static [u8]>,
    services: Vec<&'static str>,
}

/// An encoded `FileDescriptorSet` given for reflection could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid file descriptor set for reflection: {0}")]
pub struct InvalidDescriptors(#[source] tonic_reflection::server::Error);

impl Introspection {
    /// Health and reflection for no service yet (health's own is always described).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an encoded `FileDescriptorSet` that describes the services, for reflection.
    pub fn file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.descriptors.push(encoded);
        self
    }

    /// Adds a served service by its full name (`echo.v1.Echo`): reflection lists it and health
    /// reports it.
    pub fn service(mut self, name: &'static str) -> Self {
        self.services.push(name);
        self
    }

    /// Adds served services by name, as [`Introspection::service`] does.
    pub fn services(mut self, names: impl IntoIterator<Item = &'static str>) -> Self {
        self.services.extend(names);
        self
    }

    /// Adds the health service and both reflection services to `routes`, reports every service
    /// and the whole server (`""`) `SERVING`, and returns the reporter that changes them.
    ///
    /// Call it before the server accepts, so that no client sees a status that is not set yet.
    pub async fn add_to(
        &self,
        routes: &mut RoutesBuilder,
    ) -> Result<HealthReporter, InvalidDescriptors> {
        let reflection = || {
            let mut builder = Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            for encoded in &self.descriptors {
                builder = builder.register_encoded_file_descriptor_set(encoded);
            }
            for service in &self.services {
                builder = builder.with_service_name(*service);
            }
            builder
        };
        let v1 = reflection().build_v1().map_err(InvalidDescriptors)?;
        let v1alpha = reflection().build_v1alpha().map_err(InvalidDescriptors)?;
        let (health, health_service) = tonic_health::server::health_reporter();
        for service in self.services.iter().copied().chain([""]) {
            health
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        routes
            .add_service(health_service)
            .add_service(v1)
            .add_service(v1alpha);
        Ok(health)
    }
}
