//! Which service a call is for: the `mesh-service` header, else the `:authority`.

use std::net::IpAddr;

use http::Request;

use mesh::{InvalidName, ServiceName};

/// Header that names the target service, overriding `:authority`.
pub const SERVICE_HEADER: &str = "mesh-service";

/// Authorities that address the router itself rather than a service behind it.
const ROUTER_NAMES: &[&str] = &["localhost", "mesh"];

/// Where a call goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// The router's own services (registry, manager, health, reflection).
    Local,
    /// Forwarded to an instance of this service (a valid name, borrowed from the request).
    Service(&'a str),
    /// The `mesh-service` header holds no valid name.
    Invalid(InvalidName),
}

/// Routes `request`: its `mesh-service` header if any, else its authority. Calls to the
/// `mesh.v1` API, and authorities that are an IP address, `localhost`, `mesh` or not a service
/// name at all (grpcurl's socket path, a host name with capitals), reach the router itself.
pub(crate) fn route<B>(request: &Request<B>) -> Route<'_> {
    if request.uri().path().starts_with("/mesh.v1.") {
        return Route::Local;
    }
    if let Some(value) = request.headers().get(SERVICE_HEADER) {
        return match ServiceName::check(value.as_bytes()) {
            Ok(name) => Route::Service(name),
            Err(e) => Route::Invalid(e),
        };
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(http::header::HOST)?.to_str().ok());
    let Some(authority) = authority else {
        return Route::Local;
    };
    let host = host_of(authority);
    if host.is_empty() || ROUTER_NAMES.contains(&host) || host.parse::<IpAddr>().is_ok() {
        return Route::Local;
    }
    match ServiceName::check(host.as_bytes()) {
        Ok(name) => Route::Service(name),
        Err(_) => Route::Local,
    }
}

/// `host:port` → `host`; `[::1]:7700` → `::1`.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authority: &str, path: &str) -> Request<()> {
        Request::builder()
            .uri(format!("http://{authority}{path}"))
            .body(())
            .unwrap()
    }

    fn service(name: &str) -> Route<'_> {
        Route::Service(name)
    }

    #[test]
    fn routes_by_authority() {
        let call = "/echo.v1.Echo/Echo";
        assert_eq!(route(&request("plugin.echo", call)), service("plugin.echo"));
        assert_eq!(
            route(&request("plugin.echo:7700", call)),
            service("plugin.echo")
        );
        for local in [
            "localhost",
            "mesh",
            "127.0.0.1:7700",
            "[::1]:7700",
            "10.0.0.1",
            "Host.Example",
        ] {
            assert_eq!(route(&request(local, call)), Route::Local, "{local}");
        }
    }

    #[test]
    fn the_mesh_api_is_always_local() {
        let path = "/mesh.v1.Registry/List";
        assert_eq!(route(&request("plugin.echo", path)), Route::Local);
    }

    #[test]
    fn the_header_overrides_the_authority() {
        let mut req = request("localhost", "/echo.v1.Echo/Echo");
        req.headers_mut()
            .insert(SERVICE_HEADER, "plugin.echo".parse().unwrap());
        assert_eq!(route(&req), service("plugin.echo"));
        req.headers_mut()
            .insert(SERVICE_HEADER, "Bad_Name".parse().unwrap());
        assert!(matches!(route(&req), Route::Invalid(_)));
    }
}
