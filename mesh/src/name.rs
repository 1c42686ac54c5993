//! Logical service names: `segment(.segment)*`, segments of `[a-z0-9-]`, at most 253 bytes.

use std::{fmt, str::FromStr, sync::Arc};

/// Longest service name accepted, in bytes (a DNS name's limit).
pub(crate) const MAX_LEN: usize = 253;

/// A validated logical service name such as `plugin.echo`.
///
/// Cheap to clone: the text is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(Arc<str>);

/// Why a service name was rejected; its message names the name, the rule it breaks and an example.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid service name {name:?}: {reason} (a name is dot-separated segments of a-z, 0-9 and '-', such as plugin.echo)"
)]
pub struct InvalidName {
    name: String,
    reason: String,
}

impl ServiceName {
    /// Validates `name`.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidName> {
        let name = name.as_ref();
        validate(name).map_err(|reason| InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        Ok(Self(name.into()))
    }

    /// The registry name of the managed plugin `name` (`echo` becomes `plugin.echo`).
    pub fn plugin(name: &str) -> Result<Self, InvalidName> {
        if name.contains('.') {
            return Err(InvalidName {
                name: name.to_owned(),
                reason: "a plugin name is one segment, without '.'".into(),
            });
        }
        Self::new(format!("plugin.{name}"))
    }

    /// Checks `name` without allocating when it is valid (the router does this per call), and
    /// returns it as text.
    pub fn check(name: &[u8]) -> Result<&str, InvalidName> {
        let invalid = |reason: String| InvalidName {
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        };
        let text = std::str::from_utf8(name).map_err(|_| invalid("it is not UTF-8".into()))?;
        validate(text).map_err(invalid)?;
        Ok(text)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > MAX_LEN {
        return Err(format!(
            "it is {} bytes long, over the {MAX_LEN}-byte limit",
            name.len()
        ));
    }
    for segment in name.split('.') {
        if segment.is_empty() {
            return Err("it has an empty segment (a leading, trailing or doubled '.')".into());
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
        {
            return Err(format!("{c:?} is not allowed"));
        }
    }
    Ok(())
}

impl FromStr for ServiceName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dotted_lowercase_names() {
        for ok in ["plugin.echo", "a", "plugin.my-plugin.v2", "x1.y-2"] {
            assert_eq!(ServiceName::new(ok).unwrap().as_str(), ok);
        }
        assert_eq!(ServiceName::plugin("echo").unwrap().as_str(), "plugin.echo");
    }

    #[test]
    fn rejects_with_the_reason() {
        let cases = [
            ("", "empty"),
            ("Plugin.echo", "'P' is not allowed"),
            ("plugin..echo", "empty segment"),
            ("plugin.echo.", "empty segment"),
            ("plugin/echo", "'/' is not allowed"),
            ("plugin_echo", "'_' is not allowed"),
        ];
        for (name, reason) in cases {
            let err = ServiceName::new(name).unwrap_err().to_string();
            assert!(err.contains(reason), "{name:?}: {err}");
            assert!(
                err.contains("plugin.echo"),
                "the message shows an example: {err}"
            );
        }
        let long = "a".repeat(MAX_LEN + 1);
        assert!(
            ServiceName::new(&long)
                .unwrap_err()
                .to_string()
                .contains("254 bytes")
        );
        assert!(ServiceName::new("a".repeat(MAX_LEN)).is_ok());
        assert!(
            ServiceName::plugin("a.b")
                .unwrap_err()
                .to_string()
                .contains("one segment")
        );
    }
}
