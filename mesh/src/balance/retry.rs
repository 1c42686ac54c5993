//! When a failed call may be sent again: which methods are idempotent, and which errors prove
//! that the instance never processed the call.

use std::sync::Arc;

use h2::Reason;

use mesh_proto::mesh::v1::Instance;

use crate::labels;

/// The methods of a service that may be sent twice (`/echo.v1.Echo/Echo`), as every one of
/// its instances declares in its [`labels::IDEMPOTENT`] label.
///
/// A method counts as idempotent only when all instances say so: an instance registered
/// without the label (another version, or by hand) turns retries off rather than on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Idempotent(Arc<[Box<str>]>);

impl Idempotent {
    /// What the instances agree on.
    pub(crate) fn of(instances: &[Instance]) -> Self {
        let mut each = instances.iter().map(|instance| {
            instance
                .labels
                .get(labels::IDEMPOTENT)
                .map(|methods| labels::methods(methods).collect::<Vec<_>>())
                .unwrap_or_default()
        });
        let Some(mut agreed) = each.next() else {
            return Self::default();
        };
        for methods in each {
            agreed.retain(|m| methods.contains(m));
        }
        Self(agreed.into_iter().map(|m| format!("/{m}").into()).collect())
    }

    /// Whether the call to `path` (`/echo.v1.Echo/Echo`) may be sent twice. A linear scan: a
    /// service marks a handful of methods, and most mark none.
    pub(crate) fn contains(&self, path: &str) -> bool {
        !self.0.is_empty() && self.0.iter().any(|m| **m == *path)
    }
}

/// What a failed call tells about whether the instance processed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The instance refused the stream or went away before reading it (`REFUSED_STREAM`, or a
    /// graceful `GOAWAY` below this stream): it never processed the call, any call may be
    /// sent again, and the instance is not at fault.
    Unprocessed,
    /// This side ended the stream (the caller's request body failed, or it cancelled): not the
    /// instance's fault, and not to be sent again.
    Local,
    /// Anything else (connection lost, stream reset by the instance): it may have processed
    /// the call, and counts against its health.
    Failed,
}

impl Failure {
    /// Classifies an error from a call on a connection.
    pub(crate) fn of(error: &h2::Error) -> Self {
        if !error.is_remote() {
            // A reset this side asked for (the request body failed, or the caller gave up);
            // one h2 made itself means the instance broke the protocol.
            return if error.is_reset() && !error.is_library() {
                Self::Local
            } else {
                Self::Failed
            };
        }
        match error.reason() {
            Some(Reason::REFUSED_STREAM) if error.is_reset() => Self::Unprocessed,
            // A graceful GOAWAY fails only the streams above its last stream id; one with an
            // error code fails every stream, processed or not.
            Some(Reason::NO_ERROR) if error.is_go_away() => Self::Unprocessed,
            _ => Self::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn instance(idempotent: Option<&str>) -> Instance {
        Instance {
            service: "plugin.echo".into(),
            id: "echo-0".into(),
            endpoint: "unix:/tmp/e.sock".into(),
            labels: idempotent
                .map(|m| HashMap::from([(labels::IDEMPOTENT.to_owned(), m.to_owned())]))
                .unwrap_or_default(),
        }
    }

    #[test]
    fn a_method_is_idempotent_when_every_instance_says_so() {
        let both = "echo.v1.Echo/Echo,echo.v1.Echo/Expand";
        let policy = Idempotent::of(&[instance(Some(both)), instance(Some("echo.v1.Echo/Echo"))]);
        assert!(policy.contains("/echo.v1.Echo/Echo"));
        assert!(
            !policy.contains("/echo.v1.Echo/Expand"),
            "one instance disagrees"
        );
        assert!(
            !policy.contains("echo.v1.Echo/Echo"),
            "paths start with '/'"
        );

        let policy = Idempotent::of(&[instance(Some(both)), instance(None)]);
        assert!(
            !policy.contains("/echo.v1.Echo/Echo"),
            "an unlabelled instance"
        );
        assert!(!Idempotent::of(&[]).contains("/echo.v1.Echo/Echo"));
    }
}
