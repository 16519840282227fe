//! Catalogue images in the host's store (`docs/images.md`): before a VM that boots a
//! catalogue image is made, each file of the image must be in the store's `images/`
//! under its hash-carrying name; a missing one is copied from the manager over the
//! agent's authenticated link (its host certificate), checked against the size and
//! SHA-256 the manager declared, and only then renamed into place. A shared store
//! fetches each file once for every host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tern_api::catalog::{FileRole, ImageFile, ImageRef};
use tern_api::client::ManagerClient;
use tokio::io::AsyncWriteExt;

/// Where missing image files come from: the managers this agent reports to, tried in
/// turn.
#[derive(Clone, Default)]
pub struct ImageSource {
    pub managers: Vec<ManagerClient>,
}

/// Why an image's files could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image {image:?}: its {role} file {file} is not in the store and this agent has no \
         manager to copy it from (start it with --manager, or put the file into {dir})"
    )]
    NoSource {
        image: String,
        role: &'static str,
        file: String,
        dir: PathBuf,
    },
    #[error("image {image:?}: copying its {role} file from the manager: {source}")]
    Fetch {
        image: String,
        role: &'static str,
        #[source]
        source: tern_api::client::ClientError,
    },
    #[error("image {image:?}: the {role} file the manager sent {why}; nothing was kept")]
    Mismatch {
        image: String,
        role: &'static str,
        why: String,
    },
    #[error(
        "image {image:?}: its {role} file needs {need_mib} MiB and the store has {free_mib} MiB \
         free"
    )]
    NoRoom {
        image: String,
        role: &'static str,
        need_mib: u64,
        free_mib: u64,
    },
    #[error("image {image:?}: the spec is invalid: {why}")]
    Invalid { image: String, why: String },
    #[error("image store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// Whether the request itself was at fault (a 400), not the host or the manager.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ImageError::Invalid { .. } | ImageError::NoRoom { .. })
    }
}

/// Where a VM's image files are in the store, once present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
}

/// Longest a single file may take to copy (a 64 GiB disk at ~75 MB/s).
const FETCH_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Checks an image reference before anything is fetched (pure): every file valid,
/// a kernel, file names that stay in the store.
pub fn check(image: &ImageRef) -> Result<(), ImageError> {
    let invalid = |why: String| ImageError::Invalid {
        image: image.name.to_string(),
        why,
    };
    if image.file(FileRole::Kernel).is_none() {
        return Err(invalid("it has no kernel file".into()));
    }
    for f in &image.files {
        f.validate().map_err(invalid)?;
        tern_api::agent::check_store_name("image file", &f.stored_name(image.name.as_str()))
            .map_err(invalid)?;
    }
    Ok(())
}

/// Makes every file of `image` present in `images_dir`, copying missing ones from
/// `source`; answers where the kernel and initramfs are.
pub async fn ensure(
    images_dir: &Path,
    source: &ImageSource,
    image: &ImageRef,
) -> Result<Present, ImageError> {
    check(image)?;
    ensure_files(images_dir, source, image.name.as_str(), &image.files).await?;
    let mut present = Present {
        kernel: None,
        initramfs: None,
    };
    for f in &image.files {
        let path = images_dir.join(f.stored_name(image.name.as_str()));
        match f.role {
            FileRole::Kernel => present.kernel = Some(path),
            FileRole::Initramfs => present.initramfs = Some(path),
            FileRole::Disk => {}
        }
    }
    Ok(present)
}

/// Makes `files` of image `image` present in `images_dir` (checked by [`check`]
/// first), copying missing ones from `source`.
pub async fn ensure_files(
    images_dir: &Path,
    source: &ImageSource,
    image: &str,
    files: &[ImageFile],
) -> Result<(), ImageError> {
    tokio::fs::create_dir_all(images_dir)
        .await
        .map_err(|source| ImageError::Io {
            path: images_dir.to_path_buf(),
            source,
        })?;
    for f in files {
        let path = images_dir.join(f.stored_name(image));
        let have = tokio::fs::metadata(&path).await.ok().map(|m| m.len());
        if have != Some(f.size) {
            fetch(images_dir, source, image, f, &path).await?;
        }
    }
    Ok(())
}

async fn fetch(
    dir: &Path,
    source: &ImageSource,
    image: &str,
    want: &ImageFile,
    dest: &Path,
) -> Result<(), ImageError> {
    let role = want.role.as_str();
    if source.managers.is_empty() {
        return Err(ImageError::NoSource {
            image: image.into(),
            role,
            file: want.stored_name(image),
            dir: dir.to_path_buf(),
        });
    }
    let free = tern_hv::disk::Store::new(dir.to_path_buf())
        .free_bytes()
        .unwrap_or(u64::MAX);
    if free < want.size {
        return Err(ImageError::NoRoom {
            image: image.into(),
            role,
            need_mib: want.size.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    let mut last = None;
    for m in &source.managers {
        match m.image_file(image, want.role, FETCH_TIMEOUT).await {
            Ok(stream) => return receive(stream, dir, image, want, dest).await,
            Err(e) => last = Some(e),
        }
    }
    Err(ImageError::Fetch {
        image: image.into(),
        role,
        source: last.expect("at least one manager was tried"),
    })
}

/// Writes the answer to a temporary file, refusing it past the declared size, and
/// renames it into place only when size and hash match.
async fn receive(
    mut stream: tern_api::client::Stream,
    dir: &Path,
    image: &str,
    want: &ImageFile,
    dest: &Path,
) -> Result<(), ImageError> {
    let tmp = dir.join(format!(
        ".fetch-{}-{}",
        std::process::id(),
        want.stored_name(image)
    ));
    let r = async {
        let io = |source| ImageError::Io {
            path: tmp.clone(),
            source,
        };
        let mismatch = |why: String| ImageError::Mismatch {
            image: image.into(),
            role: want.role.as_str(),
            why,
        };
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut hash = Sha256::new();
        let mut got = 0u64;
        loop {
            let chunk = stream
                .read_chunk()
                .await
                .map_err(|source| ImageError::Fetch {
                    image: image.into(),
                    role: want.role.as_str(),
                    source,
                })?;
            let Some(chunk) = chunk else { break };
            got += chunk.len() as u64;
            if got > want.size {
                return Err(mismatch(format!(
                    "is larger than the declared {} bytes",
                    want.size
                )));
            }
            hash.update(&chunk);
            f.write_all(&chunk).await.map_err(io)?;
        }
        f.sync_all().await.map_err(io)?;
        if got != want.size {
            return Err(mismatch(format!(
                "has {got} bytes, not the declared {}",
                want.size
            )));
        }
        let sha: String = tern_api::catalog::hex(&hash.finalize());
        if sha != want.sha256 {
            return Err(mismatch(format!(
                "has SHA-256 {sha}, not the declared {}",
                want.sha256
            )));
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|source| ImageError::Io {
                path: dest.to_path_buf(),
                source,
            })
    }
    .await;
    if r.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::catalog::DiskFormat;

    fn image(files: Vec<ImageFile>) -> ImageRef {
        ImageRef {
            name: "debian".parse().unwrap(),
            files,
        }
    }

    fn file(role: FileRole, data: &[u8]) -> ImageFile {
        ImageFile {
            role,
            size: data.len() as u64,
            sha256: tern_api::catalog::hex(&Sha256::digest(data)),
            format: (role == FileRole::Disk).then_some(DiskFormat::Raw),
            virtual_mib: (role == FileRole::Disk).then_some(1),
        }
    }

    #[tokio::test]
    async fn files_already_in_the_store_are_used_without_a_manager() {
        let dir = tempfile::tempdir().unwrap();
        let k = file(FileRole::Kernel, b"kernel");
        let i = file(FileRole::Initramfs, b"initrd");
        let img = image(vec![k.clone(), i.clone()]);
        for (f, data) in [(&k, b"kernel"), (&i, b"initrd")] {
            std::fs::write(dir.path().join(f.stored_name("debian")), data).unwrap();
        }
        let p = ensure(dir.path(), &ImageSource::default(), &img)
            .await
            .unwrap();
        assert_eq!(p.kernel.unwrap(), dir.path().join(k.stored_name("debian")));
        assert_eq!(
            p.initramfs.unwrap(),
            dir.path().join(i.stored_name("debian"))
        );
    }

    #[tokio::test]
    async fn a_missing_file_without_a_manager_is_an_error_naming_both_ways_out() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(vec![file(FileRole::Kernel, b"kernel")]);
        let e = ensure(dir.path(), &ImageSource::default(), &img)
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--manager") && msg.contains("kernel"), "{msg}");
    }

    #[test]
    fn a_reference_without_a_kernel_or_with_a_bad_hash_is_refused() {
        let e = check(&image(vec![file(FileRole::Disk, b"d")])).unwrap_err();
        assert!(e.is_bad_input(), "{e}");
        let mut k = file(FileRole::Kernel, b"k");
        k.sha256 = "../../etc/passwd".into();
        assert!(check(&image(vec![k])).unwrap_err().is_bad_input());
    }
}
