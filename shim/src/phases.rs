//! Where a pod start's time goes: named phases, each the time since the
//! previous mark, logged on the pod's "ready" line. hull-bench reads them
//! back to explain start latency with measured figures.

use std::fmt;
use std::time::Instant;

pub struct Phases {
    start: Instant,
    last: Instant,
    marks: Vec<(&'static str, u128)>,
}

impl Phases {
    pub fn new() -> Phases {
        let now = Instant::now();
        Phases { start: now, last: now, marks: Vec::new() }
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks.push((name, now.duration_since(self.last).as_millis()));
        self.last = now;
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
        let parts: Vec<(&str, u128)> = s
            .split(", ")
            .map(|x| {
                let (n, ms) = x.rsplit_once(' ').unwrap();
                (n, ms.parse().unwrap())
            })
            .collect();
        assert_eq!(parts.iter().map(|p| p.0).collect::<Vec<_>>(), ["first", "second"]);
        assert!(parts[0].1 >= 20, "{s}");
        assert!(parts[1].1 < 20, "{s}");
        assert!(p.total_ms() >= parts[0].1 + parts[1].1);
    }
}
