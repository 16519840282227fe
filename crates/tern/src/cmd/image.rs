//! `tern image build`: builds (or finds in the cache) the guest image and prints its
//! manifest. Progress goes to stderr, the result to stdout.

use std::path::PathBuf;

use tern_hv::image::{default_cache_dir, ensure_image, GuestImage};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Build the guest image (cloud kernel + initramfs with busybox and tern-guest),
    /// or reuse the cached one when no input changed.
    Build(BuildArgs),
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
