//! containerd-shim-hull-v2: see the `hull_shim` library and docs/containerd.md.
//!
//! Besides containerd's shim commands (`start`, `delete`, serving), one of
//! its own: `containerd-shim-hull-v2 fill-disk-pool` formats the disk pool
//! up to `disk_pool_size` (install scripts run it so the first pods start
//! without formatting).

use hull_shim::config::Config;
use hull_shim::diskpool::DiskPool;

fn fill_disk_pool() -> Result<(), String> {
    let cfg = Config::load()?;
    let pool = DiskPool::new(cfg.disk_pool_dir(), cfg.defaults.disk_size_mib, cfg.defaults.disk_pool_size as usize)?;
    let made = pool.refill()?;
    println!("{}: {made} disk(s) formatted, {} ready", pool.dir().display(), pool.ready().len());
    Ok(())
}

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("fill-disk-pool") {
        return match fill_disk_pool() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-hull-v2: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-hull-v2: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(hull_shim::shim::run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // containerd shows what `start` (and a server failing to come
            // up, through `start`) wrote to stdout.
            println!("containerd-shim-hull-v2: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
