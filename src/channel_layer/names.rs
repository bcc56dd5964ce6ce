use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
};

use super::error::{InvalidName, NameKind};

/// Names must be shorter than this (Django's `MAX_NAME_LENGTH`).
pub const MAX_NAME_LENGTH: usize = 100;

fn valid_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')
}

fn check(kind: NameKind, name: &str, allow_bang: bool) -> Result<(), InvalidName> {
    let fail = |reason| {
        Err(InvalidName {
            kind,
            name: name.chars().take(MAX_NAME_LENGTH + 20).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() >= MAX_NAME_LENGTH {
        return fail("must be shorter than 100 characters");
    }
    let (head, tail) = match name.split_once('!') {
        Some((h, t)) if allow_bang => (h, Some(t)),
        Some(_) => return fail("may only contain ASCII letters, digits, '-', '_' and '.'"),
        None => (name, None),
    };
    if head.is_empty() {
        return fail("must not start with '!'");
    }
    if !head.bytes().all(valid_char) || !tail.unwrap_or("").bytes().all(valid_char) {
        return fail(if allow_bang {
            "may only contain ASCII letters, digits, '-', '_', '.' and one '!'"
        } else {
            "may only contain ASCII letters, digits, '-', '_' and '.'"
        });
    }
    Ok(())
}

/// Checks a channel name against Django Channels' rules.
///
/// ```
/// use tower_channels::channel_layer::validate_channel_name;
///
/// assert!(validate_channel_name("thumbnails").is_ok());
/// assert!(validate_channel_name("specific.a1b2!7").is_ok());
/// assert!(validate_channel_name("no spaces").is_err());
/// ```
pub fn validate_channel_name(name: &str) -> Result<(), InvalidName> {
    check(NameKind::Channel, name, true)
}

/// Checks a group name against Django Channels' rules.
///
/// ```
/// use tower_channels::channel_layer::validate_group_name;
///
/// assert!(validate_group_name("chat_lobby").is_ok());
/// assert!(validate_group_name("chat/lobby").is_err());
/// assert!(validate_group_name(&"x".repeat(100)).is_err());
/// ```
pub fn validate_group_name(name: &str) -> Result<(), InvalidName> {
    check(NameKind::Group, name, false)
}

/// A random 64-bit value from the standard library's per-process hash keys
/// (no extra dependency; uniqueness, not secrecy, is what names need).
pub(crate) fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// A random token of lowercase letters and digits for channel name prefixes.
pub(crate) fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    let mut bits = random_u64();
    for i in 0..len {
        if i % 10 == 9 {
            bits = random_u64();
        }
        out.push(ALPHABET[(bits % 36) as usize] as char);
        bits /= 36;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn django_rules() {
        assert!(validate_group_name("chat_room-1.x").is_ok());
        assert!(validate_group_name("").is_err());
        assert!(validate_group_name("a!b").is_err());
        assert!(validate_group_name("ü").is_err());
        assert!(validate_group_name(&"a".repeat(99)).is_ok());
        assert!(validate_channel_name("a!").is_ok());
        assert!(validate_channel_name("!a").is_err());
        assert!(validate_channel_name("a!b!c").is_err());
        let err = validate_group_name("bad name").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid group name \"bad name\": may only contain ASCII letters, digits, '-', '_' and '.'"
        );
    }

    #[test]
    fn tokens_are_valid_and_differ() {
        let a = random_token(12);
        let b = random_token(12);
        assert_eq!(a.len(), 12);
        assert_ne!(a, b);
        assert!(validate_channel_name(&a).is_ok());
    }
}
