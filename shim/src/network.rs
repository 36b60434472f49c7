//! The pod network: what CNI put in the pod's network namespace is handed to
//! the VM without moving anything out of the namespace (the model Kata
//! calls tcfilter):
//!
//! - the sandbox's OCI spec names the namespace (`linux.namespaces`, type
//!   `network`, its `path`); without a path the pod has loopback only;
//! - in that namespace (on a thread that joined it) the shim finds the
//!   first interface with an IPv4 address (CNI's veth), creates a tap
//!   `hulltap0` next to it, and joins the two with tc: an ingress qdisc on
//!   each and a filter redirecting every frame to the other's egress
//!   (`action mirred egress redirect`);
//! - hull-vmm gets the tap as an inherited fd (`--net fd=N`); when hull-vmm
//!   exits the tap goes with it (it is not persistent), and so do its
//!   filters; the shim then takes the interface's ingress qdisc off
//!   (`detach`), leaving the namespace as CNI made it;
//! - the agent gets the interface's MAC, address, MTU and the namespace's
//!   IPv4 routes, and gives them to the guest's NIC (eth0), so the guest
//!   answers for the pod's IP and MAC exactly as the veth did.

use hull_agent_api::proto::agent::{Interface, Route};
use serde_json::Value;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tap made in the pod's namespace.
pub const TAP_NAME: &str = "hulltap0";
/// The guest's NIC.
pub const GUEST_IFACE: &str = "eth0";

/// The pod's network, set up and ready to hand over.
#[derive(Debug)]
pub struct PodNetwork {
    /// The open tap (close-on-exec; the child that gets it clears that).
    pub tap: File,
    /// The CNI interface it is joined to.
    pub iface: String,
    pub mac: String,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
}

/// The network namespace path in an OCI spec, if it names one.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec.get("linux")?.get("namespaces")?.as_array()?.iter().find_map(|n| {
        (n.get("type")?.as_str()? == "network").then(|| n.get("path")?.as_str().map(PathBuf::from)).flatten()
    })
}

/// What was found in the namespace: an interface to hand over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub iface: String,
    pub mac: [u8; 6],
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub mtu: u32,
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Sets up the pod network in the namespace at `netns` (blocking: it runs
/// on a thread of its own, which joins the namespace). `Ok(None)`: the
/// namespace has no interface with an IPv4 address.
pub fn attach(netns: &Path) -> Result<Option<PodNetwork>, String> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || attach_here(&netns)).join().map_err(|_| "the pod network thread panicked".to_string())?
}

fn attach_here(netns: &Path) -> Result<Option<PodNetwork>, String> {
    let ns = File::open(netns).map_err(|e| format!("pod network namespace {}: {e}", netns.display()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining the pod network namespace {}: {e}", netns.display()))?;
    let Some(found) = find_interface()? else { return Ok(None) };
    let routes = routes_of(
        &std::fs::read_to_string("/proc/thread-self/net/route").map_err(|e| format!("reading routes: {e}"))?,
        &found.iface,
    );
    let tap = hull_vmm::devices::virtio::net::tap::Tap::open(TAP_NAME)
        .map_err(|e| format!("creating tap {TAP_NAME} in {}: {e}", netns.display()))?
        .into_file()
        .map_err(|e| format!("tap {TAP_NAME}: {e}"))?;
    let ctl = ctl_socket()?;
    set_mtu(&ctl, TAP_NAME, found.mtu)?;
    set_up(&ctl, TAP_NAME)?;
    // A pod that ran in this namespace before left its redirect behind.
    let _ = tc(&["qdisc", "del", "dev", &found.iface, "ingress"]);
    for (from, to) in [(found.iface.as_str(), TAP_NAME), (TAP_NAME, found.iface.as_str())] {
        tc(&["qdisc", "add", "dev", from, "ingress"])?;
        tc(&[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
            "action", "mirred", "egress", "redirect", "dev", to,
        ])?;
    }
    let mac = fmt_mac(&found.mac);
    Ok(Some(PodNetwork {
        tap,
        iface: found.iface.clone(),
        mac: mac.clone(),
        interfaces: vec![Interface {
            name: GUEST_IFACE.into(),
            mac,
            addresses: vec![format!("{}/{}", found.addr, found.prefix)],
            mtu: found.mtu,
            ..Default::default()
        }],
        routes,
    }))
}

/// Takes the redirect off the CNI interface once the pod's VM is gone (the
/// tap and its own filter went with hull-vmm; the interface's filter would
/// otherwise keep dropping what arrives, towards a tap that no longer
/// exists). A namespace CNI already removed needs nothing.
pub fn detach(netns: &Path, iface: &str) -> Result<(), String> {
    let (netns, iface) = (netns.to_path_buf(), iface.to_string());
    std::thread::spawn(move || {
        let Ok(ns) = File::open(&netns) else { return Ok(()) };
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("joining the pod network namespace {}: {e}", netns.display()))?;
        if !has_interface(&iface) {
            return Ok(());
        }
        tc(&["qdisc", "del", "dev", &iface, "ingress"])
    })
    .join()
    .map_err(|_| "the pod network thread panicked".to_string())?
}

fn has_interface(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// `tc ARGS` (iproute2), run from this thread so it acts in its namespace.
fn tc(args: &[&str]) -> Result<(), String> {
    let out = Command::new("tc").args(args).output().map_err(|e| format!("running tc (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!("tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// The first interface but loopback with an IPv4 address, its MAC and MTU.
fn find_interface() -> Result<Option<Found>, String> {
    let addrs: Vec<_> = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?.collect();
    let ctl = ctl_socket()?;
    for a in &addrs {
        if a.interface_name == "lo" || a.interface_name == TAP_NAME {
            continue;
        }
        let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) else { continue };
        let prefix = a
            .netmask
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|m| u32::from(m.ip()).count_ones() as u8)
            .unwrap_or(32);
        let mac = addrs
            .iter()
            .filter(|l| l.interface_name == a.interface_name)
            .find_map(|l| l.address.as_ref()?.as_link_addr()?.addr())
            .ok_or_else(|| format!("interface {} has no MAC address", a.interface_name))?;
        let mtu = get_mtu(&ctl, &a.interface_name)?;
        return Ok(Some(Found { iface: a.interface_name.clone(), mac, addr: ip, prefix, mtu }));
    }
    Ok(None)
}

/// The IPv4 routes out of `iface` in /proc/net/route text, for the guest's NIC.
pub fn routes_of(table: &str, iface: &str) -> Vec<Route> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| Ipv4Addr::from(u32::from_be(v)));
    let mut routes = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != iface {
            continue;
        }
        let (Some(dest), Some(gw), Some(mask)) = (hex(f[1]), hex(f[2]), hex(f[7])) else { continue };
        let prefix = u32::from(mask).count_ones();
        routes.push(Route {
            destination: if prefix == 0 { "default".into() } else { format!("{dest}/{prefix}") },
            gateway: if gw.is_unspecified() { String::new() } else { gw.to_string() },
            device: GUEST_IFACE.into(),
            ..Default::default()
        });
    }
    // On-link routes first: a gateway must be reachable when its route is added.
    routes.sort_by_key(|r| !r.gateway.is_empty());
    routes
}

fn ctl_socket() -> Result<std::os::fd::OwnedFd, String> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("network control socket: {e}"))
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    r
}

fn ioctl(fd: &std::os::fd::OwnedFd, req: libc::Ioctl, r: &mut libc::ifreq, what: &str) -> Result<(), String> {
    // SAFETY: `r` is a live ifreq, which every request used here expects.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, r as *mut libc::ifreq) } < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn get_mtu(fd: &std::os::fd::OwnedFd, name: &str) -> Result<u32, String> {
    let mut r = ifreq(name);
    ioctl(fd, libc::SIOCGIFMTU, &mut r, &format!("{name}: get MTU"))?;
    // SAFETY: SIOCGIFMTU filled the mtu member.
    Ok(unsafe { r.ifr_ifru.ifru_mtu } as u32)
}

fn set_mtu(fd: &std::os::fd::OwnedFd, name: &str, mtu: u32) -> Result<(), String> {
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl(fd, libc::SIOCSIFMTU, &mut r, &format!("{name}: set MTU {mtu}"))
}

fn set_up(fd: &std::os::fd::OwnedFd, name: &str) -> Result<(), String> {
    let mut r = ifreq(name);
    ioctl(fd, libc::SIOCGIFFLAGS, &mut r, &format!("{name}: get flags"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(fd, libc::SIOCSIFFLAGS, &mut r, &format!("{name}: set up"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_netns_path() {
        let s =
            json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(netns_path(&s), Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(netns_path(&json!({"linux": {"namespaces": [{"type": "network"}]}})), None);
        assert_eq!(netns_path(&json!({})), None);
    }

    #[test]
    fn reads_routes_for_the_guest() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0101C80A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0001C80A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     other\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
        let r = routes_of(table, "eth0");
        let got: Vec<_> = r.iter().map(|r| (r.destination.as_str(), r.gateway.as_str(), r.device.as_str())).collect();
        assert_eq!(got, [("10.200.1.0/24", "", "eth0"), ("default", "10.200.1.1", "eth0")]);
    }

    /// In a namespace of its own: a veth with an address gives a tap joined
    /// to it with tc both ways, and the agent's view of it. Needs root and tc.
    #[test]
    fn attaches_a_tap_to_the_pod_interface() {
        if !nix::unistd::geteuid().is_root() || Command::new("tc").arg("-V").output().is_err() {
            eprintln!("skipped: needs root and tc");
            return;
        }
        let name = format!("hull-net-test-{}", std::process::id());
        let sh = |c: &str| {
            let st = Command::new("sh").args(["-c", c]).status().unwrap();
            assert!(st.success(), "{c}");
        };
        sh(&format!(
            "ip netns add {name} && ip -n {name} link add eth0 type veth peer name peer0 && \
             ip -n {name} addr add 10.200.9.2/24 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} link set peer0 up && ip -n {name} route add default via 10.200.9.1"
        ));
        let r = attach(Path::new(&format!("/var/run/netns/{name}")));
        let links = Command::new("ip").args(["-n", &name, "-o", "link"]).output().unwrap();
        let filters =
            Command::new("tc").args(["-n", &name, "filter", "show", "dev", "eth0", "ingress"]).output().unwrap();
        let net = r.unwrap().expect("an interface");
        assert_eq!(net.iface, "eth0");
        assert_eq!(net.interfaces[0].addresses, ["10.200.9.2/24"]);
        assert_eq!(net.interfaces[0].name, GUEST_IFACE);
        assert!(net.routes.iter().any(|r| r.destination == "default" && r.gateway == "10.200.9.1"));
        assert!(String::from_utf8_lossy(&links.stdout).contains(TAP_NAME));
        let f = String::from_utf8_lossy(&filters.stdout);
        assert!(f.contains("mirred") && f.contains(TAP_NAME), "{f}");
        // The tap lives as long as its fd.
        drop(net);
        let links = Command::new("ip").args(["-n", &name, "-o", "link"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&links.stdout).contains(TAP_NAME));
        // A second pod in the same namespace replaces the first one's redirect.
        let ns = format!("/var/run/netns/{name}");
        let again = attach(Path::new(&ns));
        // Detach after the VM (the tap's fd) is gone: no qdisc left on eth0.
        let again = again.unwrap().expect("an interface");
        drop(again.tap);
        let detached = detach(Path::new(&ns), "eth0");
        let qdiscs = Command::new("tc").args(["-n", &name, "qdisc", "show", "dev", "eth0"]).output().unwrap();
        sh(&format!("ip netns del {name}"));
        assert_eq!(again.iface, "eth0");
        detached.unwrap();
        let q = String::from_utf8_lossy(&qdiscs.stdout);
        assert!(!q.contains("ingress"), "{q}");
        // A namespace CNI already removed: nothing to do.
        detach(Path::new(&ns), "eth0").unwrap();
    }
}
