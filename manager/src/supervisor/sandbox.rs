//! The opt-in kernel sandbox of a plugin (`sandbox = true`): what its own process may open.
//!
//! Two layers, both set up by the instance's host side (`mesh __init`, see [`super::init`]):
//!
//! - **a mount namespace** in which the runtime directory is an empty tmpfs with only this
//!   instance's socket directory and the router socket bound back into it: other plugins'
//!   sockets are not there to `connect()` to. Landlock up to ABI 8 does not cover `connect()`
//!   on a pathname Unix socket (measured here), so this is what keeps a plugin off the others'
//!   sockets;
//! - **Landlock**, applied by the plugin's process just before it execs the plugin: every file
//!   system right is handled, and only [`Spec`]'s paths are allowed (its binary, the system's
//!   libraries, its socket directory, a few devices, what its `read:`/`write:` capabilities
//!   name); TCP bind and connect are handled too (only its own port, for `transport = "tcp"`);
//!   abstract Unix sockets and signals are scoped to the sandbox.
//!
//! [`probe`] asks the kernel once, at `mesh up`, how much of this it can do.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, RestrictionStatus,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use nix::sched::{CloneFlags, unshare};
use serde::{Deserialize, Serialize};

use crate::{
    config::{PluginConfig, SandboxMode},
    host::Capability,
};

/// The Landlock ABI whose rights the sandbox handles: 6 (Linux 6.12) has every file right,
/// TCP bind/connect and the abstract-socket and signal scopes.
const ABI_HANDLED: ABI = ABI::V6;

/// What the system's programs need to start: the dynamic loader and libraries, and the files
/// the loader and libc read. Read and execute; those missing here are skipped.
const SYSTEM_PATHS: [&str; 10] = [
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
];

/// Devices every program may expect: read and write.
const DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// What one instance's sandbox allows: handed from `mesh up` to `mesh __init --sandbox JSON`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Spec {
    /// `sandbox = true`: a sandbox that cannot be set up fully stops the instance.
    pub(crate) strict: bool,
    /// Read and execute beneath these.
    pub(crate) read_exec: Vec<PathBuf>,
    /// Read beneath these (`read:` capabilities).
    pub(crate) read: Vec<PathBuf>,
    /// Create, write and remove beneath these (`write:` capabilities).
    pub(crate) write: Vec<PathBuf>,
    /// Its own socket directory: bind its socket, remove a stale one.
    pub(crate) socket_dir: PathBuf,
    /// `transport = "tcp"`: the loopback port it may bind.
    pub(crate) tcp_port: Option<u16>,
    /// The directory hidden behind an empty tmpfs (the runtime directory) ...
    pub(crate) hide: Option<PathBuf>,
    /// ... except these, bound back into it (its socket directory, the router socket).
    pub(crate) keep: Vec<PathBuf>,
}

/// The sandbox of an instance of `plugin` serving on `tcp_port` (if TCP), whose router
/// socket is `mesh_socket`.
pub(crate) fn spec(plugin: &PluginConfig, mesh_socket: &Path, tcp_port: Option<u16>) -> Spec {
    let mut read_exec: Vec<PathBuf> = SYSTEM_PATHS.iter().map(PathBuf::from).collect();
    // The command as named and, through its symlinks, the program it is (a virtual
    // environment's bin/python is a link to an interpreter installed elsewhere).
    let real = std::fs::canonicalize(&plugin.command).ok();
    for program in std::iter::once(&plugin.command).chain(real.as_ref()) {
        read_exec.push(program.clone());
        // A program installed as PREFIX/bin/NAME (a virtual environment, /opt/tool, an
        // interpreter) reads its libraries beneath PREFIX.
        if let Some(bin) = program.parent()
            && bin.file_name().is_some_and(|n| n == "bin")
            && let Some(prefix) = bin.parent()
            && prefix != Path::new("/")
        {
            read_exec.push(prefix.to_owned());
        }
    }
    read_exec.extend(plugin.sandbox.paths.iter().cloned());
    let (mut read, mut write) = (Vec::new(), Vec::new());
    for capability in &plugin.capabilities {
        match capability {
            Capability::Read(glob) => read.push(plugin.root.join(literal_prefix(glob))),
            Capability::Write(glob) => write.push(plugin.root.join(literal_prefix(glob))),
            Capability::Env(_) | Capability::Call { .. } => {}
        }
    }
    let hide = plugin.socket_dir.parent().map(Path::to_owned);
    let mut keep = vec![plugin.socket_dir.clone(), mesh_socket.to_owned()];
    // What the rules allow must not be hidden with the rest (a root under the runtime dir).
    keep.extend(read.iter().chain(&write).cloned());
    keep.extend(plugin.sandbox.paths.iter().cloned());
    Spec {
        strict: plugin.sandbox.mode == SandboxMode::Strict,
        read_exec,
        read,
        write,
        socket_dir: plugin.socket_dir.clone(),
        tcp_port,
        hide,
        keep,
    }
}

/// The directory a glob can match beneath: its segments up to the first with a wildcard
/// (`docs/**` → `docs`, `reports/*.txt` → `reports`, `**` → the root itself, `notes.txt` →
/// `notes.txt`). Landlock rules are paths, not patterns: the sandbox allows all of it, the
/// host services only what the glob matches.
pub(crate) fn literal_prefix(glob: &str) -> PathBuf {
    glob.split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .take_while(|s| !s.contains(['*', '?', '[', '{', '\\']))
        .collect()
}

/// How much of the sandbox the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// Every right and scope the sandbox handles.
    Full,
    /// Some (an older Landlock ABI).
    Partial,
    /// None: no Landlock here.
    None,
}

/// What the kernel offers the sandbox here, as [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Support {
    /// Landlock's enforcement of the sandbox's rules.
    pub landlock: Enforcement,
    /// Landlock's own words (`Landlock ABI 7`, `Landlock not enabled`).
    pub detail: String,
    /// Whether other plugins' sockets can be hidden (a mount namespace); the error if not.
    pub mounts: Result<(), String>,
}

impl Support {
    /// No sandbox at all, for `why`.
    pub fn none(why: String) -> Self {
        Self {
            landlock: Enforcement::None,
            detail: why.clone(),
            mounts: Err(why),
        }
    }

    /// Everything the sandbox does, enforced.
    pub fn full(&self) -> bool {
        self.landlock == Enforcement::Full && self.mounts.is_ok()
    }

    /// One line for `mesh up`'s log.
    pub fn describe(&self) -> String {
        let landlock = match self.landlock {
            Enforcement::Full => format!("file and TCP rules fully enforced ({})", self.detail),
            Enforcement::Partial => format!(
                "file rules only partly enforced ({}; needs ABI 6, Linux 6.12)",
                self.detail
            ),
            Enforcement::None => format!("no Landlock ({})", self.detail),
        };
        match &self.mounts {
            Ok(()) => format!("{landlock}; other plugins' sockets hidden"),
            Err(why) => format!("{landlock}; other plugins' sockets NOT hidden ({why})"),
        }
    }
}

/// Runs `mesh __init --probe-sandbox` and reads what it found.
pub fn probe(program: &Path) -> Support {
    let out = std::process::Command::new(program)
        .args([super::init::INIT_ARG, super::init::PROBE_SANDBOX_ARG])
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Err(e) => Support::none(format!("cannot run {}: {e}", program.display())),
        Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            Support::none(format!(
                "the sandbox probe failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }),
    }
}

/// The probe's own side, in `mesh __init`, after the PID namespace is made: a mount namespace
/// with a tmpfs, then a Landlock ruleset on this process. Prints the [`Support`] as JSON.
pub(crate) fn probe_here() -> ! {
    let mounts = (|| {
        let dir = std::env::temp_dir().join(format!("mesh-sandbox-probe-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let mounted = new_mount_namespace().and_then(|()| mount_tmpfs(&dir));
        let _ = unmount(&dir);
        let _ = std::fs::remove_dir(&dir);
        mounted
    })();
    let support = match restrict(&Spec::default()) {
        Ok(status) => Support {
            landlock: enforcement(&status),
            detail: landlock_detail(&status),
            mounts,
        },
        Err(why) => Support {
            landlock: Enforcement::None,
            detail: why,
            mounts,
        },
    };
    println!(
        "{}",
        serde_json::to_string(&support).unwrap_or_else(|_| "{}".into())
    );
    std::process::exit(0)
}

fn enforcement(status: &RestrictionStatus) -> Enforcement {
    match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    }
}

fn landlock_detail(status: &RestrictionStatus) -> String {
    match status.landlock {
        landlock::LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => match kernel_abi {
            Some(abi) => format!("Landlock ABI {abi}"),
            None => format!("Landlock ABI {effective_abi}"),
        },
        landlock::LandlockStatus::NotEnabled => "Landlock not enabled at boot".into(),
        landlock::LandlockStatus::NotImplemented => "Landlock not built into this kernel".into(),
    }
}

/// In the host side, before the namespace's init starts: a mount namespace in which
/// `spec.hide` is an empty tmpfs but for `spec.keep`. Needs CAP_SYS_ADMIN in this process's
/// user namespace (root, or the one [`super::init`] made).
pub(crate) fn hide(spec: &Spec) -> Result<(), String> {
    let Some(dir) = &spec.hide else {
        return Ok(());
    };
    new_mount_namespace()?;
    // Opened before the tmpfs covers them, bound back from these handles after.
    let mut kept: Vec<(PathBuf, OwnedFd, bool)> = Vec::new();
    for path in &spec.keep {
        let Ok(relative) = path.strip_prefix(dir) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let Ok(metadata) = std::fs::metadata(path) else {
            continue;
        };
        let fd = nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| format!("open {}: {e}", path.display()))?;
        kept.push((relative.to_owned(), fd, metadata.is_dir()));
    }
    mount_tmpfs(dir)?;
    for (relative, fd, is_dir) in kept {
        let target = dir.join(&relative);
        let made = match is_dir {
            true => std::fs::create_dir_all(&target),
            false => target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::File::create(&target).map(drop)),
        };
        made.map_err(|e| format!("cannot make {} in the tmpfs: {e}", target.display()))?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        mount(
            Some(&source),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .map_err(|e| format!("cannot bind {} back: {e}", target.display()))?;
    }
    Ok(())
}

fn new_mount_namespace() -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("cannot make a mount namespace: {e}"))?;
    // Nothing mounted here may reach the host's namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(|e| format!("cannot make mounts private: {e}"))
}

fn mount_tmpfs(dir: &Path) -> Result<(), String> {
    mount(
        Some(Path::new("tmpfs")),
        dir,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0700,size=64k"),
    )
    .map_err(|e| format!("cannot mount a tmpfs on {}: {e}", dir.display()))
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let c = |bytes: &[u8]| CString::new(bytes).map_err(io::Error::other);
    let source = source.map(|s| c(s.as_os_str().as_bytes())).transpose()?;
    let target = c(target.as_os_str().as_bytes())?;
    let fstype = fstype.map(|s| c(s.as_bytes())).transpose()?;
    let data = data.map(|s| c(s.as_bytes())).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn unmount(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    #[allow(unsafe_code)]
    match unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// In the plugin's process, just before exec: the Landlock ruleset of `spec` on this process
/// (and what it execs; `no_new_privs` is set too).
pub(crate) fn restrict(spec: &Spec) -> Result<RestrictionStatus, String> {
    let abi = ABI_HANDLED;
    let fail = |e: landlock::RulesetError| format!("Landlock: {e}");
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(fail)?
        .scope(Scope::from_all(abi))
        .map_err(fail)?
        .create()
        .map_err(fail)?;
    let read_only = AccessFs::ReadFile | AccessFs::ReadDir;
    let write = AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::MakeDir
        | AccessFs::RemoveFile
        | AccessFs::RemoveDir;
    let devices = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let socket_dir = read_only
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::RemoveFile
        | AccessFs::MakeSock;
    let mut rules: Vec<(&Path, BitFlags<AccessFs>)> = Vec::new();
    rules.extend(
        spec.read_exec
            .iter()
            .map(|p| (p.as_path(), AccessFs::from_read(abi))),
    );
    rules.extend(spec.read.iter().map(|p| (p.as_path(), read_only)));
    rules.extend(spec.write.iter().map(|p| (p.as_path(), write)));
    rules.extend(DEVICES.iter().map(|p| (Path::new(p), devices)));
    if !spec.socket_dir.as_os_str().is_empty() {
        rules.push((&spec.socket_dir, socket_dir));
    }
    for (path, access) in rules {
        // A path that is not there (no /lib32, a capability's directory not made yet) is
        // simply not allowed.
        let Ok(metadata) = std::fs::metadata(path) else {
            continue;
        };
        let Ok(fd) = PathFd::new(path) else {
            continue;
        };
        let access = match metadata.is_dir() {
            true => access,
            false => access & AccessFs::from_file(abi),
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(fail)?;
    }
    if let Some(port) = spec.tcp_port {
        ruleset = ruleset
            .add_rule(NetPort::new(port, AccessNet::BindTcp))
            .map_err(fail)?;
    }
    ruleset.restrict_self().map_err(fail)
}

/// In the plugin's process, before exec: [`restrict`], and one line on stderr (the instance's
/// log) saying how it went. `Err`: a strict sandbox that could not be enforced fully.
pub(crate) fn enter(spec: &Spec, hidden: &Result<(), String>) -> Result<(), String> {
    let status = restrict(spec)?;
    let support = Support {
        landlock: enforcement(&status),
        detail: landlock_detail(&status),
        mounts: hidden.clone(),
    };
    if spec.strict && !support.full() {
        return Err(format!(
            "sandbox = true, but this kernel cannot sandbox fully: {}; \
             set sandbox = \"best-effort\" to run it anyway",
            support.describe()
        ));
    }
    eprintln!("mesh: sandboxed: {}", support.describe());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_glob_is_allowed_by_its_literal_directory() {
        for (glob, dir) in [
            ("docs/**", "docs"),
            ("reports/*.txt", "reports"),
            ("**", ""),
            ("*.txt", ""),
            ("notes.txt", "notes.txt"),
            ("a/b/c?.md", "a/b"),
            ("./docs//x/[ab]", "docs/x"),
            ("{a,b}/c", ""),
        ] {
            assert_eq!(literal_prefix(glob), PathBuf::from(dir), "{glob}");
        }
    }

    #[test]
    fn the_rules_follow_the_capabilities_and_hide_the_runtime_directory() {
        let text = "[mesh]\nruntime_dir = \"/run/m\"\n[[plugin]]\nname = \"files\"\n\
            command = \"/bin/sh\"\nroot = \"/srv/files\"\nsandbox = true\n\
            sandbox_paths = [\"lib\"]\n\
            capabilities = [\"read:docs/**\", \"write:reports/*.txt\", \"env:TZ\", \"call:plugin.echo\"]\n";
        let config = crate::Config::parse(Path::new("/etc/mesh/mesh.toml"), text).unwrap();
        let plugin = &config.plugins[0];
        assert_eq!(plugin.sandbox.origin, "/etc/mesh/mesh.toml:7");
        let spec = spec(plugin, Path::new("/run/m/mesh.sock"), None);
        assert!(spec.strict);
        assert_eq!(spec.read, [PathBuf::from("/srv/files/docs")]);
        assert_eq!(spec.write, [PathBuf::from("/srv/files/reports")]);
        assert_eq!(spec.socket_dir, PathBuf::from("/run/m/files"));
        assert_eq!(spec.hide, Some(PathBuf::from("/run/m")));
        for kept in ["/run/m/files", "/run/m/mesh.sock"] {
            assert!(spec.keep.contains(&PathBuf::from(kept)), "{kept}");
        }
        for allowed in ["/usr", "/bin/sh", "/etc/mesh/lib"] {
            assert!(
                spec.read_exec.contains(&PathBuf::from(allowed)),
                "{allowed}"
            );
        }
        assert!(!spec.read_exec.iter().any(|p| p == Path::new("/")));
        assert_eq!(spec.tcp_port, None);
        // Round trip through mesh __init's argument.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<Spec>(&json).unwrap(), spec);
    }

    #[test]
    fn support_says_what_is_missing() {
        let full = Support {
            landlock: Enforcement::Full,
            detail: "Landlock ABI 7".into(),
            mounts: Ok(()),
        };
        assert!(full.full());
        assert!(full.describe().contains("hidden"), "{}", full.describe());
        let no_mounts = Support {
            mounts: Err("no user namespaces".into()),
            ..full.clone()
        };
        assert!(!no_mounts.full());
        assert!(
            no_mounts
                .describe()
                .contains("NOT hidden (no user namespaces)")
        );
        let partial = Support {
            landlock: Enforcement::Partial,
            ..full
        };
        assert!(!partial.full());
        assert!(!Support::none("why".into()).full());
    }
}
