//! File and socket plumbing that the delivery service and the client share:
//! blob files written and read without the page cache ([`blob`]), small
//! files replaced atomically ([`atomic`]), UDP sockets sized for bulk
//! transfers ([`socket`]). No protocol logic lives here.

pub mod atomic;
pub mod blob;
pub mod socket;

pub use atomic::write_atomically;
pub use blob::{BlobFile, BlobReader, Mode};
pub use socket::{udp_socket, SOCKET_BUFFER};
