//! Files beneath a plugin's root: a requested path is normalized (relative, no `..`) for the
//! capability check, and opened through the root's [`Dir`], which the kernel resolves beneath
//! the root (cap-std: `openat2` with `RESOLVE_BENEATH` where the kernel has it). There is no
//! window between a check and an open that a swapped symlink could use: the check is on the
//! name, the open never leaves the root whatever the name resolves to then.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use cap_std::{ambient_authority, fs::Dir};

/// The normalized form of a requested path: its segments joined by `/`, without `.` or empty
/// segments; `.` for the root itself. Absolute paths and `..` are refused with the reason.
pub fn normalize(path: &str) -> Result<String, String> {
    if path.contains('\0') {
        return Err(format!("path {path:?} holds a NUL byte"));
    }
    if path.starts_with('/') {
        return Err(format!(
            "path {path:?} is absolute; host paths are relative to the plugin's root"
        ));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "path {path:?} climbs with ..; host paths stay beneath the plugin's root"
                ));
            }
            part => parts.push(part),
        }
    }
    Ok(if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    })
}

/// Each plugin's root, opened once (created 0700 if missing) when first used: the only place
/// host services use ambient authority.
#[derive(Default)]
pub struct Roots {
    open: Mutex<BTreeMap<PathBuf, Arc<Dir>>>,
}

impl Roots {
    /// The root at `path`, opened now or before.
    pub fn get(&self, path: &Path) -> io::Result<Arc<Dir>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = open.get(path) {
            return Ok(dir.clone());
        }
        create_private(path)?;
        let dir = Arc::new(Dir::open_ambient_dir(path, ambient_authority())?);
        open.insert(path.to_owned(), dir.clone());
        Ok(dir)
    }
}

/// Creates `path` 0700 if missing (parents with the default mode); an existing root is used as
/// it is, unless it is not a directory (a symlink to one is followed: the operator chose it).
fn create_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_or_are_refused() {
        for (path, normal) in [
            ("a.txt", "a.txt"),
            ("./a//b/./c", "a/b/c"),
            ("", "."),
            (".", "."),
            ("dir/", "dir"),
        ] {
            assert_eq!(normalize(path).unwrap(), normal, "{path}");
        }
        for path in ["/etc/passwd", "..", "a/../../b", "a/..", "a\0b"] {
            assert!(normalize(path).is_err(), "{path:?}");
        }
    }

    #[test]
    fn the_root_keeps_every_path_beneath_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let roots = Roots::default();
        let opened = roots.get(&root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(dir.path().join("outside"), "secret").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
        for escape in ["etc/passwd", "up", "../outside", "/etc/passwd"] {
            let error = opened.read(escape).unwrap_err();
            // What the service answers PERMISSION_DENIED and logs as denied.
            assert_eq!(
                error.kind(),
                io::ErrorKind::PermissionDenied,
                "{escape}: {error}"
            );
        }
        assert!(Arc::ptr_eq(&opened, &roots.get(&root).unwrap()));
    }
}
