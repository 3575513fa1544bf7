//! File and socket plumbing that the delivery service and the client share:
//! blob files written and read without the page cache ([`blob`]), small
//! files replaced atomically ([`atomic`]), buffers reused once the bytes
//! handed on from them are dropped ([`pool`]), UDP sockets sized for bulk
//! transfers ([`socket`]), the limit on open files ([`limits`]). No
//! protocol logic lives here.

pub mod atomic;
pub mod blob;
pub mod limits;
pub mod pool;
pub mod socket;

pub use atomic::write_atomically;
pub use blob::{BlobFile, BlobReader, Mode, SyncPace};
pub use limits::raise_open_files;
pub use pool::{BufPool, PoolBuf};
pub use socket::{udp_socket, SOCKET_BUFFER};
