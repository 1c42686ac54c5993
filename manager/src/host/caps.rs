//! Capabilities: their syntax, a plugin's policy compiled from them, and the store that holds
//! every plugin's policy, swapped whole when a grant, a revoke or a reload changes it.
//!
//! A call reads its plugin's policy once (one atomic load) and checks it; nothing else decides.
//!
//! A refusal names what was missing and, where it can be pasted safely, the command that
//! grants exactly that: [`grant_hint`], the one place a `mesh grant` command is written, quotes
//! every word for the shell and offers nothing for a resource it cannot show plainly.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use mesh::{ServiceName, labels};

use super::audit::excerpt;

/// One capability, as written in `capabilities = [...]` and `mesh grant`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// `read:GLOB`: ReadDir, ReadFile, Stat on matching paths under the root.
    Read(String),
    /// `write:GLOB`: WriteFile, DeleteFile on matching paths under the root.
    Write(String),
    /// `env:NAME`: GetEnv of NAME.
    Env(String),
    /// `call:SERVICE` or `call:SERVICE/pkg.Svc/Method`: calls forwarded by the router (the
    /// direct path, dialing a plugin's socket, is not yet checked).
    Call {
        /// The service (`plugin.echo`).
        service: String,
        /// One method (`echo.v1.Echo/Echo`), or every one.
        method: Option<String>,
    },
}

/// The syntax, for error messages.
pub const SYNTAX: &str = "write read:GLOB, write:GLOB (relative to the plugin's root, ** allowed), \
    env:NAME, call:SERVICE or call:SERVICE/package.Service/Method";

impl FromStr for Capability {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: String| format!("capability {text:?}: {why}");
        let Some((kind, value)) = text.split_once(':') else {
            return Err(bad(format!("no kind; {SYNTAX}")));
        };
        match kind {
            "read" | "write" => {
                let glob = pattern(value).map_err(bad)?;
                Ok(if kind == "read" {
                    Self::Read(glob)
                } else {
                    Self::Write(glob)
                })
            }
            "env" => {
                let valid = value
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid {
                    return Err(bad(
                        "a variable name is letters, digits and _, not starting with a digit"
                            .into(),
                    ));
                }
                Ok(Self::Env(value.to_owned()))
            }
            "call" => {
                let (service, method) = match value.split_once('/') {
                    Some((service, method)) => (service, Some(method)),
                    None => (value, None),
                };
                ServiceName::new(service).map_err(|e| bad(format!("service: {e}")))?;
                if let Some(method) = method {
                    labels::method(method).map_err(|e| bad(format!("method: {e}")))?;
                }
                Ok(Self::Call {
                    service: service.to_owned(),
                    method: method.map(str::to_owned),
                })
            }
            other => Err(bad(format!("unknown kind {other:?}; {SYNTAX}"))),
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(glob) => write!(f, "read:{glob}"),
            Self::Write(glob) => write!(f, "write:{glob}"),
            Self::Env(name) => write!(f, "env:{name}"),
            Self::Call {
                service,
                method: None,
            } => write!(f, "call:{service}"),
            Self::Call {
                service,
                method: Some(method),
            } => write!(f, "call:{service}/{method}"),
        }
    }
}

/// A read:/write: glob: relative, without `..`, valid for globset.
fn pattern(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("an empty glob; write one such as reports/*.txt or **".into());
    }
    if value.starts_with('/') {
        return Err("globs are relative to the plugin's root; drop the leading /".into());
    }
    if value.split('/').any(|part| part == "..") {
        return Err("a glob cannot climb out of the root with ..".into());
    }
    if value.contains('\0') {
        return Err("a glob cannot hold a NUL byte".into());
    }
    glob(value).map_err(|e| e.kind().to_string())?;
    Ok(value.to_owned())
}

/// `*` and `?` stay within one path segment; `**` crosses them.
fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}

/// What a host call asks to do, for the check and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// ReadDir.
    ReadDir,
    /// ReadFile, ReadFileStream.
    ReadFile,
    /// Stat.
    Stat,
    /// WriteFile.
    WriteFile,
    /// DeleteFile.
    DeleteFile,
    /// GetEnv.
    GetEnv,
}

impl Action {
    /// Its name in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadDir => "read_dir",
            Self::ReadFile => "read_file",
            Self::Stat => "stat",
            Self::WriteFile => "write_file",
            Self::DeleteFile => "delete_file",
            Self::GetEnv => "get_env",
        }
    }

    /// The kind of capability it needs.
    fn kind(self) -> &'static str {
        match self {
            Self::ReadDir | Self::ReadFile | Self::Stat => "read",
            Self::WriteFile | Self::DeleteFile => "write",
            Self::GetEnv => "env",
        }
    }
}

/// One plugin's capabilities: where they came from, and compiled for checks.
#[derive(Debug)]
pub struct Policy {
    /// The plugin's name.
    pub plugin: String,
    /// Its root directory.
    pub root: PathBuf,
    /// From the config file.
    pub config: BTreeSet<Capability>,
    /// Granted at run time (and not in the config).
    pub granted: BTreeSet<Capability>,
    /// From the config, revoked at run time.
    pub revoked: BTreeSet<Capability>,
    read: Globs,
    write: Globs,
    env: BTreeSet<String>,
    /// `call:` capabilities in force, by service: looked up by the call's `&str`s, so a check
    /// allocates nothing but the reason it returns.
    calls: BTreeMap<String, CallsTo>,
}

/// The `call:` capabilities for one service.
#[derive(Debug, Default)]
struct CallsTo {
    /// `call:SERVICE`: every method.
    every: bool,
    /// `call:SERVICE/pkg.Svc/Method`: these (`pkg.Svc/Method`).
    methods: BTreeSet<String>,
}

/// Compiled globs and the capabilities they came from, to name the one that allowed a call.
#[derive(Debug)]
struct Globs {
    set: GlobSet,
    caps: Vec<String>,
}

impl Globs {
    fn new(kind: &str, globs: Vec<&str>) -> Self {
        let mut set = GlobSetBuilder::new();
        let mut caps = Vec::new();
        for g in globs {
            // Validated when parsed: a glob that fails now is left out, never allowed.
            if let Ok(compiled) = glob(g) {
                set.add(compiled);
                caps.push(format!("{kind}:{g}"));
            }
        }
        Self {
            set: set.build().unwrap_or_else(|_| GlobSet::empty()),
            caps,
        }
    }

    /// The first capability whose glob matches `path`.
    fn matching(&self, path: &str) -> Option<&str> {
        let first = *self.set.matches(path).first()?;
        self.caps.get(first).map(String::as_str)
    }
}

impl Policy {
    /// Compiles the capabilities in force: the config's not revoked, and the granted.
    pub fn new(
        plugin: String,
        root: PathBuf,
        config: BTreeSet<Capability>,
        granted: BTreeSet<Capability>,
        revoked: BTreeSet<Capability>,
    ) -> Self {
        let (mut read, mut write) = (Vec::new(), Vec::new());
        let mut env = BTreeSet::new();
        let mut calls = BTreeMap::<String, CallsTo>::new();
        for cap in config.difference(&revoked).chain(granted.iter()) {
            match cap {
                Capability::Read(g) => read.push(g.as_str()),
                Capability::Write(g) => write.push(g.as_str()),
                Capability::Env(name) => {
                    env.insert(name.clone());
                }
                Capability::Call { service, method } => {
                    let to = calls.entry(service.clone()).or_default();
                    match method {
                        Some(method) => {
                            to.methods.insert(method.clone());
                        }
                        None => to.every = true,
                    }
                }
            }
        }
        let (read, write) = (Globs::new("read", read), Globs::new("write", write));
        Self {
            plugin,
            root,
            config,
            granted,
            revoked,
            read,
            write,
            env,
            calls,
        }
    }

    /// The capabilities in force, each with its source.
    pub fn effective(&self) -> Vec<(&Capability, &'static str)> {
        self.config
            .difference(&self.revoked)
            .map(|c| (c, "config"))
            .chain(self.granted.iter().map(|c| (c, "granted")))
            .collect()
    }

    /// Whether `action` on `resource` (a normalized relative path, or a variable name) is
    /// allowed: the capability that allows it, or a refusal that names what is missing and
    /// how to grant it.
    pub fn check(&self, action: Action, resource: &str) -> Result<String, String> {
        let kind = action.kind();
        let plugin = &self.plugin;
        // No file has such a path (the kernel refuses it), and matching globs against
        // megabytes costs the manager for nothing: refused before any glob runs.
        if kind != "env" && resource.len() > MAX_PATH {
            return Err(format!(
                "plugin {plugin:?} lacks {kind}:{}; no grant command is offered: a path has \
                 at most {MAX_PATH} bytes",
                shown(resource)
            ));
        }
        let allowed = match kind {
            "read" => self.read.matching(resource).map(str::to_owned),
            "write" => self.write.matching(resource).map(str::to_owned),
            _ => self
                .env
                .contains(resource)
                .then(|| format!("env:{resource}")),
        };
        if let Some(cap) = allowed {
            return Ok(format!("allowed by {cap}"));
        }
        // The capability that allows exactly this resource: a path as a glob matching only
        // itself, a name as it is.
        let needed = match action.kind() {
            "env" => format!("env:{resource}"),
            kind => format!("{kind}:{}", literal_glob(resource)),
        };
        Err(format!(
            "plugin {plugin:?} lacks {kind}:{}; {}",
            shown(resource),
            grant_hint(plugin, &needed)
        ))
    }
}

impl Policy {
    /// Whether a call of `method` (the gRPC path, `/pkg.Svc/Method`) on `service` is allowed:
    /// the capability that allows it, or a refusal that names both capabilities that would
    /// and how to grant one.
    pub fn check_call(&self, service: &str, method: &str) -> Result<String, String> {
        let method = method.strip_prefix('/').unwrap_or(method);
        if let Some(to) = self.calls.get(service) {
            if to.every {
                return Ok(format!("allowed by call:{service}"));
            }
            if to.methods.contains(method) {
                return Ok(format!("allowed by call:{service}/{method}"));
            }
        }
        let plugin = &self.plugin;
        let service_shown = shown(service);
        Err(format!(
            "plugin {plugin:?} lacks call:{service_shown} (or call:{service_shown}/{}); {}",
            shown(method),
            grant_hint(plugin, &format!("call:{service}"))
        ))
    }
}

/// The longest path the kernel resolves (`PATH_MAX`, terminating NUL included).
const MAX_PATH: usize = 4096;

/// The longest `mesh grant` command a refusal offers: a resource that needs a longer one is
/// not something to grant by pasting (and the refusal stays well within an audit line).
const HINT_BYTES: usize = 512;
/// What a resource (or a method) may take of a refusal's text.
const SHOWN_BYTES: usize = 256;

/// How to grant `cap` to `plugin`, for a refusal: `grant it with mesh grant files
/// 'read:a.txt'`, each word quoted for a POSIX shell ([`shell_word`]) so that pasting it runs
/// `mesh grant` with exactly these two arguments, and `cap` one that `mesh grant` accepts;
/// else why no command is offered. Every refusal's hint is written here.
pub fn grant_hint(plugin: &str, cap: &str) -> String {
    let none = |why: &str| format!("no grant command is offered: {why}");
    // Cheap checks first: the resource may be megabytes long.
    if cap.len() > HINT_BYTES {
        return none(&format!(
            "it would be over {HINT_BYTES} bytes long; grant a shorter glob that matches it"
        ));
    }
    let (Some(quoted_plugin), Some(quoted_cap)) = (shell_word(plugin), shell_word(cap)) else {
        return none("it holds control or invisible characters, which a pasted command must not");
    };
    let command = format!("mesh grant {quoted_plugin} {quoted_cap}");
    if command.len() > HINT_BYTES {
        return none(&format!(
            "it would be {} bytes long; grant a shorter glob that matches it",
            command.len()
        ));
    }
    if cap.parse::<Capability>().is_err() {
        return none("no capability can name it");
    }
    format!("grant it with {command}")
}

/// `word` as one POSIX shell word: as it is when made only of characters no shell treats
/// specially (letters, digits, `_ . / -`), else in single quotes, within which nothing is
/// special, each `'` written `'\''` (close, an escaped quote, reopen). `None` when it holds a
/// control character (a pasted newline runs what follows it) or an invisible formatting one
/// (a bidirectional override shows text other than what runs).
pub fn shell_word(word: &str) -> Option<String> {
    if word.chars().any(hidden) {
        return None;
    }
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'));
    if plain {
        return Some(word.to_owned());
    }
    Some(format!("'{}'", word.replace('\'', "'\\''")))
}

/// A control character, or one that changes how text around it is shown without being seen
/// (zero-width and bidirectional formatting characters).
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// A glob that matches `path` and nothing else: globset's special characters escaped with a
/// backslash.
fn literal_glob(path: &str) -> Cow<'_, str> {
    const SPECIAL: &[char] = &['\\', '*', '?', '[', ']', '{', '}'];
    if !path.contains(SPECIAL) {
        return Cow::Borrowed(path);
    }
    let mut glob = String::with_capacity(path.len() + 8);
    for c in path.chars() {
        if SPECIAL.contains(&c) {
            glob.push('\\');
        }
        glob.push(c);
    }
    Cow::Owned(glob)
}

/// A resource as a refusal shows it: as it is when short and without hidden characters, else
/// quoted with them escaped (`"a\nb"`), cut to [`SHOWN_BYTES`] and marked with its length.
fn shown(resource: &str) -> Cow<'_, str> {
    if resource.len() <= SHOWN_BYTES && !resource.chars().any(hidden) {
        return Cow::Borrowed(resource);
    }
    Cow::Owned(format!("{:?}", excerpt(resource, SHOWN_BYTES)))
}

/// What a reload does to run-time changes, as `mesh caps` and the docs say it.
pub const RELOAD: &str = "a reload re-reads the config's capabilities and root and keeps \
    run-time grants and revokes; they last until mesh up stops";

/// Every plugin's policy: read lock-free per call, replaced whole on a change.
#[derive(Default)]
pub struct Policies {
    current: ArcSwap<BTreeMap<String, Arc<Policy>>>,
    /// Serialises changes (grant, revoke, reload), so none is lost.
    changing: Mutex<()>,
}

/// Why a grant or revoke was refused.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// No such plugin in the config.
    #[error("no plugin named {0:?}; `mesh status` lists the plugins")]
    Unknown(String),
    /// The capability does not parse.
    #[error("{0}")]
    Invalid(String),
    /// Revoking what the plugin does not have.
    #[error("plugin {plugin:?} does not have {cap}; `mesh caps {plugin}` lists what it has")]
    NotHeld {
        /// The plugin.
        plugin: String,
        /// The capability.
        cap: Capability,
    },
}

impl Policies {
    /// The policy of `plugin` now.
    pub fn get(&self, plugin: &str) -> Option<Arc<Policy>> {
        self.current.load().get(plugin).cloned()
    }

    /// Sets the config's capabilities and roots (at start and on reload), keeping run-time
    /// grants and revokes of plugins still configured.
    pub fn configure<'a>(
        &self,
        plugins: impl IntoIterator<Item = (&'a str, PathBuf, &'a [Capability])>,
    ) {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load();
        let mut next = BTreeMap::new();
        for (name, root, caps) in plugins {
            let config: BTreeSet<Capability> = caps.iter().cloned().collect();
            let (granted, revoked) = match old.get(name) {
                Some(p) => (
                    p.granted.difference(&config).cloned().collect(),
                    p.revoked.intersection(&config).cloned().collect(),
                ),
                None => Default::default(),
            };
            let policy = Policy::new(name.to_owned(), root, config, granted, revoked);
            next.insert(name.to_owned(), Arc::new(policy));
        }
        self.current.store(Arc::new(next));
    }

    /// Grants `cap` to `plugin`: in force from its next call.
    pub fn grant(&self, plugin: &str, cap: &str) -> Result<Arc<Policy>, CapsError> {
        self.change(plugin, cap, |config, granted, revoked, cap| {
            if !revoked.remove(&cap) && !config.contains(&cap) {
                granted.insert(cap);
            }
            Ok(())
        })
    }

    /// Revokes `cap` from `plugin`: refused from its next call.
    pub fn revoke(&self, plugin: &str, cap: &str) -> Result<Arc<Policy>, CapsError> {
        self.change(plugin, cap, |config, granted, revoked, cap| {
            if granted.remove(&cap) {
                return Ok(());
            }
            if config.contains(&cap) && !revoked.contains(&cap) {
                revoked.insert(cap);
                return Ok(());
            }
            Err(cap)
        })
    }

    fn change(
        &self,
        plugin: &str,
        cap: &str,
        apply: impl FnOnce(
            &BTreeSet<Capability>,
            &mut BTreeSet<Capability>,
            &mut BTreeSet<Capability>,
            Capability,
        ) -> Result<(), Capability>,
    ) -> Result<Arc<Policy>, CapsError> {
        let cap: Capability = cap.parse().map_err(CapsError::Invalid)?;
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load();
        let Some(policy) = old.get(plugin) else {
            return Err(CapsError::Unknown(plugin.to_owned()));
        };
        let (mut granted, mut revoked) = (policy.granted.clone(), policy.revoked.clone());
        apply(&policy.config, &mut granted, &mut revoked, cap).map_err(|cap| {
            CapsError::NotHeld {
                plugin: plugin.to_owned(),
                cap,
            }
        })?;
        let next = Arc::new(Policy::new(
            plugin.to_owned(),
            policy.root.clone(),
            policy.config.clone(),
            granted,
            revoked,
        ));
        let mut map = BTreeMap::clone(&old);
        map.insert(plugin.to_owned(), next.clone());
        self.current.store(Arc::new(map));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[&str]) -> Vec<Capability> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn capabilities_parse_and_print_back() {
        for text in [
            "read:reports/*.txt",
            "write:**",
            "env:HOME",
            "call:plugin.echo",
            "call:plugin.echo/echo.v1.Echo/Echo",
        ] {
            let cap: Capability = text.parse().unwrap();
            assert_eq!(cap.to_string(), text);
        }
        for (text, needle) in [
            ("read", "no kind"),
            ("read:", "empty"),
            ("read:/etc/*", "relative"),
            ("write:a/../../b", ".."),
            ("read:a[", "capability"),
            ("env:1X", "variable"),
            ("env:", "variable"),
            ("call:Plugin.Echo", "service"),
            ("call:plugin.echo/nomethod", "method"),
            ("exec:ls", "unknown kind"),
        ] {
            let error = text.parse::<Capability>().unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn globs_match_within_segments_and_across_with_double_star() {
        let policy = Policy::new(
            "lister".into(),
            "/r".into(),
            caps(&["read:reports/*.txt", "write:out/**", "env:HOME"])
                .into_iter()
                .collect(),
            BTreeSet::new(),
            BTreeSet::new(),
        );
        assert_eq!(
            policy.check(Action::ReadFile, "reports/a.txt").unwrap(),
            "allowed by read:reports/*.txt"
        );
        assert!(policy.check(Action::ReadFile, "reports/x/a.txt").is_err());
        assert!(policy.check(Action::WriteFile, "out/x/y.txt").is_ok());
        assert!(policy.check(Action::WriteFile, "reports/a.txt").is_err());
        assert!(policy.check(Action::GetEnv, "HOME").is_ok());
        let denied = policy.check(Action::GetEnv, "PATH").unwrap_err();
        assert!(
            denied.contains("lacks env:PATH") && denied.contains("mesh grant lister 'env:PATH'"),
            "{denied}"
        );
    }

    #[test]
    fn grants_and_revokes_change_the_next_check_and_survive_a_reload() {
        let policies = Policies::default();
        let config = caps(&["read:a.txt"]);
        policies.configure([("p", PathBuf::from("/r"), &config[..])]);
        let p = || policies.get("p").unwrap();
        assert!(p().check(Action::ReadFile, "b.txt").is_err());
        policies.grant("p", "read:b.txt").unwrap();
        assert!(p().check(Action::ReadFile, "b.txt").is_ok());
        policies.revoke("p", "read:a.txt").unwrap();
        assert!(p().check(Action::ReadFile, "a.txt").is_err());
        assert!(matches!(
            policies.revoke("p", "read:zzz"),
            Err(CapsError::NotHeld { .. })
        ));
        assert!(matches!(
            policies.grant("q", "read:a"),
            Err(CapsError::Unknown(_))
        ));
        // A reload keeps both run-time changes.
        policies.configure([("p", PathBuf::from("/r"), &config[..])]);
        assert!(p().check(Action::ReadFile, "b.txt").is_ok());
        assert!(p().check(Action::ReadFile, "a.txt").is_err());
        // Granting back a revoked config capability undoes the revoke.
        policies.grant("p", "read:a.txt").unwrap();
        assert!(p().revoked.is_empty() && p().check(Action::ReadFile, "a.txt").is_ok());
    }

    #[test]
    fn calls_are_allowed_by_service_or_by_method_only() {
        let policies = Policies::default();
        let config = caps(&["call:plugin.a"]);
        policies.configure([("p", PathBuf::from("/r"), &config[..])]);
        let p = || policies.get("p").unwrap();
        assert_eq!(
            p().check_call("plugin.a", "/a.v1.A/Any").unwrap(),
            "allowed by call:plugin.a"
        );
        let denied = p()
            .check_call("plugin.echo", "/echo.v1.Echo/Echo")
            .unwrap_err();
        assert_eq!(
            denied,
            "plugin \"p\" lacks call:plugin.echo (or call:plugin.echo/echo.v1.Echo/Echo); \
             grant it with mesh grant p 'call:plugin.echo'"
        );
        policies
            .grant("p", "call:plugin.echo/echo.v1.Echo/Echo")
            .unwrap();
        assert!(p().check_call("plugin.echo", "/echo.v1.Echo/Echo").is_ok());
        assert!(
            p().check_call("plugin.echo", "/echo.v1.Echo/Expand")
                .is_err()
        );
        // A method of the same name on another service, or a path without its slash.
        assert!(
            p().check_call("plugin.echo2", "/echo.v1.Echo/Echo")
                .is_err()
        );
        assert!(p().check_call("plugin.echo", "echo.v1.Echo/Echo").is_ok());
        assert!(p().check_call("plugin.echo", "").is_err());
        policies.revoke("p", "call:plugin.a").unwrap();
        assert!(p().check_call("plugin.a", "/a.v1.A/Any").is_err());
    }

    /// What a shell makes of `hint`'s command, run in `dir` with `mesh` standing for a
    /// function that prints its arguments: the arguments `mesh` would get.
    fn run_hint(hint: &str, dir: &std::path::Path) -> Vec<String> {
        let command = hint
            .split_once("grant it with ")
            .unwrap_or_else(|| panic!("no command offered: {hint}"))
            .1;
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("mesh() {{ printf '%s\\0' \"$@\"; }}\n{command}"))
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{command}: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(str::to_owned)
            .collect()
    }

    fn lister() -> Policy {
        Policy::new(
            "lister".into(),
            "/r".into(),
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
        )
    }

    #[test]
    fn hints_quote_what_they_echo_and_grant_exactly_that_resource() {
        let dir = tempfile::tempdir().unwrap();
        for path in [
            "x'$(touch PWNED)'",
            "a`touch PWNED`b",
            "$(touch PWNED)",
            "';touch PWNED;'",
            "a b\\c",
            "a*b",
            "we[i]rd{x,y}?.txt",
            "dir/'quoted'/é.txt",
            &"'".repeat(100),
        ] {
            let denied = lister().check(Action::ReadFile, path).unwrap_err();
            let args = run_hint(&denied, dir.path());
            assert!(
                std::fs::read_dir(dir.path()).unwrap().next().is_none(),
                "{path}: running the hint made a file"
            );
            assert_eq!(args[..2], ["grant", "lister"], "{path}: {args:?}");
            assert_eq!(args.len(), 3, "{path}: {args:?}");
            // What it grants allows this path and nothing else.
            let cap: Capability = args[2].parse().unwrap();
            let granted = Policy::new(
                "lister".into(),
                "/r".into(),
                BTreeSet::new(),
                [cap].into(),
                BTreeSet::new(),
            );
            assert!(granted.check(Action::ReadFile, path).is_ok(), "{path}");
            for other in [format!("{path}x"), "ab".into(), "weird".into(), "a".into()] {
                assert!(
                    granted.check(Action::ReadFile, &other).is_err(),
                    "{path}: {other}"
                );
            }
        }
        // The same function writes the call: hint.
        let denied = lister()
            .check_call("plugin.echo", "/echo.v1.Echo/Echo")
            .unwrap_err();
        assert_eq!(
            run_hint(&denied, dir.path()),
            ["grant", "lister", "call:plugin.echo"]
        );
    }

    #[test]
    fn no_command_is_offered_for_what_cannot_be_pasted_safely() {
        for path in [
            "a\nmesh stop echo",
            "a\rb",
            "a\u{1b}[2Jb",
            "evil\u{202e}txt.exe",
            "zero\u{200b}width",
            &"a".repeat(600),
        ] {
            let denied = lister().check(Action::ReadFile, path).unwrap_err();
            assert!(denied.contains("no grant command is offered"), "{denied}");
            assert!(!denied.contains("mesh grant"), "{denied}");
            assert!(!denied.chars().any(hidden), "{denied:?}");
        }
        // Not a variable name: no env: capability can grant it.
        let denied = lister().check(Action::GetEnv, "A-B").unwrap_err();
        assert!(denied.contains("no capability can name it"), "{denied}");
        assert_eq!(
            shell_word("plain-name_1.x/y"),
            Some("plain-name_1.x/y".into())
        );
        assert_eq!(shell_word(""), Some("''".into()));
        assert_eq!(shell_word("it's"), Some("'it'\\''s'".into()));
        assert_eq!(shell_word("a\nb"), None);
    }

    #[test]
    fn a_refusal_stays_within_its_share_of_an_audit_line() {
        use super::super::audit::REASON_BYTES;
        let json = |s: &str| serde_json::to_string(s).unwrap().len();
        let huge = "a".repeat(4_000_000);
        let denied = lister().check(Action::Stat, &huge).unwrap_err();
        assert!(denied.contains("[cut: 4000000 bytes]"), "{denied}");
        assert!(denied.contains("at most 4096 bytes"), "{denied}");
        assert!(json(&denied) <= REASON_BYTES, "{}", json(&denied));
        // Refused before any glob runs, whatever the policy: no path is that long.
        let everything = Policy::new(
            "all".into(),
            "/r".into(),
            [Capability::Read("**".into())].into(),
            BTreeSet::new(),
            BTreeSet::new(),
        );
        assert!(everything.check(Action::Stat, &huge).is_err());
        assert!(everything.check(Action::Stat, &"a".repeat(4096)).is_ok());
        // The longest refusal that still offers a command fits whole: never cut mid-command.
        for path in ["'".repeat(120), "\\".repeat(240), "é".repeat(120)] {
            let denied = lister().check(Action::ReadFile, &path).unwrap_err();
            assert!(json(&denied) <= REASON_BYTES, "{}", json(&denied));
        }
        let method = format!("/{}", "\u{1}".repeat(100_000));
        let denied = lister().check_call("plugin.echo", &method).unwrap_err();
        assert!(json(&denied) <= REASON_BYTES, "{}", json(&denied));
        assert!(denied.ends_with("grant it with mesh grant lister 'call:plugin.echo'"));
    }
}
