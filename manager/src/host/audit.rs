//! The audit log: one JSON line per host-service or `call:` decision, allowed or denied, in a
//! file of mode 0600 that is never a symlink, bounded in size with one rotation
//! (`audit.log.1`).
//! Followers (`mesh audit -f`) get new lines as they are written.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::broadcast;

/// The default bound of `audit.log` before it is rotated.
pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;

/// The room made for one line: more than a line with the longest refusal takes.
const LINE: usize = 512;

/// One decision.
#[derive(Debug, Serialize)]
pub struct Decision<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The calling plugin.
    pub plugin: &'a str,
    /// Its instance.
    pub instance: &'a str,
    /// The calling process.
    pub pid: u32,
    /// What it asked (`read_file`, `get_env`, `call`, …).
    pub action: &'a str,
    /// On what: a path relative to its root, a variable's name, or `SERVICE/pkg.Svc/Method`.
    pub resource: &'a str,
    /// Whether it was allowed.
    pub allowed: bool,
    /// Why: the capability that allowed it, or what was missing.
    pub reason: &'a str,
    /// For `call`: the path it took, `router` (forwarded by the router) or `direct` (on the
    /// target plugin's own socket); absent for host services.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'a str>,
}

impl Decision<'_> {
    /// The time now, as decisions carry it.
    pub fn now() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }
}

/// The audit log.
pub struct Audit {
    path: PathBuf,
    max_size: u64,
    file: Mutex<Option<(File, u64)>>,
    lines: broadcast::Sender<String>,
}

impl Audit {
    /// The log at `path`, rotated past `max_size` bytes; the file is opened (created 0600) now,
    /// so that a bad path is an error at start rather than a silent gap.
    pub fn open(path: PathBuf, max_size: u64) -> io::Result<Self> {
        let file = open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            max_size: max_size.max(1),
            file: Mutex::new(Some((file, size))),
            lines: broadcast::channel(1024).0,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `decision` as one line. A failure to write is logged, never hidden from the
    /// operator, and never fails the call it records.
    pub fn record(&self, decision: &Decision<'_>) {
        // Room for a line with a long reason at once: no growing on the way.
        let mut line = Vec::with_capacity(LINE);
        if serde_json::to_writer(&mut line, decision).is_err() {
            return;
        }
        line.push(b'\n');
        if let Err(error) = self.write(&line) {
            tracing::error!(path = %self.path.display(), %error, "cannot write the audit log");
        }
        line.pop();
        if self.lines.receiver_count() > 0
            && let Ok(line) = String::from_utf8(line)
        {
            let _ = self.lines.send(line);
        }
    }

    fn write(&self, line: &[u8]) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let size = file.as_ref().map_or(0, |(_, size)| *size);
        if file.is_none() || size + line.len() as u64 > self.max_size && size > 0 {
            *file = None;
            if size > 0 {
                std::fs::rename(&self.path, rotated(&self.path))?;
            }
            let opened = open(&self.path)?;
            let size = opened.metadata()?.len();
            *file = Some((opened, size));
        }
        let (f, size) = file.as_mut().expect("opened above");
        f.write_all(line)?;
        *size += line.len() as u64;
        Ok(())
    }

    /// The lines kept: the rotated file's, then the current one's.
    pub fn lines(&self) -> Vec<String> {
        let _file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        [rotated(&self.path), self.path.clone()]
            .iter()
            .filter_map(|p| read_plain(p).ok())
            .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    /// New lines from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.lines.subscribe()
    }
}

/// `audit.log.1` beside `audit.log`.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Opens for appending, created 0600; a symlink, a file of another owner, or one others may
/// read is refused.
fn open(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| refused(path, e))?;
    check(path, &file)?;
    Ok(file)
}

fn read_plain(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    check(path, &file)?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

fn check(path: &Path, file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    let mine = nix::unistd::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != mine || meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "audit log {} must be a regular file of uid {mine} with mode 0600 (it is mode \
                 {:o}, uid {}); fix or remove it",
                path.display(),
                meta.mode() & 0o7777,
                meta.uid()
            ),
        ));
    }
    Ok(())
}

fn refused(path: &Path, error: io::Error) -> io::Error {
    if error.raw_os_error() == Some(nix::libc::ELOOP) {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "audit log {} is a symlink, which is refused; point audit_log at the file itself",
                path.display()
            ),
        );
    }
    io::Error::new(
        error.kind(),
        format!("audit log {}: {error}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(resource: &str) -> Decision<'_> {
        Decision {
            time: Decision::now(),
            plugin: "p",
            instance: "p-0",
            pid: 1,
            action: "read_file",
            resource,
            allowed: false,
            reason: "r",
            via: None,
        }
    }

    #[test]
    fn lines_are_json_rotated_once_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(path.clone(), 300).unwrap();
        audit.record(&decision("file-0"));
        // Followers get the lines written after they subscribe, as written.
        let mut follower = audit.subscribe();
        for i in 1..10 {
            audit.record(&decision(&format!("file-{i}")));
        }
        let followed: serde_json::Value =
            serde_json::from_str(&follower.try_recv().unwrap()).unwrap();
        assert_eq!(followed["resource"], "file-1");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(rotated(&path).exists());
        let lines = audit.lines();
        let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(last["resource"], "file-9");
        assert_eq!(last["allowed"], false);
        // Bounded: the two files hold at most twice the bound.
        let total = std::fs::metadata(&path).unwrap().len()
            + std::fs::metadata(rotated(&path)).unwrap().len();
        assert!(total <= 600, "{total}");
    }

    #[test]
    fn a_symlinked_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join("audit.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = Audit::open(link, 100).err().unwrap();
        assert!(error.to_string().contains("symlink"), "{error}");
    }
}
