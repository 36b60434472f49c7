//! The lab's kernel: Debian's generic kernel, unpacked (not installed) from its
//! .deb into the cache, and an initramfs with busybox, the modules the lab needs
//! (in dependency order) and `init.sh`.

use anyhow::{bail, Context, Result};
use flate2::{write::GzEncoder, Compression};
use hull_rootfs_builder::cpio::{Archive, Node};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules the lab needs; their dependencies are added from modules.dep.
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "virtio_console",
    "kvm-amd",
    "vhost_vsock",
    "tun",
    // Pod networks in tests: veth pairs joined to taps with tc.
    "veth",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    "fuse",
    "loop",
    "crc32c_generic",
    "ext4",
];

const INIT_SH: &str = include_str!("init.sh");

/// Where hull caches slow artifacts (outside the clone): `$HULL_CACHE_DIR` or /var/cache/hull.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HULL_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/hull"))
}

#[derive(Debug, Clone)]
pub struct LabKernel {
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    pub release: String,
}

impl LabKernel {
    /// Finds or prepares the lab kernel and initramfs (under a lock, so
    /// parallel callers prepare it once).
    pub fn ensure() -> Result<LabKernel> {
        let root = cache_dir().join("lab");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let _lock = crate::lock::FileLock::exclusive(&root.join("prepare.lock"))?;

        let pkg = resolve_package()?;
        let unpacked = root.join(&pkg);
        if !unpacked.join("done").exists() {
            unpack_deb(&pkg, &unpacked)?;
        }
        let release = std::fs::read_dir(unpacked.join("lib/modules"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .context("the unpacked kernel has no lib/modules/<release>")?;
        let vmlinuz = unpacked.join(format!("boot/vmlinuz-{release}"));
        let moddir = unpacked.join("lib/modules").join(&release);

        let busybox = Path::new("/bin/busybox");
        let order = module_order(&moddir)?;
        let mut h = Sha256::new();
        h.update(INIT_SH.as_bytes());
        h.update(std::fs::read(busybox).context("reading /bin/busybox (install busybox-static)")?);
        h.update(order.join("\n").as_bytes());
        h.update(release.as_bytes());
        let key = hex(&h.finalize()[..8]);
        let initramfs = unpacked.join(format!("lab-initramfs-{key}.cpio.gz"));
        if !initramfs.exists() {
            build_initramfs(busybox, &moddir, &order, &initramfs)?;
        }
        Ok(LabKernel { vmlinuz, initramfs, release })
    }
}

/// `linux-image-amd64` is a meta package; the real name changes with Debian
/// point releases, so resolve it. An override: `$HULL_LAB_KERNEL_PKG`.
fn resolve_package() -> Result<String> {
    if let Ok(p) = std::env::var("HULL_LAB_KERNEL_PKG") {
        return Ok(p);
    }
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("running apt-cache (the lab needs Debian's apt)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let name = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|n| n.starts_with("linux-image-"))
        .map(str::to_string);
    let Some(name) = name else {
        bail!("cannot resolve linux-image-amd64 with apt-cache (run apt-get update): {}", text.trim());
    };
    let ver = Command::new("apt-cache").args(["show", "--no-all-versions", &name]).output()?;
    let ver = String::from_utf8_lossy(&ver.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        .with_context(|| format!("apt-cache show {name}: no version"))?;
    Ok(format!("{name}_{ver}"))
}

fn unpack_deb(pkg: &str, dest: &Path) -> Result<()> {
    let (name, ver) = pkg.split_once('_').unwrap_or((pkg, ""));
    let tmp = tempfile::Builder::new().prefix(".unpack-").tempdir_in(dest.parent().unwrap())?;
    let spec = if ver.is_empty() { name.to_string() } else { format!("{name}={ver}") };
    eprintln!("hull-lab: downloading {spec} (once; cached in {})", dest.display());
    let st = Command::new("apt-get")
        .arg("download")
        .arg(&spec)
        .current_dir(tmp.path())
        .status()
        .context("running apt-get download")?;
    if !st.success() {
        bail!("apt-get download {spec} failed ({st})");
    }
    let deb = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download produced no .deb")?;
    let root = tmp.path().join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let release = std::fs::read_dir(root.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the .deb has no lib/modules")?;
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    std::fs::write(root.join("done"), b"")?;
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    std::fs::rename(&root, dest)?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// The modules to load, dependencies first, as paths relative to `moddir`.
fn module_order(moddir: &Path) -> Result<Vec<String>> {
    let dep = std::fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", moddir.display()))?;
    let deps: std::collections::HashMap<&str, Vec<&str>> =
        dep.lines().filter_map(|l| l.split_once(':')).map(|(m, d)| (m, d.split_whitespace().collect())).collect();
    let by_name = |name: &str| {
        let file = format!("/{name}.ko");
        let alt = format!("/{}.ko", name.replace('-', "_"));
        deps.keys().find(|k| k.ends_with(&file) || k.ends_with(&alt)).copied()
    };
    let mut order: Vec<String> = Vec::new();
    fn visit(m: &str, deps: &std::collections::HashMap<&str, Vec<&str>>, order: &mut Vec<String>) {
        if order.iter().any(|o| o == m) {
            return;
        }
        // modules.dep lists all transitive dependencies; visit them first anyway.
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, order);
        }
        order.push(m.to_string());
    }
    for name in MODULES {
        let m = by_name(name).with_context(|| format!("module {name} not in {}/modules.dep", moddir.display()))?;
        visit(m, &deps, &mut order);
    }
    Ok(order)
}

fn build_initramfs(busybox: &Path, moddir: &Path, order: &[String], out: &Path) -> Result<()> {
    let mut a = Archive::new();
    for d in ["dev", "proc", "sys", "bin", "host", "rw", "newroot", "tmp"] {
        a.add(d, Node::Dir)?;
    }
    a.add("dev/console", Node::CharDev { major: 5, minor: 1 })?;
    a.add("bin/busybox", Node::File { data: std::fs::read(busybox)?, executable: true })?;
    a.add("bin/sh", Node::Symlink { target: "busybox".into() })?;
    a.add("init", Node::File { data: INIT_SH.as_bytes().to_vec(), executable: true })?;
    let mut list = String::new();
    for m in order {
        let flat = m.replace('/', "_");
        let data = std::fs::read(moddir.join(m)).with_context(|| format!("reading module {m}"))?;
        a.add(&format!("modules/{flat}"), Node::File { data, executable: false })?;
        list.push_str(&flat);
        list.push('\n');
    }
    a.add("modules/order", Node::File { data: list.into_bytes(), executable: false })?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    a.write_to(&mut gz)?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, gz.finish()?)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_order_puts_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut dep = String::new();
        for m in MODULES {
            dep.push_str(&format!("kernel/x/{m}.ko: kernel/y/base.ko\n"));
        }
        dep.push_str("kernel/y/base.ko:\n");
        std::fs::write(dir.path().join("modules.dep"), dep).unwrap();
        let order = module_order(dir.path()).unwrap();
        assert_eq!(order[0], "kernel/y/base.ko");
        assert_eq!(order.len(), MODULES.len() + 1);

        std::fs::write(dir.path().join("modules.dep"), "kernel/a.ko:\n").unwrap();
        let err = module_order(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not in"), "{err}");
    }
}
