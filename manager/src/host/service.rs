//! `mesh.v1.Host`: files beneath the plugin's root and the host's environment, for plugin
//! callers only (the router's policy refuses everyone else before this runs; the caller is
//! checked again here). Each call: who (fixed per connection by the kernel), one load of the
//! plugin's policy, one check, one audit line, then the operation through the root's `Dir`.

use std::{io, pin::Pin, sync::Arc, time::SystemTime};

use cap_std::fs::{Dir, OpenOptions};
use futures_util::Stream;
use mesh_proto::mesh::v1::{
    DeleteFileRequest, DeleteFileResponse, DirEntry, FileChunk, FileKind, GetEnvRequest,
    GetEnvResponse, ReadDirRequest, ReadDirResponse, ReadFileRequest, ReadFileResponse,
    StatRequest, StatResponse, WriteFileRequest, WriteFileResponse, host_server,
};
use mesh_router::Caller;
use tonic::{Request, Response, Status};

use super::{
    Audit, Policies,
    audit::Decision,
    caps::{Action, Policy},
    fs::{Roots, normalize},
};

/// The largest file ReadFile answers whole: its answer must fit gRPC's default 4 MiB message
/// limit, which generated clients decode with. ReadFileStream has no limit.
pub const MAX_READ: u64 = (4 << 20) - 1024;
/// The largest chunk ReadFileStream sends.
pub const CHUNK: usize = 64 << 10;

/// `mesh.v1.Host` over the plugins' policies, roots and the audit log.
#[derive(Clone)]
pub struct HostService {
    policies: Arc<Policies>,
    roots: Arc<Roots>,
    audit: Arc<Audit>,
}

/// The plugin instance a call comes from.
struct Who {
    plugin: Arc<str>,
    instance: Arc<str>,
    pid: u32,
}

/// A call that passed its check: the policy it passed and the normalized resource.
struct Allowed {
    policy: Arc<Policy>,
    resource: String,
    who: Who,
    action: Action,
}

impl HostService {
    /// Serves `policies`, recording decisions in `audit`.
    pub fn new(policies: Arc<Policies>, audit: Arc<Audit>) -> Self {
        Self {
            policies,
            roots: Arc::default(),
            audit,
        }
    }

    /// The tonic service, for the router.
    pub fn into_server(self) -> host_server::HostServer<Self> {
        host_server::HostServer::new(self)
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
    /// place a host call is decided, and logged.
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
        })
    }

    /// Runs a file operation on the plugin's root, off the router's threads.
    async fn on_root<T: Send + 'static>(
        &self,
        allowed: Allowed,
        op: impl FnOnce(&Dir, &str) -> io::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let roots = self.roots.clone();
        let root = allowed.policy.root.clone();
        let resource = allowed.resource.clone();
        let done = tokio::task::spawn_blocking(move || {
            let dir = roots.get(&root).map_err(|e| (true, e))?;
            op(&dir, &resource).map_err(|e| (false, e))
        })
        .await
        .map_err(|_| Status::internal("the host operation panicked"))?;
        done.map_err(|(root, error)| {
            if root {
                return Status::failed_precondition(format!(
                    "plugin {:?}: its root {} cannot be opened: {error}",
                    allowed.who.plugin,
                    allowed.policy.root.display()
                ));
            }
            let message = format!("{}: {error}", allowed.resource);
            match error.kind() {
                io::ErrorKind::NotFound => Status::not_found(message),
                io::ErrorKind::PermissionDenied => {
                    // cap-std refuses whatever resolves outside the root: a symlink out, say.
                    self.record(
                        &allowed.who,
                        allowed.action,
                        &allowed.resource,
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
        })
    }
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

type ChunkStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;

#[tonic::async_trait]
impl host_server::Host for HostService {
    async fn read_dir(
        &self,
        request: Request<ReadDirRequest>,
    ) -> Result<Response<ReadDirResponse>, Status> {
        let allowed = self.decide(&request, Action::ReadDir, &request.get_ref().path)?;
        let entries = self
            .on_root(allowed, |dir, path| {
                let mut entries = Vec::new();
                for entry in dir.read_dir(path)? {
                    let entry = entry?;
                    entries.push(DirEntry {
                        name: entry.file_name().to_string_lossy().into_owned(),
                        kind: kind(entry.file_type()?) as i32,
                    });
                }
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(entries)
            })
            .await?;
        Ok(Response::new(ReadDirResponse { entries }))
    }

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<ReadFileResponse>, Status> {
        let allowed = self.decide(&request, Action::ReadFile, &request.get_ref().path)?;
        let data = self
            .on_root(allowed, |dir, path| {
                use std::io::Read;
                let file = dir.open(path)?;
                let size = file.metadata()?.len();
                if size > MAX_READ {
                    return Err(io::Error::other(format!(
                        "{size} bytes, over ReadFile's {MAX_READ}; use ReadFileStream"
                    )));
                }
                let mut data = Vec::with_capacity(size as usize);
                file.take(MAX_READ + 1).read_to_end(&mut data)?;
                Ok(data)
            })
            .await?;
        Ok(Response::new(ReadFileResponse { data }))
    }

    type ReadFileStreamStream = ChunkStream;

    async fn read_file_stream(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let allowed = self.decide(&request, Action::ReadFile, &request.get_ref().path)?;
        let file = self.on_root(allowed, |dir, path| dir.open(path)).await?;
        let (send, receive) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = file;
            loop {
                let mut chunk = vec![0; CHUNK];
                let message = match file.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => {
                        chunk.truncate(n);
                        Ok(FileChunk { data: chunk })
                    }
                    Err(error) => Err(Status::internal(error.to_string())),
                };
                let failed = message.is_err();
                // The caller went away: stop reading.
                if send.blocking_send(message).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receive),
        )))
    }

    async fn write_file(
        &self,
        request: Request<WriteFileRequest>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let allowed = self.decide(&request, Action::WriteFile, &request.get_ref().path)?;
        let WriteFileRequest { data, append, .. } = request.into_inner();
        let written = self
            .on_root(allowed, move |dir, path| {
                use std::io::Write;
                let mut options = OpenOptions::new();
                options.write(true).create(true);
                if append {
                    options.append(true);
                } else {
                    options.truncate(true);
                }
                let mut file = dir.open_with(path, &options)?;
                file.write_all(&data)?;
                Ok(data.len() as u64)
            })
            .await?;
        Ok(Response::new(WriteFileResponse { written }))
    }

    async fn delete_file(
        &self,
        request: Request<DeleteFileRequest>,
    ) -> Result<Response<DeleteFileResponse>, Status> {
        let allowed = self.decide(&request, Action::DeleteFile, &request.get_ref().path)?;
        self.on_root(allowed, |dir, path| dir.remove_file(path))
            .await?;
        Ok(Response::new(DeleteFileResponse {}))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let allowed = self.decide(&request, Action::Stat, &request.get_ref().path)?;
        let stat = self
            .on_root(allowed, |dir, path| {
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
        Ok(Response::new(stat))
    }

    async fn get_env(
        &self,
        request: Request<GetEnvRequest>,
    ) -> Result<Response<GetEnvResponse>, Status> {
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
