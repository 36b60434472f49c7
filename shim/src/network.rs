//! The pod network: what CNI put in the pod's network namespace is handed to
//! the VM without moving anything out of the namespace (the model Kata
//! calls tcfilter):
//!
//! - the sandbox's OCI spec names the namespace (`linux.namespaces`, type
//!   `network`, its `path`); without a path the pod has loopback only;
//! - in that namespace (on a thread that joined it) the shim finds every
//!   interface with an IPv4 address (CNI's veths), creates a tap
//!   `hulltapN` next to each, and joins each pair with tc: an ingress qdisc
//!   on each and a filter redirecting every frame to the other's egress
//!   (`action mirred egress redirect`);
//! - hull-vmm gets the taps as inherited fds (`--net fd=N`, the guest's
//!   eth0, eth1, ... in order); when hull-vmm exits the taps go with it
//!   (they are not persistent), and so do their filters; the shim then
//!   takes the interfaces' ingress qdiscs off (`detach`), leaving the
//!   namespace as CNI made it;
//! - the agent gets each interface's MAC, address, MTU and the namespace's
//!   IPv4 routes, and gives them to the guest's NICs, so the guest answers
//!   for the pod's IPs and MACs exactly as the veths did;
//! - the file the sandbox's spec mounts at /etc/resolv.conf (CRI's, from
//!   the pod's DNS config) gives the guest's own resolver settings.

use hull_agent_api::proto::agent::{Interface, Route};
use serde_json::Value;
use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The taps made in the pod's namespace: `hulltap0`, `hulltap1`, ...
pub fn tap_name(i: usize) -> String {
    format!("hulltap{i}")
}
/// The guest's NIC for the pod's `i`th interface (the VM's `i`th virtio-net
/// device, in the order of hull-vmm's `--net` arguments).
pub fn guest_iface(i: usize) -> String {
    format!("eth{i}")
}
/// Interfaces handed to one pod at most (the agent's limit is higher).
pub const MAX_LINKS: usize = 8;

/// One CNI interface joined to its tap.
#[derive(Debug)]
pub struct Link {
    /// The open tap (close-on-exec; the child that gets it clears that).
    pub tap: File,
    /// The CNI interface it is joined to.
    pub iface: String,
    pub mac: String,
}

/// The pod's network, set up and ready to hand over.
#[derive(Debug)]
pub struct PodNetwork {
    /// In the guest's NIC order.
    pub links: Vec<Link>,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
}

/// The network namespace path in an OCI spec, if it names one.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec.get("linux")?.get("namespaces")?.as_array()?.iter().find_map(|n| {
        (n.get("type")?.as_str()? == "network").then(|| n.get("path")?.as_str().map(PathBuf::from)).flatten()
    })
}

/// What a sandbox's spec says about its network.
#[derive(Debug, Clone, Default)]
pub struct NetSpec {
    /// CNI's network namespace, if the spec names one.
    pub netns: Option<PathBuf>,
    /// The resolver settings of its /etc/resolv.conf mount, if it has one.
    pub dns: Option<Dns>,
}

impl NetSpec {
    pub fn of(spec: &Value) -> NetSpec {
        NetSpec { netns: netns_path(spec), dns: dns_of(spec) }
    }
}

/// The pod's resolver settings, for the guest's own /etc/resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// The resolver settings of the file a spec mounts at /etc/resolv.conf
/// (CRI's sandbox spec does, from the pod's DNS config). Entries the agent
/// would refuse are left out with a warning, so a resolv.conf the host
/// wrote oddly never fails the pod; containers get the file itself anyway.
pub fn dns_of(spec: &Value) -> Option<Dns> {
    let source = spec.get("mounts")?.as_array()?.iter().find_map(|m| {
        (m.get("destination")?.as_str()? == "/etc/resolv.conf").then(|| m.get("source")?.as_str()).flatten()
    })?;
    let mut text = String::new();
    // A resolv.conf is small; read at most 64 KiB of whatever the spec names.
    if let Err(e) = File::open(source).and_then(|f| f.take(64 << 10).read_to_string(&mut text)) {
        log::warn!("resolv.conf mount {source}: {e}; the guest gets no DNS settings");
        return None;
    }
    Some(parse_resolv_conf(&text))
}

/// nameserver / search / options lines, within the agent's limits.
pub fn parse_resolv_conf(text: &str) -> Dns {
    use hull_agent_api::validate::{
        check_dns_option, check_search_domain, MAX_DNS_OPTIONS, MAX_DNS_SEARCH, MAX_NAMESERVERS,
    };
    let mut dns = Dns::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().filter(|w| w.parse::<std::net::IpAddr>().is_ok()) {
                    if dns.servers.len() < MAX_NAMESERVERS {
                        dns.servers.push(ip.to_string());
                    }
                }
            }
            // The last search line wins, as in the resolver.
            Some("search") => dns.search = words.filter(|d| check_search_domain(d).is_ok()).map(String::from).collect(),
            Some("options") => dns.options.extend(words.filter(|o| check_dns_option(o).is_ok()).map(String::from)),
            _ => {}
        }
    }
    dns.search.truncate(MAX_DNS_SEARCH);
    dns.options.truncate(MAX_DNS_OPTIONS);
    dns
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
    let found = find_interfaces()?;
    if found.is_empty() {
        return Ok(None);
    }
    let table = std::fs::read_to_string("/proc/thread-self/net/route").map_err(|e| format!("reading routes: {e}"))?;
    let ctl = ctl_socket()?;
    let mut net = PodNetwork { links: Vec::new(), interfaces: Vec::new(), routes: Vec::new() };
    for (i, f) in found.iter().enumerate() {
        let (tap_name, guest) = (tap_name(i), guest_iface(i));
        let tap = hull_vmm::devices::virtio::net::tap::Tap::open(&tap_name)
            .map_err(|e| format!("creating tap {tap_name} in {}: {e}", netns.display()))?
            .into_file()
            .map_err(|e| format!("tap {tap_name}: {e}"))?;
        set_mtu(&ctl, &tap_name, f.mtu)?;
        set_up(&ctl, &tap_name)?;
        // A pod that ran in this namespace before left its redirect behind.
        let _ = tc(&["qdisc", "del", "dev", &f.iface, "ingress"]);
        for (from, to) in [(f.iface.as_str(), tap_name.as_str()), (tap_name.as_str(), f.iface.as_str())] {
            tc(&["qdisc", "add", "dev", from, "ingress"])?;
            tc(&[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
                "action", "mirred", "egress", "redirect", "dev", to,
            ])?;
        }
        let mac = fmt_mac(&f.mac);
        net.interfaces.push(Interface {
            name: guest.clone(),
            mac: mac.clone(),
            addresses: vec![format!("{}/{}", f.addr, f.prefix)],
            mtu: f.mtu,
            ..Default::default()
        });
        net.routes.extend(routes_of(&table, &f.iface, &guest));
        net.links.push(Link { tap, iface: f.iface.clone(), mac });
    }
    // On-link routes first: a gateway must be reachable when its route is added.
    net.routes.sort_by_key(|r| !r.gateway.is_empty());
    Ok(Some(net))
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

/// Every interface but loopback (and hull's own taps) with an IPv4
/// address: its first address, MAC and MTU, in the kernel's order.
fn find_interfaces() -> Result<Vec<Found>, String> {
    let addrs: Vec<_> = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?.collect();
    let ctl = ctl_socket()?;
    let mut found: Vec<Found> = Vec::new();
    for a in &addrs {
        let name = &a.interface_name;
        if name == "lo" || name.starts_with("hulltap") || found.iter().any(|f| &f.iface == name) {
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
            .filter(|l| &l.interface_name == name)
            .find_map(|l| l.address.as_ref()?.as_link_addr()?.addr())
            .ok_or_else(|| format!("interface {name} has no MAC address"))?;
        if found.len() == MAX_LINKS {
            return Err(format!("the pod network namespace has more than {MAX_LINKS} interfaces with IPv4"));
        }
        let mtu = get_mtu(&ctl, name)?;
        found.push(Found { iface: name.clone(), mac, addr: ip, prefix, mtu });
    }
    Ok(found)
}

/// The IPv4 routes out of `iface` in /proc/net/route text, for the guest's
/// NIC `guest`.
pub fn routes_of(table: &str, iface: &str, guest: &str) -> Vec<Route> {
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
            device: guest.into(),
            ..Default::default()
        });
    }
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
        let r = routes_of(table, "eth0", "eth1");
        let got: Vec<_> = r.iter().map(|r| (r.destination.as_str(), r.gateway.as_str(), r.device.as_str())).collect();
        assert_eq!(got, [("default", "10.200.1.1", "eth1"), ("10.200.1.0/24", "", "eth1")]);
    }

    #[test]
    fn resolv_conf_within_the_agents_limits() {
        let d = parse_resolv_conf(
            "# comment\nnameserver 10.96.0.10\nnameserver fd00::a\nnameserver bogus\nnameserver 1.1.1.1\n\
             nameserver 8.8.8.8\nsearch old.example\nsearch default.svc.cluster.local cluster.local bad/dom\n\
             options ndots:5 edns0\n",
        );
        assert_eq!(d.servers, ["10.96.0.10", "fd00::a", "1.1.1.1"]);
        assert_eq!(d.search, ["default.svc.cluster.local", "cluster.local"]);
        assert_eq!(d.options, ["ndots:5", "edns0"]);
        assert_eq!(parse_resolv_conf(""), Dns::default());
    }

    #[test]
    fn dns_from_the_specs_resolv_conf_mount() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("resolv.conf");
        std::fs::write(&f, "nameserver 10.0.0.10\nsearch svc.local\n").unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/etc/hosts", "source": "/nonexistent", "type": "bind"},
            {"destination": "/etc/resolv.conf", "source": f, "type": "bind", "options": ["rbind", "ro"]}
        ]});
        let d = dns_of(&spec).unwrap();
        assert_eq!(d.servers, ["10.0.0.10"]);
        assert_eq!(d.search, ["svc.local"]);
        assert_eq!(dns_of(&serde_json::json!({"mounts": []})), None);
        let missing = serde_json::json!({"mounts": [{"destination": "/etc/resolv.conf", "source": "/nonexistent/r"}]});
        assert_eq!(dns_of(&missing), None);
    }

    /// In a namespace of its own: two veths with addresses give two taps,
    /// each joined to its veth with tc both ways, and the agent's view of
    /// them (eth0, eth1 in order). Needs root and tc.
    #[test]
    fn attaches_a_tap_to_each_pod_interface() {
        if !nix::unistd::geteuid().is_root() || Command::new("tc").arg("-V").output().is_err() {
            eprintln!("skipped: needs root and tc");
            return;
        }
        let name = format!("hull-net-test-{}", std::process::id());
        let ns = format!("/var/run/netns/{name}");
        let sh = |c: &str| {
            let st = Command::new("sh").args(["-c", c]).status().unwrap();
            assert!(st.success(), "{c}");
        };
        let out = |args: &[&str]| {
            String::from_utf8_lossy(&Command::new(args[0]).args(&args[1..]).output().unwrap().stdout).into_owned()
        };
        sh(&format!(
            "ip netns add {name} && ip -n {name} link add eth0 type veth peer name peer0 && \
             ip -n {name} link add net1 type veth peer name peer1 && \
             ip -n {name} addr add 10.200.9.2/24 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} addr add 10.201.9.2/24 dev net1 && ip -n {name} link set net1 up && \
             ip -n {name} link set peer0 up && ip -n {name} link set peer1 up && \
             ip -n {name} route add default via 10.200.9.1"
        ));
        let r = attach(Path::new(&ns));
        let links = out(&["ip", "-n", &name, "-o", "link"]);
        let filters: Vec<String> =
            ["eth0", "net1"].iter().map(|d| out(&["tc", "-n", &name, "filter", "show", "dev", d, "ingress"])).collect();
        let net = r.unwrap().expect("interfaces");
        let ifaces: Vec<_> = net.links.iter().map(|l| l.iface.as_str()).collect();
        assert_eq!(ifaces, ["eth0", "net1"]);
        let guest: Vec<_> = net.interfaces.iter().map(|i| (i.name.as_str(), i.addresses[0].as_str())).collect();
        assert_eq!(guest, [("eth0", "10.200.9.2/24"), ("eth1", "10.201.9.2/24")]);
        let routes: Vec<_> = net.routes.iter().map(|r| (r.destination.as_str(), r.device.as_str())).collect();
        assert_eq!(routes, [("10.200.9.0/24", "eth0"), ("10.201.9.0/24", "eth1"), ("default", "eth0")]);
        assert!(links.contains("hulltap0") && links.contains("hulltap1"), "{links}");
        assert!(filters[0].contains("mirred") && filters[0].contains("hulltap0"), "{}", filters[0]);
        assert!(filters[1].contains("mirred") && filters[1].contains("hulltap1"), "{}", filters[1]);
        // The taps live as long as their fds.
        drop(net);
        assert!(!out(&["ip", "-n", &name, "-o", "link"]).contains("hulltap"));
        // A second pod in the same namespace replaces the first one's
        // redirects; after its VM (the taps' fds) is gone, detach leaves
        // no qdisc on the interfaces.
        let again = attach(Path::new(&ns)).unwrap().expect("interfaces");
        let ifaces: Vec<String> = again.links.iter().map(|l| l.iface.clone()).collect();
        drop(again);
        let detached: Vec<_> = ifaces.iter().map(|i| detach(Path::new(&ns), i)).collect();
        let qdiscs = out(&["tc", "-n", &name, "qdisc", "show"]);
        sh(&format!("ip netns del {name}"));
        assert_eq!(ifaces, ["eth0", "net1"]);
        for d in detached {
            d.unwrap();
        }
        assert!(!qdiscs.contains("ingress"), "{qdiscs}");
        // A namespace CNI already removed: nothing to do.
        detach(Path::new(&ns), "eth0").unwrap();
    }
}
