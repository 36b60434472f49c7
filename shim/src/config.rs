//! The shim's configuration: `/etc/hull/config.toml`, or the file named by
//! `HULL_CONFIG`. A missing file means all defaults; an unknown key, a wrong
//! type or an out-of-range value is an error naming the key. docs/config.md
//! documents every key.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where the configuration is read from unless `HULL_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hull/config.toml";
/// Environment variable overriding [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "HULL_CONFIG";

/// Most vCPUs hull-vmm supports (its MP table).
pub const MAX_VCPUS: u32 = 32;
/// hull-vmm's smallest guest; the agent and kernel need more than that in
/// practice, hence the higher floor here.
pub const MIN_MEM_MIB: u64 = 64;
/// hull-vmm has 19 virtio IRQs; vsock and virtio-fs take two.
pub const MAX_DISKS_PER_POD: u32 = 17;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub paths: Paths,
    pub defaults: Defaults,
    pub jailer: Jailer,
}

/// How each pod's hull-vmm is confined (see `crate::jail`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Jailer {
    /// Start hull-vmm jailed (namespaces, pivot_root, a uid of its own).
    pub enabled: bool,
    /// Pods get uids uid_base + 1 ..= uid_base + uid_count.
    pub uid_base: u32,
    pub uid_count: u32,
    /// The group of every jailed hull-vmm (templates are readable by it).
    pub gid: u32,
}

impl Default for Jailer {
    fn default() -> Self {
        Jailer { enabled: true, uid_base: 3_000_000, uid_count: 65_536, gid: 3_000_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    /// Guest kernel (vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs holding hull-agent as /init.
    pub initramfs: PathBuf,
    /// The hull-vmm binary.
    pub hull_vmm: PathBuf,
    /// The virtiofsd binary.
    pub virtiofsd: PathBuf,
    /// Per-pod state (sockets, shared dir, disks), the disk pool and the VM templates.
    pub state_dir: PathBuf,
    /// hull's cgroup, relative to the cgroup root (each controller's on v1):
    /// the pool and pods without a Kubernetes cgroup parent live under it.
    pub cgroup_parent: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    /// vCPUs of a pod without a CPU limit (and the floor for one with).
    pub vcpus: u32,
    /// Guest memory of a pod without a memory limit; added to the limit otherwise.
    pub mem_mib: u64,
    /// Writable-layer disks attached to every pod VM at boot.
    pub disks_per_pod: u32,
    /// Size of each writable-layer disk (sparse ext4 image).
    pub disk_size_mib: u64,
    /// Pre-formatted disks kept ready in `<state_dir>/diskpool/`.
    pub disk_pool_size: u32,
    /// How long to wait for the agent's ready announcement after starting hull-vmm.
    pub agent_ready_timeout_secs: u64,
    /// How long one call to the agent may take (sent to the agent as its
    /// deadline too).
    pub agent_call_timeout_secs: u64,
    /// The shim's log level: error, warn, info, debug or trace.
    pub log_level: String,
    /// Start pods by restoring a VM template (built on first use) instead
    /// of booting.
    pub template: bool,
    /// Pre-created host cgroups kept ready for new pods.
    pub cgroup_pool_size: u32,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            kernel: "/usr/share/hull/vmlinux".into(),
            initramfs: "/usr/share/hull/initramfs.cpio.gz".into(),
            hull_vmm: "/usr/local/bin/hull-vmm".into(),
            virtiofsd: "/usr/libexec/virtiofsd".into(),
            state_dir: "/run/hull".into(),
            cgroup_parent: "hull".into(),
        }
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            vcpus: 1,
            mem_mib: 256,
            disks_per_pod: 4,
            disk_size_mib: 10240,
            disk_pool_size: 8,
            agent_ready_timeout_secs: 30,
            agent_call_timeout_secs: 30,
            log_level: "info".into(),
            template: true,
            cgroup_pool_size: 8,
        }
    }
}

/// A TOML error on one line (containerd shows shim errors inline):
/// `line L, column C: message`.
fn one_line_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

impl Config {
    /// The configuration file in effect: `$HULL_CONFIG` or the default path.
    pub fn path() -> PathBuf {
        match std::env::var_os(CONFIG_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_CONFIG_PATH),
        }
    }

    /// Loads [`Config::path`].
    pub fn load() -> Result<Config, String> {
        Config::load_from(&Config::path())
    }

    /// Loads `path`; a file that does not exist gives the defaults.
    pub fn load_from(path: &Path) -> Result<Config, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|e| format!("hull config {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(format!("hull config {}: {e}", path.display())),
        }
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| one_line_error(text, &e))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        let d = &self.defaults;
        if !(1..=MAX_VCPUS).contains(&d.vcpus) {
            return Err(format!("defaults.vcpus = {}: must be 1 to {MAX_VCPUS}", d.vcpus));
        }
        if d.mem_mib < MIN_MEM_MIB {
            return Err(format!("defaults.mem_mib = {}: must be at least {MIN_MEM_MIB}", d.mem_mib));
        }
        if d.disks_per_pod > MAX_DISKS_PER_POD {
            return Err(format!(
                "defaults.disks_per_pod = {}: at most {MAX_DISKS_PER_POD} (hull-vmm's virtio IRQs)",
                d.disks_per_pod
            ));
        }
        if d.disk_size_mib < 16 {
            return Err(format!("defaults.disk_size_mib = {}: must be at least 16", d.disk_size_mib));
        }
        if d.agent_ready_timeout_secs == 0 {
            return Err("defaults.agent_ready_timeout_secs = 0: must be at least 1".into());
        }
        if d.agent_call_timeout_secs == 0 {
            return Err("defaults.agent_call_timeout_secs = 0: must be at least 1".into());
        }
        if !LOG_LEVELS.contains(&d.log_level.as_str()) {
            return Err(format!("defaults.log_level = {:?}: expected one of {}", d.log_level, LOG_LEVELS.join(", ")));
        }
        let j = &self.jailer;
        if j.uid_base == 0 || j.gid == 0 {
            return Err("jailer.uid_base and jailer.gid must not be 0 (root)".into());
        }
        if j.uid_count == 0 || j.uid_base.checked_add(j.uid_count).is_none() {
            return Err(format!(
                "jailer.uid_count = {}: must be at least 1, with uid_base + uid_count below 2^32",
                j.uid_count
            ));
        }
        let cg = &self.paths.cgroup_parent;
        if cg.is_empty() || cg.starts_with('/') || cg.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(format!("paths.cgroup_parent = {cg:?}: must be a relative cgroup path without . or .. parts"));
        }
        for (key, p) in [
            ("paths.kernel", &self.paths.kernel),
            ("paths.initramfs", &self.paths.initramfs),
            ("paths.hull_vmm", &self.paths.hull_vmm),
            ("paths.virtiofsd", &self.paths.virtiofsd),
            ("paths.state_dir", &self.paths.state_dir),
        ] {
            if !p.is_absolute() {
                return Err(format!("{key} = {:?}: must be an absolute path", p.display().to_string()));
            }
        }
        Ok(())
    }

    /// The files a pod VM needs, each with its config key; the first missing
    /// one is an error naming both.
    pub fn check_files(&self) -> Result<(), String> {
        for (key, what, p) in [
            ("paths.kernel", "guest kernel", &self.paths.kernel),
            ("paths.initramfs", "guest initramfs", &self.paths.initramfs),
            ("paths.hull_vmm", "hull-vmm", &self.paths.hull_vmm),
            ("paths.virtiofsd", "virtiofsd", &self.paths.virtiofsd),
        ] {
            if !p.is_file() {
                return Err(format!("{what} {} not found (set {key} in {})", p.display(), Config::path().display()));
            }
        }
        Ok(())
    }

    /// `<state_dir>/diskpool`
    pub fn disk_pool_dir(&self) -> PathBuf {
        self.paths.state_dir.join("diskpool")
    }

    /// `<state_dir>/<sandbox id>`
    pub fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.paths.state_dir.join(sandbox_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let d = Config::default();
        assert_eq!(d.defaults.vcpus, 1);
        assert_eq!(d.defaults.mem_mib, 256);
        assert_eq!(d.defaults.disks_per_pod, 4);
        assert_eq!(d.paths.state_dir, Path::new("/run/hull"));
        assert_eq!(d.defaults.log_level, "info");
        assert!(d.defaults.template);
        assert_eq!((d.paths.cgroup_parent.as_str(), d.defaults.cgroup_pool_size), ("hull", 8));
    }

    #[test]
    fn missing_file_is_all_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Config::load_from(&dir.path().join("nope.toml")).unwrap(), Config::default());
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::parse(
            "[paths]\nkernel = \"/k\"\nstate_dir = \"/tmp/h\"\n[defaults]\nvcpus = 2\nagent_ready_timeout_secs = 90\n",
        )
        .unwrap();
        assert_eq!(c.paths.kernel, Path::new("/k"));
        assert_eq!(c.paths.state_dir, Path::new("/tmp/h"));
        assert_eq!(c.paths.virtiofsd, Paths::default().virtiofsd);
        assert_eq!(c.defaults.vcpus, 2);
        assert_eq!(c.defaults.agent_ready_timeout_secs, 90);
        assert_eq!(c.defaults.mem_mib, 256);
        assert_eq!(c.disk_pool_dir(), Path::new("/tmp/h/diskpool"));
        assert_eq!(c.sandbox_dir("abc"), Path::new("/tmp/h/abc"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse("[defaults]\nvcpu = 2\n").unwrap_err();
        assert!(e.starts_with("line 2, column 1: unknown field `vcpu`"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = Config::parse("[path]\nkernel = \"/k\"\n").unwrap_err();
        assert!(e.contains("unknown field `path`"), "{e}");
        let e = Config::parse("[paths]\nkernal = \"/k\"\n").unwrap_err();
        assert!(e.contains("unknown field `kernal`") && e.contains("kernel"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        for (text, want) in [
            ("[defaults]\nvcpus = 0\n", "defaults.vcpus = 0"),
            ("[defaults]\nvcpus = 33\n", "defaults.vcpus = 33"),
            ("[defaults]\nmem_mib = 8\n", "defaults.mem_mib = 8"),
            ("[defaults]\ndisks_per_pod = 18\n", "defaults.disks_per_pod = 18"),
            ("[defaults]\nlog_level = \"loud\"\n", "defaults.log_level"),
            ("[defaults]\nagent_ready_timeout_secs = 0\n", "agent_ready_timeout_secs"),
            ("[defaults]\nagent_call_timeout_secs = 0\n", "agent_call_timeout_secs"),
            ("[defaults]\nvcpus = \"two\"\n", "invalid type"),
            ("[paths]\nkernel = \"vmlinux\"\n", "paths.kernel"),
            ("[paths]\ncgroup_parent = \"../x\"\n", "paths.cgroup_parent"),
            ("[paths]\ncgroup_parent = \"/abs\"\n", "paths.cgroup_parent"),
            ("[defaults]\ntemplate = \"yes\"\n", "invalid type"),
            ("[defaults\n", "line 1, column 10: "),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, "bogus = 1\n").unwrap();
        let e = Config::load_from(&p).unwrap_err();
        assert!(e.contains(&p.display().to_string()) && e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn missing_files_name_path_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, "").unwrap();
        let mut c = Config::default();
        c.paths.kernel = k.clone();
        c.paths.initramfs = dir.path().join("missing.cpio.gz");
        let e = c.check_files().unwrap_err();
        assert!(e.contains("missing.cpio.gz") && e.contains("paths.initramfs"), "{e}");
        c.paths.initramfs = k.clone();
        c.paths.hull_vmm = k.clone();
        c.paths.virtiofsd = dir.path().join("nope/virtiofsd");
        let e = c.check_files().unwrap_err();
        assert!(e.contains("virtiofsd") && e.contains("paths.virtiofsd"), "{e}");
        c.paths.virtiofsd = k;
        c.check_files().unwrap();
    }

    /// The config scripts/install.sh writes is valid and matches the defaults
    /// except for the paths it fills in.
    #[test]
    fn install_script_config_parses() {
        let script = include_str!("../../scripts/install.sh");
        let open = "cat > \"$config\" <<EOT\n";
        let start = script.find(open).expect("heredoc in install.sh") + open.len();
        let end = start + script[start..].find("\nEOT\n").unwrap();
        let text = script[start..end]
            .replace("$kernel", "/usr/share/hull/vmlinux")
            .replace("$initramfs", "/usr/share/hull/initramfs.cpio.gz")
            .replace("$hull_vmm", "/usr/local/bin/hull-vmm")
            .replace("$virtiofsd", "/usr/libexec/virtiofsd");
        assert!(!text.contains('$'), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }

    /// The documented example in docs/config.md parses and says what the defaults are.
    #[test]
    fn documented_defaults_match() {
        let doc = include_str!("../../docs/config.md");
        let start = doc.find("```toml\n").expect("docs/config.md has a toml block") + 8;
        let end = start + doc[start..].find("```").unwrap();
        assert_eq!(Config::parse(&doc[start..end]).unwrap(), Config::default());
    }
}
