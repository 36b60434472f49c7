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

/// Writes `out` (a tar archive in OCI image layout) holding an image named
/// `name` (e.g. `docker.io/library/hull-test:latest`) whose only layer is `layer_dir`.
pub fn write_image_archive(layer_dir: &Path, name: &str, out: &Path) -> Result<()> {
    let layer_tar = tar_dir(layer_dir)?;
    let diff_id = sha256_hex(&layer_tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&layer_tar)?;
    let layer_gz = gz.finish()?;
    let layer_digest = sha256_hex(&layer_gz);

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
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
}
