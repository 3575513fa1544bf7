//! UDP sockets with buffers large enough for bulk QUIC transfers.

use std::net::SocketAddr;

/// UDP socket buffer size asked for (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). The default (about 200 KiB) drops
/// packets when a fast sender fills it between two reads, which QUIC then
/// takes for congestion.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with large send and receive buffers.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}
