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
///
/// The kernel is asked for that one socket over `sock_diag` netlink (tens of microseconds,
/// whatever the number of sockets on the host); where that socket family is unavailable, the
/// tables are read (their cost grows with the host's TCP hash table).
pub fn socket_of(peer: SocketAddr, local: SocketAddr) -> io::Result<SocketOwner> {
    match diag::lookup(peer, local) {
        Ok(Some(found)) => return Ok(found),
        Ok(None) => return Err(not_listed(peer, local)),
        Err(error) => tracing::debug!(%error, "sock_diag unavailable; reading /proc/net/tcp"),
    }
    socket_in_tables(peer, local)
}

fn not_listed(peer: SocketAddr, local: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no socket {peer} connected to {local} in the kernel's socket table"),
    )
}

/// [`socket_of`] from the text tables `/proc/net/tcp` and `/proc/net/tcp6`.
fn socket_in_tables(peer: SocketAddr, local: SocketAddr) -> io::Result<SocketOwner> {
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
    Err(not_listed(peer, local))
}

/// One TCP socket by its addresses, asked of the kernel over `NETLINK_SOCK_DIAG`
/// (`SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`: an exact lookup, `inet_diag_find_one_icsk`).
mod diag {
    use std::{
        io,
        net::{IpAddr, SocketAddr},
        os::fd::AsRawFd,
    };

    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        setsockopt, socket, sockopt::ReceiveTimeout,
    };

    use nix::sys::time::TimeVal;

    use super::SocketOwner;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const IPPROTO_TCP: u8 = 6;
    const TCP_LISTEN: u8 = 10;
    /// nlmsghdr (16) + inet_diag_req_v2 (56).
    const REQUEST_LEN: usize = 72;
    /// Where `inet_diag_msg`'s fields sit in the answer (after its 16-byte nlmsghdr).
    const STATE: usize = 17;
    const SPORT: usize = 20;
    const DPORT: usize = 22;
    const UID: usize = 80;
    const INODE: usize = 84;

    /// The socket whose local address is `peer` and remote address `local`: `Ok(None)` when
    /// the kernel has none (or only a listener); `Err` when it could not be asked.
    pub(super) fn lookup(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<SocketOwner>> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        // The kernel answers at once; a bound on the wait keeps a surprise from holding the
        // accept.
        setsockopt(&fd, ReceiveTimeout, &TimeVal::new(1, 0))?;
        sendto(
            fd.as_raw_fd(),
            &request(peer, local),
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut answer = [0u8; 1024];
        let len = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty())?;
        parse(&answer[..len], peer, local)
    }

    /// The request: family, TCP, every state, the socket's id (ports big-endian, addresses in
    /// network order, no interface, no cookie).
    pub(super) fn request(peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
        let v4 = peer.is_ipv4() && local.is_ipv4();
        let mut out = Vec::with_capacity(REQUEST_LEN);
        out.extend((REQUEST_LEN as u32).to_ne_bytes());
        out.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        out.extend(NLM_F_REQUEST.to_ne_bytes());
        out.extend(1u32.to_ne_bytes()); // sequence
        out.extend(0u32.to_ne_bytes()); // port id: the kernel fills it
        out.push(if v4 { 2 } else { 10 }); // AF_INET, AF_INET6
        out.push(IPPROTO_TCP);
        out.push(0); // no extensions
        out.push(0);
        out.extend(u32::MAX.to_ne_bytes()); // every state
        out.extend(peer.port().to_be_bytes());
        out.extend(local.port().to_be_bytes());
        out.extend(address(peer.ip(), v4));
        out.extend(address(local.ip(), v4));
        out.extend(0u32.to_ne_bytes()); // any interface
        out.extend([0xff; 8]); // INET_DIAG_NOCOOKIE
        out
    }

    /// 16 bytes: an IPv4 address then zeros, or an IPv6 one (IPv4 mapped when the other side
    /// of the request is IPv6; the kernel looks a mapped pair up as IPv4).
    fn address(ip: IpAddr, v4: bool) -> [u8; 16] {
        let mut out = [0u8; 16];
        match ip {
            IpAddr::V4(ip) if v4 => out[..4].copy_from_slice(&ip.octets()),
            IpAddr::V4(ip) => out = ip.to_ipv6_mapped().octets(),
            IpAddr::V6(ip) => out = ip.octets(),
        }
        out
    }

    /// The answer to [`request`]: one `inet_diag_msg`, or an error message (`ENOENT`: no
    /// such socket).
    pub(super) fn parse(
        answer: &[u8],
        peer: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<Option<SocketOwner>> {
        let u16_at = |at: usize| {
            answer
                .get(at..at + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            answer
                .get(at..at + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        let short = || io::Error::new(io::ErrorKind::InvalidData, "a short sock_diag answer");
        match u16_at(4).ok_or_else(short)? {
            NLMSG_ERROR => {
                // nlmsgerr: a negative errno, 0 for an acknowledgement.
                let errno = -(u32_at(16).ok_or_else(short)? as i32);
                if errno == nix::errno::Errno::ENOENT as i32 {
                    Ok(None)
                } else {
                    Err(io::Error::from_raw_os_error(errno))
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                let state = *answer.get(STATE).ok_or_else(short)?;
                let ports = (
                    u16_at(SPORT).map(u16::from_be),
                    u16_at(DPORT).map(u16::from_be),
                );
                // A listener found in place of the client, or any other socket: not it.
                if state == TCP_LISTEN || ports != (Some(peer.port()), Some(local.port())) {
                    return Ok(None);
                }
                let uid = u32_at(UID).ok_or_else(short)?;
                let inode = u32_at(INODE).ok_or_else(short)?;
                Ok(Some(SocketOwner {
                    uid,
                    inode: u64::from(inode),
                }))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an unexpected sock_diag answer (type {other})"),
            )),
        }
    }
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
    fn sock_diag_answers_are_read_and_a_listener_or_an_error_is_no_socket() {
        let (peer, local): (SocketAddr, SocketAddr) = (
            "127.0.0.2:40000".parse().unwrap(),
            "127.0.0.1:7700".parse().unwrap(),
        );
        // An inet_diag_msg after its nlmsghdr: state, ports, then uid and inode.
        let answer = |state: u8, sport: u16| {
            let mut out = vec![0u8; 16 + 72];
            out[4..6].copy_from_slice(&20u16.to_ne_bytes());
            out[17] = state;
            out[20..22].copy_from_slice(&sport.to_be_bytes());
            out[22..24].copy_from_slice(&7700u16.to_be_bytes());
            out[80..84].copy_from_slice(&65534u32.to_ne_bytes());
            out[84..88].copy_from_slice(&4242u32.to_ne_bytes());
            out
        };
        assert_eq!(
            diag::parse(&answer(1, 40000), peer, local).unwrap(),
            Some(SocketOwner {
                uid: 65534,
                inode: 4242
            })
        );
        assert_eq!(diag::parse(&answer(10, 40000), peer, local).unwrap(), None);
        assert_eq!(diag::parse(&answer(1, 40001), peer, local).unwrap(), None);
        let mut error = vec![0u8; 36];
        error[4..6].copy_from_slice(&2u16.to_ne_bytes());
        error[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        assert_eq!(diag::parse(&error, peer, local).unwrap(), None);
        error[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert!(diag::parse(&error, peer, local).is_err());
        assert!(diag::parse(&answer(1, 40000)[..50], peer, local).is_err());
        assert!(diag::parse(&[], peer, local).is_err());
        // The request is the kernel's 72 bytes, ports in network order.
        let request = diag::request(peer, local);
        assert_eq!(request.len(), 72);
        assert_eq!(&request[24..26], &40000u16.to_be_bytes());
        assert_eq!(&request[26..28], &7700u16.to_be_bytes());
        assert_eq!(&request[28..32], &[127, 0, 0, 2]);
        assert_eq!(&request[44..48], &[127, 0, 0, 1]);
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
        // Both ways of asking agree.
        let tables = socket_in_tables(peer, server.local_addr().unwrap()).unwrap();
        assert_eq!(tables, owner);
        assert_eq!(
            diag::lookup(peer, server.local_addr().unwrap()).unwrap(),
            Some(owner)
        );
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
        assert_eq!(
            socket_in_tables(peer, server.local_addr().unwrap()).unwrap(),
            owner
        );
        drop(client);
        // A socket nobody has: none, by either way of asking.
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            diag::lookup(nowhere, server.local_addr().unwrap()).unwrap(),
            None
        );
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
        let asked = started.elapsed() / n;
        let started = std::time::Instant::now();
        for _ in 0..n {
            socket_in_tables(peer, local).unwrap();
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
            "loopback lookup: sock_diag {asked:?}, /proc/net/tcp {table:?}, sock_diag and the \
             holder walk {whole:?} ({rows} rows in /proc/net/tcp, {processes} processes of uid \
             {uid})"
        );
        drop(client);
    }
}
