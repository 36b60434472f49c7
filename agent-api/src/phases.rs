//! Where a start's time goes: named phases, each the time since the
//! previous mark. The shim logs them on a pod's "ready" and a container's
//! "created" lines, the agent returns its own with CreateContainer, and
//! hull-bench reads them back to explain start latency with measured figures.

use std::fmt;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Phases {
    start: Instant,
    last: Instant,
    marks: Vec<(String, u128)>,
}

impl Phases {
    pub fn new() -> Phases {
        let now = Instant::now();
        Phases { start: now, last: now, marks: Vec::new() }
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks.push((name.to_string(), now.duration_since(self.last).as_millis()));
        self.last = now;
    }

    /// Records phases measured elsewhere (the agent's), each named
    /// `prefix` + its name, without ending the current phase.
    pub fn extend(&mut self, prefix: &str, marks: &[crate::proto::agent::Phase]) {
        self.marks.extend(marks.iter().map(|m| (format!("{prefix}{}", m.name), u128::from(m.ms))));
    }

    /// Like `extend`, for marks in this type's text form (hull-vmm's
    /// readiness line). Parts that are not "name ms" are an error.
    pub fn extend_text(&mut self, prefix: &str, text: &str) -> Result<(), String> {
        for (name, ms) in parse(text)? {
            self.marks.push((format!("{prefix}{name}"), ms));
        }
        Ok(())
    }

    /// The marks as sent on the wire.
    pub fn to_proto(&self) -> Vec<crate::proto::agent::Phase> {
        let ms = |v: u128| u32::try_from(v).unwrap_or(u32::MAX);
        self.marks
            .iter()
            .map(|(n, v)| crate::proto::agent::Phase { name: n.clone(), ms: ms(*v), ..Default::default() })
            .collect()
    }

    pub fn total_ms(&self) -> u128 {
        self.start.elapsed().as_millis()
    }
}

impl Default for Phases {
    fn default() -> Self {
        Phases::new()
    }
}

/// "name ms, name ms, ..." in order (`hull-bench` parses this form).
impl fmt::Display for Phases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, ms)) in self.marks.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} {ms}")?;
        }
        Ok(())
    }
}

/// The marks of a text in the `Display` form, in order.
pub fn parse(text: &str) -> Result<Vec<(String, u128)>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(", ")
        .map(|part| {
            let (name, ms) =
                part.rsplit_once(' ').ok_or_else(|| format!("phase mark {part:?}: expected \"name ms\""))?;
            let ms = ms.parse().map_err(|_| format!("phase mark {part:?}: {ms:?} is not a number of ms"))?;
            Ok((name.to_string(), ms))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_consecutive_and_ordered() {
        let mut p = Phases::new();
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.mark("first");
        p.mark("second");
        let s = p.to_string();
        let parts = parse(&s).unwrap();
        assert_eq!(parts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["first", "second"]);
        assert!(parts[0].1 >= 20, "{s}");
        assert!(parts[1].1 < 20, "{s}");
        assert!(p.total_ms() >= parts[0].1 + parts[1].1);
    }

    #[test]
    fn agent_marks_travel_and_keep_the_clock() {
        let mut agent = Phases::new();
        std::thread::sleep(std::time::Duration::from_millis(15));
        agent.mark("rootfs");
        agent.mark("build");
        let wire = agent.to_proto();
        assert_eq!(wire.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["rootfs", "build"]);
        assert!(wire[0].ms >= 15);

        let mut shim = Phases::new();
        std::thread::sleep(std::time::Duration::from_millis(15));
        shim.extend("guest-", &wire);
        shim.mark("agent");
        let s = shim.to_string();
        assert!(s.starts_with(&format!("guest-rootfs {}, guest-build {}, agent ", wire[0].ms, wire[1].ms)), "{s}");
        // The extension did not end a phase: "agent" still counts from the start.
        assert!(s.rsplit_once(' ').unwrap().1.parse::<u128>().unwrap() >= 15, "{s}");
    }

    #[test]
    fn text_marks_are_parsed_back_or_refused() {
        let mut shim = Phases::new();
        shim.extend_text("vmm-", "fork 41, jail 12, restore 130").unwrap();
        shim.mark("connect");
        let s = shim.to_string();
        assert!(s.starts_with("vmm-fork 41, vmm-jail 12, vmm-restore 130, connect "), "{s}");
        assert_eq!(parse("").unwrap(), []);
        assert!(parse("fork forty").unwrap_err().contains("\"forty\" is not a number"));
        assert!(parse("fork").unwrap_err().contains("expected \"name ms\""));
        // A refused text adds nothing.
        let mut p = Phases::new();
        assert!(p.extend_text("vmm-", "jail 3, seccomp x").is_err());
        assert_eq!(p.to_string(), "");
    }
}
