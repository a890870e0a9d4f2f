//! Process resource limits.
//!
//! The gateway holds one descriptor per peer connection, per lane and per context (the memfd it
//! hands out). 256 peers, a few hundred lanes and 10 000 contexts need more than the soft
//! `RLIMIT_NOFILE` many systems start processes with (1024), while the hard limit is usually far
//! higher. `knit gateway` raises its soft limit to the hard one at start; a program embedding
//! the gateway decides for itself (a library should not change its host's limits behind its
//! back).

use rustix::process::{getrlimit, setrlimit, Resource};
use std::io;

/// The soft and hard limits on open descriptors (`None`: unlimited).
pub fn nofile() -> (Option<u64>, Option<u64>) {
    let r = getrlimit(Resource::Nofile);
    (r.current, r.maximum)
}

/// Raises the soft limit on open descriptors to the hard limit. Returns the soft limit before
/// and after (`None`: unlimited).
pub fn raise_nofile() -> io::Result<(Option<u64>, Option<u64>)> {
    let mut r = getrlimit(Resource::Nofile);
    let before = r.current;
    if r.current != r.maximum {
        r.current = r.maximum;
        setrlimit(Resource::Nofile, r)?;
    }
    Ok((before, getrlimit(Resource::Nofile).current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_soft_limit_reaches_the_hard_one() {
        let (before, after) = raise_nofile().unwrap();
        let (soft, hard) = nofile();
        assert_eq!(soft, after);
        assert_eq!(soft, hard);
        // Never lowered.
        match (before, after) {
            (Some(b), Some(a)) => assert!(a >= b),
            (_, None) => {}
            (None, Some(_)) => panic!("an unlimited soft limit was lowered"),
        }
    }
}
