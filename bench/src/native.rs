//! The host-side restore path, natively (no guest runs, so it works on a
//! PVM-only host): a snapshot is made from a VM that is configured but never
//! run, then each iteration does what `hull_vmm::persist::restore` does on
//! the host before the guest runs — read the state file, create the VM, map
//! the memory file MAP_PRIVATE and register it, make the irqchip and PIT and
//! restore them with the clock, add the legacy devices, create the vCPUs and
//! restore their registers/MSRs/LAPIC, start their threads (paused) — and
//! takes a host cgroup. Each step is timed on its own.

use crate::stats::Summary;
use anyhow::{bail, Context, Result};
use hull_shim::cgroups::HostCgroups;
use hull_vmm::arch::x86_64::boot::KernelEntry;
use hull_vmm::arch::x86_64::regs::EntryMode;
use hull_vmm::device_manager::DeviceManager;
use hull_vmm::persist::{self, Snapshot, MEMORY_FILE, SNAPSHOT_VERSION, STATE_FILE};
use hull_vmm::vstate::memory::{self, Sharing};
use hull_vmm::vstate::vcpu::{msr_index_list, Vcpu, VcpuExitReason};
use hull_vmm::vstate::vm::Vm;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NativeOptions {
    pub iterations: usize,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// MiB of non-zero pages in the memory file (what a booted idle guest
    /// leaves: kernel, initramfs contents, page tables, agent).
    pub touched_mib: u64,
}

/// One step's timings (milliseconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub what: String,
    pub summary: Summary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NativeResult {
    pub options: NativeOptions,
    /// How the cgroup was taken ("hull_shim::cgroups" or "mkdir+rename").
    pub cgroup_method: String,
    pub steps: Vec<Step>,
    /// The whole path per iteration (ms).
    pub total: Summary,
    pub total_samples_ms: Vec<f64>,
    /// KVM_GET_SUPPORTED_CPUID alone (inside the `cpuid` step), timed apart.
    #[serde(default)]
    pub get_supported_cpuid: Summary,
}

pub fn run(opts: &NativeOptions) -> Result<NativeResult> {
    let dir = tempfile::Builder::new().prefix("hull-bench-snap.").tempdir_in(tmp_base())?;
    make_snapshot(dir.path(), opts).context("making the native snapshot")?;
    let mut cgroups = Cgroups::new(opts.iterations + 1)?;
    let names = [
        ("load", "read + parse state.json"),
        ("create_vm", "open /dev/kvm, KVM_CREATE_VM"),
        ("map_memory", "mmap memory file MAP_PRIVATE + KVM_SET_USER_MEMORY_REGION"),
        ("irqchip", "TSS, irqchip, PIT create + PIT/clock/PIC/IOAPIC restore"),
        ("devices", "serial + i8042 (irqfd)"),
        ("vcpu_create", "KVM_CREATE_VCPU"),
        ("cpuid", "KVM_SET_CPUID2 (the snapshot's CPUID)"),
        ("vcpu_state", "restore regs/sregs/xcrs/xsave/LAPIC/MSRs/mp_state/events"),
        ("vcpu_threads", "start vCPU threads (paused)"),
        ("cgroup", "take a host cgroup"),
    ];
    let mut per_step: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut totals = Vec::new();
    let mut get_cpuid = Vec::new();
    // One untimed warm-up: page cache, KVM module state, allocator.
    for i in 0..=opts.iterations {
        let mut t = [0f64; 10];
        let start = Instant::now();
        let mut lap = Instant::now();
        let mut mark = |k: usize| {
            t[k] = lap.elapsed().as_secs_f64() * 1e3;
            lap = Instant::now();
        };
        let snap = persist::load(dir.path())?;
        mark(0);
        let vm = Vm::new()?;
        mark(1);
        let (mem, _file) = memory::open_file(&dir.path().join(MEMORY_FILE), snap.mem_mib, Sharing::Private)?;
        vm.set_memory(&mem)?;
        mark(2);
        vm.setup_irqchip()?;
        vm.restore_state(&snap.vm)?;
        mark(3);
        let mut devices = DeviceManager::new();
        let reset = EventFd::new(0)?;
        devices.add_legacy(vm.fd(), Box::new(std::io::sink()), reset.try_clone()?, snap.serial.as_ref())?;
        mark(4);
        let mut vcpus = Vec::new();
        for s in &snap.vcpu_states {
            vcpus.push(Vcpu::new(vm.fd(), s.id, devices.pio.clone(), devices.mmio.clone())?);
        }
        mark(5);
        for (v, s) in vcpus.iter().zip(&snap.vcpu_states) {
            v.restore_cpuid(vm.kvm(), snap.vcpus, &s.cpuid)?;
        }
        mark(6);
        for (v, s) in vcpus.iter().zip(&snap.vcpu_states) {
            v.restore_state(s)?;
        }
        mark(7);
        let on_exit: Arc<dyn Fn(u8, VcpuExitReason) + Send + Sync> = Arc::new(|_, _| {});
        let mut handles = Vec::new();
        for v in vcpus {
            handles.push(v.start(true, on_exit.clone())?);
        }
        mark(8);
        let cg = cgroups.take(i)?;
        mark(9);
        let total = start.elapsed().as_secs_f64() * 1e3;
        for h in &mut handles {
            h.stop();
        }
        drop(handles);
        drop(devices);
        drop(mem);
        drop(vm);
        cgroups.give_back(cg)?;
        let kvm = kvm_ioctls::Kvm::new()?;
        let t0 = Instant::now();
        kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
        let cpuid_ms = t0.elapsed().as_secs_f64() * 1e3;
        if i > 0 {
            get_cpuid.push(cpuid_ms);
            for (k, v) in t.iter().enumerate() {
                per_step[k].push(*v);
            }
            totals.push(total);
        }
    }
    let steps = names
        .iter()
        .zip(per_step)
        .map(|((n, w), v)| Step { name: n.to_string(), what: w.to_string(), summary: Summary::of(&v) })
        .collect();
    Ok(NativeResult {
        options: opts.clone(),
        cgroup_method: cgroups.method(),
        steps,
        total: Summary::of(&totals),
        total_samples_ms: totals,
        get_supported_cpuid: Summary::of(&get_cpuid),
    })
}

fn tmp_base() -> PathBuf {
    // A tmpfs like the shim's state dir (/run) when there is one.
    for d in ["/run", "/dev/shm"] {
        let p = Path::new(d);
        if p.is_dir() && tempfile::tempdir_in(p).is_ok() {
            return p.to_path_buf();
        }
    }
    std::env::temp_dir()
}

/// A snapshot directory from a VM that is configured for a PVH boot but never
/// run: real KVM state (irqchip, PIT, clock, vCPU registers and MSRs) in the
/// format `persist::restore` reads, and a sparse memory file with
/// `touched_mib` of non-zero pages.
fn make_snapshot(dir: &Path, opts: &NativeOptions) -> Result<()> {
    let vm = Vm::new()?;
    let (mem, _f) = memory::create_memfd(opts.mem_mib)?;
    vm.set_memory(&mem)?;
    vm.setup_irqchip()?;
    let devices = DeviceManager::new();
    let indices = msr_index_list(vm.kvm())?;
    let mut vcpu_states = Vec::new();
    for id in 0..opts.vcpus {
        let v = Vcpu::new(vm.fd(), id, devices.pio.clone(), devices.mmio.clone())?;
        let entry = (id == 0).then_some(KernelEntry { mode: EntryMode::Pvh, entry: 0x100_0000 });
        v.configure(vm.kvm(), opts.vcpus, &mem, entry)?;
        vcpu_states.push(v.save_state(&indices)?);
    }
    let snap = Snapshot {
        version: SNAPSHOT_VERSION,
        hull_version: env!("CARGO_PKG_VERSION").to_string(),
        mem_mib: opts.mem_mib,
        vcpus: opts.vcpus,
        vm: vm.save_state()?,
        vcpu_states,
        serial: None,
        devices: Vec::new(),
    };
    std::fs::write(dir.join(STATE_FILE), serde_json::to_vec(&snap)?)?;
    let f = std::fs::File::create(dir.join(MEMORY_FILE))?;
    f.set_len(opts.mem_mib << 20)?;
    let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    // Non-zero pages spread over the low memory, as a guest leaves them.
    let touched_pages = (opts.touched_mib << 20) / 4096;
    let total_pages = (opts.mem_mib << 20) / 4096;
    let stride = (total_pages / touched_pages.max(1)).max(1);
    for p in 0..touched_pages.min(total_pages) {
        f.write_all_at(&page, p * stride * 4096)?;
    }
    f.sync_all()?;
    // A sanity check that the format is what restore reads.
    persist::load(dir)?;
    Ok(())
}

/// The "take a cgroup" step: the shim's host cgroup pool
/// (`hull_shim::cgroups::HostCgroups`: claim a pool entry, move a process
/// in, write the limits), under a parent of the benchmark's own; or, if that
/// fails here, the stand-in below.
enum Cgroups {
    Shim { cg: HostCgroups, child: std::process::Child, roots: Vec<PathBuf> },
    Own(CgroupPool),
}

enum Taken {
    Shim(hull_shim::cgroups::PodCgroup),
    Own(TakenCgroup),
}

impl Cgroups {
    fn new(n: usize) -> Result<Cgroups> {
        let parent = format!("hull-bench-{}", std::process::id());
        match HostCgroups::detect(&parent, n) {
            Ok(cg) => {
                let roots: Vec<PathBuf> =
                    cg.parent_dirs().iter().filter_map(|d| d.parent().map(Path::to_path_buf)).collect();
                let child = std::process::Command::new("sleep").arg("100000").spawn().context("spawning sleep")?;
                let me = Cgroups::Shim { cg, child, roots };
                if let Cgroups::Shim { cg, .. } = &me {
                    cg.refill().map_err(|e| anyhow::anyhow!("cgroup pool refill: {}", e.0))?;
                }
                Ok(me)
            }
            Err(e) => {
                eprintln!("hull-bench: hull_shim::cgroups unusable here ({}); timing mkdir+rename instead", e.0);
                Ok(Cgroups::Own(CgroupPool::new(n)?))
            }
        }
    }

    fn method(&self) -> String {
        match self {
            Cgroups::Shim { cg, .. } => format!(
                "hull_shim::cgroups::HostCgroups ({:?}): take() a pool entry, add_pid(), set_limits(1 vCPU, 256 MiB)",
                cg.version()
            ),
            Cgroups::Own(p) => p.method(),
        }
    }

    fn take(&mut self, i: usize) -> Result<Taken> {
        match self {
            Cgroups::Shim { cg, child, .. } => {
                let pod = cg.take(&format!("bench{i}"), None).map_err(|e| anyhow::anyhow!("take: {}", e.0))?;
                pod.add_pid(child.id()).map_err(|e| anyhow::anyhow!("add_pid: {}", e.0))?;
                pod.set_limits(1, Some(256 << 20)).map_err(|e| anyhow::anyhow!("set_limits: {}", e.0))?;
                Ok(Taken::Shim(pod))
            }
            Cgroups::Own(p) => Ok(Taken::Own(p.take(i)?)),
        }
    }

    fn give_back(&mut self, t: Taken) -> Result<()> {
        match (self, t) {
            (Cgroups::Shim { child, roots, .. }, Taken::Shim(pod)) => {
                for r in roots.iter() {
                    std::fs::write(r.join("cgroup.procs"), child.id().to_string())?;
                }
                pod.remove().map_err(|e| anyhow::anyhow!("remove: {}", e.0))?;
                Ok(())
            }
            (Cgroups::Own(p), Taken::Own(c)) => p.give_back(c),
            _ => bail!("cgroup kinds mixed"),
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        if let Cgroups::Shim { cg, child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
            for p in cg.parent_dirs() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    for e in rd.flatten() {
                        if e.path().is_dir() {
                            let _ = std::fs::remove_dir(e.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(&p);
            }
        }
    }
}

/// Host cgroups for the "take a cgroup" step: pre-created directories
/// `hull-bench-<pid>/pool-<i>` in each v1 controller (or under the v2 root)
/// renamed to `sb-<i>` when taken, then a process is moved in and limits
/// are written, as a sandbox's hull-vmm would be.
struct CgroupPool {
    /// (controller dir, our parent dir inside it)
    parents: Vec<PathBuf>,
    v2: bool,
    child: std::process::Child,
}

pub struct TakenCgroup {
    i: usize,
}

impl CgroupPool {
    fn new(n: usize) -> Result<CgroupPool> {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers").exists();
        let controllers: Vec<PathBuf> = if v2 {
            vec![root.to_path_buf()]
        } else {
            ["cpu", "memory", "pids"].iter().map(|c| root.join(c)).filter(|p| p.join("tasks").exists()).collect()
        };
        if controllers.is_empty() {
            bail!("no cgroup controllers under /sys/fs/cgroup");
        }
        let name = format!("hull-bench-{}", std::process::id());
        let mut parents = Vec::new();
        for c in &controllers {
            let p = c.join(&name);
            std::fs::create_dir(&p).with_context(|| format!("mkdir {} (needs root)", p.display()))?;
            parents.push(p);
        }
        let child = std::process::Command::new("sleep").arg("100000").spawn().context("spawning sleep")?;
        let pool = CgroupPool { parents, v2, child };
        for i in 0..n {
            for p in &pool.parents {
                std::fs::create_dir(p.join(format!("pool-{i}")))?;
            }
        }
        Ok(pool)
    }

    fn method(&self) -> String {
        format!(
            "rename pool-<i> -> sb-<i>{} in {} controller(s), move a process in, write cpu/memory/pids limits",
            if self.v2 { " (v2: rename refused, so mkdir is timed instead)" } else { "" },
            self.parents.len()
        )
    }

    fn take(&mut self, i: usize) -> Result<TakenCgroup> {
        let pid = self.child.id().to_string();
        for p in &self.parents {
            let dst = p.join(format!("sb-{i}"));
            if self.v2 {
                std::fs::create_dir(&dst)?;
            } else {
                std::fs::rename(p.join(format!("pool-{i}")), &dst)?;
            }
            let procs = if self.v2 { "cgroup.procs" } else { "tasks" };
            std::fs::write(dst.join(procs), &pid)?;
            for (file, value) in [
                ("memory.limit_in_bytes", "268435456"),
                ("memory.max", "268435456"),
                ("cpu.cfs_quota_us", "100000"),
                ("cpu.max", "100000 100000"),
                ("pids.max", "1024"),
            ] {
                let f = dst.join(file);
                if f.exists() {
                    std::fs::write(&f, value).with_context(|| format!("writing {}", f.display()))?;
                }
            }
        }
        Ok(TakenCgroup { i })
    }

    fn give_back(&mut self, c: TakenCgroup) -> Result<()> {
        let pid = self.child.id().to_string();
        for p in &self.parents {
            let procs = if self.v2 { "cgroup.procs" } else { "tasks" };
            let root = p.parent().unwrap();
            std::fs::write(root.join(procs), &pid)?;
            let _ = std::fs::remove_dir(p.join(format!("sb-{}", c.i)));
        }
        Ok(())
    }
}

impl Drop for CgroupPool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.parents {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(p);
        }
    }
}
