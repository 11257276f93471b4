//! Files on disk: atomic replacement (shared by the state file, the gallery, snapshots
//! and the model cache) and the permission check of files holding secrets.
//!
//! A whole new copy is written beside the target and renamed over it, so a reader (or a
//! power cut) sees the old file or the new one, never half of one. The copy is a fresh
//! file with an unguessable name, created with `O_CREAT | O_EXCL` (tempfile): at a fixed
//! or pid-derived name, anyone who can write to the directory could plant a symlink
//! beforehand and the write would land wherever it points. `rename(2)` replaces a symlink
//! at the target itself, it does not follow it.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// A step of an atomic write failed; `path` is the file or directory it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub error: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> WriteError {
    let path = path.to_owned();
    move |error| WriteError { path, error }
}

/// Whether a replacement must survive a power cut once the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync of the new copy before the rename and of the directory after it: for files
    /// whose loss or rollback matters (sequence numbers, counts, the gallery).
    Synced,
    /// No fsync: for files that are simply made again (snapshots), where the flash wear
    /// and the latency buy nothing.
    Unsynced,
}

/// The name prefix of temporary copies of `file_name`. Hidden, so that whatever globs
/// the directory (a files camera, a web server serving snapshots) skips them.
pub fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.tmp.")
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A new, empty temporary file in `path`'s directory, for [`persist`] to rename over
/// `path`. Dropped without being persisted, it is removed.
pub fn temp_beside(path: &Path) -> Result<NamedTempFile, WriteError> {
    let dir = dir_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&temp_prefix(&name))
        // The mode File::create gives (0666 less the umask) rather than tempfile's 0600:
        // replacing a file must not change who can read it (a gallery enrolled by an
        // admin is read by the daemon's user).
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(at(dir))
}

/// Renames `tmp` over `path`, with the fsyncs `durability` asks for. On failure the
/// temporary file is removed.
pub fn persist(tmp: NamedTempFile, path: &Path, durability: Durability) -> Result<(), WriteError> {
    if durability == Durability::Synced {
        tmp.as_file().sync_all().map_err(at(tmp.path()))?;
    }
    tmp.persist(path).map_err(|e| WriteError {
        path: path.to_owned(),
        error: e.error,
    })?;
    if durability == Durability::Synced {
        // The rename is durable only once the directory entry is on disk.
        let dir = dir_of(path);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at(dir))?;
    }
    Ok(())
}

/// Replaces `path` atomically with what `write` puts into a fresh temporary file.
pub fn write_atomic(
    path: &Path,
    durability: Durability,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), WriteError> {
    let mut tmp = temp_beside(path)?;
    write(tmp.as_file_mut()).map_err(at(tmp.path()))?;
    persist(tmp, path, durability)
}

/// Refuses a file holding a secret (the MQTT password, a TLS private key) that others
/// can read or change: world-readable or world-writable, or owned by a user other than
/// root and the one running this process (that user could rewrite or read it whatever
/// its mode). Group bits are left alone: the documented setup is `root:shelfwatch`,
/// mode 0640. The message names the file and what to change.
pub fn check_secret_file(path: &Path) -> Result<(), String> {
    let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = m.mode() & 0o7777;
    let fix = "chmod 0640, owner root, group of the daemon's user";
    if mode & 0o002 != 0 {
        return Err(format!(
            "{}: holds a secret but is world-writable (mode {mode:04o}); {fix}",
            path.display()
        ));
    }
    if mode & 0o004 != 0 {
        return Err(format!(
            "{}: holds a secret but is world-readable (mode {mode:04o}); {fix}",
            path.display()
        ));
    }
    let me = nix::unistd::geteuid();
    let owner = nix::unistd::Uid::from_raw(m.uid());
    if !owner.is_root() && owner != me {
        let name = |uid: nix::unistd::Uid| match nix::unistd::User::from_uid(uid) {
            Ok(Some(u)) => format!("uid {uid} ({})", u.name),
            _ => format!("uid {uid}"),
        };
        return Err(format!(
            "{}: holds a secret but is owned by {}, neither root nor the user running \
             shelfwatch ({}), who could change it; {fix}",
            path.display(),
            name(owner),
            name(me)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    // Issue #19: temporary files at fixed names followed symlinks planted there.
    #[test]
    fn a_symlink_planted_at_a_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // Every name the old code could have used, and the new prefix with a guessed tail.
        for name in [
            "state.json.tmp",
            ".state.json.tmp",
            ".state.json.tmp.000000",
        ] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let target = dir.path().join("state.json");
        for durability in [Durability::Synced, Durability::Unsynced] {
            write_atomic(&target, durability, |f| f.write_all(b"new")).unwrap();
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_copy() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");
        std::fs::write(&target, "old").unwrap();
        let err = write_atomic(&target, Durability::Synced, |f| {
            f.write_all(b"ne")?;
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        })
        .unwrap_err();
        assert!(err.to_string().contains(".state.json.tmp."), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["state.json"]);
    }

    #[test]
    fn a_replacement_keeps_the_mode_file_create_would_give() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("gallery.swg");
        write_atomic(&target, Durability::Unsynced, |f| f.write_all(b"x")).unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        // Read, not set: setting the umask would race with other tests creating files.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(mode, 0o666 & !umask);
    }

    fn secret(mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mqtt-password");
        std::fs::write(&path, "hunter2\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    // Issue #19: docs/mqtt.md asked for mode 0640 but nothing checked it.
    #[test]
    fn a_secret_file_others_can_read_or_write_is_refused_naming_it() {
        for (mode, what) in [
            (0o644, "world-readable (mode 0644)"),
            (0o604, "world-readable"),
            (0o602, "world-writable"),
            (0o666, "world-writable"),
        ] {
            let (_dir, path) = secret(mode);
            let e = check_secret_file(&path).unwrap_err();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(what),
                "{mode:o}: {e}"
            );
        }
        for mode in [0o600, 0o640, 0o400, 0o660] {
            let (_dir, path) = secret(mode);
            check_secret_file(&path).unwrap();
        }
        let e = check_secret_file(Path::new("/nonexistent/mqtt-password")).unwrap_err();
        assert!(e.contains("/nonexistent/mqtt-password"), "{e}");
    }

    // Issue #19: a secret file owned by another user is theirs to change.
    #[test]
    fn a_secret_file_owned_by_another_user_is_refused_unless_root_owns_it() {
        let (_dir, path) = secret(0o600);
        let other = nix::unistd::Uid::from_raw(54_321);
        match nix::unistd::chown(&path, Some(other), None) {
            Ok(()) => {
                let e = check_secret_file(&path).unwrap_err();
                assert!(e.contains("owned by uid 54321"), "{e}");
                nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
                check_secret_file(&path).unwrap();
            }
            // Not root: handing the file to another user needs privileges, so only the
            // accepted case (our own file) can be checked.
            Err(nix::errno::Errno::EPERM) => check_secret_file(&path).unwrap(),
            Err(e) => panic!("chown: {e}"),
        }
    }
}
