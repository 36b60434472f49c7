//! Snapshots and restore: a paused VM written to a directory (its VM,
//! vCPU, serial and device states as JSON, its memory as a sparse file), and
//! a new VM made from such a directory with its memory mapped private (copy
//! on write), so every VM restored from one template shares the template's
//! clean pages.
//!
//! A restored VM gets its own backends: the snapshot's disks, virtiofsd
//! sockets, vsock socket and net backends are replaced by the ones in
//! [`RestoreConfig`], matched by kind and order. What the guest already knows about them must
//! not change (disk capacity, read-only flag, file system tag); the restore
//! checks that and says which device differs.
//!
//! The snapshot file is input like any other: sizes, queue addresses and
//! device kinds are validated before anything runs.

use crate::arch::x86_64::layout::ram_ranges;
use crate::builder::{console_writer, start_vcpus};
use crate::config::{validate_net, Console, DiskConfig, FsDeviceConfig, NetDeviceConfig, VmConfig, VsockDeviceConfig};
use crate::device_manager::DeviceManager;
use crate::devices::legacy::SerialState;
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::fs::{Fs, FsConfig};
use crate::devices::virtio::mmio::MmioState;
use crate::devices::virtio::net::{Net, NetBackend};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{DeviceState, VirtioDevice};
use crate::vmm::{Vmm, VmmEvent};
use crate::vstate::memory::{self, Sharing};
use crate::vstate::vcpu::{msr_index_list, Vcpu, VcpuState};
use crate::vstate::vm::{Vm, VmState};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use vmm_sys_util::eventfd::EventFd;

/// Format version of `state.json`; bumped on incompatible changes.
pub const SNAPSHOT_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";

/// One virtio device: its transport and its own state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub transport: MmioState,
    pub device: DeviceState,
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// hull-vmm's version that wrote it (a different one refuses it).
    pub hull_version: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub vm: VmState,
    pub vcpu_states: Vec<VcpuState>,
    pub serial: Option<SerialState>,
    /// In virtio-mmio slot order.
    pub devices: Vec<DeviceSnapshot>,
}

/// What a restored VM is made of besides the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// The snapshot directory (`state.json` + `memory`).
    pub snapshot: PathBuf,
    /// Replaces the snapshot's disks, in order; exactly as many.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Replaces the snapshot's virtiofsd sockets, in order (tags must match).
    #[serde(default)]
    pub fs: Vec<FsDeviceConfig>,
    /// Replaces the snapshot's vsock socket (the guest CID stays).
    #[serde(default)]
    pub vsock: Option<VsockDeviceConfig>,
    /// Replaces the backends of the snapshot's net devices, in order (at
    /// most as many). A net device without one here keeps its snapshot
    /// backend if that was `none` or a tap name; one that had an inherited
    /// descriptor needs a new one. A `mac` here must be the snapshot's:
    /// the guest read its MAC when it booted.
    #[serde(default)]
    pub net: Vec<NetDeviceConfig>,
    #[serde(default)]
    pub console: Console,
}

impl Vmm {
    /// Writes the paused VM to `dir` (created if needed): `memory` (sparse:
    /// zero pages are left as holes) and then `state.json` (written last,
    /// renamed into place: a directory with a state file is complete).
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        ensure!(self.paused, "pause the VM before taking a snapshot");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let msr_indices = msr_index_list(self.vm.kvm())?;
        let mut vcpu_states = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpu_states.push(v.save_state(&msr_indices)?);
        }
        let mut devices = Vec::new();
        for (i, (transport, device)) in self.devices.save_virtio_states().into_iter().enumerate() {
            let device = device
                .with_context(|| format!("virtio device {i} (type {}) cannot be snapshotted", transport.device_type))?;
            devices.push(DeviceSnapshot { transport, device });
        }
        let snap = Snapshot {
            version: SNAPSHOT_VERSION,
            hull_version: env!("CARGO_PKG_VERSION").to_string(),
            mem_mib: self.config.mem_mib,
            vcpus: self.config.vcpus,
            vm: self.vm.save_state()?,
            vcpu_states,
            serial: self.devices.serial_state(),
            devices,
        };
        write_memory(&self.mem_file, self.config.mem_mib << 20, &dir.join(MEMORY_FILE))?;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        serde_json::to_writer(&mut f, &snap)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(STATE_FILE)).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(())
    }
}

/// The next (start, end) data range of `f` at or after `off` (SEEK_DATA /
/// SEEK_HOLE: a memfd's never-touched pages are holes); None past the last.
fn next_data(f: &File, off: u64, size: u64) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let start = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if start < 0 || start as u64 >= size {
        return None;
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(f.as_raw_fd(), start, libc::SEEK_HOLE) };
    let end = if end < 0 { size } else { (end as u64).min(size) };
    Some((start as u64, end))
}

/// Copies the memory file's non-zero pages to `path` (a new sparse file),
/// reading only its data ranges.
fn write_memory(src: &File, size: u64, path: &Path) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    const PAGE: usize = 4096;
    let tmp = path.with_extension("tmp");
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    out.set_len(size)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while let Some((start, end)) = next_data(src, pos, size) {
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK) as usize;
            src.read_exact_at(&mut buf[..n], off).context("reading guest memory")?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    out.write_all_at(page, off + (i * PAGE) as u64)
                        .with_context(|| format!("writing {}", tmp.display()))?;
                }
            }
            off += n as u64;
        }
        pos = end;
    }
    out.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Reads and checks a snapshot's state file.
pub fn load(dir: &Path) -> Result<Snapshot> {
    let p = dir.join(STATE_FILE);
    let f = File::open(&p).with_context(|| format!("snapshot state {}", p.display()))?;
    let snap: Snapshot = serde_json::from_reader(std::io::BufReader::new(f))
        .with_context(|| format!("snapshot state {} is not valid", p.display()))?;
    ensure!(
        snap.version == SNAPSHOT_VERSION,
        "snapshot {} has format version {}, this hull-vmm reads {SNAPSHOT_VERSION}",
        dir.display(),
        snap.version
    );
    ensure!(
        snap.hull_version == env!("CARGO_PKG_VERSION"),
        "snapshot {} was written by hull-vmm {}, this is {}: rebuild the template",
        dir.display(),
        snap.hull_version,
        env!("CARGO_PKG_VERSION")
    );
    ensure!(
        snap.vcpus >= 1 && snap.vcpu_states.len() == usize::from(snap.vcpus),
        "snapshot {}: {} vCPU states for {} vCPUs",
        dir.display(),
        snap.vcpu_states.len(),
        snap.vcpus
    );
    for (i, v) in snap.vcpu_states.iter().enumerate() {
        ensure!(usize::from(v.id) == i, "snapshot {}: vCPU state {i} has id {}", dir.display(), v.id);
    }
    Ok(snap)
}

/// Makes the device for one snapshot slot with this VM's backend.
struct Overrides<'a> {
    disks: std::slice::Iter<'a, DiskConfig>,
    fs: std::slice::Iter<'a, FsDeviceConfig>,
    vsock: Option<&'a VsockDeviceConfig>,
    net: std::slice::Iter<'a, NetDeviceConfig>,
}

fn make_device(slot: usize, snap: &DeviceState, o: &mut Overrides) -> Result<Box<dyn VirtioDevice>> {
    Ok(match snap {
        DeviceState::Block(s) => {
            let d = o
                .disks
                .next()
                .with_context(|| format!("the snapshot has a disk in slot {slot}: give one more disk"))?;
            let blk = Block::new(BlockConfig { path: d.path.clone(), read_only: d.read_only, id: d.id.clone() })?;
            ensure!(
                blk.nsectors() == s.nsectors,
                "disk {} has {} sectors, the snapshot's disk in slot {slot} had {} (the guest knows its size)",
                d.path.display(),
                blk.nsectors(),
                s.nsectors
            );
            ensure!(
                d.read_only == s.read_only,
                "disk {}: read-only is {}, in the snapshot it was {}",
                d.path.display(),
                d.read_only,
                s.read_only
            );
            Box::new(blk)
        }
        DeviceState::Fs(s) => {
            let f = o.fs.next().with_context(|| {
                format!("the snapshot has a virtio-fs device in slot {slot}: give one more --fs-socket")
            })?;
            ensure!(
                f.tag == s.tag,
                "virtio-fs socket {} has tag {:?}, the snapshot's device in slot {slot} has {:?}",
                f.socket.display(),
                f.tag,
                s.tag
            );
            Box::new(Fs::new(FsConfig::new(f.socket.clone(), f.tag.clone()))?)
        }
        DeviceState::Vsock(s) => {
            let uds_path = o.vsock.map_or_else(|| s.uds_path.clone(), |v| v.uds_path.clone());
            let mut state = s.clone();
            state.uds_path = uds_path;
            // from_state queues a transport reset: the guest drops the
            // template's connections.
            Box::new(Vsock::from_state(&state)?)
        }
        DeviceState::Net(s) => {
            let backend = match o.net.next() {
                Some(n) => {
                    if let Some(mac) = n.mac_addr()? {
                        ensure!(
                            mac == s.mac,
                            "net device in slot {slot}: mac {mac} given, the snapshot's guest has {} (it read its \
                             MAC at boot; change it inside the guest instead)",
                            s.mac
                        );
                    }
                    n.backend.clone()
                }
                None => match &s.backend {
                    NetBackend::Fd(fd) => bail!(
                        "the snapshot's net device in slot {slot} used inherited fd {fd}: give it a backend (--net)"
                    ),
                    b => b.clone(),
                },
            };
            // Activation (now, or when the guest's driver gets there) sets
            // the new tap's offloads for the features the guest accepted.
            Box::new(Net::from_state(s, backend).with_context(|| format!("net device in slot {slot}"))?)
        }
    })
}

/// Builds a VM from a snapshot and starts its vCPUs.
pub fn restore(rc: &RestoreConfig, events: Sender<VmmEvent>) -> Result<Vmm> {
    let snap = load(&rc.snapshot)?;
    let n_disks = snap.devices.iter().filter(|d| matches!(d.device, DeviceState::Block(_))).count();
    let n_fs = snap.devices.iter().filter(|d| matches!(d.device, DeviceState::Fs(_))).count();
    ensure!(
        rc.disks.len() == n_disks,
        "the snapshot has {n_disks} disk(s), {} were given: every disk slot needs this VM's own disk",
        rc.disks.len()
    );
    ensure!(rc.fs.len() == n_fs, "the snapshot has {n_fs} virtio-fs device(s), {} sockets were given", rc.fs.len());
    if rc.vsock.is_some() && !snap.devices.iter().any(|d| matches!(d.device, DeviceState::Vsock(_))) {
        bail!("a vsock socket was given but the snapshot has no vsock device");
    }
    let n_net = snap.devices.iter().filter(|d| matches!(d.device, DeviceState::Net(_))).count();
    ensure!(
        rc.net.len() <= n_net,
        "the snapshot has {n_net} net device(s), {} backends were given (a restore cannot add devices)",
        rc.net.len()
    );
    validate_net(&rc.net)?;
    // The snapshot's RAM layout must be what this build lays out.
    ensure!(!ram_ranges(snap.mem_mib << 20).is_empty(), "snapshot memory size {} MiB", snap.mem_mib);

    let vm = Vm::new()?;
    let (mem, mem_file) = memory::open_file(&rc.snapshot.join(MEMORY_FILE), snap.mem_mib, Sharing::Private)?;
    vm.set_memory(&mem)?;
    vm.setup_irqchip()?;
    vm.restore_state(&snap.vm)?;

    let mut devices = DeviceManager::new();
    let reset_evt = EventFd::new(0).context("eventfd")?;
    devices.add_legacy(vm.fd(), console_writer(&rc.console)?, reset_evt.try_clone()?, snap.serial.as_ref())?;
    let mut o = Overrides { disks: rc.disks.iter(), fs: rc.fs.iter(), vsock: rc.vsock.as_ref(), net: rc.net.iter() };
    for (slot, d) in snap.devices.iter().enumerate() {
        let dev = make_device(slot, &d.device, &mut o)?;
        devices.add_virtio_restored(vm.fd(), &mem, dev, &d.transport).with_context(|| format!("virtio slot {slot}"))?;
    }

    let mut vcpus = Vec::new();
    for s in &snap.vcpu_states {
        let v = Vcpu::new(vm.fd(), s.id, devices.pio.clone(), devices.mmio.clone())?;
        v.restore_cpuid(vm.kvm(), snap.vcpus, &s.cpuid)?;
        v.restore_state(s)?;
        vcpus.push(v);
    }
    // Devices start serving only now: an interrupt raised before the LAPIC
    // state was restored would be lost.
    devices.finish_restore()?;
    let config = VmConfig {
        kernel: rc.snapshot.clone(),
        initrd: None,
        cmdline: String::new(),
        mem_mib: snap.mem_mib,
        vcpus: snap.vcpus,
        disks: rc.disks.clone(),
        fs: rc.fs.clone(),
        vsock: rc.vsock.clone(),
        net: rc.net.clone(),
        console: rc.console.clone(),
    };
    start_vcpus(vm, mem, mem_file, config, devices, vcpus, reset_evt, events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn memory_file_keeps_data_and_holes() {
        let (mem, f) = memory::create_memfd(32).unwrap();
        mem.write_obj(0xabu8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0xcdu8, GuestAddress(0x1ff_f000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MEMORY_FILE);
        write_memory(&f, 32 << 20, &p).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 32 << 20);
        assert_eq!((data[0x5000], data[0x1ff_f000], data[0x4fff]), (0xab, 0xcd, 0));
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&p).unwrap());
        assert!(blocks * 512 <= 64 << 10, "the copy is sparse: {blocks} blocks");
    }

    #[test]
    fn net_backends_on_restore() {
        use crate::devices::virtio::net::{MacAddr, NetState, AVAIL_FEATURES};
        let state = |backend| {
            DeviceState::Net(NetState {
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                backend,
                avail_features: AVAIL_FEATURES,
                acked_features: AVAIL_FEATURES,
            })
        };
        let make = |snap: &DeviceState, net: &[NetDeviceConfig]| {
            let mut o = Overrides { disks: [].iter(), fs: [].iter(), vsock: None, net: net.iter() };
            make_device(2, snap, &mut o).map(|d| d.snapshot_state())
        };
        // A template built without a backend restores without one.
        let Some(DeviceState::Net(s)) = make(&state(NetBackend::None), &[]).unwrap() else { panic!() };
        assert_eq!(
            (s.backend, s.mac, s.acked_features),
            (NetBackend::None, MacAddr([2, 0, 0, 0, 0, 9]), AVAIL_FEATURES)
        );
        // An inherited descriptor of the old process means nothing now.
        let e = format!("{:#}", make(&state(NetBackend::Fd(7)), &[]).err().unwrap());
        assert!(e.contains("slot 2 used inherited fd 7: give it a backend"), "{e}");
        // The guest's MAC cannot change under it; the same one may be given.
        let other = NetDeviceConfig { backend: NetBackend::None, mac: Some("02:00:00:00:00:01".into()) };
        let e = format!("{:#}", make(&state(NetBackend::None), &[other]).err().unwrap());
        assert!(e.contains("mac 02:00:00:00:00:01 given, the snapshot's guest has 02:00:00:00:00:09"), "{e}");
        let same = NetDeviceConfig { backend: NetBackend::None, mac: Some("02:00:00:00:00:09".into()) };
        assert!(make(&state(NetBackend::Fd(7)), &[same]).is_ok());
        // A bad override names itself.
        let bad = NetDeviceConfig { backend: NetBackend::Fd(987_654), mac: None };
        let e = format!("{:#}", make(&state(NetBackend::None), &[bad]).err().unwrap());
        assert!(e.contains("net device in slot 2") && e.contains("net fd 987654: not an open file descriptor"), "{e}");
    }

    #[test]
    fn bad_snapshots_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
        std::fs::write(dir.path().join(STATE_FILE), "{\"version\": 1}").unwrap();
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("not valid"), "{e}");
        let rc = RestoreConfig {
            snapshot: dir.path().join("none"),
            disks: vec![],
            fs: vec![],
            vsock: None,
            net: vec![],
            console: Console::Off,
        };
        let e = format!("{:#}", restore(&rc, std::sync::mpsc::channel().0).err().unwrap());
        assert!(e.contains("none/state.json"), "{e}");
    }
}
