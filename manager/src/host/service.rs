//! `mesh.v1.Host`: files beneath the plugin's root and the host's environment, for plugin
//! callers only (the router's policy refuses everyone else before this runs; the caller is
//! checked again here). Each call: who (fixed per connection by the kernel), a slot of the
//! plugin's share of the host's threads ([`Pool`]), one load of the plugin's policy, one check,
//! one audit line, then the operation through the root's `Dir` on the pool, under a deadline.
//!
//! Nothing here waits on what a plugin controls: files are opened non-blocking and refused
//! unless regular (or a directory, to list), so a FIFO, a device or a socket in a root never
//! holds a thread; a stream reads its next chunk only once the client took the last one.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use cap_std::fs::{Dir, File, FileTypeExt, MetadataExt, OpenOptions, OpenOptionsExt};
use futures_util::Stream;
use mesh_proto::mesh::v1::{
    DeleteFileRequest, DeleteFileResponse, DirEntry, FileChunk, FileKind, GetEnvRequest,
    GetEnvResponse, ReadDirRequest, ReadDirResponse, ReadFileRequest, ReadFileResponse,
    StatRequest, StatResponse, WriteFileRequest, WriteFileResponse, host_server,
};
use mesh_router::Caller;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{
    Audit, Policies,
    audit::Decision,
    caps::{Action, Policy},
    fs::{Roots, normalize},
    pool::{OP_DEADLINE, Pool, Slot, Unanswered},
};

/// The largest file ReadFile answers whole: its answer must fit gRPC's default 4 MiB message
/// limit, which generated clients decode with. ReadFileStream has no limit.
pub const MAX_READ: u64 = (4 << 20) - 1024;
/// The largest chunk ReadFileStream sends.
pub const CHUNK: usize = 64 << 10;
/// The most entries a ReadDir answers.
pub const MAX_DIR_ENTRIES: usize = 10_000;
/// The most bytes of names a ReadDir answers: with [`MAX_DIR_ENTRIES`] names of 255 bytes the
/// answer would pass gRPC's default 4 MiB message limit, so names are bounded on their own.
pub const MAX_DIR_BYTES: usize = 2 << 20;

/// `mesh.v1.Host` over the plugins' policies, roots and the audit log.
#[derive(Clone)]
pub struct HostService {
    policies: Arc<Policies>,
    roots: Arc<Roots>,
    audit: Arc<Audit>,
    pool: Pool,
}

/// The plugin instance a call comes from.
struct Who {
    plugin: Arc<str>,
    instance: Arc<str>,
    pid: u32,
}

/// A call that passed its check: the policy it passed and the normalized resource, with the
/// plugin's slot it holds until its answer is sent, and its deadline.
struct Allowed {
    policy: Arc<Policy>,
    resource: String,
    who: Who,
    action: Action,
    slot: Slot,
    deadline: Instant,
}

/// Why a file operation failed: the system call's error, or what host services refuse to
/// touch.
#[derive(Debug)]
enum OpError {
    Io(io::Error),
    /// Not a regular file (or, for ReadDir, not a directory): its kind.
    Kind(&'static str),
    /// A regular file with more than one name.
    Linked(u64),
    /// Over ReadFile's bound: its size.
    TooLarge(u64),
    /// Over ReadDir's bounds.
    TooManyEntries,
}

impl From<io::Error> for OpError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

impl HostService {
    /// Serves `policies`, recording decisions in `audit`.
    pub fn new(policies: Arc<Policies>, audit: Arc<Audit>) -> Self {
        Self {
            policies,
            roots: Arc::default(),
            audit,
            pool: Pool::default(),
        }
    }

    /// The tonic service, for the router: each answer holds its plugin's slot until it is
    /// sent or dropped.
    pub fn into_server(self) -> super::pool::Bounded<host_server::HostServer<Self>> {
        super::pool::Bounded::new(host_server::HostServer::new(self))
    }

    fn record(&self, who: &Who, action: Action, resource: &str, allowed: bool, reason: &str) {
        self.audit.record(&Decision {
            time: Decision::now(),
            plugin: &who.plugin,
            instance: &who.instance,
            pid: who.pid,
            action: action.as_str(),
            resource,
            allowed,
            reason,
            via: None,
        });
    }

    /// Who is calling, what they ask, and whether their plugin's policy allows it: the one
    /// place a host call is decided, and logged. A plugin over its bound of open operations is
    /// refused first, unlogged: the log records decisions on capabilities, and a flood of
    /// refusals must not flood it.
    fn decide<T>(
        &self,
        request: &Request<T>,
        action: Action,
        resource: &str,
    ) -> Result<Allowed, Status> {
        let who = match request.extensions().get::<Caller>() {
            Some(Caller::Plugin {
                plugin,
                instance,
                pid,
                ..
            }) => Who {
                plugin: plugin.clone(),
                instance: instance.clone(),
                pid: *pid,
            },
            other => {
                let caller =
                    other.map_or_else(|| "an unknown caller".to_owned(), |c| c.to_string());
                return Err(Status::permission_denied(format!(
                    "host services are for managed plugins only, and {caller} is none"
                )));
            }
        };
        let slot = self
            .pool
            .admit(&who.plugin)
            .map_err(|busy| Status::resource_exhausted(busy.to_string()))?;
        let deadline = Instant::now() + deadline(request.metadata());
        let deny = |resource: &str, reason: String| {
            self.record(&who, action, resource, false, &reason);
            Err(Status::permission_denied(reason))
        };
        let Some(policy) = self.policies.get(&who.plugin) else {
            let reason = format!("plugin {:?} has no capabilities configured", who.plugin);
            return deny(resource, reason);
        };
        let resource = match action {
            Action::GetEnv => resource.to_owned(),
            _ => match normalize(resource) {
                Ok(path) => path,
                Err(reason) => return deny(resource, format!("plugin {:?}: {reason}", who.plugin)),
            },
        };
        match policy.check(action, &resource) {
            Ok(reason) => self.record(&who, action, &resource, true, &reason),
            Err(reason) => return deny(&resource, reason),
        }
        Ok(Allowed {
            policy,
            resource,
            who,
            action,
            slot,
            deadline,
        })
    }

    /// Runs a file operation on the plugin's root, on the host services' pool, under the
    /// call's slot and deadline.
    async fn on_root<T: Send + 'static>(
        &self,
        allowed: &Allowed,
        op: impl FnOnce(&Dir, &str) -> Result<T, OpError> + Send + 'static,
    ) -> Result<T, Status> {
        let roots = self.roots.clone();
        let root = allowed.policy.root.clone();
        let resource = allowed.resource.clone();
        let done = self
            .pool
            .run(allowed.slot.clone(), allowed.deadline, move || {
                roots.get(&root).map(|dir| op(&dir, &resource))
            })
            .await
            .map_err(|unanswered| {
                unanswered_status(allowed.action.as_str(), &allowed.resource, unanswered)
            })?;
        match done {
            Ok(done) => done.map_err(|error| self.status(allowed, error)),
            Err(error) => Err(Status::failed_precondition(format!(
                "plugin {:?}: its root {} cannot be opened: {error}",
                allowed.who.plugin,
                allowed.policy.root.display()
            ))),
        }
    }

    /// The answer to a failed operation.
    fn status(&self, allowed: &Allowed, error: OpError) -> Status {
        let path = &allowed.resource;
        let error = match error {
            OpError::Io(error) => error,
            OpError::Kind(kind) => {
                let wanted = match allowed.action {
                    Action::ReadDir => "a directory",
                    _ => "a regular file",
                };
                return Status::failed_precondition(format!(
                    "{path} is {kind}, not {wanted}: host services open regular files and \
                     list directories only, so that nothing a plugin makes in its root (a \
                     FIFO, a socket, a device) can hold a host thread"
                ));
            }
            OpError::Linked(links) => {
                return Status::failed_precondition(format!(
                    "{path} has {links} hard links: host services read and write files with \
                     one link only, so that a link made in the root reaches no file elsewhere; \
                     copy the file into the root instead"
                ));
            }
            OpError::TooLarge(size) => {
                return Status::failed_precondition(format!(
                    "{path}: {size} bytes, over ReadFile's {MAX_READ}; use ReadFileStream"
                ));
            }
            OpError::TooManyEntries => {
                return Status::resource_exhausted(format!(
                    "{path} holds more than ReadDir answers ({MAX_DIR_ENTRIES} entries or \
                     {MAX_DIR_BYTES} bytes of names): list a subdirectory, or Stat the names \
                     you know"
                ));
            }
        };
        let message = format!("{path}: {error}");
        match error.kind() {
            io::ErrorKind::NotFound => Status::not_found(message),
            io::ErrorKind::PermissionDenied => {
                // cap-std refuses whatever resolves outside the root: a symlink out, say.
                self.record(
                    &allowed.who,
                    allowed.action,
                    path,
                    false,
                    &format!("refused by the kernel beneath the root: {error}"),
                );
                Status::permission_denied(message)
            }
            io::ErrorKind::AlreadyExists => Status::already_exists(message),
            io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory => {
                Status::failed_precondition(message)
            }
            _ => Status::internal(message),
        }
    }
}

/// The answer to an operation that gave none.
fn unanswered_status(action: &str, path: &str, unanswered: Unanswered) -> Status {
    match unanswered {
        Unanswered::Expired(_) => Status::deadline_exceeded(format!(
            "{action} {path}: {unanswered} (the call's grpc-timeout, at most {OP_DEADLINE:?} for \
             a host operation)"
        )),
        Unanswered::Panicked => Status::internal(format!("{action} {path}: {unanswered}")),
    }
}

/// How long a call may take: its `grpc-timeout`, at most [`OP_DEADLINE`]. The router already
/// refused a malformed one.
fn deadline(metadata: &tonic::metadata::MetadataMap) -> Duration {
    metadata
        .get("grpc-timeout")
        .and_then(|value| mesh_router::parse_grpc_timeout(value.as_bytes()))
        .map_or(OP_DEADLINE, |asked| asked.min(OP_DEADLINE))
}

/// What a file's type is called in a refusal.
fn kind_name(file_type: cap_std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_file() {
        "a regular file"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "not a file"
    }
}

/// Opens `path` with `options` without waiting on it, and keeps it only if it is a regular file
/// with one link. `O_NONBLOCK`: opening a FIFO never waits for a writer (or reader); `O_NOCTTY`:
/// a terminal never becomes the manager's. The type is checked on the opened file (`fstat`),
/// not on the name before, so nothing can be swapped in between.
fn open_regular(dir: &Dir, path: &str, options: &mut OpenOptions) -> Result<File, OpError> {
    options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let file = match dir.open_with(path, options) {
        Ok(file) => file,
        // A socket (or a FIFO opened to write with no reader): say what it is.
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => {
            return Err(match dir.metadata(path) {
                Ok(meta) if !meta.is_file() => OpError::Kind(kind_name(meta.file_type())),
                _ => OpError::Io(error),
            });
        }
        Err(error) => return Err(error.into()),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(OpError::Kind(kind_name(meta.file_type())));
    }
    // A hard link a plugin made in its root to a file elsewhere would be read and written as
    // the manager's uid: only files with one name are served (docs/security.md, Hard links).
    if meta.nlink() > 1 {
        return Err(OpError::Linked(meta.nlink()));
    }
    // O_NONBLOCK changes nothing for a regular file's reads and writes: it stays set.
    Ok(file)
}

fn kind(file_type: cap_std::fs::FileType) -> FileKind {
    if file_type.is_symlink() {
        FileKind::Symlink
    } else if file_type.is_dir() {
        FileKind::Dir
    } else if file_type.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

/// The entries of the directory `path`, sorted, or [`OpError::TooManyEntries`] past
/// [`MAX_DIR_ENTRIES`] or [`MAX_DIR_BYTES`]: reading stops there, so a huge directory costs no
/// more than the bound. Refused rather than cut short: `ReadDirResponse` has no field to say
/// it was cut, and a listing that looks whole but is not would mislead its caller.
fn list(dir: &Dir, path: &str) -> Result<Vec<DirEntry>, OpError> {
    let mut entries = Vec::new();
    let mut bytes = 0;
    // `read_dir` opens with O_DIRECTORY: a FIFO is refused (ENOTDIR) before it is opened.
    for entry in dir.read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        bytes += name.len();
        if entries.len() == MAX_DIR_ENTRIES || bytes > MAX_DIR_BYTES {
            return Err(OpError::TooManyEntries);
        }
        entries.push(DirEntry {
            name,
            kind: kind(entry.file_type()?) as i32,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Reads the next chunk of `file` (empty at its end), handing the file back.
fn next_chunk(mut file: File) -> (File, io::Result<Vec<u8>>) {
    use std::io::Read;
    let mut chunk = vec![0; CHUNK];
    let read = file.read(&mut chunk).map(|n| {
        chunk.truncate(n);
        chunk
    });
    (file, read)
}

/// Feeds a ReadFileStream: room in the channel first, then one chunk read on the pool, so a
/// client that does not read holds no thread and no more than the chunks already sent. The
/// whole stream keeps the call's `grpc-timeout` if it has one; each read, [`OP_DEADLINE`].
async fn produce(
    pool: Pool,
    slot: Slot,
    mut file: File,
    send: tokio::sync::mpsc::Sender<Result<FileChunk, Status>>,
    deadline: Option<Instant>,
    resource: String,
) {
    loop {
        let room = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, send.reserve()).await,
            None => Ok(send.reserve().await),
        };
        let room = match room {
            Ok(Ok(room)) => room,
            // The caller went away: stop reading.
            Ok(Err(_)) => return,
            Err(_) => {
                // Never end without saying so: the error waits for room too.
                if let Ok(room) = send.reserve().await {
                    room.send(Err(Status::deadline_exceeded(format!(
                        "read_file {resource}: the stream passed the call's grpc-timeout"
                    ))));
                }
                return;
            }
        };
        let read_by = Instant::now() + OP_DEADLINE;
        let read_by = deadline.map_or(read_by, |deadline| deadline.min(read_by));
        match pool
            .run(slot.clone(), read_by, move || next_chunk(file))
            .await
        {
            Ok((_, Ok(chunk))) if chunk.is_empty() => return,
            Ok((next, Ok(chunk))) => {
                room.send(Ok(FileChunk { data: chunk }));
                file = next;
            }
            Ok((_, Err(error))) => {
                room.send(Err(Status::internal(format!("{resource}: {error}"))));
                return;
            }
            Err(unanswered) => {
                room.send(Err(unanswered_status("read_file", &resource, unanswered)));
                return;
            }
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;

/// `response`, holding `slot` until it is sent (see [`super::pool::Bounded`]).
fn holding<T>(slot: Slot, message: T) -> Response<T> {
    let mut response = Response::new(message);
    response.extensions_mut().insert(slot);
    response
}

#[tonic::async_trait]
impl host_server::Host for HostService {
    async fn read_dir(
        &self,
        request: Request<ReadDirRequest>,
    ) -> Result<Response<ReadDirResponse>, Status> {
        let allowed = self.decide(&request, Action::ReadDir, &request.get_ref().path)?;
        let entries = self.on_root(&allowed, list).await?;
        Ok(holding(allowed.slot, ReadDirResponse { entries }))
    }

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<ReadFileResponse>, Status> {
        let allowed = self.decide(&request, Action::ReadFile, &request.get_ref().path)?;
        let data = self
            .on_root(&allowed, |dir, path| {
                use std::io::Read;
                let file = open_regular(dir, path, OpenOptions::new().read(true))?;
                let size = file.metadata()?.len();
                if size > MAX_READ {
                    return Err(OpError::TooLarge(size));
                }
                let mut data = Vec::with_capacity(size as usize);
                file.take(MAX_READ + 1).read_to_end(&mut data)?;
                Ok(data)
            })
            .await?;
        Ok(holding(allowed.slot, ReadFileResponse { data }))
    }

    type ReadFileStreamStream = ChunkStream;

    async fn read_file_stream(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let allowed = self.decide(&request, Action::ReadFile, &request.get_ref().path)?;
        let file = self
            .on_root(&allowed, |dir, path| {
                open_regular(dir, path, OpenOptions::new().read(true))
            })
            .await?;
        // The whole stream: the call's own grpc-timeout, uncapped (a large file takes long).
        let whole = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|value| mesh_router::parse_grpc_timeout(value.as_bytes()))
            .map(|timeout| Instant::now() + timeout);
        let (send, receive) = tokio::sync::mpsc::channel(1);
        tokio::spawn(produce(
            self.pool.clone(),
            allowed.slot.clone(),
            file,
            send,
            whole,
            allowed.resource.clone(),
        ));
        let stream: ChunkStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(receive));
        Ok(holding(allowed.slot, stream))
    }

    async fn write_file(
        &self,
        request: Request<WriteFileRequest>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let allowed = self.decide(&request, Action::WriteFile, &request.get_ref().path)?;
        let WriteFileRequest { data, append, .. } = request.into_inner();
        let written = self
            .on_root(&allowed, move |dir, path| {
                use std::io::Write;
                let mut options = OpenOptions::new();
                options.write(true).create(true).append(append);
                // Truncated only once it is known to be a regular file with one link.
                let mut file = open_regular(dir, path, &mut options)?;
                if !append {
                    file.set_len(0)?;
                }
                file.write_all(&data)?;
                Ok(data.len() as u64)
            })
            .await?;
        Ok(holding(allowed.slot, WriteFileResponse { written }))
    }

    async fn delete_file(
        &self,
        request: Request<DeleteFileRequest>,
    ) -> Result<Response<DeleteFileResponse>, Status> {
        let allowed = self.decide(&request, Action::DeleteFile, &request.get_ref().path)?;
        // Removing a name touches no file's contents: any kind, any number of links.
        self.on_root(&allowed, |dir, path| Ok(dir.remove_file(path)?))
            .await?;
        Ok(holding(allowed.slot, DeleteFileResponse {}))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let allowed = self.decide(&request, Action::Stat, &request.get_ref().path)?;
        // cap-std's `metadata` opens with O_PATH and calls fstat: a FIFO is not opened for
        // reading, so it never waits.
        let stat = self
            .on_root(&allowed, |dir, path| {
                let meta = dir.metadata(path)?;
                let modified = meta
                    .modified()
                    .map(|t| t.into_std())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                Ok(StatResponse {
                    kind: kind(meta.file_type()) as i32,
                    size: meta.len(),
                    modified_unix_ms: modified
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                    mode: cap_std::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
                })
            })
            .await?;
        Ok(holding(allowed.slot, stat))
    }

    async fn get_env(
        &self,
        request: Request<GetEnvRequest>,
    ) -> Result<Response<GetEnvResponse>, Status> {
        // Answered here, without the pool: reading the environment does not block.
        self.decide(&request, Action::GetEnv, &request.get_ref().name)?;
        let value = std::env::var_os(&request.get_ref().name);
        Ok(Response::new(GetEnvResponse {
            present: value.is_some(),
            value: value
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_capped_by_the_host_deadline() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(deadline(&metadata), OP_DEADLINE);
        metadata.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(deadline(&metadata), Duration::from_millis(250));
        metadata.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(deadline(&metadata), OP_DEADLINE);
        // A malformed one (the router refuses it before it gets here) is the host's own.
        for malformed in ["123456789S", "5x"] {
            metadata.insert("grpc-timeout", malformed.parse().unwrap());
            assert_eq!(deadline(&metadata), OP_DEADLINE, "{malformed}");
        }
    }

    fn root() -> (tempfile::TempDir, Dir) {
        let temp = tempfile::tempdir().unwrap();
        let dir = Dir::open_ambient_dir(temp.path(), cap_std::ambient_authority()).unwrap();
        (temp, dir)
    }

    #[test]
    fn a_fifo_a_socket_and_a_hard_link_are_refused_without_waiting() {
        let (temp, dir) = root();
        let fifo = temp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(temp.path().join("sock")).unwrap();
        std::fs::write(temp.path().join("one"), "one").unwrap();
        std::fs::write(temp.path().join("two"), "two").unwrap();
        std::fs::hard_link(temp.path().join("two"), temp.path().join("two-again")).unwrap();
        let read = || {
            let mut options = OpenOptions::new();
            options.read(true);
            options
        };
        // With no writer, a blocking open of the FIFO would never return: this test would hang.
        for (path, expected) in [
            ("fifo", "a FIFO"),
            ("sock", "a socket"),
            (".", "a directory"),
        ] {
            match open_regular(&dir, path, &mut read()) {
                Err(OpError::Kind(kind)) => assert_eq!(kind, expected, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        let mut write = OpenOptions::new();
        write.write(true).create(true);
        assert!(matches!(
            open_regular(&dir, "fifo", &mut write),
            Err(OpError::Kind("a FIFO"))
        ));
        assert!(matches!(
            open_regular(&dir, "two", &mut read()),
            Err(OpError::Linked(2))
        ));
        // A write through a link is refused before anything is truncated.
        assert!(matches!(
            open_regular(&dir, "two-again", &mut write),
            Err(OpError::Linked(2))
        ));
        assert_eq!(
            std::fs::read_to_string(temp.path().join("two")).unwrap(),
            "two"
        );
        assert!(open_regular(&dir, "one", &mut read()).is_ok());
    }

    #[test]
    fn a_listing_stops_at_its_bound() {
        let (temp, dir) = root();
        for i in 0..MAX_DIR_ENTRIES {
            std::fs::write(temp.path().join(format!("{i:05}")), "").unwrap();
        }
        assert_eq!(list(&dir, ".").unwrap().len(), MAX_DIR_ENTRIES);
        std::fs::write(temp.path().join("one-more"), "").unwrap();
        assert!(matches!(list(&dir, "."), Err(OpError::TooManyEntries)));
    }
}
