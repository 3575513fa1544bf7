//! Why the DS could not start or load its state: what it was doing, and
//! why that failed.

use std::fmt::Display;

/// A failure while starting: what was being done, and why it failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(String);

impl StartError {
    /// A failure described by `message` alone.
    pub fn msg(message: impl Into<String>) -> Self {
        StartError(message.into())
    }
}

/// Says what was being done when an error happened.
pub trait Context<T> {
    /// The error, behind `what` was being done.
    fn context(self, what: &str) -> Result<T, StartError>;
    /// [`Context::context`], with the description made only on failure.
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, StartError>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, StartError> {
        self.map_err(|e| StartError(format!("{what}: {e}")))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, StartError> {
        self.map_err(|e| StartError(format!("{}: {e}", what())))
    }
}
