//! Process stdio: containerd's FIFOs on one side, the agent's STDIO streams
//! (one connection per stream, see `hull_agent_api::stdio`) on the other.
//!
//! The copies are containerd-shim's [`IoTasks`], which keep the FIFO
//! semantics of the Go shims (the shim holds the stdin FIFO open until
//! CloseIO; output FIFOs never block on containerd's reader). Output is
//! complete when the agent closes a stream: it does so only after the
//! process exited and its pipe was drained, and WaitProcess answers only
//! after that. The exit path shuts the tasks down (waiting for the output
//! copies to reach end-of-file) before it records the exit, so nothing is
//! lost when a process exits fast.

pub use containerd_shim::asynchronous::io::{IoTasks, Stdio};
use hull_agent_api::proto::agent as pb;
use hull_agent_api::{open_stdio, AgentAddr, StdioStream};

/// The agent's `Stdio` message for containerd's stdio request.
pub fn agent_stdio(s: &Stdio) -> pb::Stdio {
    pb::Stdio {
        terminal: s.terminal,
        stdin: !s.stdin.is_empty(),
        stdout: !s.stdout.is_empty(),
        stderr: !s.terminal && !s.stderr.is_empty(),
        ..Default::default()
    }
}

/// Only FIFO paths (what ctr and the CRI plugin pass) are supported.
pub fn check_stdio(s: &Stdio) -> Result<(), String> {
    for p in [&s.stdin, &s.stdout, &s.stderr] {
        if p.contains("://") {
            return Err(format!("stdio {p:?}: log URIs are not supported by hull (give FIFO paths)"));
        }
    }
    Ok(())
}

async fn open(
    addr: &AgentAddr,
    cid: &str,
    exec: Option<&str>,
    stream: StdioStream,
) -> Result<tokio::net::UnixStream, String> {
    let (addr, cid, exec) = (addr.clone(), cid.to_string(), exec.map(str::to_string));
    let s = tokio::task::spawn_blocking(move || open_stdio(&addr, &cid, exec.as_deref(), stream))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::UnixStream::from_std(s).map_err(|e| e.to_string())
}

/// Attaches the process's streams (as requested by `agent_stdio(s)`) and
/// starts copying. On error nothing keeps running.
pub async fn attach(addr: &AgentAddr, cid: &str, exec: Option<&str>, s: &Stdio) -> Result<IoTasks, String> {
    let tasks = IoTasks::default();
    match attach_into(&tasks, addr, cid, exec, s).await {
        Ok(()) => Ok(tasks),
        Err(e) => {
            tasks.abort().await;
            Err(e)
        }
    }
}

async fn attach_into(
    tasks: &IoTasks,
    addr: &AgentAddr,
    cid: &str,
    exec: Option<&str>,
    s: &Stdio,
) -> Result<(), String> {
    if s.terminal {
        let conn = open(addr, cid, exec, StdioStream::Pty).await?;
        let (r, w) = conn.into_split();
        if s.stdout.is_empty() {
            tokio::spawn(async move {
                let mut r = r;
                let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            });
        } else {
            tasks.copy_to_fifo(r, &s.stdout).map_err(|e| e.to_string())?;
        }
        if !s.stdin.is_empty() {
            tasks.copy_from_fifo(&s.stdin, w).map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    for (path, stream) in [(&s.stdout, StdioStream::Stdout), (&s.stderr, StdioStream::Stderr)] {
        if !path.is_empty() {
            let conn = open(addr, cid, exec, stream).await?;
            tasks.copy_to_fifo(conn, path).map_err(|e| e.to_string())?;
        }
    }
    if !s.stdin.is_empty() {
        let conn = open(addr, cid, exec, StdioStream::Stdin).await?;
        tasks.copy_from_fifo(&s.stdin, conn).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hull_agent_api::stdio::{read_line_exact, StdioHeader, MAX_HEADER_LEN};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn mkfifo(p: &Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    /// A fake agent STDIO listener: stdout gets `out` and is closed at once
    /// (a process that printed and exited), stderr gets "err", stdin is
    /// echoed into `stdin_seen`.
    fn fake_agent(l: UnixListener, out: Vec<u8>, streams: usize) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut stdin_seen = Vec::new();
            let mut handles = Vec::new();
            for _ in 0..streams {
                let (mut s, _) = l.accept().unwrap();
                let h = StdioHeader::parse(&read_line_exact(&mut s, MAX_HEADER_LEN).unwrap()).unwrap();
                assert_eq!(h.container_id, "c1");
                s.write_all(b"OK\n").unwrap();
                let out = out.clone();
                handles.push(std::thread::spawn(move || match h.stream {
                    StdioStream::Stdout | StdioStream::Pty => {
                        s.write_all(&out).unwrap();
                        s.shutdown(std::net::Shutdown::Write).unwrap();
                        if h.stream == StdioStream::Pty {
                            let mut v = Vec::new();
                            s.read_to_end(&mut v).unwrap();
                            return v;
                        }
                        Vec::new()
                    }
                    StdioStream::Stderr => {
                        s.write_all(b"err").unwrap();
                        Vec::new()
                    }
                    StdioStream::Stdin => {
                        let mut v = Vec::new();
                        s.read_to_end(&mut v).unwrap();
                        v
                    }
                }));
            }
            for h in handles {
                stdin_seen.extend(h.join().unwrap());
            }
            stdin_seen
        })
    }

    #[test]
    fn agent_stdio_flags() {
        let s = Stdio::new("/in", "/out", "/err", false);
        let a = agent_stdio(&s);
        assert!(!a.terminal && a.stdin && a.stdout && a.stderr);
        let a = agent_stdio(&Stdio::new("", "/out", "/err", true));
        assert!(a.terminal && !a.stdin && a.stdout && !a.stderr);
        assert!(check_stdio(&Stdio::new("", "binary:///usr/bin/logger", "", false)).unwrap_err().contains("URI"));
        check_stdio(&s).unwrap();
    }

    /// containerd's side: reads a FIFO to end-of-file.
    async fn read_fifo(p: &Path) -> Vec<u8> {
        let mut r = tokio::net::unix::pipe::OpenOptions::new().open_receiver(p).unwrap();
        let mut v = Vec::new();
        // open_receiver succeeds before the writer is there: wait for it and read to EOF.
        loop {
            let mut buf = vec![0u8; 65536];
            match r.read(&mut buf).await {
                Ok(0) if v.is_empty() => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                Ok(0) => return v,
                Ok(n) => v.extend_from_slice(&buf[..n]),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_is_complete_when_shutdown_returns() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stdio.sock");
        // More than any pipe buffer, written by a "process" that exits at once.
        let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let agent = fake_agent(UnixListener::bind(&sock).unwrap(), big.clone(), 3);
        let (i, o, e) = (dir.path().join("in"), dir.path().join("out"), dir.path().join("err"));
        for p in [&i, &o, &e] {
            mkfifo(p);
        }
        let paths = Stdio::new(i.to_str().unwrap(), o.to_str().unwrap(), e.to_str().unwrap(), false);
        let reader_out = tokio::spawn({
            let o = o.clone();
            async move { read_fifo(&o).await }
        });
        let reader_err = tokio::spawn({
            let e = e.clone();
            async move { read_fifo(&e).await }
        });
        let tasks = attach(&AgentAddr::Unix { path: sock.clone() }, "c1", None, &paths).await.unwrap();
        // containerd writes stdin, closes it, and calls CloseIO.
        let mut w = tokio::net::unix::pipe::OpenOptions::new().open_sender(&i).unwrap();
        w.write_all(b"typed input").await.unwrap();
        drop(w);
        tasks.close_input();
        // CloseIO: the input reaches the process, then end-of-file.
        let typed = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            tokio::task::spawn_blocking(move || agent.join().unwrap()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(typed, b"typed input");
        // What the exit path does before publishing TaskExit.
        tokio::time::timeout(std::time::Duration::from_secs(20), tasks.shutdown()).await.unwrap();
        let got = reader_out.await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big, "stdout differs");
        assert_eq!(reader_err.await.unwrap(), b"err");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminal_is_one_stream_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stdio.sock");
        let agent = fake_agent(UnixListener::bind(&sock).unwrap(), b"prompt$ ".to_vec(), 1);
        let (i, o) = (dir.path().join("in"), dir.path().join("out"));
        mkfifo(&i);
        mkfifo(&o);
        let paths = Stdio::new(i.to_str().unwrap(), o.to_str().unwrap(), "", true);
        let reader = tokio::spawn({
            let o = o.clone();
            async move { read_fifo(&o).await }
        });
        let tasks = attach(&AgentAddr::Unix { path: sock }, "c1", Some("e1"), &paths).await.unwrap();
        let mut w = tokio::net::unix::pipe::OpenOptions::new().open_sender(&i).unwrap();
        w.write_all(b"ls\n").await.unwrap();
        drop(w);
        tasks.close_input();
        let typed = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            tokio::task::spawn_blocking(move || agent.join().unwrap()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(typed, b"ls\n");
        tokio::time::timeout(std::time::Duration::from_secs(20), tasks.shutdown()).await.unwrap();
        assert_eq!(reader.await.unwrap(), b"prompt$ ");
    }

    #[tokio::test]
    async fn refused_stream_is_an_error_and_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stdio.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let agent = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            read_line_exact(&mut s, MAX_HEADER_LEN).unwrap();
            s.write_all(b"ERR no process c1/-\n").unwrap();
        });
        let o = dir.path().join("out");
        mkfifo(&o);
        let paths = Stdio::new("", o.to_str().unwrap(), "", false);
        let Err(e) = attach(&AgentAddr::Unix { path: sock }, "c1", None, &paths).await else {
            panic!("attach succeeded")
        };
        assert!(e.contains("no process c1/-"), "{e}");
        agent.join().unwrap();
    }
}
