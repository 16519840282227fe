//! `tern image build [minimal|debian]`: builds (or finds in the cache) a guest image
//! and prints its manifest. Progress goes to stderr, the result to stdout. `list`,
//! `import` and `delete` work on the manager's catalogue (`super::catalog`).

use std::path::PathBuf;

use tern_hv::image::debian::{ensure_debian_image, DebianImage};
use tern_hv::image::{default_cache_dir, ensure_image, GuestImage, ImageError};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Build a guest image, or reuse the cached one when no input changed.
    Build(BuildArgs),
    /// The manager's catalogue of images.
    List {
        #[command(flatten)]
        conn: super::host::Conn,
    },
    /// Add an image to the manager's catalogue: a built one (--from minimal) or the
    /// files given; each file is hashed here and checked by the manager.
    Import(super::catalog::ImportArgs),
    /// Delete an image no template or VM uses from the catalogue.
    Delete {
        name: tern_model::ImageName,
        #[command(flatten)]
        conn: super::host::Conn,
    },
}

/// Which image to build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Cloud kernel + initramfs with busybox and tern-guest (no disk; boots in seconds).
    #[default]
    Minimal,
    /// A Debian 12 root disk (qcow2) with systemd, sshd and tern-guest as a service,
    /// plus its kernel and initrd; built with debootstrap, needs root.
    Debian,
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The image to build.
    #[arg(value_enum, default_value_t = Kind::Minimal)]
    kind: Kind,
    /// Cache directory [default: $TERN_CACHE, else ~/.cache/tern].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Build(args) => build(args),
        Command::List { conn } => super::catalog::list_images(&conn),
        Command::Import(a) => super::catalog::import(a),
        Command::Delete { name, conn } => super::catalog::delete_image(&conn, &name),
    }
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let cache = args.cache.unwrap_or_else(default_cache_dir);
    let started = std::time::Instant::now();
    let mut progress = |step: &str| eprintln!("image: {step}");
    let failed = |e: ImageError| {
        if e.is_bad_input() {
            super::bad_input(e)
        } else {
            anyhow::Error::new(e)
        }
    };
    let json = match args.kind {
        Kind::Minimal => {
            let image = ensure_image(&cache, &mut progress).map_err(failed)?;
            if !args.json {
                print_human(&image);
            }
            serde_json::to_string_pretty(&image)?
        }
        Kind::Debian => {
            let image = ensure_debian_image(&cache, &mut progress).map_err(failed)?;
            if !args.json {
                print_debian(&image);
            }
            serde_json::to_string_pretty(&image)?
        }
    };
    eprintln!("image: ready in {:.1} s", started.elapsed().as_secs_f64());
    if args.json {
        println!("{json}");
    }
    Ok(())
}

fn print_debian(image: &DebianImage) {
    println!("root disk  {}", image.root_disk.display());
    println!("kernel     {}", image.kernel.display());
    println!("initrd     {}", image.initrd.display());
    println!("manifest   {}", image.manifest.display());
    println!(
        "version    Debian {} ({}), kernel {}",
        image.suite, image.kind, image.kernel_version
    );
    println!("disk       {} MiB virtual (qcow2)", image.disk_virtual_mib);
    println!("cmdline    {}", image.cmdline);
    println!("channel    virtserialport name={}", image.control_port);
    println!("store name {}", image.store_name());
    println!(
        "built      {} in {:.0} s",
        image.built_at, image.build_seconds
    );
}

fn print_human(image: &GuestImage) {
    println!("kernel     {}", image.kernel.display());
    println!("initramfs  {}", image.initramfs.display());
    println!("manifest   {}", image.manifest.display());
    println!(
        "version    {} ({} {})",
        image.kernel_version, image.kernel_package, image.kernel_package_version
    );
    println!("modules    {}", image.modules.join(" "));
    println!("cmdline    {} tern.ip=ADDR/PREFIX", image.cmdline);
    println!("channel    virtserialport name={}", image.control_port);
}
