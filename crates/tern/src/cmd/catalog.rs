//! `tern image list|import|delete` and `tern template ...`: the manager's catalogue
//! (`docs/images.md`). `import` hashes each file locally, records the image, then uploads
//! the files one by one; the manager keeps a file only if it matches.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tern_api::agent::DiskBus;
use tern_api::catalog::{DiskFormat, FileRole, Image, ImageFile, NewImage, Template, VmDisk};
use tern_model::{ImageName, TemplateName};
use tokio::io::AsyncReadExt;

use super::host::{refused, table, Conn};

/// Where an imported image's files come from.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The image's name in the catalogue.
    pub name: ImageName,
    /// A built image to take the files from: `minimal` (tern's guest) or `debian`
    /// (Debian 12 root disk, kernel and initrd), built into the cache if missing, as
    /// `tern image build` does (the Debian one needs root and a few minutes the first
    /// time).
    #[arg(long, value_name = "BUILT", conflicts_with_all = ["kernel", "initramfs", "disk"])]
    pub from: Option<Built>,
    /// Kernel to boot (bzImage), when not --from.
    #[arg(long, value_name = "FILE", required_unless_present = "from")]
    pub kernel: Option<PathBuf>,
    /// Its initramfs.
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// A root disk (qcow2 or raw, standing alone) a VM's first disk is an overlay on.
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Kernel command line it boots with (with --from: the built image's).
    #[arg(long, value_name = "ARGS")]
    pub cmdline: Option<String>,
    /// One line for people.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Image cache for --from [default: $TERN_CACHE, else ~/.cache/tern].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Built {
    Minimal,
    Debian,
}

/// One local file to upload and what the catalogue is told about it.
struct Local {
    path: PathBuf,
    file: ImageFile,
}

/// Reads `path` once: size and SHA-256.
fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| super::bad_input(format!("{}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f
            .read(&mut buf)
            .with_context(|| path.display().to_string())?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((n, tern_api::catalog::hex(&h.finalize())))
}

/// Format and size of a disk file, as `qemu-img info` reads it; anything but a
/// stand-alone qcow2 or raw file is refused.
fn disk_info(path: &Path) -> anyhow::Result<(DiskFormat, u64)> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .context("running qemu-img (apt-get install qemu-utils)")?;
    if !out.status.success() {
        return Err(super::bad_input(format!(
            "--disk {}: qemu-img cannot read it: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (format, bytes) = tern_hv::disk::parse_image_info(&v)
        .map_err(|e| super::bad_input(format!("--disk {} is {e}", path.display())))?;
    let format = match format {
        tern_hv::disk::ImageFormat::Qcow2 => DiskFormat::Qcow2,
        tern_hv::disk::ImageFormat::Raw => DiskFormat::Raw,
    };
    Ok((format, bytes.div_ceil(1 << 20)))
}

fn local(role: FileRole, path: &Path) -> anyhow::Result<Local> {
    if !path.is_file() {
        return Err(super::bad_input(format!(
            "{} file {}: no such file",
            role.as_str(),
            path.display()
        )));
    }
    let (format, virtual_mib) = match role {
        FileRole::Disk => {
            let (f, mib) = disk_info(path)?;
            (Some(f), Some(mib))
        }
        _ => (None, None),
    };
    eprintln!("image: hashing {} ({})", path.display(), role.as_str());
    let (size, sha256) = hash_file(path)?;
    Ok(Local {
        path: path.to_path_buf(),
        file: ImageFile {
            role,
            size,
            sha256,
            format,
            virtual_mib,
        },
    })
}

/// The files and command line to import.
fn gather(a: &ImportArgs) -> anyhow::Result<(Vec<Local>, String)> {
    match a.from {
        Some(Built::Minimal) => {
            let cache = a
                .cache
                .clone()
                .unwrap_or_else(tern_hv::image::default_cache_dir);
            let img = tern_hv::image::ensure_image(&cache, &mut |s| eprintln!("image: {s}"))
                .context("building the minimal guest image")?;
            let files = vec![
                local(FileRole::Kernel, &img.kernel)?,
                local(FileRole::Initramfs, &img.initramfs)?,
            ];
            Ok((files, a.cmdline.clone().unwrap_or(img.cmdline)))
        }
        Some(Built::Debian) => {
            let cache = a
                .cache
                .clone()
                .unwrap_or_else(tern_hv::image::default_cache_dir);
            let img = tern_hv::image::debian::ensure_debian_image(&cache, &mut |s| {
                eprintln!("image: {s}")
            })
            .map_err(|e| match e.is_bad_input() {
                true => super::bad_input(e),
                false => anyhow::Error::new(e).context("building the Debian image"),
            })?;
            let files = vec![
                local(FileRole::Kernel, &img.kernel)?,
                local(FileRole::Initramfs, &img.initrd)?,
                local(FileRole::Disk, &img.root_disk)?,
            ];
            Ok((files, a.cmdline.clone().unwrap_or(img.cmdline)))
        }
        None => {
            let mut files = Vec::new();
            for (role, p) in [
                (FileRole::Kernel, &a.kernel),
                (FileRole::Initramfs, &a.initramfs),
                (FileRole::Disk, &a.disk),
            ] {
                if let Some(p) = p {
                    files.push(local(role, p)?);
                }
            }
            Ok((files, a.cmdline.clone().unwrap_or_default()))
        }
    }
}

/// A file's bytes as an upload body, read in 1 MiB pieces.
async fn body(path: &Path) -> anyhow::Result<reqwest::Body> {
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| path.display().to_string())?;
    let stream = futures_util::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

pub fn import(a: ImportArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (files, cmdline) = gather(&a)?;
    let new = NewImage {
        name: a.name.clone(),
        cmdline,
        files: files.iter().map(|l| l.file.clone()).collect(),
        description: a.description.clone(),
    };
    new.validate().map_err(super::bad_input)?;
    let client = a.conn.client()?;
    let rt = tokio::runtime::Runtime::new()?;
    let image = rt.block_on(async {
        let mut image = client.add_image(&new).await.map_err(refused)?;
        for l in &files {
            let t = Instant::now();
            eprintln!(
                "image: uploading {} ({} MiB)",
                l.file.role.as_str(),
                l.file.size.div_ceil(1 << 20)
            );
            // Generous: a 64 GiB disk at 75 MB/s.
            let timeout = Duration::from_secs(60 + l.file.size / (75 << 20) * 2);
            image = client
                .upload_image_file(a.name.as_str(), l.file.role, body(&l.path).await?, timeout)
                .await
                .map_err(refused)?;
            eprintln!(
                "image: {} uploaded in {:.1} s",
                l.file.role.as_str(),
                t.elapsed().as_secs_f64()
            );
        }
        anyhow::Ok(image)
    })?;
    eprintln!(
        "image: {} {} in {:.1} s",
        image.name,
        state(&image),
        started.elapsed().as_secs_f64()
    );
    print_images(&a.conn, &[image])
}

fn state(i: &Image) -> &'static str {
    match i.state {
        tern_api::catalog::ImageState::Ready => "ready",
        tern_api::catalog::ImageState::Uploading => "uploading",
    }
}

fn print_images(conn: &Conn, images: &[Image]) -> anyhow::Result<()> {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(images)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            let disk = i
                .file(FileRole::Disk)
                .and_then(|f| f.virtual_mib)
                .map_or("-".into(), |m| format!("{m} MiB"));
            vec![
                i.name.clone(),
                state(i).into(),
                format!("{:.1} MiB", i.bytes() as f64 / (1 << 20) as f64),
                disk,
                i.description.clone(),
            ]
        })
        .collect();
    table(&["NAME", "STATE", "FILES", "DISK", "DESCRIPTION"], &rows);
    Ok(())
}

fn on_runtime<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Runtime::new()?.block_on(f)
}

pub fn list_images(conn: &Conn) -> anyhow::Result<()> {
    let c = conn.client()?;
    let images = on_runtime(async { c.images().await.map_err(refused) })?;
    print_images(conn, &images)
}

pub fn delete_image(conn: &Conn, name: &ImageName) -> anyhow::Result<()> {
    let c = conn.client()?;
    let i = on_runtime(async { c.delete_image(name.as_str()).await.map_err(refused) })?;
    match conn.json {
        true => println!("{}", serde_json::to_string_pretty(&i)?),
        false => println!("image {name} deleted"),
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(clap::Subcommand)]
enum TemplateCommand {
    /// Every template.
    List,
    /// One template.
    Show { name: TemplateName },
    /// A template over a catalogue image; name it `default` for VMs created without one.
    Create {
        name: TemplateName,
        /// The catalogue image its VMs boot.
        #[arg(long)]
        image: ImageName,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        /// A disk, `[NAME=]SIZE[:BUS,STORE]` as `tern vm create --disk`; `root` starts
        /// from the image's disk. Without any: one `root` disk from the image, if it has
        /// one.
        #[arg(long = "disk", value_name = "[NAME=]SIZE[:BUS,STORE]")]
        disks: Vec<String>,
        /// Kernel command line added after the image's.
        #[arg(long, default_value = "")]
        cmdline: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a template; VMs made from it keep their values.
    Delete { name: TemplateName },
}

pub fn templates(a: TemplateArgs) -> anyhow::Result<()> {
    let conn = &a.conn;
    let c = conn.client()?;
    let shown: Vec<Template> = match a.command {
        TemplateCommand::List => on_runtime(async { c.templates().await.map_err(refused) })?,
        TemplateCommand::Show { name } => {
            vec![on_runtime(async {
                c.template(name.as_str()).await.map_err(refused)
            })?]
        }
        TemplateCommand::Create {
            name,
            image,
            vcpus,
            memory_mib,
            disks,
            cmdline,
            description,
        } => {
            let disks = match disks.is_empty() {
                true => None,
                false => Some(template_disks(&disks)?),
            };
            let t = Template {
                name,
                image,
                vcpus,
                memory_mib,
                disks,
                cmdline,
                description,
            };
            t.validate().map_err(super::bad_input)?;
            vec![on_runtime(async {
                c.create_template(&t).await.map_err(refused)
            })?]
        }
        TemplateCommand::Delete { name } => {
            vec![on_runtime(async {
                c.delete_template(name.as_str()).await.map_err(refused)
            })?]
        }
    };
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|t| {
            let disks = match &t.disks {
                None => "root from image".to_owned(),
                Some(d) => d
                    .iter()
                    .map(|d| {
                        let bus = match d.bus {
                            Some(DiskBus::VirtioScsi) => ":virtio-scsi",
                            _ => "",
                        };
                        match d.size_mib {
                            Some(s) => format!("{}={s}M{bus}", d.name),
                            None => format!("{}{bus}", d.name),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            };
            vec![
                t.name.to_string(),
                t.image.to_string(),
                t.vcpus.to_string(),
                t.memory_mib.to_string(),
                disks,
                t.cmdline.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "IMAGE", "VCPUS", "MEMORY MiB", "DISKS", "CMDLINE"],
        &rows,
    );
    Ok(())
}

/// A template's `--disk` arguments (pure): as `tern vm create --disk`, and a disk named
/// `root` starts from the image.
fn template_disks(args: &[String]) -> anyhow::Result<Vec<VmDisk>> {
    let mut d = super::vm::disk_args(args).map_err(super::bad_input)?;
    for x in &mut d {
        x.from_image = x.name == "root";
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_templates_root_disk_starts_from_the_image() {
        let d = template_disks(&["root=8G:virtio-scsi".into(), "2G".into()]).unwrap();
        assert_eq!(d[0].name, "root");
        assert!(d[0].from_image);
        assert_eq!(d[0].size_mib, Some(8192));
        assert_eq!(d[0].bus, Some(DiskBus::VirtioScsi));
        assert_eq!(d[1].name, "data0");
        assert!(!d[1].from_image);
        assert_eq!(d[1].bus, None);
    }
}
