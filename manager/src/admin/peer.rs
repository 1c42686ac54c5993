//! Who is on the other end of a loopback TCP connection, as the kernel says: the uid that owns
//! the client's socket, from `/proc/net/tcp` and `/proc/net/tcp6` (what identd does), and the
//! process holding that socket open (its inode, found among `/proc/<pid>/fd`). Any local user
//! can connect to a loopback port; this is how the admin listener tells its owner from the
//! strangers, and the owner's own processes from a plugin's.

use std::net::{IpAddr, SocketAddr};

/// The uid owning the local socket `peer` that is connected to `local`, if the kernel lists
/// it (it does while the connection is open).
pub(crate) fn uid_of(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let table = match peer.ip() {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    find(&text, peer, local)
}

/// The pid of a process holding open the local socket `peer` that is connected to `local`
/// (the first found: a socket shared across a fork is any of its holders'). One function, so
/// that a shared lookup (the router's, for its own loopback listener) can replace it.
pub(crate) fn pid_of(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let table = match peer.ip() {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    let inode = field(&text, peer, local, 9)?;
    let wanted = format!("socket:[{inode}]");
    // Newest processes first: a plugin's started after `mesh up` (and the test's) did.
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable_by(|a, b| b.cmp(a));
    pids.into_iter().find(|pid| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            // Gone, or not ours to read: then not a process this listener must tell apart.
            return false;
        };
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        })
    })
}

fn find(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    field(table, peer, local, 7)?.parse().ok()
}

/// Field `index` (7: uid, 9: inode) of the row of the socket `peer` connected to `local`.
fn field(table: &str, peer: SocketAddr, local: SocketAddr, index: usize) -> Option<&str> {
    let (peer, local) = (hex(peer), hex(local));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (from, to, value) = (fields.get(1)?, fields.get(2)?, fields.get(index)?);
        (from.eq_ignore_ascii_case(&peer) && to.eq_ignore_ascii_case(&local)).then_some(*value)
    })
}

/// An address as `/proc/net/tcp*` writes it: the address in 32-bit words of host byte
/// order, then the port, in hex.
fn hex(addr: SocketAddr) -> String {
    let words: Vec<u8> = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let mut out: String = words
        .chunks(4)
        .map(|word| {
            format!(
                "{:08X}",
                u32::from_ne_bytes([word[0], word[1], word[2], word[3]])
            )
        })
        .collect();
    out.push_str(&format!(":{:04X}", addr.port()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_client_socket_of_a_connection() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:2694 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1\n\
            1: 0100007F:B249 0100007F:2694 01 00000000:00000000 00:00000000 00000000  1001        0 2 1\n\
            2: 0100007F:2694 0100007F:B249 01 00000000:00000000 00:00000000 00000000  1000        0 3 1\n";
        let listener: SocketAddr = "127.0.0.1:9876".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:45641".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(find(table, client, listener), Some(1001));
            assert_eq!(find(table, listener, "127.0.0.1:1".parse().unwrap()), None);
        }
    }

    #[test]
    fn a_real_loopback_connection_is_ours() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let own = nix::unistd::geteuid().as_raw();
        assert_eq!(uid_of(peer, listener.local_addr().unwrap()), Some(own));
        assert_eq!(
            pid_of(peer, listener.local_addr().unwrap()),
            Some(std::process::id())
        );
    }
}
