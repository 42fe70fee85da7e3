//! The keyring: named secrets kept in files, SPDK's `keyring_file` module
//! (`keyring_file_add_key`, `keyring_file_remove_key`, `keyring_get_keys`).
//! A key is a name and an absolute path; the file must belong to this
//! process's user and be closed to group and others (mode 0600 or
//! stricter), checked when the key is added and again at every read, as
//! SPDK does. The secret itself is read at use, so a rewritten file takes
//! effect at the next authentication. Users (a host's DH-HMAC-CHAP keys)
//! hold the `Arc<Key>`: removing a key from the keyring leaves it usable
//! by them, marked removed, as SPDK's reference counting does.

use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The module name `keyring_get_keys` shows.
pub const FILE_MODULE: &str = "keyring_file";
/// Largest key file read (a DHHC-1 secret of a 64-byte key is 103 bytes).
const MAX_KEY_FILE_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Permission(String),
    #[error("key {0} already exists")]
    Exists(String),
    #[error("key {0} not found")]
    NotFound(String),
    #[error("{msg}")]
    Os { errno: i32, msg: String },
}

impl KeyError {
    pub fn errno(&self) -> i32 {
        match self {
            KeyError::Invalid(_) => libc::EINVAL,
            KeyError::Permission(_) => libc::EPERM,
            KeyError::Exists(_) => libc::EEXIST,
            KeyError::NotFound(_) => libc::ENOKEY,
            KeyError::Os { errno, .. } => *errno,
        }
    }
}

/// One key of the keyring.
#[derive(Debug)]
pub struct Key {
    pub name: String,
    pub path: String,
    removed: AtomicBool,
}

impl Key {
    /// The key file's text, whitespace at the ends trimmed; the file's
    /// owner and mode are checked first.
    pub fn read(&self) -> Result<String, KeyError> {
        let size = check_path(&self.path)?;
        if size > MAX_KEY_FILE_BYTES {
            return Err(KeyError::Invalid(format!("key {}: file {} is {size} bytes", self.name, self.path)));
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| os_error(&e, &self.path))?;
        Ok(text.trim().to_string())
    }

    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

fn os_error(e: &std::io::Error, path: &str) -> KeyError {
    KeyError::Os { errno: e.raw_os_error().unwrap_or(libc::EIO), msg: format!("key file '{path}': {e}") }
}

/// SPDK's checks on a key file: absolute path, owned by this user, no
/// access for group or others. Returns the file's size.
fn check_path(path: &str) -> Result<u64, KeyError> {
    if !path.starts_with('/') {
        return Err(KeyError::Permission(format!("non-absolute paths are not allowed: {path}")));
    }
    let md = std::fs::metadata(path).map_err(|e| os_error(&e, path))?;
    if !md.is_file() {
        return Err(KeyError::Invalid(format!("key file '{path}' is not a regular file")));
    }
    if md.mode() & 0o077 != 0 {
        return Err(KeyError::Permission(format!(
            "invalid permissions of key file '{path}': 0{:o}, required: 0{:o}",
            md.mode() & 0o7777,
            md.mode() & 0o7700
        )));
    }
    // The owner of /proc/self is this process's effective user (the
    // crate forbids the unsafe call to getuid).
    let me = std::fs::metadata("/proc/self").map_err(|e| os_error(&e, "/proc/self"))?.uid();
    if md.uid() != me {
        return Err(KeyError::Permission(format!("invalid owner of key file '{path}': {}, must be: {me}", md.uid())));
    }
    Ok(md.len())
}

/// The keys of one reactor set: `reactor::global::<Keyring>()`.
#[derive(Default)]
pub struct Keyring {
    keys: Mutex<Vec<Arc<Key>>>,
}

impl Keyring {
    /// The keyring of the current reactor's set.
    pub fn get() -> Arc<Keyring> {
        reactor::global::<Keyring>()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Key>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `keyring_file_add_key`.
    pub fn add_file_key(&self, name: &str, path: &str) -> Result<(), KeyError> {
        if name.is_empty() {
            return Err(KeyError::Invalid("key name is empty".into()));
        }
        let mut keys = self.lock();
        if keys.iter().any(|k| k.name == name) {
            return Err(KeyError::Exists(name.to_string()));
        }
        check_path(path)?;
        keys.push(Arc::new(Key { name: name.to_string(), path: path.to_string(), removed: AtomicBool::new(false) }));
        Ok(())
    }

    /// `keyring_file_remove_key`: holders keep their reference.
    pub fn remove(&self, name: &str) -> Result<(), KeyError> {
        let mut keys = self.lock();
        let pos = keys.iter().position(|k| k.name == name).ok_or_else(|| KeyError::NotFound(name.to_string()))?;
        let k = keys.remove(pos);
        k.removed.store(true, Ordering::Release);
        Ok(())
    }

    pub fn find(&self, name: &str) -> Option<Arc<Key>> {
        self.lock().iter().find(|k| k.name == name).cloned()
    }

    /// `keyring_get_keys`: SPDK's fields. `refcnt` counts the keyring's
    /// own reference and every holder's.
    pub fn keys_json(&self) -> Value {
        let keys = self.lock();
        Value::Array(
            keys.iter()
                .map(|k| {
                    json!({"name": k.name, "module": FILE_MODULE, "removed": k.removed(), "probed": false,
                           "refcnt": Arc::strong_count(k), "path": k.path})
                })
                .collect(),
        )
    }

    /// The calls that recreate the keyring (for `save_config`).
    pub fn config(&self) -> Vec<Value> {
        self.lock()
            .iter()
            .map(|k| json!({"method": "keyring_file_add_key", "params": {"name": k.name, "path": k.path}}))
            .collect()
    }
}
