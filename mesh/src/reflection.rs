//! Server reflection, v1 and v1alpha (grpcurl 1.8 speaks only v1alpha, newer tools v1), for the
//! router and for plugins. Only the services actually served are advertised, with health's.

use tonic_reflection::server::{
    Builder, Error,
    v1::{ServerReflection as V1, ServerReflectionServer as V1Server},
    v1alpha::{ServerReflection as V1Alpha, ServerReflectionServer as V1AlphaServer},
};

/// Both reflection services for `services`, described by the encoded `descriptors`.
pub fn services(
    descriptors: &[&'static [u8]],
    services: &[&'static str],
) -> Result<(V1Server<impl V1>, V1AlphaServer<impl V1Alpha>), Error> {
    let builder = || {
        let mut builder = Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for encoded in descriptors {
            builder = builder.register_encoded_file_descriptor_set(encoded);
        }
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
