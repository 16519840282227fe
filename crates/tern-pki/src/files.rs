//! Secret files: keys and tokens are created 0600 (never briefly wider) and refused when
//! group or others may read them, as ssh does with its keys.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{PkiError, Result};

/// Writes `bytes` to `path` with mode 0600, through a temporary file and a rename so a
/// reader never sees half a key.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_mode(path, bytes, 0o600)
}

/// Writes a file anyone may read (certificates, the CA's public certificate, the CRL).
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_mode(path, bytes, 0o644)
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(PkiError::io("creating directory", dir))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; a public file must stay readable.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        PkiError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source: e,
        }
    })
}

/// Refuses `path` when group or others have any access to it.
pub fn check_private(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(PkiError::io("reading", path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::NotPrivate {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret file, refusing it when it is not private.
pub fn read_private(path: &Path) -> Result<String> {
    check_private(path)?;
    std::fs::read_to_string(path).map_err(PkiError::io("reading", path))
}

/// Reads a public file (a certificate).
pub fn read_public(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(PkiError::io("reading", path))
}

/// Reads a bearer token file: the first line, trimmed; the file must be private and the
/// token not empty.
pub fn read_token(path: &Path) -> Result<String> {
    let t = read_private(path)?;
    let t = t.lines().next().unwrap_or("").trim().to_string();
    if t.is_empty() {
        return Err(PkiError::BadName(format!(
            "token file {} is empty: put a secret on its first line",
            path.display()
        )));
    }
    Ok(t)
}

/// Narrows an existing file (a database) to 0600.
pub fn make_private(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(PkiError::io("setting the mode of", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_files_are_0600_and_readable_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/key.pem");
        write_private(&p, b"secret\n").unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(read_private(&p).unwrap(), "secret\n");
        assert_eq!(read_token(&p).unwrap(), "secret");
        write_public(&d.path().join("ca.pem"), b"x").unwrap();
        assert_eq!(mode(&d.path().join("ca.pem")), 0o644);
    }

    #[test]
    fn a_secret_others_can_read_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "abc\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&p).unwrap_err();
        assert!(matches!(e, PkiError::NotPrivate { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_token(&p).is_err());
        make_private(&p).unwrap();
        assert_eq!(read_token(&p).unwrap(), "abc");
    }

    #[test]
    fn an_empty_token_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        write_private(&p, b"\n").unwrap();
        assert!(read_token(&p).is_err());
        assert!(read_token(&d.path().join("none")).is_err());
    }
}
