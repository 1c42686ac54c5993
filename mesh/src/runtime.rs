//! Where runtime files live, and binding Unix sockets safely.
//!
//! Sockets live under `$XDG_RUNTIME_DIR/mesh` or, lacking it, `$TMPDIR/mesh-<uid>`. Every socket
//! path is checked against the kernel's `sun_path` limit before use, so a deep directory gives a
//! clear error instead of `EINVAL` or a silently truncated path.

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
    /// Another process is serving on the path.
    #[error("socket {0} is in use by a running process; stop it or choose another path")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
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

/// Creates `dir` (and its parents) with mode 0700 if it is missing, and tightens it to 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), SocketError> {
    let io = |source| SocketError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)
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
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_owned()));
            }
            fs::remove_file(path).map_err(|source| SocketError::Io {
                path: path.to_owned(),
                source,
            })
        }
    }
}

/// Binds a Unix socket at `path`: checks its length, makes its directory private, removes a
/// stale file, and leaves the socket readable and writable by its owner only.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    check_socket_path(path)?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        create_private_dir(dir)?;
    }
    remove_stale_socket(path)?;
    let io = |source| SocketError::Io {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(io)?;
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
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(listener);
        // The file stays behind after the listener is gone: a stale socket.
        assert!(path.exists());
        bind(&path).expect("a stale socket is replaced");

        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotASocket(_))));
    }
}
