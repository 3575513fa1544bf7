//! The process's limit on open file descriptors.
//!
//! Every upload and download of the DS holds its blob file open (a download
//! two descriptors of it, one per read in flight), so the limits on
//! transfers need more descriptors than the soft limit many systems start a
//! service with (1,024). The hard limit is the one the administrator set;
//! the soft one is only a default, and a process may raise it that far.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Where the soft limit is raised to when the hard one is unlimited: Linux
/// refuses more than `fs.nr_open`, whose default this is.
const UNLIMITED_TARGET: u64 = 1 << 20;

/// Raises the soft limit on open file descriptors to the hard limit and
/// returns the soft limit now in force (`u64::MAX` for unlimited). If the
/// system refuses, the limit stays as it was and that is returned.
pub fn raise_open_files() -> u64 {
    let now = getrlimit(Resource::Nofile);
    let Some(soft) = now.current else {
        return u64::MAX;
    };
    let target = now.maximum.unwrap_or(UNLIMITED_TARGET).max(soft);
    if target == soft {
        return soft;
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: now.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => target,
        Err(_) => soft,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let before = getrlimit(Resource::Nofile);
        let now = raise_open_files();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.current.unwrap_or(u64::MAX), now);
        assert_eq!(after.maximum, before.maximum, "the hard limit is untouched");
        assert!(now >= before.current.unwrap_or(u64::MAX));
        if let Some(hard) = before.maximum {
            assert_eq!(now, hard, "raised all the way");
        }
    }
}
