//! Pool refills and other upkeep run on threads at `SCHED_IDLE`: they get
//! a CPU only when no pod start wants it (the `mkfs.ext4` they run inherits
//! the policy). Under a burst of starts on a busy host the refills wait,
//! the starts do not.

/// Spawns `f` on a named thread at idle priority; None (logged) if the
/// thread could not be started.
pub fn spawn<F: FnOnce() + Send + 'static>(name: &str, f: F) -> Option<std::thread::JoinHandle<()>> {
    let r = std::thread::Builder::new().name(name.into()).spawn(move || {
        set_idle_priority();
        f()
    });
    match r {
        Ok(h) => Some(h),
        Err(e) => {
            log::warn!("cannot start the {name} thread: {e}");
            None
        }
    }
}

/// Puts the calling thread under `SCHED_IDLE` (best effort: upkeep still
/// runs at normal priority where that is refused).
pub fn set_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; param is a valid struct.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        log::debug!("SCHED_IDLE refused: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn upkeep_threads_run_at_idle_priority() {
        let h = super::spawn("test-upkeep", || {
            // SAFETY: pid 0 is the calling thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_IDLE);
        })
        .unwrap();
        h.join().expect("the thread saw SCHED_IDLE");
        // The caller's own policy is untouched.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }
}
