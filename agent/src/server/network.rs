//! The pod network inside the guest: loopback up, the NIC's MAC, MTU and
//! IPv4 address, and routes, from SetupSandbox (validated by [`plan`],
//! carried out by [`apply`] with the classic interface and route ioctls:
//! no netlink library in the static agent). IPv6 is refused for now.

use hull_agent_api::proto::agent::{Interface, Route};
use hull_agent_api::validate::shown;
use std::io;
use std::net::Ipv4Addr;

pub const MAX_INTERFACES: usize = 4;
pub const MAX_ROUTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfacePlan {
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub addr: Option<(Ipv4Addr, u8)>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Destination network and prefix length (0.0.0.0/0 for "default").
    pub dest: (Ipv4Addr, u8),
    pub gateway: Option<Ipv4Addr>,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetPlan {
    pub interfaces: Vec<IfacePlan>,
    pub routes: Vec<RoutePlan>,
}

fn check_ifname(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() < libc::IFNAMSIZ
        && n != "."
        && n != ".."
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("interface name {} is not 1 to 15 of [A-Za-z0-9_.-]", shown(n)))
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("MAC address {} is not six hex bytes like 02:42:0a:00:00:05", shown(s));
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("MAC address {} is not a unicast address", shown(s)));
    }
    Ok(mac)
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').ok_or_else(|| format!("{} is not an address/prefix length", shown(s)))?;
    if ip.contains(':') {
        return Err(format!("{}: IPv6 is not supported yet", shown(s)));
    }
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{} is not an IPv4 address/prefix length", shown(s)))?;
    let len: u8 =
        len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| format!("{}: prefix length is not 0 to 32", shown(s)))?;
    Ok((ip, len))
}

fn netmask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(if len == 0 { 0 } else { u32::MAX << (32 - len as u32) })
}

/// Validates the request's interfaces and routes.
pub fn plan(interfaces: &[Interface], routes: &[Route]) -> Result<NetPlan, String> {
    if interfaces.len() > MAX_INTERFACES {
        return Err(format!("{} interfaces: at most {MAX_INTERFACES} are allowed", interfaces.len()));
    }
    if routes.len() > MAX_ROUTES {
        return Err(format!("{} routes: at most {MAX_ROUTES} are allowed", routes.len()));
    }
    let mut p = NetPlan::default();
    for i in interfaces {
        check_ifname(&i.name)?;
        if i.name == "lo" || p.interfaces.iter().any(|o: &IfacePlan| o.name == i.name) {
            return Err(format!("interface {} is given twice or is the loopback", shown(&i.name)));
        }
        if i.addresses.len() > 1 {
            return Err(format!("interface {}: {} addresses: at most one is supported", i.name, i.addresses.len()));
        }
        let addr =
            i.addresses.first().map(|a| parse_cidr(a)).transpose().map_err(|e| format!("interface {}: {e}", i.name))?;
        let mac = (!i.mac.is_empty())
            .then(|| parse_mac(&i.mac))
            .transpose()
            .map_err(|e| format!("interface {}: {e}", i.name))?;
        let mtu = match i.mtu {
            0 => None,
            m @ 68..=65535 => Some(m),
            m => return Err(format!("interface {}: MTU {m} is not 68 to 65535", i.name)),
        };
        p.interfaces.push(IfacePlan { name: i.name.clone(), mac, addr, mtu });
    }
    for r in routes {
        let dest = match r.destination.as_str() {
            "default" => (Ipv4Addr::UNSPECIFIED, 0),
            d => parse_cidr(d).map_err(|e| format!("route destination: {e}"))?,
        };
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => Some(g.parse::<Ipv4Addr>().map_err(|_| format!("route gateway {} is not an IPv4 address", shown(g)))?),
        };
        if !p.interfaces.iter().any(|i| i.name == r.device) {
            return Err(format!("route device {} is not one of the request's interfaces", shown(&r.device)));
        }
        p.routes.push(RoutePlan { dest, gateway, device: r.device.clone() });
    }
    Ok(p)
}

/// A socket for interface ioctls.
fn ctl_socket() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: &std::os::fd::OwnedFd, req: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> Result<(), String> {
    // SAFETY: `arg` points to the struct `req` expects, alive for the call.
    if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(fd), req as _, arg) } < 0 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn set_up(fd: &std::os::fd::OwnedFd, name: &str) -> Result<(), String> {
    let mut r = ifreq(name);
    ioctl(fd, libc::SIOCGIFFLAGS, &mut r as *mut _ as *mut _, &format!("{name}: get flags"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(fd, libc::SIOCSIFFLAGS, &mut r as *mut _ as *mut _, &format!("{name}: set up"))
}

/// Carries a plan out in the current network namespace: loopback up, then
/// each interface (MAC, MTU, address, up), then the routes.
pub fn apply(p: &NetPlan) -> Result<(), String> {
    let fd = ctl_socket().map_err(|e| format!("network control socket: {e}"))?;
    set_up(&fd, "lo")?;
    for i in &p.interfaces {
        if let Some(mac) = i.mac {
            let mut r = ifreq(&i.name);
            let mut sa: libc::sockaddr = sockaddr_in(Ipv4Addr::UNSPECIFIED);
            sa.sa_family = libc::ARPHRD_ETHER;
            for (d, s) in sa.sa_data.iter_mut().zip(mac) {
                *d = s as libc::c_char;
            }
            r.ifr_ifru.ifru_hwaddr = sa;
            ioctl(&fd, libc::SIOCSIFHWADDR, &mut r as *mut _ as *mut _, &format!("{}: set MAC", i.name))?;
        }
        if let Some(mtu) = i.mtu {
            let mut r = ifreq(&i.name);
            r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
            ioctl(&fd, libc::SIOCSIFMTU, &mut r as *mut _ as *mut _, &format!("{}: set MTU {mtu}", i.name))?;
        }
        if let Some((ip, len)) = i.addr {
            let mut r = ifreq(&i.name);
            r.ifr_ifru.ifru_addr = sockaddr_in(ip);
            ioctl(&fd, libc::SIOCSIFADDR, &mut r as *mut _ as *mut _, &format!("{}: set address {ip}", i.name))?;
            let mut r = ifreq(&i.name);
            r.ifr_ifru.ifru_netmask = sockaddr_in(netmask(len));
            ioctl(&fd, libc::SIOCSIFNETMASK, &mut r as *mut _ as *mut _, &format!("{}: set prefix /{len}", i.name))?;
        }
        set_up(&fd, &i.name)?;
    }
    for r in &p.routes {
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(r.dest.0);
        rt.rt_genmask = sockaddr_in(netmask(r.dest.1));
        rt.rt_flags = libc::RTF_UP;
        if let Some(gw) = r.gateway {
            rt.rt_gateway = sockaddr_in(gw);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        let mut dev: Vec<libc::c_char> = r.device.bytes().map(|b| b as libc::c_char).chain([0]).collect();
        rt.rt_dev = dev.as_mut_ptr();
        let what = format!("route {}/{} via {:?} dev {}", r.dest.0, r.dest.1, r.gateway, r.device);
        match ioctl(&fd, libc::SIOCADDRT, &mut rt as *mut _ as *mut _, &what) {
            // The kernel adds the on-link route of an address itself.
            Err(e) if e.ends_with(&io::Error::from_raw_os_error(libc::EEXIST).to_string()) => {}
            r => r?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &str, addrs: &[&str], mtu: u32) -> Interface {
        Interface {
            name: name.into(),
            mac: mac.into(),
            addresses: addrs.iter().map(|a| a.to_string()).collect(),
            mtu,
            ..Default::default()
        }
    }

    fn route(d: &str, g: &str, dev: &str) -> Route {
        Route { destination: d.into(), gateway: g.into(), device: dev.into(), ..Default::default() }
    }

    #[test]
    fn plans_a_pod_network() {
        let p = plan(
            &[iface("eth0", "02:42:0a:c8:01:02", &["10.200.1.2/24"], 1500)],
            &[route("default", "10.200.1.1", "eth0"), route("10.0.0.0/8", "", "eth0")],
        )
        .unwrap();
        assert_eq!(
            p.interfaces,
            [IfacePlan {
                name: "eth0".into(),
                mac: Some([2, 0x42, 10, 0xc8, 1, 2]),
                addr: Some((Ipv4Addr::new(10, 200, 1, 2), 24)),
                mtu: Some(1500)
            }]
        );
        assert_eq!(p.routes[0].dest, (Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(p.routes[0].gateway, Some(Ipv4Addr::new(10, 200, 1, 1)));
        assert_eq!(p.routes[1].gateway, None);
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(plan(&[], &[]).unwrap(), NetPlan::default());
    }

    #[test]
    fn rejects_bad_networks() {
        let ok = || iface("eth0", "02:00:00:00:00:01", &["10.0.0.2/24"], 0);
        for (ifs, routes, needle) in [
            (vec![iface("eth0/x", "", &[], 0)], vec![], "interface name"),
            (vec![iface("averyveryverylongname", "", &[], 0)], vec![], "interface name"),
            (vec![iface("lo", "", &[], 0)], vec![], "loopback"),
            (vec![ok(), ok()], vec![], "twice"),
            (vec![iface("eth0", "01:00:00:00:00:01", &[], 0)], vec![], "unicast"),
            (vec![iface("eth0", "02:00:00:00:00", &[], 0)], vec![], "six hex bytes"),
            (vec![iface("eth0", "zz:00:00:00:00:01", &[], 0)], vec![], "six hex bytes"),
            (vec![iface("eth0", "", &["10.0.0.2"], 0)], vec![], "address/prefix"),
            (vec![iface("eth0", "", &["10.0.0.2/33"], 0)], vec![], "prefix length"),
            (vec![iface("eth0", "", &["fd00::2/64"], 0)], vec![], "IPv6"),
            (vec![iface("eth0", "", &["10.0.0.2/24", "10.0.1.2/24"], 0)], vec![], "at most one"),
            (vec![iface("eth0", "", &[], 20)], vec![], "MTU 20"),
            (vec![ok()], vec![route("default", "10.0.0.1", "eth1")], "not one of the request's interfaces"),
            (vec![ok()], vec![route("default", "gw", "eth0")], "gateway"),
            (vec![ok()], vec![route("10.0.0.0", "", "eth0")], "route destination"),
            (vec![ok(); 5], vec![], "at most 4"),
        ] {
            let e = plan(&ifs, &routes).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
