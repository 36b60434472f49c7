use anyhow::Result;
use clap::{Parser, Subcommand};
use hull_rootfs_builder::initramfs::{write_initramfs, InitramfsSpec};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "hull-rootfs-builder", version, about = "Builds hull guest images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest initramfs (gzip-compressed newc cpio) with the agent as /init.
    Initramfs {
        /// Static hull-agent binary.
        #[arg(long)]
        agent: PathBuf,
        /// Static busybox to include as /bin/busybox (for debugging and tests).
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Extra file, HOST_PATH:GUEST_PATH (repeatable).
        #[arg(long = "add", value_parser = parse_extra)]
        extra: Vec<(PathBuf, String)>,
        /// Output path.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Write an OCI image archive (for `ctr image import`) from a layer directory.
    OciImage {
        /// Layer directory (e.g. from busybox-layer).
        #[arg(long)]
        layer: PathBuf,
        /// Image name, e.g. docker.io/library/hull-test:latest
        #[arg(long)]
        name: String,
        /// The image's entrypoint, one argument per use (repeatable):
        /// `--entrypoint /bin/sh --entrypoint -c --entrypoint 'sleep 1'`.
        #[arg(long, allow_hyphen_values = true)]
        entrypoint: Vec<String>,
        /// The image's command, one argument per use (repeatable). Default:
        /// `/bin/sh` without an entrypoint, none with one.
        #[arg(long, allow_hyphen_values = true)]
        cmd: Option<Vec<String>>,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Write a busybox root file system layer as a directory (test image).
    BusyboxLayer {
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
    },
}

fn parse_extra(s: &str) -> Result<(PathBuf, String), String> {
    let (host, guest) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected HOST_PATH:GUEST_PATH"))?;
    Ok((PathBuf::from(host), guest.to_string()))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Initramfs { agent, busybox, extra, out } => {
            write_initramfs(&InitramfsSpec { agent, busybox, extra }, &out)?;
            println!("{}", out.display());
        }
        Cmd::OciImage { layer, name, entrypoint, cmd, out } => {
            let cfg = hull_rootfs_builder::oci::ImageConfig { entrypoint, cmd };
            hull_rootfs_builder::oci::write_image_archive_with(&layer, &name, &cfg, &out)?;
            println!("{}", out.display());
        }
        Cmd::BusyboxLayer { busybox, out } => {
            hull_rootfs_builder::image::busybox_layer(&busybox, &out)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
