//! Who holds the other end of a loopback TCP connection, as the kernel says: the client
//! socket's row in `/proc/net/tcp` or `/proc/net/tcp6` (its uid and inode, what identd reads),
//! then the processes whose file descriptors name that inode.
//!
//! Any local process can dial a loopback port, plugins included: this is how the router (and
//! the admin listener) tells a plugin from the owner from another user on TCP, as
//! `SO_PEERCRED` does on the Unix socket. The lookup costs one read of the socket table and,
//! for [`holders`], one walk of that uid's processes' descriptors: once per connection, never
//! per call (`cost_of_a_loopback_lookup` below measures it).

use std::{
    fs,
    io::{self, BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
};

/// The most lines of a socket table read for one lookup: past it the row is taken as missing
/// (and the connection refused) rather than the accept held for an unbounded read.
const MAX_TABLE_LINES: usize = 1 << 20;

/// The most processes of the uid, and the most descriptors of theirs, [`holders`] looks at
/// for one lookup: past either the lookup fails (the connection is refused) rather than
/// taking unbounded time on a host with huge descriptor tables.
const MAX_PROCESSES: usize = 1 << 15;
const MAX_DESCRIPTORS: usize = 1 << 18;

/// The kernel's row for a client socket: who created it, and which socket it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    /// The uid the socket belongs to (the creating process's).
    pub uid: u32,
    /// The socket's inode: `socket:[INODE]` in its holders' `/proc/<pid>/fd`.
    pub inode: u64,
}

/// A process holding a socket, with its start time (in clock ticks since boot), so that a pid
/// reused after the scan is not taken for the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22.
    pub start: u64,
}

impl Holder {
    /// Whether the process that held the socket still runs as this pid.
    pub fn still_running(&self) -> bool {
        start_of(self.pid) == Some(self.start)
    }
}

/// Whether `ip` is a loopback address: 127.0.0.0/8, `::1`, or an IPv4 loopback address mapped
/// into IPv6 (`::ffff:127.0.0.1`, as a dual-stack listener sees IPv4 clients).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The uid owning the client socket `peer` connected to `local` (this side's address), if the
/// kernel lists it (it does while the connection is open). What the admin listener asks.
pub fn uid_of(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    socket_of(peer, local).ok().map(|owner| owner.uid)
}

/// The kernel's row for the client socket `peer` connected to `local`: the row whose local
/// address is `peer` and whose remote address is `local`, in `/proc/net/tcp` for IPv4 and
/// `/proc/net/tcp6` for IPv6. A v4-mapped peer (a dual-stack listener's IPv4 client) is looked
/// for in both: its socket is an IPv4 one, or an IPv6 one that dialed a mapped address.
pub fn socket_of(peer: SocketAddr, local: SocketAddr) -> io::Result<SocketOwner> {
    let unmapped = |addr: SocketAddr| match addr.ip() {
        IpAddr::V6(ip) => ip
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
        IpAddr::V4(_) => Some(addr),
    };
    let mut tables: Vec<(&str, SocketAddr, SocketAddr)> = Vec::with_capacity(2);
    match (peer.ip(), local.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => tables.push(("/proc/net/tcp", peer, local)),
        _ => {
            if let (Some(peer), Some(local)) = (unmapped(peer), unmapped(local)) {
                tables.push(("/proc/net/tcp", peer, local));
            }
            tables.push(("/proc/net/tcp6", mapped(peer), mapped(local)));
        }
    }
    for (table, peer, local) in tables {
        let file = fs::File::open(table)?;
        if let Some(found) = find(BufReader::new(file), peer, local)? {
            return Ok(found);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no socket {peer} connected to {local} in the kernel's socket table"),
    ))
}

/// `addr` as an IPv6 address (v4-mapped if it is IPv4).
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// The row of `table` (the text of `/proc/net/tcp` or `tcp6`) whose local address is `peer`
/// and remote address `local`. A listening socket (state `0A`) is never the client.
fn find(
    table: impl BufRead,
    peer: SocketAddr,
    local: SocketAddr,
) -> io::Result<Option<SocketOwner>> {
    let (peer, local) = (hex(peer), hex(local));
    for line in table.lines().skip(1).take(MAX_TABLE_LINES) {
        let line = line?;
        let mut fields = line.split_whitespace();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        let (Some(from), Some(to), Some(state)) = (fields.nth(1), fields.next(), fields.next())
        else {
            continue;
        };
        if !from.eq_ignore_ascii_case(&peer) || !to.eq_ignore_ascii_case(&local) || state == "0A" {
            continue;
        }
        let (uid, inode) = (fields.nth(3), fields.nth(1));
        let (Some(uid), Some(inode)) = (
            uid.and_then(|u| u.parse().ok()),
            inode.and_then(|i| i.parse().ok()),
        ) else {
            continue;
        };
        return Ok(Some(SocketOwner { uid, inode }));
    }
    Ok(None)
}

/// An address as `/proc/net/tcp*` writes it: the address in 32-bit words of host byte
/// order, then the port, in hex.
fn hex(addr: SocketAddr) -> String {
    let octets: Vec<u8> = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let mut out: String = octets
        .chunks_exact(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    out.push_str(&format!(":{:04X}", addr.port()));
    out
}

/// The processes of `uid` holding the socket `inode` (a descriptor whose link reads
/// `socket:[INODE]`): usually one; several after a fork or a descriptor passed on.
///
/// Only processes whose `/proc/<pid>` belongs to `uid` are looked at (the socket's uid is its
/// creator's; a process whose descriptors this process may not read is skipped). Fails past
/// [`MAX_PROCESSES`] or [`MAX_DESCRIPTORS`].
pub fn holders(inode: u64, uid: u32) -> io::Result<Vec<Holder>> {
    let link = format!("socket:[{inode}]");
    let (mut processes, mut descriptors) = (0usize, 0usize);
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Exited since the listing, or another uid's: not a holder we look for.
        if !entry.metadata().is_ok_and(|m| m.uid() == uid) {
            continue;
        }
        processes += 1;
        if processes > MAX_PROCESSES {
            return Err(bound("processes", MAX_PROCESSES, uid));
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds {
            let Ok(fd) = fd else { continue };
            descriptors += 1;
            if descriptors > MAX_DESCRIPTORS {
                return Err(bound("open descriptors", MAX_DESCRIPTORS, uid));
            }
            if fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == link.as_str()) {
                if let Some(start) = start_of(pid) {
                    found.push(Holder { pid, start });
                }
                break;
            }
        }
    }
    Ok(found)
}

fn bound(what: &str, max: usize, uid: u32) -> io::Error {
    io::Error::other(format!(
        "uid {uid} has more than {max} {what}: too many to find which process holds a \
         loopback connection's socket"
    ))
}

/// A process's start time (`/proc/<pid>/stat` field 22), `None` once it has exited.
fn start_of(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    // rest starts at field 3 (state): starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    fn table(rows: &[&str]) -> String {
        let mut text = HEADER.to_owned();
        for row in rows {
            text.push_str(row);
            text.push('\n');
        }
        text
    }

    fn lookup(text: &str, peer: &str, local: &str) -> Option<SocketOwner> {
        find(
            text.as_bytes(),
            peer.parse().unwrap(),
            local.parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn addresses_are_written_as_the_kernel_writes_them() {
        if cfg!(target_endian = "big") {
            return;
        }
        assert_eq!(hex("127.0.0.1:9876".parse().unwrap()), "0100007F:2694");
        assert_eq!(
            hex("[::1]:80".parse().unwrap()),
            "00000000000000000000000001000000:0050"
        );
        assert_eq!(
            hex("[::ffff:127.0.0.2]:443".parse().unwrap()),
            "0000000000000000FFFF00000200007F:01BB"
        );
    }

    #[test]
    fn finds_the_client_row_of_an_ipv4_connection() {
        if cfg!(target_endian = "big") {
            return;
        }
        let text = table(&[
            "   0: 0100007F:2694 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 11 1 0000000000000000 100 0 0 10 0",
            "   1: 0200007F:B249 0100007F:2694 01 00000000:00000000 00:00000000 00000000  1001        0 22 1 0000000000000000 20 4 30 10 -1",
            "   2: 0100007F:2694 0200007F:B249 01 00000000:00000000 00:00000000 00000000  1000        0 33 1 0000000000000000 20 4 30 10 -1",
        ]);
        assert_eq!(
            lookup(&text, "127.0.0.2:45641", "127.0.0.1:9876"),
            Some(SocketOwner {
                uid: 1001,
                inode: 22
            })
        );
        // The server's own row is not the client's, nor is a listener.
        assert_eq!(lookup(&text, "127.0.0.1:9876", "127.0.0.2:1"), None);
        assert_eq!(lookup(&text, "127.0.0.1:9876", "0.0.0.0:0"), None);
    }

    #[test]
    fn finds_the_client_row_of_ipv6_and_v4_mapped_connections() {
        if cfg!(target_endian = "big") {
            return;
        }
        let text = table(&[
            "   0: 00000000000000000000000001000000:D431 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000     0        0 44 1 0000000000000000 20 4 30 10 -1",
            "   1: 0000000000000000FFFF00000300007F:D432 0000000000000000FFFF00000100007F:1F90 01 00000000:00000000 00:00000000 00000000 65534        0 55 1 0000000000000000 20 4 30 10 -1",
        ]);
        assert_eq!(
            lookup(&text, "[::1]:54321", "[::1]:8080"),
            Some(SocketOwner { uid: 0, inode: 44 })
        );
        assert_eq!(
            lookup(&text, "[::ffff:127.0.0.3]:54322", "[::ffff:127.0.0.1]:8080"),
            Some(SocketOwner {
                uid: 65534,
                inode: 55
            })
        );
        assert_eq!(lookup(&text, "[::1]:54322", "[::1]:8080"), None);
    }

    #[test]
    fn a_short_or_garbled_row_is_skipped_not_a_panic() {
        let text = table(&["   0: 0100007F:2694", "garbage", ""]);
        assert_eq!(lookup(&text, "127.0.0.1:9876", "127.0.0.1:1"), None);
        let text = table(&[
            "   0: 0100007F:2694 0100007F:0001 01 00000000:00000000 00:00000000 00000000  notauid 0 x",
        ]);
        assert_eq!(lookup(&text, "127.0.0.1:9876", "127.0.0.1:1"), None);
    }

    #[test]
    fn loopback_includes_every_127_address_and_mapped_ones() {
        for ip in [
            "127.0.0.1",
            "127.0.0.2",
            "127.255.0.9",
            "::1",
            "::ffff:127.0.0.5",
        ] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "::ffff:10.0.0.1", "::", "0.0.0.0"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_real_loopback_connection_is_found_with_its_holder() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let owner = socket_of(peer, server.local_addr().unwrap()).unwrap();
        let own = nix::unistd::geteuid().as_raw();
        assert_eq!(owner.uid, own);
        assert_eq!(uid_of(peer, server.local_addr().unwrap()), Some(own));
        let holders = holders(owner.inode, own).unwrap();
        let me = std::process::id();
        assert_eq!(holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [me]);
        assert!(holders[0].still_running());
        // Once the client closes, its socket is gone from the table (or no longer ours).
        drop(client);
        drop(server);
    }

    #[test]
    fn a_dual_stack_listener_finds_its_ipv4_client() {
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else {
            return; // no IPv6 here
        };
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert!(is_loopback(peer.ip()), "{peer}");
        let owner = socket_of(peer, server.local_addr().unwrap()).unwrap();
        assert_eq!(owner.uid, nix::unistd::geteuid().as_raw());
        drop(client);
    }

    /// What one lookup costs: the socket table and the walk of this uid's descriptors, as the
    /// router does it per loopback connection. `cargo test -p mesh-router --lib
    /// cost_of_a_loopback_lookup -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement: run it by name"]
    fn cost_of_a_loopback_lookup() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let n = 200;
        let started = std::time::Instant::now();
        for _ in 0..n {
            socket_of(peer, local).unwrap();
        }
        let table = started.elapsed() / n;
        let started = std::time::Instant::now();
        for _ in 0..n {
            let owner = socket_of(peer, local).unwrap();
            assert_eq!(holders(owner.inode, uid).unwrap().len(), 1);
        }
        let whole = started.elapsed() / n;
        let rows = fs::read_to_string("/proc/net/tcp").unwrap().lines().count() - 1;
        let processes = fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count();
        println!(
            "loopback lookup: socket table {table:?}, with the holder walk {whole:?} \
             ({rows} rows in /proc/net/tcp, {processes} processes of uid {uid})"
        );
        drop(client);
    }
}
