//! Small files replaced atomically: a crash leaves the old file or the new
//! one, never a torn one.

use std::io::Write as _;
use std::path::Path;

/// Writes `data` to a temporary file beside `path` (created with `mode`),
/// syncs it, renames it over `path` and syncs the directory. On error the
/// message names the file and the step.
pub fn write_atomically(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let named = |what: &str, p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| named("creating", &tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| named("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| named("writing", path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| named("syncing", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_sets_the_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("key.pem");
        write_atomically(&p, b"first, longer content", 0o600).expect("first write");
        write_atomically(&p, b"second", 0o600).expect("second write");
        assert_eq!(std::fs::read(&p).expect("read"), b"second");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!p.with_extension("tmp").exists());
    }

    #[test]
    fn errors_name_the_file() {
        let e = write_atomically(Path::new("/nonexistent-dir/x"), b"x", 0o600)
            .expect_err("no such directory");
        assert!(e.to_string().contains("/nonexistent-dir/x.tmp"), "{e}");
    }
}
