//! Stream tokens: the secret every stream of one incoming migration presents in its
//! `Hello`, drawn by the destination at prepare and compared by its gate.

/// Random bytes in a stream token: a guess succeeds with probability 2^-256.
pub const STREAM_TOKEN_BYTES: usize = 32;

/// A fresh secret for the streams of one incoming migration: [`STREAM_TOKEN_BYTES`]
/// bytes from the OS's random source, hex encoded. Whoever holds it may write into the
/// destination VM's memory, so it is as strong as a key.
pub fn stream_token() -> Result<String, getrandom::Error> {
    let mut b = [0u8; STREAM_TOKEN_BYTES];
    getrandom::getrandom(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Whether a stream's token is the expected one, in time that does not depend on where
/// they differ (a byte-by-byte compare that stops early lets a caller find the token a
/// byte at a time by timing refusals). Lengths are not secret.
pub fn token_matches(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_tokens_are_32_random_bytes_and_compare_whole() {
        let a = stream_token().unwrap();
        let b = stream_token().unwrap();
        assert_eq!(a.len(), 2 * STREAM_TOKEN_BYTES);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(token_matches(&a, &a.clone()));
        // A wrong token of the right length, one differing only in its last byte, and
        // a prefix are all refused.
        assert!(!token_matches(&b, &a));
        let mut last = a.clone().into_bytes();
        last[2 * STREAM_TOKEN_BYTES - 1] ^= 1;
        assert!(!token_matches(std::str::from_utf8(&last).unwrap(), &a));
        assert!(!token_matches(&a[..10], &a));
        assert!(!token_matches("", &a));
    }
}
