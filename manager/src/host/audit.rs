//! The audit log: one JSON line per host-service or `call:` decision, allowed or denied, in a
//! file of mode 0600 that is never a symlink, bounded in size with one rotation
//! (`audit.log.1`). Followers (`mesh audit -f`) get new lines as they are written.
//!
//! Everything a plugin chose (a path, a variable's name, a method) is hostile to the log, so
//! the bounds are kept here, in [`Audit::record`], for every caller:
//!
//! - every string field is cut to a fixed share of the line, measured as JSON writes it,
//!   on a char boundary and marked with the length it had ([`excerpt`]); a line is never
//!   over [`MAX_LINE`] bytes, far below the smallest rotation bound, so each file stays under
//!   its bound and the two together under twice it;
//! - denials are throttled per plugin (a burst of [`DENIALS_BURST`], then one line a
//!   second): a plugin that floods refusals cannot rotate the other decisions out. The next
//!   line of that plugin counts those left out (`denials_left_out`). Allowed decisions are all
//!   written: a plugin pays for each with real work, which host services bound;
//! - readers get the kept lines one by one ([`Audit::kept`]), never a file at once, and never
//!   a line over the bound (one an older version wrote is replaced by a note).

use std::{
    borrow::Cow,
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Instant, SystemTime},
};

use serde::{Serialize, Serializer, ser::SerializeMap};
use tokio::sync::broadcast;

/// The default bound of `audit.log` before it is rotated.
pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;

/// The largest line, newline included: below the smallest `audit_max_size` the config
/// accepts (4 KiB), so one line never overfills a file, and far below gRPC's message limit,
/// so `mesh audit` reads any line.
pub const MAX_LINE: usize = 4096;

/// What the resource (a path, a name, `SERVICE/pkg.Svc/Method`) may take of a line, escaped.
pub const RESOURCE_BYTES: usize = 512;
/// What the reason may take of a line, escaped: room for a refusal that quotes a resource
/// and offers a grant command (both bounded where they are made, see `caps.rs`).
pub const REASON_BYTES: usize = 2048;
/// What each other string field (time, plugin, instance, action, via, reported_by) may take.
const NAME_BYTES: usize = 128;

/// Denied lines one plugin may write at once before the throttle applies.
pub const DENIALS_BURST: f64 = 20.0;
/// Denied lines one plugin may write a second, past its burst.
pub const DENIALS_PER_SECOND: f64 = 1.0;
/// Plugins whose denials are tracked before those back to a full burst are forgotten (only
/// configured plugins are named, so this is never reached in practice).
const TRACKED_PLUGINS: usize = 4096;

/// The path a `call` took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via<'a> {
    /// Forwarded by the router: the router saw the call itself.
    Router,
    /// On the target plugin's own socket: the target's SDK reported the call on its private
    /// channel. The caller is named by the manager from the pidfd the target passed, but that
    /// a call happened (and which pidfd) is the target's word.
    Direct {
        /// The target instance whose channel reported the call (`echo-0`).
        reported_by: &'a str,
    },
}

/// One decision.
#[derive(Debug)]
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
    /// For `call`: the path it took (`via` `router` or `direct`, the latter with
    /// `reported_by`); absent for host services.
    pub via: Option<Via<'a>>,
}

impl Decision<'_> {
    /// The time now, as decisions carry it.
    pub fn now() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }
}

/// A decision as written: every field cut to its share, and the denials of its plugin left
/// out since its last line.
struct Line<'d, 'a> {
    decision: &'d Decision<'a>,
    left_out: u64,
}

impl Serialize for Line<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let d = self.decision;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("time", &excerpt(&d.time, NAME_BYTES))?;
        map.serialize_entry("plugin", &excerpt(d.plugin, NAME_BYTES))?;
        map.serialize_entry("instance", &excerpt(d.instance, NAME_BYTES))?;
        map.serialize_entry("pid", &d.pid)?;
        map.serialize_entry("action", &excerpt(d.action, NAME_BYTES))?;
        map.serialize_entry("resource", &excerpt(d.resource, RESOURCE_BYTES))?;
        map.serialize_entry("allowed", &d.allowed)?;
        map.serialize_entry("reason", &excerpt(d.reason, REASON_BYTES))?;
        match d.via {
            None => {}
            Some(Via::Router) => map.serialize_entry("via", "router")?,
            Some(Via::Direct { reported_by }) => {
                map.serialize_entry("via", "direct")?;
                map.serialize_entry("reported_by", &excerpt(reported_by, NAME_BYTES))?;
            }
        }
        if self.left_out > 0 {
            map.serialize_entry("denials_left_out", &self.left_out)?;
        }
        map.end()
    }
}

impl Serialize for Decision<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Line {
            decision: self,
            left_out: 0,
        }
        .serialize(serializer)
    }
}

/// The bytes `c` takes inside a JSON string as serde_json writes it.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// `text` as it may appear in an audit line: whole if it takes at most `budget` bytes once
/// written as JSON, else its longest prefix (cut on a char boundary) that fits with a marker
/// saying it was cut and how long it was: `aaaa…[cut: 4000000 bytes]`.
pub fn excerpt(text: &str, budget: usize) -> Cow<'_, str> {
    // Stops counting once over the budget: the text may be megabytes long.
    let mut total = 0;
    if text.chars().all(|c| {
        total += json_len(c);
        total <= budget
    }) {
        return Cow::Borrowed(text);
    }
    let marker = format!("…[cut: {} bytes]", text.len());
    let room = budget.saturating_sub(marker.len());
    let mut used = 0;
    let mut end = 0;
    for (at, c) in text.char_indices() {
        used += json_len(c);
        if used > room {
            break;
        }
        end = at + c.len_utf8();
    }
    Cow::Owned(format!("{}{marker}", &text[..end]))
}

/// Each plugin's denied lines: what it may still write now, and what was left out.
#[derive(Default)]
struct Denials {
    by_plugin: HashMap<String, Bucket>,
}

/// A token bucket of denied lines, and the denials left out since the plugin's last line.
struct Bucket {
    tokens: f64,
    at: Instant,
    left_out: u64,
}

impl Denials {
    /// Whether `decision` is written: `Some(denials left out before it)` or `None` (counted,
    /// left out).
    fn admit(&mut self, decision: &Decision<'_>, now: Instant) -> Option<u64> {
        if !self.by_plugin.contains_key(decision.plugin) {
            if decision.allowed {
                return Some(0);
            }
            if self.by_plugin.len() >= TRACKED_PLUGINS {
                self.by_plugin
                    .retain(|_, b| b.left_out > 0 || b.refilled(now) < DENIALS_BURST);
            }
            self.by_plugin.insert(
                decision.plugin.to_owned(),
                Bucket {
                    tokens: DENIALS_BURST,
                    at: now,
                    left_out: 0,
                },
            );
        }
        let bucket = self.by_plugin.get_mut(decision.plugin)?;
        bucket.tokens = bucket.refilled(now);
        bucket.at = now;
        if !decision.allowed {
            if bucket.tokens < 1.0 {
                bucket.left_out += 1;
                return None;
            }
            bucket.tokens -= 1.0;
        }
        Some(std::mem::take(&mut bucket.left_out))
    }
}

impl Bucket {
    fn refilled(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * DENIALS_PER_SECOND).min(DENIALS_BURST)
    }
}

/// The audit log.
pub struct Audit {
    path: PathBuf,
    max_size: u64,
    file: Mutex<Option<(File, u64)>>,
    denials: Mutex<Denials>,
    lines: broadcast::Sender<String>,
}

impl Audit {
    /// The log at `path`, rotated past `max_size` bytes (at least [`MAX_LINE`], so a line
    /// always fits); the file is opened (created 0600) now, so that a bad path is an error at
    /// start rather than a silent gap.
    pub fn open(path: PathBuf, max_size: u64) -> io::Result<Self> {
        let file = open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            max_size: max_size.max(MAX_LINE as u64),
            file: Mutex::new(Some((file, size))),
            denials: Mutex::default(),
            lines: broadcast::channel(1024).0,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `decision` as one line of at most [`MAX_LINE`] bytes, unless it is a denial
    /// over its plugin's throttle (then it is counted, and the plugin's next line says how
    /// many were left out). A failure to write is logged, never hidden from the operator, and
    /// never fails the call it records.
    pub fn record(&self, decision: &Decision<'_>) {
        let admitted = self
            .denials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(decision, Instant::now());
        let Some(left_out) = admitted else {
            return;
        };
        let mut line = Vec::with_capacity(512);
        if serde_json::to_writer(&mut line, &Line { decision, left_out }).is_err() {
            return;
        }
        line.push(b'\n');
        // The fields' shares add up to less than MAX_LINE (tested): this never fires.
        debug_assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
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
        // Rotate before a line would pass the bound: the file never holds more than
        // max_size (a line is at most MAX_LINE <= max_size), the two files never more than
        // twice it.
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

    /// The lines kept, the rotated file's then the current one's, as they are now: both files
    /// are opened and measured at once, so a rotation while they are read loses nothing and a
    /// line written meanwhile is not read (a follower gets it from [`Audit::subscribe`]).
    /// Read a line at a time; a line over [`MAX_LINE`] (an older version wrote such) is
    /// replaced by a note.
    pub fn kept(&self) -> Kept {
        let _file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let files = [rotated(&self.path), self.path.clone()]
            .iter()
            .filter_map(|p| open_plain(p).ok())
            .filter_map(|f| {
                let len = f.metadata().ok()?.len();
                Some(BufReader::new(f.take(len)))
            })
            .collect();
        Kept { files }
    }

    /// [`Audit::kept`], gathered.
    pub fn lines(&self) -> Vec<String> {
        self.kept().collect()
    }

    /// New lines from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.lines.subscribe()
    }
}

/// The kept lines, read one at a time ([`Audit::kept`]).
pub struct Kept {
    files: std::collections::VecDeque<BufReader<io::Take<File>>>,
}

impl Iterator for Kept {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            let file = self.files.front_mut()?;
            match read_line(file) {
                Ok(Some(line)) => return Some(line),
                Ok(None) | Err(_) => {
                    self.files.pop_front();
                }
            }
        }
    }
}

/// The next line of `file` without its newline; one over [`MAX_LINE`] is skipped without
/// being held and a note stands in for it. `None` at the end.
fn read_line(file: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut length = 0usize;
    loop {
        let available = file.fill_buf()?;
        if available.is_empty() {
            if length == 0 {
                return Ok(None);
            }
            break;
        }
        let (chunk, newline) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (&available[..at], true),
            None => (available, false),
        };
        length += chunk.len();
        if length < MAX_LINE {
            line.extend_from_slice(chunk);
        }
        let used = chunk.len() + usize::from(newline);
        file.consume(used);
        if newline {
            break;
        }
    }
    if length >= MAX_LINE {
        let note = serde_json::json!({
            "note": format!(
                "a line of {length} bytes is left out here: over the {MAX_LINE}-byte bound of \
                 a line (an older mesh wrote it)"
            )
        });
        return Ok(Some(note.to_string()));
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
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

/// Opens for reading, refusing what [`open`] refuses.
fn open_plain(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    check(path, &file)?;
    Ok(file)
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
    use std::{os::unix::fs::PermissionsExt, time::Duration};

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

    fn parsed(line: &str) -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    #[test]
    fn lines_are_json_rotated_once_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(path.clone(), 4096).unwrap();
        audit.record(&decision("file-0"));
        // Followers get the lines written after they subscribe, as written.
        let mut follower = audit.subscribe();
        for i in 1..60 {
            audit.record(&Decision {
                allowed: true,
                ..decision(&format!("file-{i}"))
            });
        }
        let followed = parsed(&follower.try_recv().unwrap());
        assert_eq!(followed["resource"], "file-1");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(rotated(&path).exists());
        let lines = audit.lines();
        let last = parsed(lines.last().unwrap());
        assert_eq!(last["resource"], "file-59");
        assert_eq!(last["allowed"], true);
        // Bounded: the two files hold at most twice the bound.
        let total = size(&path) + size(&rotated(&path));
        assert!(total <= 2 * 4096, "{total}");
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

    #[test]
    fn excerpts_are_cut_on_a_char_boundary_within_their_budget_and_say_so() {
        assert_eq!(excerpt("plain/path.txt", 512), "plain/path.txt");
        for text in [
            "é".repeat(1000),
            "\u{1}".repeat(1000),
            "\"\\".repeat(1000),
            "a".repeat(4_000_000),
        ] {
            let cut = excerpt(&text, 512);
            let escaped = serde_json::to_string(&cut).unwrap();
            assert!(
                escaped.len() - 2 <= 512,
                "{} bytes: {escaped}",
                escaped.len()
            );
            assert!(
                cut.ends_with(&format!("…[cut: {} bytes]", text.len())),
                "{cut}"
            );
            assert!(text.starts_with(cut.split('…').next().unwrap()));
        }
    }

    #[test]
    fn every_field_is_cut_to_its_share_and_a_line_never_passes_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path().join("audit.log"), DEFAULT_MAX_SIZE).unwrap();
        // The worst a field can be: long, and made of what JSON escapes most (6 bytes each).
        let huge = "\u{1}\"".repeat(2_000_000);
        audit.record(&Decision {
            time: huge.clone(),
            plugin: &huge,
            instance: &huge,
            pid: u32::MAX,
            action: &huge,
            resource: &huge,
            allowed: true,
            reason: &huge,
            via: Some(Via::Direct { reported_by: &huge }),
        });
        // A denied Stat of a 4,000,000-byte path (finding 7): one short line.
        let path = "a".repeat(4_000_000);
        audit.record(&Decision {
            via: Some(Via::Router),
            ..decision(&path)
        });
        let written = std::fs::read_to_string(audit.path()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 2);
        for line in &lines {
            assert!(line.len() < MAX_LINE, "{} bytes", line.len());
        }
        let first = parsed(lines[0]);
        assert_eq!(first["via"], "direct");
        assert!(
            first["reported_by"]
                .as_str()
                .unwrap()
                .ends_with("[cut: 4000000 bytes]")
        );
        let second = parsed(lines[1]);
        let resource = second["resource"].as_str().unwrap();
        assert!(resource.len() <= RESOURCE_BYTES, "{}", resource.len());
        assert!(resource.ends_with("…[cut: 4000000 bytes]"), "{resource}");
        assert_eq!(second["via"], "router");
        assert!(second.get("reported_by").is_none());
    }

    #[test]
    fn huge_lines_rotate_within_twice_the_bound_and_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let bound = 64 << 10;
        let audit = Audit::open(path.clone(), bound).unwrap();
        let path_of = |i: usize| format!("{i}-{}", "x".repeat(1 << 20));
        for i in 0..100 {
            let resource = path_of(i);
            audit.record(&Decision {
                allowed: true,
                reason: &resource,
                ..decision(&resource)
            });
            assert!(size(&path) <= bound, "{}", size(&path));
            assert!(size(&rotated(&path)) <= bound);
        }
        let lines = audit.lines();
        assert!(lines.len() > 16, "{}", lines.len());
        let last = parsed(lines.last().unwrap());
        assert!(last["resource"].as_str().unwrap().starts_with("99-x"));
    }

    #[test]
    fn denials_are_throttled_per_plugin_and_the_next_line_counts_those_left_out() {
        let mut denials = Denials::default();
        let start = Instant::now();
        let denied = decision("x");
        let other = Decision {
            plugin: "q",
            ..decision("x")
        };
        let allowed = Decision {
            allowed: true,
            ..decision("x")
        };
        // A burst, then nothing within the same instant: counted.
        let burst = DENIALS_BURST as usize;
        for _ in 0..burst {
            assert_eq!(denials.admit(&denied, start), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(denials.admit(&denied, start), None);
        }
        // Another plugin has its own burst; an allowed line is always written, and it says
        // how many denials of its plugin were left out.
        assert_eq!(denials.admit(&other, start), Some(0));
        assert_eq!(denials.admit(&allowed, start), Some(1000));
        assert_eq!(denials.admit(&denied, start), None);
        // A second later, one more denial is written, counting the one left out since.
        let later = start + Duration::from_secs(1);
        assert_eq!(denials.admit(&denied, later), Some(1));
        assert_eq!(denials.admit(&denied, later), None);
        // A plugin never refused is never tracked.
        assert_eq!(
            denials.admit(
                &Decision {
                    plugin: "r",
                    ..allowed
                },
                later
            ),
            Some(0)
        );
        assert!(!denials.by_plugin.contains_key("r"));
    }

    #[test]
    fn a_denial_flood_leaves_the_history_and_other_plugins_lines_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path().join("audit.log"), 1 << 20).unwrap();
        audit.record(&Decision {
            plugin: "earlier",
            allowed: true,
            ..decision("history")
        });
        let path = "a".repeat(100_000);
        let started = Instant::now();
        for _ in 0..2_000 {
            audit.record(&decision(&path));
        }
        let seconds = started.elapsed().as_secs() as usize;
        audit.record(&Decision {
            plugin: "other",
            allowed: true,
            ..decision("served")
        });
        let lines: Vec<_> = audit.lines().iter().map(|l| parsed(l)).collect();
        assert_eq!(lines[0]["resource"], "history");
        assert_eq!(lines.last().unwrap()["resource"], "served");
        let flood = lines.iter().filter(|l| l["plugin"] == "p").count();
        assert!(
            flood <= DENIALS_BURST as usize + seconds + 1,
            "{flood} lines in {seconds} s"
        );
        assert!(size(audit.path()) < 64 << 10, "{}", size(audit.path()));
    }

    #[test]
    fn a_line_over_the_bound_left_by_an_older_version_is_read_as_a_note() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let old = format!(
            "{{\"resource\":\"before\"}}\n{{\"resource\":\"{}\"}}\n{{\"resource\":\"after\"}}\n",
            "y".repeat(16 << 20)
        );
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(old.as_bytes())
            .unwrap();
        let audit = Audit::open(path, DEFAULT_MAX_SIZE).unwrap();
        let lines: Vec<_> = audit.kept().collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(parsed(&lines[0])["resource"], "before");
        let note = parsed(&lines[1]);
        assert!(
            note["note"]
                .as_str()
                .unwrap()
                .contains(&format!("a line of {} bytes", (16 << 20) + 15)),
            "{note}"
        );
        assert_eq!(parsed(&lines[2])["resource"], "after");
        assert!(lines.iter().all(|l| l.len() < MAX_LINE));
    }
}
