//! The node's own state that outlives the agent: whether it is drained (`xlb node drain`). A
//! file of its own in `--state-dir` (`node.json`), written atomically like the desired state,
//! and kept apart from it: `--config` replaces the VIPs at every start, but a drained node must
//! stay drained across a restart until an operator undrains it.

use crate::util::write_atomic;
use serde::{Deserialize, Serialize};
use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Name of the file inside `--state-dir`.
pub(crate) const NODE_FILE: &str = "node.json";
/// Version of its format.
const NODE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeFileError {
    #[error("cannot read {}: {}", path.display(), crate::util::os_message(source))]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is corrupt: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{} has version {found}, this xlb understands {NODE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {}: {}", path.display(), crate::util::os_message(source))]
    Write { path: PathBuf, source: io::Error },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    version: u32,
    drained: bool,
    /// When the drain began (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    drained_since_unix_ms: Option<u64>,
}

/// Since when the node is drained (unix ms), `None` if it is not (or there is no file yet). A
/// file that does not parse is an error: starting undrained by mistake would announce a node an
/// operator took out.
pub(crate) fn load(path: &Path) -> Result<Option<u64>, NodeFileError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(NodeFileError::Read {
                path: path.into(),
                source,
            });
        }
    };
    let file: NodeFile =
        serde_json::from_slice(&bytes).map_err(|source| NodeFileError::Corrupt {
            path: path.into(),
            source,
        })?;
    if file.version != NODE_VERSION {
        return Err(NodeFileError::Version {
            path: path.into(),
            found: file.version,
        });
    }
    Ok(file
        .drained
        .then(|| file.drained_since_unix_ms.unwrap_or_default()))
}

/// Persist the drain (`Some(since)`) or its end.
pub(crate) fn save(path: &Path, drained: Option<u64>) -> Result<(), NodeFileError> {
    let file = NodeFile {
        version: NODE_VERSION,
        drained: drained.is_some(),
        drained_since_unix_ms: drained,
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("the node file serialises");
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| NodeFileError::Write {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_round_trips_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_FILE);
        assert_eq!(load(&path).unwrap(), None, "no file: not drained");
        save(&path, Some(1_700_000_000_000)).unwrap();
        assert_eq!(load(&path).unwrap(), Some(1_700_000_000_000));
        save(&path, None).unwrap();
        assert_eq!(load(&path).unwrap(), None);
        fs::write(&path, b"{\"version\": 1, \"drained\": maybe}").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains(NODE_FILE), "{e}");
        fs::write(&path, b"{\"version\": 7, \"drained\": false}").unwrap();
        assert!(matches!(
            load(&path),
            Err(NodeFileError::Version { found: 7, .. })
        ));
    }
}
