//! Where runtime files live, and binding Unix sockets safely.
//!
//! Sockets live under `$XDG_RUNTIME_DIR/mesh` or, lacking it, `$TMPDIR/mesh-<uid>`. Every socket
//! path is checked against the kernel's `sun_path` limit before use, so a deep directory gives a
//! clear error instead of `EINVAL` or a silently truncated path.
//!
//! A runtime directory is private to its owner, as ssh-agent and tmux keep theirs: created
//! 0700, and an existing one is refused when it is a symlink, owned by another uid, or writable
//! by group or others — otherwise another local user could create `/tmp/mesh-<uid>` first and
//! later swap `mesh.sock` for a listener of its own, or plant a symlink that makes the owner
//! chmod and fill a directory of the attacker's choosing. Nothing under it is followed through
//! a symlink.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;

/// Longest socket path, in bytes, that fits `sockaddr_un.sun_path` (108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Environment variable naming the router's Unix socket.
pub const MESH_SOCKET: &str = "MESH_SOCKET";

/// Errors from preparing or binding a Unix socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The path does not fit `sun_path`.
    #[error(
        "socket path {path} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit of Unix sockets; \
         choose a shorter runtime directory (runtime_dir in the config, or XDG_RUNTIME_DIR)"
    )]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Another process is serving on the path; the second field names it where the kernel
    /// tells (`pid 123, echo-plugin`).
    #[error("socket {0} is in use by a running process{1}; stop it or choose another path")]
    InUse(PathBuf, String),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    /// A runtime directory that someone other than its owner could control.
    #[error(
        "runtime directory {path} {problem}, so another user could control mesh's sockets; \
         remove it (mesh creates it again, mode 0700) or choose another runtime directory \
         (runtime_dir in the config, or XDG_RUNTIME_DIR)"
    )]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it (`is a symlink to /etc`).
        problem: String,
    },
    /// Any other I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The default runtime directory: `$XDG_RUNTIME_DIR/mesh`, else `$TMPDIR/mesh-<uid>`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("mesh"),
        _ => std::env::temp_dir().join(format!("mesh-{}", nix::unistd::getuid())),
    }
}

/// The router socket a client should use: `$MESH_SOCKET`, else `mesh.sock` in [`default_dir`].
pub fn router_socket() -> PathBuf {
    match std::env::var_os(MESH_SOCKET) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => default_dir().join("mesh.sock"),
    }
}

/// Checks that `path` fits a Unix socket address.
pub fn check_socket_path(path: &Path) -> Result<(), SocketError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(SocketError::TooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700 if it is missing, checks that it is private
/// to this user, and tightens it to 0700.
///
/// An existing `dir` is refused ([`SocketError::UnsafeDir`]) when it is a symlink, not a
/// directory, owned by another uid, or writable by group or others. Its parents are the
/// owner's choice (`XDG_RUNTIME_DIR`, `/tmp`) and are not checked.
pub fn create_private_dir(dir: &Path) -> Result<(), SocketError> {
    private_dir(dir, None)
}

/// Like [`create_private_dir`], for a directory handed to another user (a plugin that runs as
/// `uid`): it may already be owned by this user or by `uid`, and ends owned by `uid`:`gid`,
/// mode 0700.
pub fn create_private_dir_for(dir: &Path, uid: u32, gid: u32) -> Result<(), SocketError> {
    private_dir(dir, Some((uid, gid)))
}

fn private_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), SocketError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let io = |source| SocketError::Io {
        path: dir.to_owned(),
        source,
    };
    let unsafe_dir = |problem: String| SocketError::UnsafeDir {
        path: dir.to_owned(),
        problem,
    };
    let symlink = || {
        let target =
            fs::read_link(dir).map_or_else(|_| "elsewhere".into(), |t| t.display().to_string());
        unsafe_dir(format!("is a symlink (to {target})"))
    };
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(symlink()),
        Ok(meta) if !meta.is_dir() => return Err(unsafe_dir("is not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(io)?;
            }
            // Not recursive: if someone else creates it meanwhile, the checks below see theirs.
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io(e)),
                _ => {}
            }
        }
        Err(e) => return Err(io(e)),
    }
    // Checked and changed through one descriptor, opened without following a symlink: what is
    // checked is what is tightened, whatever is renamed meanwhile.
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir);
    let handle = match opened {
        Ok(handle) => handle,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Err(symlink()),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            return Err(unsafe_dir("is not a directory".into()));
        }
        Err(e) => return Err(io(e)),
    };
    let meta = handle.metadata().map_err(io)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && owner.is_none_or(|(uid, _)| meta.uid() != uid) {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by you (uid {me})",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "is writable by group or others (mode {mode:04o})"
        )));
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&handle, Some(uid), Some(gid)).map_err(io)?;
    }
    handle
        .set_permissions(fs::Permissions::from_mode(0o700))
        .map_err(io)
}

/// Removes a socket file left behind by a process that is gone.
///
/// Fails if a live process still answers on it, or if the path holds something else.
pub fn remove_stale_socket(path: &Path) -> Result<(), SocketError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SocketError::Io {
            path: path.to_owned(),
            source,
        }),
        Ok(meta) if !meta.file_type().is_socket() => Err(SocketError::NotASocket(path.to_owned())),
        Ok(_) => {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
                return Err(SocketError::InUse(path.to_owned(), holder(&stream)));
            }
            fs::remove_file(path).map_err(|source| SocketError::Io {
                path: path.to_owned(),
                source,
            })
        }
    }
}

/// ` (pid 123, echo-plugin)`: who serves on the other end of `stream`, as far as the kernel
/// and `/proc` tell; empty when they do not.
fn holder(stream: &std::os::unix::net::UnixStream) -> String {
    let Ok(pid) = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.pid())
    else {
        return String::new();
    };
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(name) => format!(" (pid {pid}, {})", name.trim()),
        Err(_) => format!(" (pid {pid})"),
    }
}

/// Binds a Unix socket at `path`: checks its length, makes its directory private, removes a
/// stale file, and leaves the socket readable and writable by its owner only.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::MetadataExt;
    check_socket_path(path)?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && fs::symlink_metadata(dir).is_err()
    {
        // A directory we make is private; an existing one is the owner's choice.
        create_private_dir(dir)?;
    }
    remove_stale_socket(path)?;
    let io = |source| SocketError::Io {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(io)?;
    // chmod follows symlinks: make sure the path still is the socket just bound, ours.
    let meta = fs::symlink_metadata(path).map_err(io)?;
    if !meta.file_type().is_socket() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_long_paths_are_named_with_the_fix() {
        let path = PathBuf::from(format!("/tmp/{}/x.sock", "d".repeat(120)));
        let err = check_socket_path(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("107-byte limit"), "{err}");
        assert!(err.contains("runtime_dir"), "{err}");
        assert!(check_socket_path(Path::new("/tmp/ok.sock")).is_ok());
    }

    fn unsafe_problem(result: Result<(), SocketError>) -> String {
        match result {
            Err(error @ SocketError::UnsafeDir { .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains("remove it") && text.contains("runtime_dir"),
                    "{text}"
                );
                text
            }
            other => panic!("not refused as unsafe: {other:?}"),
        }
    }

    #[test]
    fn a_private_dir_is_created_0700_and_kept_private() {
        let tmp = tempfile::Builder::new()
            .prefix("m")
            .tempdir_in("/tmp")
            .unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        // One of ours that is merely readable by others is tightened, not refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_planted_runtime_dir_is_refused_and_left_alone() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::Builder::new()
            .prefix("m")
            .tempdir_in("/tmp")
            .unwrap();

        // Writable by others: anyone could swap the sockets in it.
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let text = unsafe_problem(create_private_dir(&open));
        assert!(
            text.contains(&format!(
                "{} is writable by group or others (mode 0777)",
                open.display()
            )),
            "{text}"
        );
        assert_eq!(
            fs::metadata(&open).unwrap().mode() & 0o777,
            0o777,
            "left as it was"
        );

        // A symlink to a directory of the attacker's choosing: not followed, not chmodded.
        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let text = unsafe_problem(create_private_dir(&link));
        assert!(text.contains("is a symlink (to "), "{text}");
        assert_eq!(
            fs::metadata(&target).unwrap().mode() & 0o777,
            0o755,
            "target untouched"
        );
        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink("/nonexistent/mesh", &dangling).unwrap();
        unsafe_problem(create_private_dir(&dangling));

        // Owned by someone else (needs root to set up; the tests run as root in CI).
        let me = nix::unistd::geteuid();
        if me.is_root() {
            let foreign = tmp.path().join("foreign");
            fs::create_dir(&foreign).unwrap();
            fs::set_permissions(&foreign, fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            let text = unsafe_problem(create_private_dir(&foreign));
            assert!(
                text.contains("is owned by uid 65534, not by you (uid 0)"),
                "{text}"
            );
            assert_eq!(
                fs::metadata(&foreign).unwrap().uid(),
                65534,
                "left as it was"
            );
            // Handed to that user, it is accepted.
            create_private_dir_for(&foreign, 65534, 65534).unwrap();
        } else {
            eprintln!("not root: the foreign-owner case needs root to chown");
        }
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_not_a_live_one() {
        let dir = tempfile::Builder::new()
            .prefix("m")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("sub/s.sock");
        let listener = bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert!(matches!(bind(&path), Err(SocketError::InUse(..))));
        drop(listener);
        // The file stays behind after the listener is gone: a stale socket.
        assert!(path.exists());
        bind(&path).expect("a stale socket is replaced");

        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotASocket(_))));
    }
}
