//! Time as the DS reads it: milliseconds since the Unix epoch, through a
//! function the configuration carries, so that tests can set the time.

/// A wall clock in milliseconds since the Unix epoch.
pub type Clock = fn() -> u64;

/// The system's wall clock (0 if it is set before 1970).
pub fn system() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
