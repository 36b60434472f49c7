//! The report: one JSON file with every figure, a table on stdout with a
//! PASS/MISS line per target of issue 6 (each a ratio of two things measured
//! in the same run, with the measured reason when missed), and PNG plots.

use crate::native::NativeResult;
use crate::pods::PodsResult;
use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub figure: String,
    pub goal: String,
    /// None: not measured in this run.
    pub pass: Option<bool>,
    /// What the measurements say about a miss.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    pub unix_time: u64,
    pub native: Option<NativeResult>,
    pub pods: Option<PodsResult>,
    pub targets: Vec<Target>,
}

impl Report {
    pub fn new(native: Option<NativeResult>, pods: Option<PodsResult>) -> Report {
        let mut r = Report {
            version: env!("CARGO_PKG_VERSION").into(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            native,
            pods,
            targets: Vec::new(),
        };
        r.targets = targets(&r);
        r
    }
}

fn p50_of(v: &[Option<f64>]) -> Option<f64> {
    let x: Vec<f64> = v.iter().flatten().copied().collect();
    (!x.is_empty()).then(|| crate::stats::Summary::of(&x).p50)
}

fn targets(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let none = |name: &str, goal: &str| Target {
        name: name.into(),
        figure: "not measured".into(),
        goal: goal.into(),
        pass: None,
        reason: None,
    };
    // 1. cold start
    let g1 = "template start >= 10x faster than hull cold boot";
    let g2 = "template start faster than QEMU microvm cold boot by the same factor (>= 10x)";
    match &r.pods {
        Some(p) if p.template.summary.n > 0 && p.cold.summary.n > 0 => {
            let tm = p.template.summary.p50;
            let split = {
                let s = &p.template.splits;
                let total = p50_of(&s.iter().map(|x| Some(x.total_ms)).collect::<Vec<_>>());
                let agent = p50_of(&s.iter().map(|x| x.agent_ready_ms).collect::<Vec<_>>());
                let ready = p50_of(&s.iter().map(|x| x.sandbox_ready_ms).collect::<Vec<_>>());
                let mut m = format!("template start p50 {tm:.0} ms");
                if let Some(a) = agent {
                    write!(m, "; hull-vmm start -> agent ready p50 {a:.0} ms").ok();
                }
                if let Some(rd) = ready {
                    write!(m, "; -> sandbox set up (SetupSandbox answered) p50 {rd:.0} ms").ok();
                    if let Some(tt) = total {
                        write!(m, "; the rest (ctr, containerd, shim start, container create/start) {:.0} ms", tt - rd)
                            .ok();
                    }
                }
                if p.ctr_floor.n > 0 {
                    write!(m, " (of which ctr's own start + one call: {:.0} ms)", p.ctr_floor.p50).ok();
                }
                let cold_agent = p50_of(&p.cold.splits.iter().map(|x| x.agent_ready_ms).collect::<Vec<_>>());
                if let (Some(c), Some(a)) = (cold_agent, agent) {
                    write!(
                        m,
                        "; VM alone (monitor start -> agent ready): restore {a:.0} ms vs cold boot {c:.0} ms ({:.1}x) \
                         vs QEMU {:.0} ms ({:.1}x)",
                        c / a,
                        p.qemu.summary.p50,
                        p.qemu.summary.p50 / a
                    )
                    .ok();
                }
                if let Some(ph) = phase_p50s(&p.template.splits) {
                    let parts: Vec<String> = PHASES.iter().zip(ph).map(|(n, v)| format!("{n} {v:.0} ms")).collect();
                    write!(m, "; from containerd's log timestamps, p50: {}", parts.join(", ")).ok();
                }
                let fine = shim_phase_p50s(&p.template.splits);
                if !fine.is_empty() {
                    let parts: Vec<String> = fine.iter().map(|(n, v)| format!("{n} {v:.0}")).collect();
                    write!(m, "; the shim's phases, p50 ms: {}", parts.join(", ")).ok();
                }
                if !p.template_supported {
                    m.push_str("; the shim had no defaults.template: these starts were cold boots");
                }
                m
            };
            let f = p.cold.summary.p50 / tm;
            t.push(Target {
                name: "cold start: template vs cold boot".into(),
                figure: format!("{f:.2}x (p50 {:.0} ms vs {tm:.0} ms)", p.cold.summary.p50),
                goal: g1.into(),
                pass: Some(f >= 10.0),
                reason: (f < 10.0).then(|| split.clone()),
            });
            if p.qemu.summary.n > 0 {
                let q = p.qemu.summary.p50 / tm;
                t.push(Target {
                    name: "cold start: template vs QEMU microvm".into(),
                    figure: format!("{q:.2}x (p50 {:.0} ms vs {tm:.0} ms)", p.qemu.summary.p50),
                    goal: g2.into(),
                    pass: Some(q >= 10.0),
                    reason: (q < 10.0).then(|| split.clone()),
                });
            } else {
                t.push(none("cold start: template vs QEMU microvm", g2));
            }
        }
        _ => {
            t.push(none("cold start: template vs cold boot", g1));
            t.push(none("cold start: template vs QEMU microvm", g2));
        }
    }
    // 2. concurrency at the largest N
    let g3 = "start throughput at N=50 >= 80% of the CPU-bound ideal (cores / CPU time of one start)";
    let g4 = "p99 <= 3x p50 at N=50";
    match r.pods.as_ref().and_then(|p| p.bursts.iter().max_by_key(|b| b.n).map(|b| (p, b))) {
        Some((p, b)) if b.summary.n > 0 && p.cpu_one_start.n > 0 && p.cpu_one_start.p50 > 0.0 => {
            let ok = b.latencies_ms.len() as f64;
            let thr = ok / (b.wall_ms / 1e3);
            let ideal = p.cpus as f64 / (p.cpu_one_start.p50 / 1e3);
            let ratio = thr / ideal;
            let util = b.cpu_ms / (b.wall_ms * p.cpus as f64);
            let per_start_cpu = b.cpu_ms / (b.n.max(1) as f64);
            t.push(Target {
                name: format!("concurrency N={}: throughput / ideal", b.n),
                figure: format!(
                    "{:.0}% ({thr:.2} starts/s vs ideal {ideal:.2}/s = {} cores / {:.0} ms CPU per start)",
                    ratio * 100.0,
                    p.cpus,
                    p.cpu_one_start.p50
                ),
                goal: g3.into(),
                pass: Some(ratio >= 0.8 && b.failures == 0),
                reason: (ratio < 0.8 || b.failures > 0).then(|| {
                    format!(
                        "CPU busy {:.0}% of {} cores during the burst; CPU per attempted start under the burst {per_start_cpu:.0} ms \
                         vs {:.0} ms alone ({:.2}x){}{}",
                        util * 100.0,
                        p.cpus,
                        p.cpu_one_start.p50,
                        per_start_cpu / p.cpu_one_start.p50,
                        if util < 0.8 {
                            ": CPUs idle while pods wait, i.e. something serialises starts"
                        } else if per_start_cpu > 1.2 * p.cpu_one_start.p50 {
                            ": CPU-bound, and each start costs more CPU under contention"
                        } else {
                            ": CPU-bound"
                        },
                        if b.failures > 0 {
                            format!(
                                "; {} of {} starts failed, e.g. {}",
                                b.failures,
                                b.n,
                                b.errors.first().and_then(|e| e.lines().next()).unwrap_or("")
                            )
                        } else {
                            String::new()
                        }
                    )
                }),
            });
            let spread = b.summary.p99 / b.summary.p50;
            t.push(Target {
                name: format!("concurrency N={}: p99 / p50", b.n),
                figure: format!("{spread:.2} (p50 {:.0} ms, p99 {:.0} ms)", b.summary.p50, b.summary.p99),
                goal: g4.into(),
                pass: Some(spread <= 3.0 && b.failures == 0),
                reason: (spread > 3.0 || b.failures > 0).then(|| {
                    format!(
                        "latencies (of {} successful starts) min {:.0} / p50 {:.0} / p90 {:.0} / max {:.0} ms on {} CPUs{}",
                        b.latencies_ms.len(),
                        b.summary.min,
                        b.summary.p50,
                        b.summary.p90,
                        b.summary.max,
                        p.cpus,
                        if b.failures > 0 { format!("; {} starts failed: not a valid figure", b.failures) } else { String::new() }
                    )
                }),
            });
        }
        _ => {
            t.push(none("concurrency: throughput / ideal", g3));
            t.push(none("concurrency: p99 / p50", g4));
        }
    }
    // 3. density
    let g5 = "<= 8 MiB host PSS per idle sandbox beyond the shared template";
    match r.pods.as_ref().and_then(|p| p.density.as_ref()) {
        Some(d) if d.running > 0 => {
            let mib = d.beyond_template_per_sandbox_kib / 1024.0;
            t.push(Target {
                name: format!("density K={}: PSS per sandbox beyond the template", d.k),
                figure: format!(
                    "{mib:.1} MiB (total {:.1} MiB/sandbox, template share {:.1} MiB/sandbox)",
                    d.pss_per_sandbox_kib / 1024.0,
                    d.template_pss_per_sandbox_kib / 1024.0
                ),
                goal: g5.into(),
                pass: Some(mib <= 8.0),
                reason: (mib > 8.0).then(|| {
                    let kinds: Vec<String> =
                        d.by_kind_kib.iter().map(|(k, v)| format!("{k} {:.1} MiB", v / 1024.0)).collect();
                    let vmms: Vec<&crate::pods::ProcMem> = d.procs.iter().filter(|p| p.kind == "hull-vmm").collect();
                    let cow = crate::stats::Summary::of(
                        &vmms.iter().map(|p| p.template_anon_kib as f64 / 1024.0).collect::<Vec<_>>(),
                    );
                    let other = crate::stats::Summary::of(
                        &vmms
                            .iter()
                            .map(|p| p.private_kib.saturating_sub(p.template_anon_kib) as f64 / 1024.0)
                            .collect::<Vec<_>>(),
                    );
                    let maps: Vec<String> = median_of_kind(d, "hull-vmm")
                        .map(|v| top_mappings(v, 4))
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(n, kib)| format!("{n} {:.1} MiB", kib as f64 / 1024.0))
                        .collect();
                    format!(
                        "PSS per sandbox by process: {}; hull-vmm private pages p50 {:.1} MiB = guest pages copied on \
                         write since the restore p50 {:.1} MiB + the VMM's own (heap, stacks, buffers) p50 {:.1} MiB; \
                         the median hull-vmm's largest mappings by PSS: {}",
                        kinds.join(", "),
                        d.vmm_private_kib.p50 / 1024.0,
                        cow.p50,
                        other.p50,
                        maps.join(", ")
                    )
                }),
            });
        }
        _ => t.push(none("density: PSS per sandbox beyond the template", g5)),
    }
    // 4. native restore path
    let g6 = "native host-side restore path p50 <= 2 ms";
    match &r.native {
        Some(n) => {
            let p = n.total.p50;
            t.push(Target {
                name: "native restore path p50".into(),
                figure: format!("{p:.3} ms"),
                goal: g6.into(),
                pass: Some(p <= 2.0),
                reason: (p > 2.0).then(|| {
                    let s: Vec<String> =
                        n.steps.iter().map(|s| format!("{} {:.3} ms", s.name, s.summary.p50)).collect();
                    format!(
                        "step p50s: {}; KVM_GET_SUPPORTED_CPUID alone p50 {:.3} ms",
                        s.join(", "),
                        n.get_supported_cpuid.p50
                    )
                }),
            });
        }
        None => t.push(none("native restore path p50", g6)),
    }
    t
}

pub fn print_table(r: &Report) {
    let mut out = String::new();
    if let Some(n) = &r.native {
        writeln!(
            out,
            "\nNative host-side restore path ({} iterations, {} MiB memory file, {} vCPU):",
            n.options.iterations, n.options.mem_mib, n.options.vcpus
        )
        .ok();
        writeln!(out, "  {:<14} {:>9} {:>9} {:>9}  what", "step", "p50 ms", "p90 ms", "p99 ms").ok();
        for s in &n.steps {
            writeln!(
                out,
                "  {:<14} {:>9.3} {:>9.3} {:>9.3}  {}",
                s.name, s.summary.p50, s.summary.p90, s.summary.p99, s.what
            )
            .ok();
        }
        writeln!(out, "  {:<14} {:>9.3} {:>9.3} {:>9.3}", "total", n.total.p50, n.total.p90, n.total.p99).ok();
        writeln!(out, "  cgroup: {}", n.cgroup_method).ok();
        writeln!(out, "  KVM_GET_SUPPORTED_CPUID alone (inside cpuid): p50 {:.3} ms", n.get_supported_cpuid.p50).ok();
    }
    if let Some(p) = &r.pods {
        writeln!(out, "\nCold start, create -> container running ({}; {} CPUs):", p.host, p.cpus).ok();
        writeln!(out, "  {:<42} {:>4} {:>9} {:>9} {:>9} {:>9}", "", "n", "p50 ms", "p90 ms", "p99 ms", "CPU ms").ok();
        for s in [&p.qemu, &p.cold, &p.template] {
            let cpu = if s.cpu_ms.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}", crate::stats::Summary::of(&s.cpu_ms).p50)
            };
            writeln!(
                out,
                "  {:<42} {:>4} {:>9.0} {:>9.0} {:>9.0} {:>9}{}",
                s.label,
                s.summary.n,
                s.summary.p50,
                s.summary.p90,
                s.summary.p99,
                cpu,
                if s.errors.is_empty() { String::new() } else { format!("  ({} failed)", s.errors.len()) }
            )
            .ok();
        }
        // The VM alone, without containerd/ctr/shim: monitor start -> the agent's ready line.
        let agent =
            |s: &crate::pods::StartSeries| p50_of(&s.splits.iter().map(|x| x.agent_ready_ms).collect::<Vec<_>>());
        if let (Some(c), Some(t)) = (agent(&p.cold), agent(&p.template)) {
            writeln!(
                out,
                "  VM level (monitor start -> agent ready, p50): QEMU microvm {:.0} ms, hull-vmm cold boot {c:.0} ms, \
                 hull-vmm restore {t:.0} ms ({:.1}x faster than cold boot, {:.1}x than QEMU)",
                p.qemu.summary.p50,
                c / t,
                p.qemu.summary.p50 / t
            )
            .ok();
        }
        for s in [&p.cold, &p.template] {
            if let Some(ph) = phase_p50s(&s.splits) {
                let parts: Vec<String> = PHASES.iter().zip(ph).map(|(n, v)| format!("{n} {v:.0}")).collect();
                writeln!(out, "  {} split, p50 ms: {}", s.label, parts.join(" | ")).ok();
            }
            let fine = shim_phase_p50s(&s.splits);
            if !fine.is_empty() {
                let parts: Vec<String> = fine.iter().map(|(n, v)| format!("{n} {v:.0}")).collect();
                writeln!(out, "  {} shim phases, p50 ms: {}", s.label, parts.join(" | ")).ok();
            }
        }
        if p.ctr_floor.n > 0 {
            writeln!(out, "  ctr floor (`ctr task ls`: ctr start + one call), p50: {:.0} ms", p.ctr_floor.p50).ok();
        }
        if let Some(b) = p.template_build_ms {
            writeln!(out, "  template build (once, not in the figures): {b:.0} ms").ok();
        }
        if !p.bursts.is_empty() {
            writeln!(out, "\nConcurrency (pods started at once):").ok();
            writeln!(
                out,
                "  {:>4} {:>10} {:>9} {:>9} {:>9} {:>10} {:>8} {:>7}",
                "N", "wall ms", "p50 ms", "p99 ms", "p99/p50", "starts/s", "CPU %", "failed"
            )
            .ok();
            for b in &p.bursts {
                let ok = b.latencies_ms.len() as f64;
                writeln!(
                    out,
                    "  {:>4} {:>10.0} {:>9.0} {:>9.0} {:>9.2} {:>10.2} {:>8.0} {:>7}",
                    b.n,
                    b.wall_ms,
                    b.summary.p50,
                    b.summary.p99,
                    if b.summary.p50 > 0.0 { b.summary.p99 / b.summary.p50 } else { 0.0 },
                    ok / (b.wall_ms / 1e3),
                    100.0 * b.cpu_ms / (b.wall_ms * p.cpus as f64),
                    b.failures
                )
                .ok();
            }
            if p.cpu_one_start.n > 0 {
                writeln!(
                    out,
                    "  CPU time of one start (alone, p50): {:.0} ms -> ideal {:.2} starts/s on {} CPUs",
                    p.cpu_one_start.p50,
                    p.cpus as f64 / (p.cpu_one_start.p50 / 1e3),
                    p.cpus
                )
                .ok();
            }
        }
        if let Some(d) = &p.density {
            writeln!(out, "\nDensity ({} idle sandboxes, {} running):", d.k, d.running).ok();
            writeln!(out, "  host PSS per sandbox:            {:>8.1} MiB", d.pss_per_sandbox_kib / 1024.0).ok();
            for (k, v) in &d.by_kind_kib {
                writeln!(out, "    {:<30}{:>8.1} MiB", k, v / 1024.0).ok();
            }
            writeln!(out, "  of which template's shared pages: {:>7.1} MiB", d.template_pss_per_sandbox_kib / 1024.0)
                .ok();
            writeln!(out, "  beyond the template:             {:>8.1} MiB", d.beyond_template_per_sandbox_kib / 1024.0)
                .ok();
            writeln!(out, "  template resident (once):        {:>8.1} MiB", d.template_resident_kib as f64 / 1024.0)
                .ok();
            writeln!(out, "  hull-vmm Private_Clean+Dirty p50: {:>7.1} MiB", d.vmm_private_kib.p50 / 1024.0).ok();
            if d.idle_cpu_ms_per_s > 0.0 {
                writeln!(
                    out,
                    "  machine CPU with them idle: {:.0} ms/s (before: {:.0} ms/s) = {:.1} ms/s per idle sandbox",
                    d.idle_cpu_ms_per_s,
                    d.idle_cpu_before_ms_per_s,
                    (d.idle_cpu_ms_per_s - d.idle_cpu_before_ms_per_s) / d.running.max(1) as f64
                )
                .ok();
            }
            let mut threads: Vec<(&String, &f64)> = d.idle_cpu_by_thread.iter().filter(|(_, v)| **v >= 0.05).collect();
            threads.sort_by(|a, b| b.1.total_cmp(a.1));
            if !threads.is_empty() {
                let parts: Vec<String> = threads.iter().map(|(n, v)| format!("{n} {v:.1}")).collect();
                writeln!(out, "  idle CPU per sandbox by thread, ms/s: {}", parts.join(", ")).ok();
            }
            for kind in ["hull-vmm", "shim", "virtiofsd"] {
                if let Some(v) = median_of_kind(d, kind) {
                    let parts: Vec<String> = top_mappings(v, 6)
                        .into_iter()
                        .map(|(n, kib)| format!("{n} {:.1}", kib as f64 / 1024.0))
                        .collect();
                    writeln!(out, "  median {kind}'s PSS by mapping, MiB: {}", parts.join(", ")).ok();
                }
            }
        }
        for e in &p.errors {
            writeln!(out, "  error: {e}").ok();
        }
    }
    writeln!(out, "\nTargets (issue 6):").ok();
    for t in &r.targets {
        let verdict = match t.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "----",
        };
        writeln!(out, "  {verdict} {}: {}   [goal: {}]", t.name, t.figure, t.goal).ok();
        if let Some(why) = &t.reason {
            writeln!(out, "       why: {why}").ok();
        }
    }
    print!("{out}");
}

pub fn write(r: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let json = dir.join("bench.json");
    std::fs::write(&json, serde_json::to_vec_pretty(r)?)?;
    written.push(json);
    load_font()?;
    if let Some(n) = &r.native {
        let cats: Vec<String> = n.steps.iter().map(|s| s.name.clone()).chain(["total".into()]).collect();
        let vals = |f: fn(&crate::stats::Summary) -> f64| -> Vec<f64> {
            n.steps.iter().map(|s| f(&s.summary)).chain([f(&n.total)]).collect()
        };
        let p = dir.join("native-restore.png");
        bars(
            &p,
            "Native host-side restore path (ms)",
            &cats,
            &[("p50", vals(|s| s.p50)), ("p90", vals(|s| s.p90)), ("p99", vals(|s| s.p99))],
            Some(2.0),
        )?;
        written.push(p);
    }
    if let Some(pr) = &r.pods {
        let series = [&pr.qemu, &pr.cold, &pr.template];
        let cats: Vec<String> = ["QEMU microvm", "hull cold boot", "hull template"].map(String::from).to_vec();
        let v = |f: fn(&crate::stats::Summary) -> f64| series.iter().map(|s| f(&s.summary)).collect::<Vec<_>>();
        let p = dir.join("cold-start.png");
        bars(
            &p,
            "Cold start, create -> running (ms)",
            &cats,
            &[("p50", v(|s| s.p50)), ("p90", v(|s| s.p90)), ("p99", v(|s| s.p99))],
            None,
        )?;
        written.push(p);
        if !pr.bursts.is_empty() {
            let cats: Vec<String> = pr.bursts.iter().map(|b| format!("N={}", b.n)).collect();
            let p = dir.join("concurrency.png");
            bars(
                &p,
                "Pods started at once: latency and wall time (ms)",
                &cats,
                &[
                    ("p50", pr.bursts.iter().map(|b| b.summary.p50).collect()),
                    ("p99", pr.bursts.iter().map(|b| b.summary.p99).collect()),
                    ("wall", pr.bursts.iter().map(|b| b.wall_ms).collect()),
                ],
                None,
            )?;
            written.push(p);
        }
        if let Some(d) = &pr.density {
            let mut cats: Vec<String> = d.by_kind_kib.keys().cloned().collect();
            let mut vals: Vec<f64> = d.by_kind_kib.values().map(|v| v / 1024.0).collect();
            cats.push("template share".into());
            vals.push(d.template_pss_per_sandbox_kib / 1024.0);
            cats.push("beyond template".into());
            vals.push(d.beyond_template_per_sandbox_kib / 1024.0);
            let p = dir.join("density.png");
            bars(&p, &format!("Host PSS per idle sandbox, K={} (MiB)", d.k), &cats, &[("MiB", vals)], Some(8.0))?;
            written.push(p);
        }
    }
    Ok(written)
}

/// plotters draws text with ab_glyph from a TTF registered at run time:
/// DejaVu Sans from Debian's fonts-dejavu-core (scripts/setup.sh installs it).
fn load_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = [
            std::env::var("HULL_BENCH_FONT").unwrap_or_default(),
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
            "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf".into(),
        ];
        let path = candidates
            .iter()
            .find(|p| !p.is_empty() && Path::new(p).exists())
            .ok_or("no TTF font: apt-get install fonts-dejavu-core (scripts/setup.sh does), or set HULL_BENCH_FONT")?;
        let bytes: &'static [u8] =
            Box::leak(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable TTF"))?;
        Ok(())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

const COLORS: [RGBColor; 4] =
    [RGBColor(52, 101, 164), RGBColor(245, 121, 0), RGBColor(115, 210, 22), RGBColor(117, 80, 123)];

/// A grouped bar chart: one group per category, one bar per series, an
/// optional dashed goal line.
fn bars(path: &Path, title: &str, cats: &[String], series: &[(&str, Vec<f64>)], goal: Option<f64>) -> Result<()> {
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(goal)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let n = cats.len().max(1) as f64;
    let root = BitMapBackend::new(path, (200 + 110 * cats.len() as u32, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, 0f64..ymax)?;
    let label = |x: &f64| {
        let i = (x - 0.5).round();
        if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats.len() {
            cats[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cats.len() * 2 + 1)
        .x_label_formatter(&label)
        .y_label_formatter(&|y| if ymax < 10.0 { format!("{y:.2}") } else { format!("{y:.0}") })
        .label_style(("sans-serif", 14))
        .draw()?;
    let k = series.len().max(1) as f64;
    let w = 0.8 / k;
    for (si, (name, vals)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        chart
            .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + w * si as f64;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.95, v.max(0.0))], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    if let Some(g) = goal {
        chart
            .draw_series(DashedLineSeries::new(vec![(0.0, g), (n, g)], 6, 4, RED.stroke_width(2)))?
            .label(format!("target {g}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Unix ms of a logrus `time="2006-01-02T15:04:05.999999999Z07:00"` field.
fn log_time_ms(line: &str) -> Option<f64> {
    let i = line.find("time=\"")? + 6;
    let rest = &line[i..];
    let ts = &rest[..rest.find('"')?];
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    // The zone: Z or ±HH:MM after the seconds.
    let zpos = time.find(['Z', '+', '-']).unwrap_or(time.len());
    let (clock, zone) = time.split_at(zpos);
    let mut c = clock.split(':');
    let (hh, mm) = (c.next()?.parse::<f64>().ok()?, c.next()?.parse::<f64>().ok()?);
    let ss = c.next()?.parse::<f64>().ok()?;
    let offset_min = match zone.as_bytes().first() {
        Some(b'+') | Some(b'-') => {
            let sign = if zone.starts_with('-') { -1.0 } else { 1.0 };
            let (h, m) = zone[1..].split_once(':')?;
            sign * (h.parse::<f64>().ok()? * 60.0 + m.parse::<f64>().ok()?)
        }
        _ => 0.0,
    };
    // Days since 1970-01-01 (civil calendar).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(((days as f64 * 86400.0 + hh * 3600.0 + mm * 60.0 + ss) - offset_min * 60.0) * 1000.0)
}

/// A pod start cut at the points the shim's log lines (with containerd's
/// timestamps) show: ctr started → the shim began the sandbox (ctr,
/// containerd, the shim process starting) → sandbox ready (VM restored or
/// booted, agent answered SetupSandbox) → container created in the guest →
/// ctr returned (container started, ctr exits).
pub fn phases(s: &crate::pods::Split) -> Option<[f64; 4]> {
    if s.ctr_start_unix_ms <= 0.0 {
        return None;
    }
    let ready = log_time_ms(s.raw.iter().find(|l| l.contains("ready in "))?)?;
    let created = log_time_ms(s.raw.iter().find(|l| l.contains(" created in pod "))?)?;
    let sb_start = ready - s.sandbox_ready_ms?;
    let end = s.ctr_start_unix_ms + s.total_ms;
    let p = [sb_start - s.ctr_start_unix_ms, ready - sb_start, created - ready, end - created];
    p.iter().all(|x| *x > -50.0).then_some(p)
}

pub const PHASES: [&str; 4] = [
    "ctr + containerd + shim start",
    "sandbox: VM + agent + SetupSandbox",
    "container create in the guest",
    "container start + ctr exit",
];

/// p50 of each phase over a series' starts.
pub fn phase_p50s(splits: &[crate::pods::Split]) -> Option<[f64; 4]> {
    let all: Vec<[f64; 4]> = splits.iter().filter_map(phases).collect();
    if all.is_empty() {
        return None;
    }
    let mut out = [0.0; 4];
    for (k, o) in out.iter_mut().enumerate() {
        *o = crate::stats::Summary::of(&all.iter().map(|p| p[k]).collect::<Vec<_>>()).p50;
    }
    Some(out)
}

/// The shim's own phase marks for one start ("phases ms: name N, ..." on its
/// "ready in" and "created in pod" lines), prefixed "sandbox " / "create ".
pub fn shim_phases(s: &crate::pods::Split) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (marker, prefix) in [("ready in ", "sandbox"), (" created in pod ", "create")] {
        let Some(line) = s.raw.iter().find(|l| l.contains(marker)) else { continue };
        let Some((_, rest)) = line.split_once("phases ms: ") else { continue };
        let rest = rest.split([')', '"']).next().unwrap_or("");
        for (name, ms) in hull_agent_api::phases::parse(rest).unwrap_or_default() {
            out.push((format!("{prefix} {name}"), ms as f64));
        }
    }
    out
}

/// p50 of each shim phase over a series' starts, in the order first seen.
pub fn shim_phase_p50s(splits: &[crate::pods::Split]) -> Vec<(String, f64)> {
    let mut names: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in splits {
        for (n, v) in shim_phases(s) {
            if !names.contains(&n) {
                names.push(n.clone());
            }
            values.entry(n).or_default().push(v);
        }
    }
    names.into_iter().map(|n| (n.clone(), crate::stats::Summary::of(&values[&n]).p50)).collect()
}

/// The process of `kind` with the median PSS.
fn median_of_kind<'a>(d: &'a crate::pods::Density, kind: &str) -> Option<&'a crate::pods::ProcMem> {
    let mut v: Vec<&crate::pods::ProcMem> = d.procs.iter().filter(|p| p.kind == kind).collect();
    v.sort_by_key(|p| p.pss_kib);
    v.get(v.len() / 2).copied()
}

/// A process's largest mappings by PSS, largest first.
fn top_mappings(p: &crate::pods::ProcMem, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = p.pss_by_mapping_kib.iter().map(|(k, v)| (k.clone(), *v)).collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.1));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logrus_times() {
        let a = log_time_ms(r#"time="2024-03-01T10:00:00.250000000Z" level=info msg="x""#).unwrap();
        let b = log_time_ms(r#"time="2024-03-01T11:00:01.000+01:00" level=info"#).unwrap();
        assert_eq!(b - a, 750.0);
        assert_eq!(log_time_ms(r#"time="1970-01-02T00:00:00Z""#), Some(86_400_000.0));
    }

    #[test]
    fn shim_phase_lines() {
        let split = |ready: &str, created: &str| crate::pods::Split {
            raw: vec![
                format!(
                    r#"time="x" level=info msg="pod p: ready in 90 ms (1 vCPU, 128 MiB, 1 disk slots; phases ms: {ready})""#
                ),
                format!(
                    r#"time="x" level=info msg="container c created in pod p (Standalone, writable layer hullrw0; phases ms: {created})""#
                ),
            ],
            ..Default::default()
        };
        let a = split("disks 10, restore 70, setup 10", "agent 500");
        assert_eq!(
            shim_phases(&a),
            [("sandbox disks", 10.0), ("sandbox restore", 70.0), ("sandbox setup", 10.0), ("create agent", 500.0)]
                .map(|(n, v)| (n.to_string(), v))
        );
        let b = split("disks 30, restore 90, setup 20", "agent 700");
        let c = split("disks 20, restore 80, setup 30", "agent 600");
        let p = shim_phase_p50s(&[a, b, c]);
        assert_eq!(p[1], ("sandbox restore".to_string(), 80.0));
        assert_eq!(p[3], ("create agent".to_string(), 600.0));
        // Older shims logged no phases.
        assert!(shim_phases(&crate::pods::Split::default()).is_empty());
    }
}
