//! SetupSandbox: the guest's identity, network, DNS, entropy and clock.
//!
//! [`plan`] validates a request into a [`SandboxPlan`]; [`apply`] carries it
//! out as far as [`SandboxSettings`] allow. The agent as PID 1 in the guest
//! applies everything; an agent run elsewhere (tests, development) only
//! writes resolv.conf where it is told to, so it never changes the host.

use hull_agent_api::proto::agent::SetupSandboxRequest;
use hull_agent_api::validate::{
    check_dns_option, check_hostname, check_id, check_search_domain, shown, MAX_DNS_OPTIONS, MAX_DNS_SEARCH,
    MAX_ENTROPY, MAX_NAMESERVERS,
};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// What SetupSandbox may change.
#[derive(Debug, Clone, Default)]
pub struct SandboxSettings {
    /// Where resolv.conf is written (None: not written).
    pub resolv_conf: Option<PathBuf>,
    /// Set the hostname, credit entropy and set the clock of the running
    /// kernel (the guest's PID 1 only).
    pub apply_kernel: bool,
}

impl SandboxSettings {
    /// PID 1 in the guest: everything, resolv.conf at /etc/resolv.conf.
    pub fn guest() -> SandboxSettings {
        SandboxSettings { resolv_conf: Some("/etc/resolv.conf".into()), apply_kernel: true }
    }
}

/// A validated SetupSandbox request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPlan {
    /// None: leave the hostname alone (empty in the request).
    pub hostname: Option<String>,
    /// The resolv.conf text.
    pub resolv_conf: String,
    pub entropy: Vec<u8>,
    /// None: leave the clock alone (0 in the request).
    pub wall_clock_unix_nanos: Option<i64>,
    pub net: super::network::NetPlan,
}

/// Validates a request: hostname (at most 64 characters, label syntax), at
/// most 3 nameservers that are IP addresses, search domains and options
/// that cannot break the resolv.conf syntax, at most 4096 entropy bytes, a
/// non-negative clock.
pub fn plan(req: &SetupSandboxRequest) -> Result<SandboxPlan, String> {
    if !req.sandbox_id.is_empty() {
        check_id("sandbox_id", &req.sandbox_id)?;
    }
    let hostname = if req.hostname.is_empty() {
        None
    } else {
        check_hostname(&req.hostname)?;
        Some(req.hostname.clone())
    };
    if req.dns_servers.len() > MAX_NAMESERVERS {
        return Err(format!("{} dns_servers: at most {MAX_NAMESERVERS} are allowed", req.dns_servers.len()));
    }
    let mut resolv = String::new();
    for s in &req.dns_servers {
        let ip: IpAddr = s.parse().map_err(|_| format!("dns server {} is not an IP address", shown(s)))?;
        resolv.push_str(&format!("nameserver {ip}\n"));
    }
    if req.dns_search.len() > MAX_DNS_SEARCH {
        return Err(format!("{} dns_search domains: at most {MAX_DNS_SEARCH} are allowed", req.dns_search.len()));
    }
    for d in &req.dns_search {
        check_search_domain(d)?;
    }
    if !req.dns_search.is_empty() {
        resolv.push_str(&format!("search {}\n", req.dns_search.join(" ")));
    }
    if req.dns_options.len() > MAX_DNS_OPTIONS {
        return Err(format!("{} dns_options: at most {MAX_DNS_OPTIONS} are allowed", req.dns_options.len()));
    }
    for o in &req.dns_options {
        check_dns_option(o)?;
    }
    if !req.dns_options.is_empty() {
        resolv.push_str(&format!("options {}\n", req.dns_options.join(" ")));
    }
    if req.entropy.len() > MAX_ENTROPY {
        return Err(format!("entropy is {} bytes: at most {MAX_ENTROPY} are allowed", req.entropy.len()));
    }
    let clock = match req.wall_clock_unix_nanos {
        0 => None,
        n if n < 0 => return Err(format!("wall_clock_unix_nanos {n} is before 1970")),
        n => Some(n),
    };
    let net = super::network::plan(&req.interfaces, &req.routes)?;
    Ok(SandboxPlan { hostname, resolv_conf: resolv, entropy: req.entropy.clone(), wall_clock_unix_nanos: clock, net })
}

/// Carries a plan out (blocking). Stops at the first failure, naming it.
pub fn apply(plan: &SandboxPlan, settings: &SandboxSettings) -> Result<(), String> {
    if settings.apply_kernel {
        if let Some(ns) = plan.wall_clock_unix_nanos {
            set_realtime_clock(ns).map_err(|e| format!("setting the clock: {e}"))?;
        }
        if !plan.entropy.is_empty() {
            add_entropy(&plan.entropy).map_err(|e| format!("adding entropy (RNDADDENTROPY on /dev/urandom): {e}"))?;
        }
        if let Some(h) = &plan.hostname {
            nix::unistd::sethostname(h).map_err(|e| format!("sethostname {}: {e}", shown(h)))?;
        }
        super::network::apply(&plan.net)?;
    }
    if let Some(path) = &settings.resolv_conf {
        write_in_place(path, plan.resolv_conf.as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Truncates and rewrites the file (not rename: containers may bind-mount it).
fn write_in_place(path: &std::path::Path, data: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `data` into the kernel RNG and credits it (8 bits per byte):
/// a VM restored from a template must not share RNG state with its siblings.
/// Needs CAP_SYS_ADMIN.
pub fn add_entropy(data: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = 2 + data.len().div_ceil(4);
    let mut info = vec![0u32; words];
    info[0] = (data.len() * 8) as u32;
    info[1] = data.len() as u32;
    // SAFETY: `info` has room for the two header ints and data.len() bytes after them.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), info.as_mut_ptr().add(2).cast::<u8>(), data.len()) };
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of the size given in buf_size.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // Crediting alone does not reseed an initialized CRNG before its next
    // scheduled reseed: force it, so output differs from the template's now.
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn set_realtime_clock(unix_nanos: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> SetupSandboxRequest {
        SetupSandboxRequest {
            sandbox_id: "pod-1".into(),
            hostname: "pod-1".into(),
            dns_servers: vec!["10.96.0.10".into(), "fd00::a".into()],
            dns_search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
            dns_options: vec!["ndots:5".into(), "edns0".into()],
            entropy: vec![7; 64],
            wall_clock_unix_nanos: 1_700_000_000_123_456_789,
            ..Default::default()
        }
    }

    #[test]
    fn plans_a_valid_request() {
        let p = plan(&req()).unwrap();
        assert_eq!(p.hostname.as_deref(), Some("pod-1"));
        assert_eq!(
            p.resolv_conf,
            "nameserver 10.96.0.10\nnameserver fd00::a\nsearch default.svc.cluster.local cluster.local\n\
             options ndots:5 edns0\n"
        );
        assert_eq!(p.entropy.len(), 64);
        assert_eq!(p.wall_clock_unix_nanos, Some(1_700_000_000_123_456_789));
        let empty = plan(&SetupSandboxRequest::default()).unwrap();
        assert_eq!(
            empty,
            SandboxPlan {
                hostname: None,
                resolv_conf: String::new(),
                entropy: vec![],
                wall_clock_unix_nanos: None,
                net: Default::default()
            }
        );
    }

    #[test]
    fn rejects_bad_requests() {
        type Mutate = Box<dyn Fn(&mut SetupSandboxRequest)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|r| r.hostname = "h".repeat(65)), "longer than 64"),
            (Box::new(|r| r.hostname = "bad_host".into()), "hostname \"bad_host\" contains '_'"),
            (Box::new(|r| r.hostname = "a\nb".into()), "hostname"),
            (Box::new(|r| r.dns_servers = vec!["1.1.1.1".into(); 4]), "at most 3"),
            (Box::new(|r| r.dns_servers = vec!["dns.google".into()]), "\"dns.google\" is not an IP address"),
            (Box::new(|r| r.dns_servers = vec!["1.1.1.1\nnameserver 6.6.6.6".into()]), "not an IP address"),
            (Box::new(|r| r.dns_search = vec!["a b".into()]), "dns search domain"),
            (Box::new(|r| r.dns_options = vec!["ndots:5\nsearch evil".into()]), "dns option"),
            (Box::new(|r| r.entropy = vec![0; 4097]), "entropy is 4097 bytes"),
            (Box::new(|r| r.wall_clock_unix_nanos = -1), "before 1970"),
            (Box::new(|r| r.sandbox_id = "../x".into()), "sandbox_id"),
        ];
        for (mutate, want) in cases {
            let mut r = req();
            mutate(&mut r);
            let err = plan(&r).unwrap_err();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
        let mut r = req();
        r.entropy = vec![0; 4096];
        plan(&r).unwrap();
    }

    #[test]
    fn writes_resolv_conf_only_where_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/resolv.conf");
        let p = plan(&req()).unwrap();
        apply(&p, &SandboxSettings { resolv_conf: Some(path.clone()), apply_kernel: false }).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), p.resolv_conf);
        // Rewritten in place: the inode stays (bind mounts of it see the change).
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        let mut r = req();
        r.dns_servers = vec!["192.0.2.1".into()];
        apply(&plan(&r).unwrap(), &SandboxSettings { resolv_conf: Some(path.clone()), apply_kernel: false }).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("nameserver 192.0.2.1\n"));
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()), ino);
    }

    /// As root only: hostname in a private UTS namespace (this thread's,
    /// so the host keeps its name) and RNDADDENTROPY. The clock is left alone.
    #[test]
    fn applies_hostname_and_entropy_as_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS) {
                eprintln!("skipped: unshare(CLONE_NEWUTS): {e}");
                return;
            }
            let before = std::fs::read_to_string("/proc/sys/kernel/random/entropy_avail").unwrap();
            let mut r = req();
            r.hostname = "hull-test-sandbox".into();
            r.wall_clock_unix_nanos = 0;
            let entropy: Vec<u8> = (0..256).map(|i| (i * 37 % 251) as u8).collect();
            r.entropy = entropy;
            apply(&plan(&r).unwrap(), &SandboxSettings { resolv_conf: None, apply_kernel: true }).unwrap();
            assert_eq!(nix::unistd::gethostname().unwrap(), "hull-test-sandbox");
            // Credited entropy can only raise the estimate (it is capped at the pool size).
            let after = std::fs::read_to_string("/proc/sys/kernel/random/entropy_avail").unwrap();
            assert!(after.trim().parse::<u32>().unwrap() >= before.trim().parse::<u32>().unwrap().min(256));
        });
        t.join().unwrap();
        assert_ne!(nix::unistd::gethostname().unwrap(), "hull-test-sandbox", "the host's hostname changed");
    }

    #[test]
    fn entropy_ioctl_needs_privilege_or_succeeds() {
        match add_entropy(b"0123456789") {
            Ok(()) => assert!(nix::unistd::geteuid().is_root()),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
}
