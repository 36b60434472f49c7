//! Checks shared by the agent (which enforces them on every request) and the
//! host (which may check before sending). Each returns a message naming the
//! field and the offending value.

/// Longest container or exec id.
pub const MAX_ID_LEN: usize = 128;
/// Longest virtio-blk serial (the virtio spec's limit).
pub const MAX_DISK_SERIAL_LEN: usize = 20;
/// Longest layer path.
pub const MAX_LAYER_LEN: usize = 4096;
/// Most read-only layers in one container.
pub const MAX_LAYERS: usize = 256;
/// Longest hostname (Linux's `HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Most nameservers (glibc's `MAXNS`).
pub const MAX_NAMESERVERS: usize = 3;
/// Most DNS search domains.
pub const MAX_DNS_SEARCH: usize = 32;
/// Most resolver options.
pub const MAX_DNS_OPTIONS: usize = 32;
/// Most entropy bytes in one SetupSandbox.
pub const MAX_ENTROPY: usize = 4096;

/// A value as shown in an error message: quoted, at most 64 characters.
pub fn shown(s: &str) -> String {
    if s.chars().count() > 64 {
        let head: String = s.chars().take(64).collect();
        format!("{head:?}...")
    } else {
        format!("{s:?}")
    }
}

/// A container or exec id: 1 to 128 characters of `[A-Za-z0-9_.-]`, not
/// starting with `.` or `-`. `what` names the field in the message.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("{what} {} is longer than {MAX_ID_LEN} characters", shown(id)));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(format!("{what} {} contains {c:?} (allowed: A-Z a-z 0-9 _ . -)", shown(id)));
    }
    if id.starts_with(['.', '-']) {
        return Err(format!("{what} {} must not start with '.' or '-'", shown(id)));
    }
    Ok(())
}

/// A read-only layer directory: a relative path under the shared file system,
/// without `..` components.
pub fn check_layer(layer: &str) -> Result<(), String> {
    if layer.is_empty() {
        return Err("layer path is empty".into());
    }
    if layer.len() > MAX_LAYER_LEN {
        return Err(format!("layer path {} is longer than {MAX_LAYER_LEN} bytes", shown(layer)));
    }
    if layer.contains('\0') {
        return Err(format!("layer path {} contains a NUL byte", shown(layer)));
    }
    if layer.starts_with('/') {
        return Err(format!("layer path {} is absolute (must be relative to the shared file system)", shown(layer)));
    }
    if layer.split('/').any(|c| c == "..") {
        return Err(format!("layer path {} contains a '..' component", shown(layer)));
    }
    // Overlayfs separates lower directories with ':' and escapes with '\\' and ','.
    if let Some(c) = layer.chars().find(|c| matches!(c, ':' | ',' | '\\') || c.is_control()) {
        return Err(format!("layer path {} contains {c:?}, which cannot be passed to overlayfs", shown(layer)));
    }
    Ok(())
}

/// A virtio-blk serial: at most 20 bytes of `[A-Za-z0-9_.-]` (empty = none).
pub fn check_disk_serial(serial: &str) -> Result<(), String> {
    if serial.len() > MAX_DISK_SERIAL_LEN {
        return Err(format!("rw_disk_serial {} is longer than {MAX_DISK_SERIAL_LEN} bytes", shown(serial)));
    }
    if let Some(c) = serial.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(format!("rw_disk_serial {} contains {c:?} (allowed: A-Z a-z 0-9 _ . -)", shown(serial)));
    }
    Ok(())
}

/// A hostname: at most 64 characters, dot-separated labels of letters,
/// digits and '-', a label neither empty nor starting or ending with '-'.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("hostname is empty".into());
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(format!("hostname {} is longer than {MAX_HOSTNAME_LEN} characters", shown(name)));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("hostname {} has an empty label", shown(name)));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
            return Err(format!("hostname {} contains {c:?} (allowed: A-Z a-z 0-9 - .)", shown(name)));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("hostname {}: a label must not start or end with '-'", shown(name)));
        }
    }
    Ok(())
}

/// A DNS search domain (written to resolv.conf): a hostname-like name of at
/// most 253 characters, or a single ".".
pub fn check_search_domain(d: &str) -> Result<(), String> {
    if d.is_empty() || d.len() > 253 {
        return Err(format!("dns search domain {} must have 1 to 253 characters", shown(d)));
    }
    if let Some(c) = d.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))) {
        return Err(format!("dns search domain {} contains {c:?}", shown(d)));
    }
    Ok(())
}

/// A resolver option such as `ndots:5` or `edns0` (written to resolv.conf).
pub fn check_dns_option(o: &str) -> Result<(), String> {
    if o.is_empty() || o.len() > 64 {
        return Err(format!("dns option {} must have 1 to 64 characters", shown(o)));
    }
    if let Some(c) = o.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))) {
        return Err(format!("dns option {} contains {c:?}", shown(o)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "c1", "A_b.c-d", "0", &"x".repeat(128)] {
            check_id("container_id", ok).unwrap();
        }
        assert_eq!(check_id("container_id", ""), Err("container_id is empty".into()));
        assert!(check_id("exec_id", &"x".repeat(129)).unwrap_err().contains("longer than 128"));
        assert!(check_id("container_id", "../x").unwrap_err().contains("'/'"));
        assert!(check_id("container_id", ".hidden").unwrap_err().contains("must not start"));
        assert!(check_id("container_id", "-rf").unwrap_err().contains("must not start"));
        assert!(check_id("container_id", "a b").unwrap_err().contains("' '"));
        assert!(check_id("container_id", "é").is_err());
        let long = check_id("exec_id", &"y".repeat(1000)).unwrap_err();
        assert!(long.len() < 200, "{long}");
    }

    #[test]
    fn layers() {
        for ok in ["layers/sha256-abc", "a", "a/b/c", "./a", "a/.../b", "a..b"] {
            check_layer(ok).unwrap();
        }
        assert!(check_layer("").unwrap_err().contains("empty"));
        assert!(check_layer("/abs").unwrap_err().contains("absolute"));
        assert!(check_layer("../x").unwrap_err().contains(".."));
        assert!(check_layer("a/../../x").unwrap_err().contains(".."));
        assert!(check_layer("a/..").unwrap_err().contains(".."));
        assert!(check_layer("a:b").unwrap_err().contains("overlayfs"));
        assert!(check_layer("a\0b").unwrap_err().contains("NUL"));
    }

    #[test]
    fn serials_and_names() {
        check_disk_serial("").unwrap();
        check_disk_serial("rw-c1.disk_0").unwrap();
        assert!(check_disk_serial(&"s".repeat(21)).unwrap_err().contains("longer than 20"));
        assert!(check_disk_serial("a/b").is_err());
        check_hostname("pod-1.example").unwrap();
        assert!(check_hostname(&"h".repeat(65)).is_err());
        assert!(check_hostname("a..b").unwrap_err().contains("empty label"));
        assert!(check_hostname("-a").is_err());
        assert!(check_hostname("a_b").is_err());
        assert!(check_hostname("a\nnameserver 6.6.6.6").is_err());
        check_search_domain("svc.cluster.local").unwrap();
        assert!(check_search_domain("a b").is_err());
        check_dns_option("ndots:5").unwrap();
        assert!(check_dns_option("ndots:5\nnameserver 1.1.1.1").is_err());
    }
}
