//! Calls a plugin forwards through the router, under its `call:` capabilities: a hook the
//! embedder installs ([`CallPolicy`]), asked once per forwarded call whose caller is a
//! [`Caller::Plugin`]. Any other caller pays one enum match and nothing else.

use std::sync::Arc;

use tonic::Status;

use crate::identity::Caller;

/// Decides whether a plugin may call a method of a service through the router.
///
/// Asked per call, so a grant or revoke takes effect on the next call. Only plugin callers
/// are asked; owners, other local users and TCP callers are not plugins and are not checked
/// here.
pub trait CallPolicy: Send + Sync + 'static {
    /// Whether `plugin` (instance `instance`, process `pid`) may call `method` (the gRPC path,
    /// `/pkg.Svc/Method`) on `service` (`plugin.echo`): `Err` carries the refusal's message,
    /// which should name the missing capability and how to grant it.
    fn check(
        &self,
        plugin: &str,
        instance: &str,
        pid: u32,
        service: &str,
        method: &str,
    ) -> Result<(), String>;
}

/// The check of one forwarded call: `Ok` for every caller but a plugin the policy refuses.
pub(crate) fn check(
    policy: Option<&Arc<dyn CallPolicy>>,
    caller: &Caller,
    service: &str,
    method: &str,
) -> Result<(), Status> {
    let Caller::Plugin {
        plugin,
        instance,
        pid,
        ..
    } = caller
    else {
        return Ok(());
    };
    let Some(policy) = policy else {
        return Ok(());
    };
    policy
        .check(plugin, instance, *pid, service, method)
        .map_err(Status::permission_denied)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OnlyEcho;

    impl CallPolicy for OnlyEcho {
        fn check(
            &self,
            plugin: &str,
            _: &str,
            _: u32,
            service: &str,
            _: &str,
        ) -> Result<(), String> {
            if service == "plugin.echo" {
                Ok(())
            } else {
                Err(format!("plugin {plugin:?} lacks call:{service}"))
            }
        }
    }

    #[test]
    fn only_plugins_are_checked() {
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
        assert!(check(None, &plugin, "plugin.other", "/x.v1.X/Y").is_ok());
    }
}
