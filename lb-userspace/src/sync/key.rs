//! The shared sync key (`--sync-key-file`) and the Noise pre-shared key derived from it.
//!
//! The key file is the only secret an operator manages: the same file on every node, at least
//! [`MIN_KEY_LEN`] bytes after trimming whitespace (`head -c 32 /dev/urandom | base64`). Noise
//! wants a 32-byte PSK, so the file's bytes go through HKDF-Extract (HMAC-SHA256 keyed with a
//! fixed label): any length in, 32 uniform bytes out, and the same file always gives the same
//! PSK. The label names the protocol version, so a later version that needs another key can
//! derive one from the same file without ever reusing this one.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::{fmt, path::Path, path::PathBuf};

/// HKDF-Extract's salt for the Noise PSK (see the module docs).
const PSK_LABEL: &[u8] = b"xlb-sync v2 noise psk";

/// Shortest accepted key, after trimming whitespace.
pub const MIN_KEY_LEN: usize = 16;
pub const PSK_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading sync key file {}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "sync key{} is {len} bytes after trimming whitespace; at least {MIN_KEY_LEN} are needed (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
        path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
    )]
    KeyTooShort { path: Option<PathBuf>, len: usize },
}

/// The shared sync key, kept only as the PSK derived from it.
#[derive(Clone)]
pub struct SyncKey {
    psk: [u8; PSK_LEN],
}

impl fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SyncKey(<redacted>)")
    }
}

impl SyncKey {
    /// Read the key from `path`. Leading and trailing whitespace is not part of the key (a
    /// trailing newline from `echo` or an editor must not change it).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            KeyError::KeyTooShort { len, .. } => KeyError::KeyTooShort {
                path: Some(path.to_path_buf()),
                len,
            },
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let key = bytes.trim_ascii();
        if key.len() < MIN_KEY_LEN {
            return Err(KeyError::KeyTooShort {
                path: None,
                len: key.len(),
            });
        }
        // HMAC takes keys of any length: this cannot fail, but is not unwrapped.
        let mut extract = <Hmac<Sha256> as Mac>::new_from_slice(PSK_LABEL).map_err(|_| {
            KeyError::KeyTooShort {
                path: None,
                len: key.len(),
            }
        })?;
        extract.update(key);
        Ok(SyncKey {
            psk: extract.finalize().into_bytes().into(),
        })
    }

    /// The Noise pre-shared key.
    pub(crate) fn psk(&self) -> &[u8; PSK_LEN] {
        &self.psk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "  short \n").unwrap();
        let err = SyncKey::load(&p).unwrap_err();
        assert!(err.to_string().contains("is 5 bytes"), "{err}");
        assert!(err.to_string().contains("at least 16"), "{err}");
        // Whitespace around the key does not change it.
        std::fs::write(&p, "0123456789abcdef-shared\n").unwrap();
        let a = SyncKey::load(&p).unwrap();
        let b = SyncKey::from_bytes(b"  0123456789abcdef-shared").unwrap();
        assert_eq!(a.psk(), b.psk());
        let other = SyncKey::from_bytes(b"0123456789abcdef-other").unwrap();
        assert_ne!(a.psk(), other.psk());
        // Not the key itself, and not a plain hash of it.
        assert_ne!(&a.psk()[..23], b"0123456789abcdef-shared");
        let missing = SyncKey::load(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().starts_with("reading sync key file"));
        assert_eq!(format!("{a:?}"), "SyncKey(<redacted>)");
    }
}
