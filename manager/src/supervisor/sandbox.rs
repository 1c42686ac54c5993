//! The opt-in kernel sandbox of a plugin (`sandbox = true`): what its own process may open.
//!
//! Three layers, all set up by the instance's host side (`mesh __init`, see [`super::init`]):
//!
//! - **a mount namespace** in which the runtime directory is an empty tmpfs with only this
//!   instance's socket directory and the router socket bound back into it: other plugins'
//!   sockets are not there to `connect()` to. Landlock up to ABI 8 does not cover `connect()`
//!   on a pathname Unix socket (measured here), so this is what keeps a plugin off the others'
//!   sockets. The system's socket directories (`/tmp`, `/var/tmp`, `/run`, `/dev/shm`) are
//!   emptied the same way, keeping system daemons' and the owner's agents' sockets out of
//!   reach; what the rules allow beneath them is bound back;
//! - **Landlock**, applied by the plugin's process just before it execs the plugin: every file
//!   system right is handled, and only [`Spec`]'s paths are allowed (its binary, the system's
//!   libraries, its socket directory, a few devices, what its `read:`/`write:` capabilities
//!   name); TCP bind and connect are handled too (only its own port, for `transport = "tcp"`);
//!   abstract Unix sockets and signals are scoped to the sandbox;
//! - **no capability**: after Landlock, the plugin's process empties its bounding, ambient,
//!   permitted, effective and inheritable sets and locks the securebits, so that it execs the
//!   plugin with none, even as root ([`drop_capabilities`]): Landlock does not cover packet,
//!   raw or netlink sockets, the capabilities do.
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

/// Where the system and its users keep their Unix sockets (system daemons, the owner's
/// agents): each an empty tmpfs in a sandboxed plugin's mount namespace. Landlock up to ABI 7
/// does not govern `connect()` on a pathname socket, so a socket is out of reach only where it
/// is not there to name.
const SOCKET_DIRS: [&str; 5] = ["/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm"];

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
    /// The directories hidden behind an empty tmpfs (the runtime directory, [`SOCKET_DIRS`])
    /// ...
    pub(crate) hide: Vec<PathBuf>,
    /// ... except these, bound back into them (its socket directory, the router socket, what
    /// the rules allow).
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
        read_exec.extend(program_prefix(program, &plugin.sandbox.protected));
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
    // What the rules allow must not be hidden with the rest (a script in /tmp, a root under
    // the runtime dir): bound back, as named and as resolved.
    let mut keep = vec![plugin.socket_dir.clone(), mesh_socket.to_owned()];
    keep.extend(read_exec.iter().chain(&read).chain(&write).cloned());
    keep.extend(
        keep.iter()
            .filter_map(|path| std::fs::canonicalize(path).ok())
            .collect::<Vec<_>>(),
    );
    keep.dedup();
    // The runtime directory always (other plugins' sockets); the system's socket directories
    // unless a rule allows one whole (`sandbox_paths = ["/tmp"]`).
    let mut hide: Vec<PathBuf> = plugin
        .socket_dir
        .parent()
        .map(Path::to_owned)
        .into_iter()
        .collect();
    for dir in SOCKET_DIRS {
        let Ok(real) = std::fs::canonicalize(dir) else {
            continue;
        };
        let allowed_whole = read_exec
            .iter()
            .chain(&read)
            .chain(&write)
            .any(|path| real.starts_with(resolved(path)));
        if !allowed_whole && !hide.contains(&real) {
            hide.push(real);
        }
    }
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

/// What the rules add for a program installed as `PREFIX/bin/NAME` (a virtual environment,
/// /opt/tool, an interpreter), which reads its libraries beneath `PREFIX`: `PREFIX`, unless it
/// would reach a `protected` directory (`~/.local/bin/x` would open `~/.local/share/mesh`,
/// every plugin's default root); then `PREFIX/bin` alone, unless that would too; else nothing.
/// A program that needs more beneath such a prefix is given it by `sandbox_paths`.
fn program_prefix(program: &Path, protected: &[PathBuf]) -> Option<PathBuf> {
    let bin = program
        .parent()
        .filter(|bin| bin.file_name().is_some_and(|name| name == "bin"))?;
    let prefix = bin.parent()?;
    [prefix, bin]
        .into_iter()
        .find(|dir| *dir != Path::new("/") && !reaches(dir, protected))
        .map(Path::to_owned)
}

/// Whether allowing `dir` (and all beneath it) would allow one of `protected` or what is in it.
fn reaches(dir: &Path, protected: &[PathBuf]) -> bool {
    let dir = resolved(dir);
    protected.iter().any(|p| resolved(p).starts_with(&dir))
}

/// `path` through its symlinks where it exists, else made absolute: what a rule on it covers.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_owned())
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
        let mounted = new_mount_namespace().and_then(|()| mount_tmpfs(&dir, "0700"));
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

/// In the host side, before the namespace's init starts: a mount namespace in which each of
/// `spec.hide` is an empty tmpfs but for `spec.keep`. Needs CAP_SYS_ADMIN in this process's
/// user namespace (root, or the one [`super::init`] made).
pub(crate) fn hide(spec: &Spec) -> Result<(), String> {
    if spec.hide.is_empty() {
        return Ok(());
    }
    new_mount_namespace()?;
    // Outer directories first: a hidden directory inside a kept one (the runtime directory in
    // a plugin's root under /tmp) is hidden again once that one is bound back.
    let mut hidden: Vec<&PathBuf> = spec.hide.iter().collect();
    hidden.sort_by_key(|dir| dir.components().count());
    // Each kept path, opened before any tmpfs covers it, goes back into the innermost hidden
    // directory it lies beneath; one inside another kept path comes back with that one.
    let mut kept: Vec<(usize, PathBuf, OwnedFd, bool)> = Vec::new();
    let mut keep: Vec<&PathBuf> = spec.keep.iter().collect();
    keep.sort_by_key(|path| path.components().count());
    for path in keep {
        let Some((index, dir)) = hidden
            .iter()
            .enumerate()
            .rfind(|(_, dir)| path.starts_with(dir) && path != **dir)
        else {
            continue;
        };
        if kept
            .iter()
            .any(|(i, other, ..)| *i == index && path.starts_with(dir.join(other)))
        {
            continue;
        }
        let Ok(metadata) = std::fs::metadata(path) else {
            continue;
        };
        let fd = nix::fcntl::open(
            path.as_path(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| format!("open {}: {e}", path.display()))?;
        let relative = path.strip_prefix(dir).unwrap_or(path).to_owned();
        kept.push((index, relative, fd, metadata.is_dir()));
    }
    for (index, dir) in hidden.iter().enumerate() {
        // Inside a tmpfs made a step before, unless a kept directory brought it back.
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot make {} in the tmpfs: {e}", dir.display()))?;
        let runtime = Some(dir.as_path()) == spec.socket_dir.parent();
        mount_tmpfs(dir, if runtime { "0700" } else { "0755" })?;
        for (_, relative, fd, is_dir) in kept.iter().filter(|(i, ..)| *i == index) {
            let target = dir.join(relative);
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

/// An empty tmpfs on `dir`, mode `mode`, too small to be of use but for the directories
/// [`hide`] makes in it.
fn mount_tmpfs(dir: &Path, mode: &str) -> Result<(), String> {
    mount(
        Some(Path::new("tmpfs")),
        dir,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&format!("mode={mode},size=64k")),
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

/// In the plugin's process, before exec: [`restrict`], then [`drop_capabilities`], and one
/// line on stderr (the instance's log) saying how it went. `Err`: a strict sandbox that could
/// not be enforced fully.
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
    let capabilities = match drop_capabilities() {
        Ok(()) => "no capabilities".to_owned(),
        Err(why) if spec.strict => {
            return Err(format!(
                "sandbox = true, but {why}; set sandbox = \"best-effort\" to run it anyway"
            ));
        }
        Err(why) => format!("capabilities NOT dropped ({why})"),
    };
    eprintln!("mesh: sandboxed: {}; {capabilities}", support.describe());
    Ok(())
}

/// The securebits a sandboxed plugin runs under, each locked so that it cannot turn them off:
/// uid 0 gains no capability by exec (`NOROOT`) nor keeps any across a change of uid
/// (`NO_SETUID_FIXUP`, `KEEP_CAPS` locked off), and no ambient capability can be raised.
const SECUREBITS: libc::c_int = libc::SECBIT_NOROOT
    | libc::SECBIT_NOROOT_LOCKED
    | libc::SECBIT_NO_SETUID_FIXUP
    | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
    | libc::SECBIT_KEEP_CAPS_LOCKED
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;

/// In the plugin's process, just before exec (after the mounts, which needed CAP_SYS_ADMIN,
/// and after Landlock, whose rules were opened with the capabilities still held): gives up
/// every capability for good, so that the plugin holds none however it was started — as root,
/// or with every capability of the user namespace `mesh __init` made. Landlock confines files
/// and TCP; without CAP_NET_RAW and CAP_NET_ADMIN, packet and raw sockets are refused and
/// routes cannot be changed, and without CAP_SYS_ADMIN nothing can be mounted.
///
/// The order matters: the ambient set, then the bounding set and the securebits (both need
/// CAP_SETPCAP), then the permitted, effective and inheritable sets, which removes
/// CAP_SETPCAP itself.
pub(crate) fn drop_capabilities() -> Result<(), String> {
    let prctl = |option: libc::c_int, arg: libc::c_ulong| -> io::Result<libc::c_int> {
        // SAFETY: prctl with integer arguments only; no memory is passed to the kernel.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::prctl(
                option,
                arg,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        match rc {
            -1 => Err(io::Error::last_os_error()),
            rc => Ok(rc),
        }
    };
    match prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) {
        // EINVAL: a kernel older than 4.3, which has no ambient set to clear.
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(format!("cannot clear the ambient capabilities: {e}")),
    }
    // Every capability the kernel knows, up to the first number it does not (EINVAL).
    for cap in 0..=u8::MAX as libc::c_ulong {
        match prctl(libc::PR_CAPBSET_READ, cap) {
            Err(_) => break,
            Ok(0) => continue,
            Ok(_) => {}
        }
        prctl(libc::PR_CAPBSET_DROP, cap)
            .map_err(|e| format!("cannot drop capability {cap} from the bounding set: {e}"))?;
    }
    prctl(libc::PR_SET_SECUREBITS, SECUREBITS as libc::c_ulong)
        .map_err(|e| format!("cannot set and lock the securebits: {e}"))?;
    // capset(2) with version 3: two 32-bit words for each set, all zero.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: the header and the two data words are the layout capset(2) documents for
    // version 3, and outlive the call; pid 0 is this thread.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            std::ptr::from_mut(&mut header),
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot clear the capability sets: {}",
            io::Error::last_os_error()
        ));
    }
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
        assert_eq!(spec.hide[0], PathBuf::from("/run/m"));
        // The system's socket directories too, where they are.
        for dir in ["/tmp", "/run"] {
            assert!(spec.hide.contains(&PathBuf::from(dir)), "{dir}");
        }
        for kept in [
            "/run/m/files",
            "/run/m/mesh.sock",
            "/srv/files/docs",
            "/bin/sh",
        ] {
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
    fn a_command_prefix_never_widens_to_the_data_runtime_or_config_directories() {
        let home = PathBuf::from("/home/u");
        let protected = [
            home.join(".local/share/mesh"),
            PathBuf::from("/run/user/1000/mesh"),
            home.join("conf"),
            home.clone(),
        ];
        let prefix = |command: &str| program_prefix(Path::new(command), &protected);
        // ~/.local holds the data directory (every plugin's default root): only its bin.
        assert_eq!(
            prefix("/home/u/.local/bin/x"),
            Some(home.join(".local/bin"))
        );
        // A virtual environment in a project is its own prefix.
        assert_eq!(
            prefix("/home/u/project/.venv/bin/python"),
            Some(home.join("project/.venv"))
        );
        // $HOME itself, the config's directory, the runtime directory's parents: never.
        assert_eq!(prefix("/home/u/bin/tool"), Some(home.join("bin")));
        assert_eq!(prefix("/home/u/conf/bin/tool"), Some(home.join("conf/bin")));
        assert_eq!(
            prefix("/run/user/bin/x"),
            Some(PathBuf::from("/run/user/bin"))
        );
        assert_eq!(prefix("/opt/tool/bin/x"), Some(PathBuf::from("/opt/tool")));
        assert_eq!(prefix("/bin/sh"), Some(PathBuf::from("/bin")));
        assert_eq!(prefix("/home/u/x"), None);
        // Where even bin holds a protected directory (the config beside the command): none.
        let config_in_bin = [PathBuf::from("/srv/bin")];
        assert_eq!(
            program_prefix(Path::new("/srv/bin/x"), &config_in_bin),
            None
        );

        // Through a whole config: the default data dir under ~/.local/share.
        let text = "[mesh]\nruntime_dir = \"/run/m\"\ndata_dir = \"/home/u/.local/share/mesh\"\n\
            [[plugin]]\nname = \"x\"\ncommand = \"/bin/sh\"\nsandbox = true\n";
        let config = crate::Config::parse(Path::new("/home/u/conf/mesh.toml"), text).unwrap();
        let mut plugin = config.plugins[0].clone();
        for dir in ["/home/u/.local/share/mesh", "/run/m", "/home/u/conf"] {
            assert!(
                plugin.sandbox.protected.contains(&PathBuf::from(dir)),
                "{dir}: {:?}",
                plugin.sandbox.protected
            );
        }
        plugin.command = home.join(".local/bin/x");
        let spec = spec(&plugin, Path::new("/run/m/mesh.sock"), None);
        assert!(spec.read_exec.contains(&home.join(".local/bin")));
        for never in [
            "/home/u/.local",
            "/home/u",
            "/home",
            "/run/m",
            "/home/u/conf",
        ] {
            assert!(
                !spec.read_exec.iter().any(|p| p == Path::new(never)),
                "{never}: {:?}",
                spec.read_exec
            );
        }
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
