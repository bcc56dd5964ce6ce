//! Deleting every key that matches a pattern, for every layer on Redis
//! (the Redis and Redis Cluster layers' `flush`, the Django layers'): one
//! `SCAN` loop, `DEL` of each batch, wherever the keys are (one server, or
//! each primary of a cluster in turn).
//!
//! Built with the `redis` and with the `django` feature (declared by
//! `channel_layer`, so the Django layers have it without the `redis` one).

use redis::Cmd;

use crate::channel_layer::BoxFuture;

/// One `SCAN` step's answer: the next cursor (0 at the end) and a batch
/// of keys.
pub(crate) type ScanStep = (u64, Vec<Vec<u8>>);

/// Keys a `SCAN` walks: a server's, or one cluster primary's.
pub(crate) trait Keyspace: Sync {
    /// What a failed command gives.
    type Error;

    /// Runs the `SCAN` step `scan` there: the next cursor and a batch of keys.
    fn scan<'a>(&'a self, scan: &'a Cmd) -> BoxFuture<'a, Result<ScanStep, Self::Error>>;

    /// Runs `del`, a `DEL` of keys the scan found (a cluster connection
    /// routes each key to its slot's node).
    fn delete<'a>(&'a self, del: &'a Cmd) -> BoxFuture<'a, Result<(), Self::Error>>;
}

/// Deletes every key of `space` matching the glob `pattern` (escape
/// literal parts with [`escape_glob`]): `SCAN` 500 at a time, then `DEL`
/// of each batch. Keys written meanwhile may survive (`SCAN`'s guarantee:
/// keys present for the whole scan are returned).
pub(crate) async fn delete_matching<K: Keyspace>(space: &K, pattern: &str) -> Result<(), K::Error> {
    let mut cursor: u64 = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500);
        let (next, keys) = space.scan(&scan).await?;
        if !keys.is_empty() {
            let mut del = redis::cmd("DEL");
            del.arg(&keys);
            space.delete(&del).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// `s` with the glob characters of `SCAN ... MATCH` escaped.
pub(crate) fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escaping() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(escape_glob("tower-channels"), "tower-channels");
    }
}
