//! Which instance a local process belongs to: the router asks once per connection with the
//! pid `SO_PEERCRED` gave, and the answer comes from the kernel's process tree alone.
//!
//! A process belongs to an instance when it is the process the supervisor started for it or
//! descends from it (its `/proc/<pid>/stat` parent chain reaches it). Pids are reused: the
//! ancestor found must also have the start time (field 22 of `stat`) the supervisor read when
//! it started the instance, so a recycled pid is nobody's. In a PID namespace (`mesh __init`)
//! a process whose parent dies is adopted by the namespace's init, still beneath the instance;
//! without one it is adopted outside and is no longer that plugin (it is then known by its uid).

use mesh_router::PluginIdentity;

use super::Supervisor;

/// A process, known by its pid and start time so that a recycled pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    /// Its pid (as the host sees it).
    pub pid: u32,
    /// When it started, in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl Process {
    /// `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        stat(pid).map(|(_, start)| Self { pid, start })
    }
}

/// The deepest a process tree is followed: more than any plugin's own children need.
const MAX_DEPTH: usize = 64;

/// `(ppid, starttime)` of `pid`, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, starttime field 22.
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

impl Supervisor {
    /// The instance `pid` is, or descends from; `None` for any other process.
    pub fn identify(&self, pid: u32) -> Option<PluginIdentity> {
        let mut anchors = Vec::new();
        for slot in self.plugins().values() {
            let run = slot.run();
            for instance in &run.instances {
                let status = instance.status.borrow();
                if let Some(process) = status.process {
                    anchors.push((process, (run.config.name.clone(), status.id.clone())));
                }
            }
        }
        let (plugin, instance) = ancestor_in(pid, &anchors)?;
        Some(PluginIdentity {
            plugin: plugin.as_str().into(),
            instance: instance.as_str().into(),
        })
    }
}

/// What `anchors` pairs with the process `pid` is or descends from (following its parent chain
/// by `/proc/<pid>/stat`, each step matched by pid and start time); `None` for any other.
pub(crate) fn ancestor_in<T>(pid: u32, anchors: &[(Process, T)]) -> Option<&T> {
    if anchors.is_empty() {
        return None;
    }
    let mut current = pid;
    for _ in 0..MAX_DEPTH {
        let (ppid, start) = stat(current)?;
        if let Some((_, found)) = anchors
            .iter()
            .find(|(p, _)| p.pid == current && p.start == start)
        {
            return Some(found);
        }
        if ppid <= 1 {
            return None;
        }
        current = ppid;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_the_parent_and_start_time_whatever_the_name() {
        let me = std::process::id();
        let (ppid, start) = stat(me).unwrap();
        assert_eq!(ppid, std::os::unix::process::parent_id());
        assert!(start > 0);
        assert_eq!(Process::of(me), Some(Process { pid: me, start }));
        // A child whose name holds ") 1 2 (" still parses.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exec -a ') 1 2 (' sleep 5"])
            .spawn()
            .unwrap();
        let child_pid = child.id();
        let parsed = stat(child_pid);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(parsed.map(|(ppid, _)| ppid), Some(me));
    }
}
