//! Labels with a meaning to the mesh, which an instance carries in the registry.
//!
//! - [`IDEMPOTENT`]: the methods that may be sent to an instance twice, comma-separated
//!   (`echo.v1.Echo/Echo,echo.v1.Echo/Expand`). The router and `mesh::connect` retry a call to
//!   one of them on another instance when it failed after it may have reached the first one.
//!   The manager sets it from the plugin's `idempotent` list.

/// The label that lists an instance's idempotent methods.
pub const IDEMPOTENT: &str = "mesh.idempotent";

/// A method name that is not `package.Service/Method`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a method; write package.Service/Method, such as \"echo.v1.Echo/Echo\"")]
pub struct InvalidMethod(String);

/// Checks a method name (`echo.v1.Echo/Echo`, a leading `/` allowed) and returns it without
/// the leading `/`.
pub fn method(name: &str) -> Result<&str, InvalidMethod> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    match bare.split_once('/') {
        Some((service, method)) if service.split('.').all(word) && word(method) => Ok(bare),
        _ => Err(InvalidMethod(name.to_owned())),
    }
}

/// The [`IDEMPOTENT`] label's value for `methods`.
pub fn idempotent<'a>(methods: impl IntoIterator<Item = &'a str>) -> String {
    methods
        .into_iter()
        .map(|m| m.strip_prefix('/').unwrap_or(m))
        .collect::<Vec<_>>()
        .join(",")
}

/// The valid method names in an [`IDEMPOTENT`] label's value (others are skipped).
pub fn methods(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter_map(|m| method(m.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_package_service_slash_method() {
        assert_eq!(method("echo.v1.Echo/Echo"), Ok("echo.v1.Echo/Echo"));
        assert_eq!(method("/echo.v1.Echo/Echo"), Ok("echo.v1.Echo/Echo"));
        assert_eq!(method("Svc/Do_it"), Ok("Svc/Do_it"));
        for bad in [
            "Echo",
            "echo.v1.Echo/",
            "/Echo",
            "a..b/C",
            "a/b/c",
            "a b/C",
            "",
        ] {
            let error = method(bad).unwrap_err().to_string();
            assert!(error.contains("package.Service/Method"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_label_round_trips() {
        let value = idempotent(["echo.v1.Echo/Echo", "/echo.v1.Echo/Expand"]);
        assert_eq!(value, "echo.v1.Echo/Echo,echo.v1.Echo/Expand");
        let back: Vec<&str> = methods(&value).collect();
        assert_eq!(back, ["echo.v1.Echo/Echo", "echo.v1.Echo/Expand"]);
        assert_eq!(methods("x, ,a.B/C").collect::<Vec<_>>(), ["a.B/C"]);
    }
}
