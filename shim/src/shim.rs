//! The shim binary's life: containerd-shim's `Shim` trait for hull, and the
//! bootstrap that runs it.
//!
//! The bootstrap follows `containerd_shim::run` with two changes so the
//! shim works with every containerd from 1.6 on (Debian 12 ships 1.6):
//!
//! - The Task service is registered as both `containerd.task.v2.Task`
//!   (containerd 1.6 to 2.2 with a plain address) and `containerd.task.v3.Task`
//!   (containerd 2.x); the two are the same messages on the wire (v3 only
//!   added fields).
//! - `start` prints the plain socket address for the legacy protocol
//!   (containerd 1.6 reads stdout as the address and nothing else; 1.7 and
//!   2.x accept it too) and a `BootstrapResult` for the bootstrap protocol
//!   (containerd 2.3+).
//!
//! It also shuts the pod down on SIGTERM/SIGINT, and does not reap
//! arbitrary children: the shim's only children are hull-vmm and virtiofsd,
//! which tokio waits for.

use crate::config::Config;
use crate::service::HullTask;
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::protos::types::introspection::RuntimeInfo;
use containerd_shim::{api::DeleteResponse, Error, Flags, StartOpts};
use log::{info, warn};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The runtime name containerd knows the shim by.
pub const RUNTIME_ID: &str = "io.containerd.hull.v2";
const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";

pub struct HullShim {
    namespace: String,
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
    cfg: Result<Config, String>,
}

impl HullShim {
    /// The Task service, publishing events to containerd at `ttrpc_address`.
    fn task_service(&self, ttrpc_address: &str) -> HullTask {
        let publisher = crate::events::Publisher::new(ttrpc_address.to_string());
        HullTask::new(self.cfg.clone(), &self.namespace, Some(publisher), self.exit.clone())
    }
}

fn other(msg: impl ToString) -> Error {
    Error::Other(msg.to_string())
}

#[async_trait]
impl Shim for HullShim {
    type T = HullTask;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        HullShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
            cfg: Config::load(),
        }
    }

    /// Starts (or finds) the pod's shim process: containers are grouped by
    /// their pod's sandbox id, so a pod's containers share one shim and VM.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // A broken config fails here, where containerd shows the message.
        if let Err(e) = &self.cfg {
            return Err(other(e));
        }
        let annotations = crate::spec::bundle_annotations(&self.bundle);
        let grouping = crate::pod::grouping(&opts.id, &annotations);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // A restarted containerd finds its running shims through this file.
        let file = self.bundle.join("address");
        containerd_shim::asynchronous::util::write_str_to_file(&file, &address)
            .await
            .map_err(|e| other(format!("writing {}: {e}", file.display())))?;
        Ok(address)
    }

    /// The `delete` command: cleanup after a shim that is gone.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let cfg = self.cfg.clone().unwrap_or_default();
        let (id, bundle) = (self.id.clone(), self.bundle.clone());
        let done = tokio::task::spawn_blocking(move || crate::cleanup::delete_command(&cfg, &id, &bundle))
            .await
            .map_err(other)?;
        for d in done {
            eprintln!("containerd-shim-hull-v2 delete {}: {d}", self.id);
        }
        Ok(DeleteResponse {
            exit_status: 128 + 9,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::util::timestamp().map_err(other)?,
            ),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> HullTask {
        self.task_service(&publisher.address)
    }
}

fn read_stdin() -> Vec<u8> {
    let mut input = Vec::new();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let _ = stdin.lock().take(10 << 20).read_to_end(&mut input);
    }
    input
}

/// The start parameters: the bootstrap protocol's `BootstrapParams` on
/// stdin if they are there (and for us), else the legacy flags and
/// environment (stdin then holds the runtime options, if any).
fn start_opts(flags: &Flags, input: &[u8]) -> (StartOpts, bool) {
    if let Ok(p) = BootstrapParams::parse_from_bytes(input) {
        if !input.is_empty() && p.instance_id == flags.id && p.namespace == flags.namespace {
            return (p.into(), true);
        }
    }
    let mut opts = StartOpts {
        id: flags.id.clone(),
        namespace: flags.namespace.clone(),
        address: flags.address.clone(),
        publish_binary: flags.publish_binary.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        debug: flags.debug,
        ..Default::default()
    };
    if let Ok(any) = Any::parse_from_bytes(input) {
        if !any.type_url.is_empty() {
            opts.extensions.push(any);
        }
    }
    (opts, false)
}

/// The shim's entry point (inside a tokio runtime); errors as one line.
pub async fn run() -> Result<(), String> {
    run_inner().await.map_err(|e| match e {
        Error::Other(s) => s,
        e => e.to_string(),
    })
}

async fn run_inner() -> Result<(), Error> {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..])?;
    if flags.version {
        println!("containerd-shim-hull-v2 {} ({RUNTIME_ID})", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if flags.info {
        let info = RuntimeInfo { name: RUNTIME_ID.to_string(), ..Default::default() };
        std::io::stdout().write_all(&info.write_to_bytes()?).map_err(other)?;
        return Ok(());
    }
    let mut config = containerd_shim::Config::default();
    let mut shim = HullShim::new(RUNTIME_ID, &flags, &mut config).await;
    match flags.action.as_str() {
        "start" => {
            let (opts, bootstrap) = start_opts(&flags, &read_stdin());
            if opts.ttrpc_address.is_empty() {
                return Err(other("TTRPC_ADDRESS is not set"));
            }
            let address = shim.start_shim(opts).await?;
            let reply = if bootstrap {
                BootstrapResult {
                    version: containerd_shim::protos::TASK_API_VERSION,
                    address,
                    protocol: "ttrpc".into(),
                    ..Default::default()
                }
                .write_to_bytes()?
            } else {
                address.into_bytes()
            };
            let mut out = std::io::stdout();
            out.write_all(&reply).map_err(other)?;
            out.flush().map_err(other)?;
            Ok(())
        }
        "delete" => {
            let resp = shim.delete_shim().await?;
            std::io::stdout().write_all(&resp.write_to_bytes()?).map_err(other)?;
            Ok(())
        }
        _ => serve(shim, &flags).await,
    }
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Binds the shim socket. None: another shim of the same pod already
/// serves it (two starts raced); its address was written to `address`.
async fn listen(address: &str) -> Result<Option<std::os::unix::net::UnixListener>, Error> {
    let path = Path::new(socket_path(address));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(other)?;
    }
    match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            for _ in 0..200 {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    std::fs::write("address", address).map_err(other)?;
                    return Ok(None);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let _ = std::fs::remove_file(path);
            Ok(Some(std::os::unix::net::UnixListener::bind(path).map_err(other)?))
        }
        Err(e) => Err(other(format!("listen on {}: {e}", path.display()))),
    }
}

async fn serve(mut shim: HullShim, flags: &Flags) -> Result<(), Error> {
    if flags.socket.is_empty() {
        return Err(other("-socket is required"));
    }
    let level = shim.cfg.as_ref().map(|c| c.defaults.log_level.clone()).unwrap_or_else(|_| "info".into());
    if let Err(e) = containerd_shim::logger::init(flags.debug, &level, &flags.namespace, &flags.id) {
        eprintln!("containerd-shim-hull-v2: no log fifo ({e}); logging to stderr is off");
    }
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").map_err(|_| other("TTRPC_ADDRESS is not set"))?;
    // Our own publisher, not the crate's RemotePublisher (see events.rs).
    let task = shim.task_service(&ttrpc_address);
    let Some(listener) = listen(&flags.socket).await? else {
        signal_server_started();
        return Ok(());
    };
    // The generated map holds the service as containerd.task.v3.Task; a
    // second instance answers to the v2 name.
    let mut services = create_task(Arc::new(task.clone()));
    debug_assert!(services.contains_key(TASK_V3));
    services.extend(create_task(Arc::new(task.clone())).into_values().map(|s| (TASK_V2.to_string(), s)));
    let listener = Listener::try_from(listener).map_err(other)?;
    let mut server = Server::new().add_listener(listener).register_service(services);
    server.start().await?;
    signal_server_started();
    info!("hull shim serving on {} (pid {})", flags.socket, std::process::id());

    let sig_task = task.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => warn!("SIGTERM: shutting the pod down"),
            _ = int.recv() => warn!("SIGINT: shutting the pod down"),
        }
        sig_task.shutdown_now().await;
    });
    shim.wait().await;
    info!("shim exiting");
    server.shutdown().await.unwrap_or_default();
    let _ = std::fs::remove_file(socket_path(&flags.socket));
    Ok(())
}

/// Tells `start` (which reads our stdout until end-of-file) that the server
/// is up: stdout becomes stderr (/dev/null).
fn signal_server_started() {
    // SAFETY: dup2 on the standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Flags {
        Flags {
            id: "c1".into(),
            namespace: "default".into(),
            address: "/run/containerd/containerd.sock".into(),
            ..Default::default()
        }
    }

    #[test]
    fn legacy_start_params() {
        let (o, bootstrap) = start_opts(&flags(), b"");
        assert!(!bootstrap);
        assert_eq!((o.id.as_str(), o.namespace.as_str()), ("c1", "default"));
        assert_eq!(o.address, "/run/containerd/containerd.sock");
    }

    #[test]
    fn bootstrap_start_params() {
        let p = BootstrapParams {
            instance_id: "c1".into(),
            namespace: "default".into(),
            containerd_ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            ..Default::default()
        };
        let (o, bootstrap) = start_opts(&flags(), &p.write_to_bytes().unwrap());
        assert!(bootstrap);
        assert_eq!(o.ttrpc_address, "/run/containerd/containerd.sock.ttrpc");
        // Params for another instance are not ours.
        let p = BootstrapParams { instance_id: "other".into(), ..p };
        assert!(!start_opts(&flags(), &p.write_to_bytes().unwrap()).1);
    }

    #[test]
    fn task_service_under_both_names() {
        let task = HullTask::new(Ok(Config::default()), "ns", None, Arc::new(ExitSignal::default()));
        let services = create_task(Arc::new(task));
        assert!(services.contains_key(TASK_V3), "{:?}", services.keys().collect::<Vec<_>>());
    }
}
