//! Calls forwarded through the router, under the embedder's policy: a hook ([`CallPolicy`])
//! asked once per forwarded call, before the route is looked up, with the caller fixed at
//! accept time. The manager answers it with plugins' `call:` capabilities (for plugin
//! callers) and the targets' rate limits (for every caller).

use std::sync::Arc;

use tonic::Status;

use crate::identity::Caller;

/// Why a forwarded call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not allowed (`PERMISSION_DENIED`): the message names the missing capability and how to
    /// grant it.
    Denied(String),
    /// Over a rate limit (`RESOURCE_EXHAUSTED`): the message names the limit and its setting.
    Exhausted(String),
}

impl Refusal {
    /// The gRPC status the caller gets.
    pub fn into_status(self) -> Status {
        match self {
            Self::Denied(why) => Status::permission_denied(why),
            Self::Exhausted(why) => Status::resource_exhausted(why),
        }
    }
}

/// Decides whether a caller may call a method of a service through the router.
///
/// Asked per call, so a grant or revoke takes effect on the next call; it should be cheap for
/// callers it has nothing to say about (the manager's answer for an owner's call to a service
/// without rate limits is one map lookup).
pub trait CallPolicy: Send + Sync + 'static {
    /// Whether `caller` may call `method` (the gRPC path, `/pkg.Svc/Method`) on `service`
    /// (`plugin.echo`).
    fn check(&self, caller: &Caller, service: &str, method: &str) -> Result<(), Refusal>;
}

/// The check of one forwarded call: `Ok` when no policy is installed.
pub(crate) fn check(
    policy: Option<&Arc<dyn CallPolicy>>,
    caller: &Caller,
    service: &str,
    method: &str,
) -> Result<(), Status> {
    match policy {
        Some(policy) => policy
            .check(caller, service, method)
            .map_err(Refusal::into_status),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plugins may call plugin.echo only; nobody may call plugin.busy.
    struct OnlyEcho;

    impl CallPolicy for OnlyEcho {
        fn check(&self, caller: &Caller, service: &str, _: &str) -> Result<(), Refusal> {
            if service == "plugin.busy" {
                return Err(Refusal::Exhausted("over rate_limit".into()));
            }
            match caller {
                Caller::Plugin { plugin, .. } if service != "plugin.echo" => Err(Refusal::Denied(
                    format!("plugin {plugin:?} lacks call:{service}"),
                )),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn the_policy_decides_and_its_refusals_keep_their_codes() {
        let policy: Arc<dyn CallPolicy> = Arc::new(OnlyEcho);
        let plugin = Caller::Plugin {
            plugin: "files".into(),
            instance: "files-0".into(),
            pid: 1,
            uid: 1000,
        };
        let owner = Caller::Owner {
            uid: 1000,
            pid: Some(1),
        };
        assert!(check(Some(&policy), &plugin, "plugin.echo", "/echo.v1.Echo/Echo").is_ok());
        let denied = check(Some(&policy), &plugin, "plugin.other", "/x.v1.X/Y").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("lacks call:plugin.other"));
        assert!(check(Some(&policy), &owner, "plugin.other", "/x.v1.X/Y").is_ok());
        let busy = check(Some(&policy), &owner, "plugin.busy", "/x.v1.X/Y").unwrap_err();
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
        assert!(check(None, &plugin, "plugin.other", "/x.v1.X/Y").is_ok());
    }
}
