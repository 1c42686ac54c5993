//! Who is on the other end of a loopback TCP connection, as the kernel says: the uid that owns
//! the client's socket, from `/proc/net/tcp` and `/proc/net/tcp6` (what identd does). Any
//! local user can connect to a loopback port; this is how the admin listener tells its owner
//! from the strangers.

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

fn find(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (peer, local) = (hex(peer), hex(local));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (from, to, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (from.eq_ignore_ascii_case(&peer) && to.eq_ignore_ascii_case(&local))
            .then(|| uid.parse().ok())
            .flatten()
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
    }
}
