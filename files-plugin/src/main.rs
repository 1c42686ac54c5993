//! The file lister, an example of a plugin that reaches files and other plugins only through
//! the mesh: `files.v1.Files/Survey` lists a directory and reads a file through the host
//! services (`mesh.v1.Host`), writes a report through them, and calls `plugin.echo`. Each step
//! is checked against its capabilities (`read:`, `write:`, `call:`) and audited (`mesh
//! audit`); a step it lacks the capability for answers `PERMISSION_DENIED`, naming it.
//!
//! Run by `mesh up --config deploy/local.toml`; call it with
//! `grpcurl -plaintext -unix -authority plugin.files -d '{"dir":"docs"}' SOCKET files.v1.Files/Survey`.

use mesh::tonic::{Request, Response, Status};
use mesh_proto::{
    echo::v1::{EchoRequest, echo_client::EchoClient},
    mesh::v1::{FileKind, ReadDirRequest, ReadFileRequest, WriteFileRequest},
};

mesh::include_proto!("files.v1");

/// The service a plugin calls on the way.
const ECHO: &str = "plugin.echo";

/// The one service of this plugin.
struct Files;

#[mesh::tonic::async_trait]
impl files_server::Files for Files {
    async fn survey(
        &self,
        request: Request<SurveyRequest>,
    ) -> Result<Response<SurveyReply>, Status> {
        let SurveyRequest { dir, file } = request.into_inner();
        let dir = if dir.is_empty() { ".".to_owned() } else { dir };
        let mut host = mesh::plugin::host();

        let listed = host
            .read_dir(ReadDirRequest { path: dir.clone() })
            .await
            .map_err(|s| step(s, format!("listing {dir}")))?
            .into_inner()
            .entries;
        let entries: Vec<String> = listed
            .iter()
            .map(|e| match e.kind() {
                FileKind::Dir => format!("{}/", e.name),
                _ => e.name.clone(),
            })
            .collect();
        let file = match file.is_empty() {
            false => file,
            true => listed
                .iter()
                .find(|e| e.kind() == FileKind::File)
                .map(|e| join(&dir, &e.name))
                .ok_or_else(|| {
                    Status::failed_precondition(format!("{dir} holds no file to read"))
                })?,
        };
        let data = host
            .read_file(ReadFileRequest { path: file.clone() })
            .await
            .map_err(|s| step(s, format!("reading {file}")))?
            .into_inner()
            .data;
        let text = String::from_utf8_lossy(&data);
        let first_line = text.lines().next().unwrap_or("").to_owned();

        let summary = format!(
            "{dir}: {} entries; {file}: {} bytes, first line {first_line:?}",
            entries.len(),
            data.len()
        );
        let report = format!("reports/{}.txt", report_name(&dir));
        let body = format!("{summary}\n{}\n", entries.join("\n"));
        host.write_file(WriteFileRequest {
            path: report.clone(),
            data: body.into_bytes(),
            append: false,
        })
        .await
        .map_err(|s| step(s, format!("writing {report}")))?;

        // Through the mesh, under call:plugin.echo (the router checks it).
        let channel = mesh::connect(ECHO)
            .await
            .map_err(|e| Status::unavailable(format!("connecting to {ECHO}: {e}")))?;
        let echoed = EchoClient::new(channel)
            .echo(EchoRequest { message: summary })
            .await
            .map_err(|s| step(s, format!("calling {ECHO}")))?
            .into_inner();

        Ok(Response::new(SurveyReply {
            entries,
            file,
            first_line,
            file_bytes: data.len() as u64,
            report,
            echoed: echoed.message,
            echo_instance: echoed.instance,
        }))
    }
}

/// The host's answer for one step, with the step named (`reading private/notes.txt: plugin
/// "files" lacks read:…`); the code stays the host's.
fn step(status: Status, what: String) -> Status {
    Status::new(status.code(), format!("{what}: {}", status.message()))
}

fn join(dir: &str, name: &str) -> String {
    match dir.trim_end_matches('/') {
        "." | "" => name.to_owned(),
        dir => format!("{dir}/{name}"),
    }
}

/// `docs/guides` → `docs_guides`, `.` → `root`: one file name per directory surveyed.
fn report_name(dir: &str) -> String {
    let name: String = dir
        .trim_matches(['/', '.'])
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() || c == '-' {
            true => c,
            false => '_',
        })
        .collect();
    if name.is_empty() { "root".into() } else { name }
}

mesh::plugin::main!(files_server::FilesServer::new(Files));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_named_after_its_directory_and_stays_in_reports() {
        assert_eq!(report_name("docs"), "docs");
        assert_eq!(report_name("docs/guides/"), "docs_guides");
        assert_eq!(report_name("."), "root");
        assert_eq!(report_name("../etc"), "etc");
        assert_eq!(report_name("a b"), "a_b");
        assert_eq!(join(".", "x.md"), "x.md");
        assert_eq!(join("docs/", "x.md"), "docs/x.md");
    }
}
