//! Writes an OCI image archive (the layout `ctr image import` reads): one
//! gzip layer made from a directory, an image config, a manifest and an index
//! naming the image. Deterministic: sorted entries, zero mtimes, root owner.

use anyhow::{Context, Result};
use flate2::{write::GzEncoder, Compression};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// A deterministic tar of `dir` (uncompressed).
fn tar_dir(dir: &Path) -> Result<Vec<u8>> {
    let mut paths = Vec::new();
    collect(dir, dir, &mut paths)?;
    paths.sort();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for rel in paths {
        let full = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&full)?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&full)?;
            b.append_link(&mut h, &rel, target)?;
        } else if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &rel, std::io::empty())?;
        } else {
            b.append_data(&mut h, &rel, std::fs::File::open(&full)?)?;
        }
    }
    Ok(b.into_inner()?)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        out.push(p.strip_prefix(root)?.to_path_buf());
        if e.file_type()?.is_dir() {
            collect(root, &p, out)?;
        }
    }
    Ok(())
}

/// What the image runs (the image config's `Entrypoint` and `Cmd`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    /// `None`: `["/bin/sh"]` when there is no entrypoint, else no `Cmd`.
    pub cmd: Option<Vec<String>>,
}

impl ImageConfig {
    fn cmd(&self) -> Vec<String> {
        match &self.cmd {
            Some(c) => c.clone(),
            None if self.entrypoint.is_empty() => vec!["/bin/sh".to_string()],
            None => Vec::new(),
        }
    }
}

/// Checks an image name: `[registry/]path[:tag]`, no whitespace, not empty.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!(
            "image name {name:?}: must be non-empty, without whitespace (e.g. docker.io/library/hull-test:latest)"
        );
    }
    Ok(())
}

/// Writes `out` (a tar archive in OCI image layout) holding an image named
/// `name` (e.g. `docker.io/library/hull-test:latest`) whose only layer is
/// `layer_dir` and which runs `/bin/sh`.
pub fn write_image_archive(layer_dir: &Path, name: &str, out: &Path) -> Result<()> {
    write_image_archive_with(layer_dir, name, &ImageConfig::default(), out)
}

/// [`write_image_archive`] with the entrypoint and command of `cfg`.
pub fn write_image_archive_with(layer_dir: &Path, name: &str, cfg: &ImageConfig, out: &Path) -> Result<()> {
    check_name(name)?;
    if cfg.entrypoint.is_empty() && cfg.cmd().is_empty() {
        anyhow::bail!("image {name}: an empty command with no entrypoint runs nothing");
    }
    let layer_tar = tar_dir(layer_dir)?;
    let diff_id = sha256_hex(&layer_tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&layer_tar)?;
    let layer_gz = gz.finish()?;
    let layer_digest = sha256_hex(&layer_gz);

    let mut run = serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/",
    });
    if !cfg.entrypoint.is_empty() {
        run["Entrypoint"] = serde_json::json!(cfg.entrypoint);
    }
    if !cfg.cmd().is_empty() {
        run["Cmd"] = serde_json::json!(cfg.cmd());
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created_by": "hull-rootfs-builder"}],
    }))?;
    let config_digest = sha256_hex(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{layer_digest}"), "size": layer_gz.len()}],
    }))?;
    let manifest_digest = sha256_hex(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest")},
        }],
    }))?;

    let mut b = tar::Builder::new(std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?);
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add(&format!("blobs/sha256/{layer_digest}"), &layer_gz)?;
    add(&format!("blobs/sha256/{config_digest}"), &config)?;
    add(&format!("blobs/sha256/{manifest_digest}"), &manifest)?;
    add("index.json", &index)?;
    b.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_blobs_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("bin")).unwrap();
        std::fs::write(layer.join("bin/hello"), "hi").unwrap();
        std::os::unix::fs::symlink("hello", layer.join("bin/hi")).unwrap();
        let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
        write_image_archive(&layer, "docker.io/library/t:latest", &a).unwrap();
        write_image_archive(&layer, "docker.io/library/t:latest", &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let out = std::process::Command::new("tar").arg("-tf").arg(&a).output().unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("index.json") && list.contains("oci-layout"), "{list}");
        assert_eq!(list.matches("blobs/sha256/").count(), 3, "{list}");
    }

    /// The image config blob of archive `a` (the only blob that is JSON with a "config" key).
    fn image_config(a: &Path) -> serde_json::Value {
        let mut ar = tar::Archive::new(std::fs::File::open(a).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) {
                if v.get("rootfs").is_some() {
                    return v["config"].clone();
                }
            }
        }
        panic!("no image config in {}", a.display());
    }

    #[test]
    fn entrypoint_and_cmd() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("bin")).unwrap();
        let a = dir.path().join("a.tar");
        write_image_archive(&layer, "t:1", &a).unwrap();
        let c = image_config(&a);
        assert_eq!(c["Cmd"], serde_json::json!(["/bin/sh"]));
        assert!(c.get("Entrypoint").is_none());

        let cfg = ImageConfig { entrypoint: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()], cmd: None };
        write_image_archive_with(&layer, "t:2", &cfg, &a).unwrap();
        let c = image_config(&a);
        assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh", "-c", "sleep 1"]));
        assert!(c.get("Cmd").is_none());

        let cfg = ImageConfig { entrypoint: vec!["/bin/echo".into()], cmd: Some(vec!["hi".into()]) };
        write_image_archive_with(&layer, "t:3", &cfg, &a).unwrap();
        let c = image_config(&a);
        assert_eq!(
            (c["Entrypoint"].clone(), c["Cmd"].clone()),
            (serde_json::json!(["/bin/echo"]), serde_json::json!(["hi"]))
        );
    }

    #[test]
    fn bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.tar");
        let e = write_image_archive(dir.path(), "has space:1", &a).unwrap_err().to_string();
        assert!(e.contains("has space"), "{e}");
        let e = write_image_archive(dir.path(), "", &a).unwrap_err().to_string();
        assert!(e.contains("non-empty"), "{e}");
        let cfg = ImageConfig { entrypoint: vec![], cmd: Some(vec![]) };
        let e = write_image_archive_with(dir.path(), "t:1", &cfg, &a).unwrap_err().to_string();
        assert!(e.contains("runs nothing"), "{e}");
    }
}
