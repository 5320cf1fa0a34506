//! Writing secrets to disk: mode 0600, atomically (temp file, fsync, rename,
//! fsync of the directory), so a crash leaves either the old file or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `path` atomically; `secret` files get mode 0600, others 0644.
pub fn write_atomic(path: &Path, data: &[u8], secret: bool) -> io::Result<()> {
    write_atomic_mode(path, data, if secret { 0o600 } else { 0o644 })
}

/// Rewrites the file at `path` (or the one its symlink names) with `data`
/// atomically, keeping its permissions: an edit in place, as an editor's.
pub fn rewrite_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let target = fs::canonicalize(path)?;
    let mode = fs::metadata(&target)?.permissions().mode() & 0o7777;
    write_atomic_mode(&target, data, mode)
}

/// Writes `data` to `path` atomically, with permissions `mode`.
fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    // (A bare file name's parent is "", the current directory.)
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // A new file of an unguessable name: nothing another user put in the
    // directory beforehand (a file to read the key from later, a symlink to
    // somewhere else) is opened or followed.
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| io::Error::other("no randomness for a temporary file name"))?;
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        u64::from_ne_bytes(nonce)
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode is the one asked for, whatever the umask.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)?.sync_all()
}

/// Creates a directory (and parents) that only its owner may read.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file rewritten in place keeps its permissions, and a symlink
    /// stays one: the file it names is what is rewritten.
    #[test]
    fn a_rewrite_keeps_the_mode_and_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.cedar");
        fs::write(&p, "one").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("b.cedar");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        rewrite_atomic(&link, b"two").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        rewrite_atomic(&p, b"three").unwrap();
        assert_eq!(fs::read(&link).unwrap(), b"three");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[test]
    fn secret_files_are_0600_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_atomic(&p, b"one", true).unwrap();
        write_atomic(&p, b"two", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    /// What another user may have put in the directory under the old,
    /// fixed temp name (a file of theirs, a symlink) is neither written
    /// nor followed.
    /// A bare file name is written in the current directory, and the write
    /// reports success (it used to fail after the rename, opening "").
    #[test]
    fn a_bare_file_name_is_written_in_the_current_directory() {
        let dir = tempfile::tempdir().unwrap();
        let before = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let written = write_atomic(Path::new("bare.pem"), b"k", true);
        std::env::set_current_dir(before).unwrap();
        written.unwrap();
        assert_eq!(std::fs::read(dir.path().join("bare.pem")).unwrap(), b"k");
    }

    #[test]
    fn files_planted_under_a_temp_name_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join(".k.pem.tmp");
        fs::write(&planted, b"theirs").unwrap();
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join(".k.pem.0.tmp")).unwrap();
        let p = dir.path().join("k.pem");
        write_atomic(&p, b"secret", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        assert_eq!(fs::read(&planted).unwrap(), b"theirs");
        assert!(!target.exists());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
