//! `tern image build`: builds (or finds in the cache) the guest image and prints its
//! manifest. Progress goes to stderr, the result to stdout. `list`, `import` and
//! `delete` work on the manager's catalogue (`super::catalog`).

use std::path::PathBuf;

use tern_hv::image::{default_cache_dir, ensure_image, GuestImage};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Build the guest image (cloud kernel + initramfs with busybox and tern-guest),
    /// or reuse the cached one when no input changed.
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

#[derive(clap::Args)]
pub struct BuildArgs {
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
    let image = ensure_image(&cache, &mut |step| eprintln!("image: {step}")).map_err(|e| {
        if e.is_bad_input() {
            super::bad_input(e)
        } else {
            anyhow::Error::new(e)
        }
    })?;
    eprintln!("image: ready in {:.1} s", started.elapsed().as_secs_f64());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&image)?);
    } else {
        print_human(&image);
    }
    Ok(())
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
