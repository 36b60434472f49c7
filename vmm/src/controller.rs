//! The VMM's main loop: one thread that owns the VM and reacts to API
//! requests, guest exits and signals, in order. Returns the exit status.

use crate::api::{ErrorKind, Request, Response, VmInfo, VmStatus};
use crate::builder::build_and_boot;
use crate::config::VmConfig;
use crate::persist::{self, RestoreConfig};
use crate::vmm::{Vmm, VmmEvent};
use crate::vstate::vcpu::VcpuExitReason;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};

pub struct Controller {
    events_tx: Sender<VmmEvent>,
    events: Receiver<VmmEvent>,
    config: Option<VmConfig>,
    vmm: Option<Vmm>,
    api_socket: Option<PathBuf>,
}

/// How the VMM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Guest reboot/poweroff, API shutdown or a signal.
    Clean(String),
    /// The guest could not run (KVM error) or the boot failed.
    Failed(String),
}

impl Controller {
    pub fn new(api_socket: Option<PathBuf>) -> Controller {
        let (events_tx, events) = channel();
        Controller { events_tx, events, config: None, vmm: None, api_socket }
    }

    pub fn sender(&self) -> Sender<VmmEvent> {
        self.events_tx.clone()
    }

    /// Configures and boots right away (CLI use).
    pub fn boot(&mut self, config: VmConfig) -> Result<(), String> {
        self.config = Some(config);
        self.do_boot().map_err(|r| match r {
            Response::Error(e) => e.message,
            Response::Ok(_) => unreachable!(),
        })
    }

    fn info(&self) -> VmInfo {
        match (&self.vmm, &self.config) {
            (Some(v), _) => v.info(),
            (None, Some(c)) => {
                VmInfo { status: VmStatus::Configured, vcpus: c.vcpus, mem_mib: c.mem_mib, devices: vec![] }
            }
            (None, None) => VmInfo { status: VmStatus::NotConfigured, vcpus: 0, mem_mib: 0, devices: vec![] },
        }
    }

    /// Builds the VM from a snapshot instead of booting (CLI and API).
    pub fn restore(&mut self, rc: &RestoreConfig) -> Result<(), Response> {
        if self.vmm.is_some() {
            return Err(Response::error(ErrorKind::InvalidState, "the VM is already running"));
        }
        match persist::restore(rc, self.events_tx.clone()) {
            Ok(v) => {
                self.vmm = Some(v);
                Ok(())
            }
            Err(e) => Err(Response::error(ErrorKind::Boot, format!("restoring {}: {e:#}", rc.snapshot.display()))),
        }
    }

    fn do_boot(&mut self) -> Result<(), Response> {
        if self.vmm.is_some() {
            return Err(Response::error(ErrorKind::InvalidState, "the VM is already booted"));
        }
        let Some(cfg) = &self.config else {
            return Err(Response::error(ErrorKind::InvalidState, "configure the VM before boot"));
        };
        match build_and_boot(cfg, self.events_tx.clone()) {
            Ok(v) => {
                self.vmm = Some(v);
                Ok(())
            }
            Err(e) => Err(Response::error(ErrorKind::Boot, format!("{e:#}"))),
        }
    }

    /// Runs until the VM ends; cleans up everything before returning.
    pub fn run(mut self) -> Outcome {
        let outcome = loop {
            let Ok(ev) = self.events.recv() else {
                break Outcome::Failed("event channel closed".into());
            };
            match ev {
                VmmEvent::Vcpu(id, VcpuExitReason::Reset) => break Outcome::Clean(format!("guest reset (vCPU {id})")),
                VmmEvent::Vcpu(id, VcpuExitReason::PowerOff) => {
                    break Outcome::Clean(format!("guest powered off (vCPU {id})"))
                }
                VmmEvent::Vcpu(id, VcpuExitReason::Error(e)) => break Outcome::Failed(format!("vCPU {id}: {e}")),
                VmmEvent::GuestReset => break Outcome::Clean("guest reset (i8042)".into()),
                VmmEvent::Signal(s) => break Outcome::Clean(format!("signal {s}")),
                VmmEvent::Api(req, reply) => {
                    if let Some(outcome) = self.handle_api(*req, &reply) {
                        break outcome;
                    }
                }
            }
        };
        if let Some(v) = self.vmm.take() {
            v.shutdown();
        }
        if let Some(p) = &self.api_socket {
            let _ = std::fs::remove_file(p);
        }
        outcome
    }

    fn handle_api(&mut self, req: Request, reply: &Sender<Response>) -> Option<Outcome> {
        let resp = match req {
            Request::Configure(cfg) => {
                if self.vmm.is_some() {
                    Response::error(ErrorKind::InvalidState, "the VM is already booted; configure applies before boot")
                } else if let Err(e) = cfg.validate() {
                    Response::error(ErrorKind::Config, e.to_string())
                } else {
                    self.config = Some(cfg);
                    Response::Ok(self.info())
                }
            }
            Request::Boot => match self.do_boot() {
                Ok(()) => Response::Ok(self.info()),
                Err(r) => r,
            },
            Request::Pause | Request::Resume => match &mut self.vmm {
                None => Response::error(ErrorKind::InvalidState, "the VM is not booted"),
                Some(v) => {
                    if req == Request::Pause {
                        v.pause()
                    } else {
                        v.resume()
                    }
                    Response::Ok(v.info())
                }
            },
            Request::State => Response::Ok(self.info()),
            Request::Snapshot { dir } => match &self.vmm {
                None => Response::error(ErrorKind::InvalidState, "the VM is not running"),
                Some(v) if v.info().status != VmStatus::Paused => {
                    Response::error(ErrorKind::InvalidState, "pause the VM before taking a snapshot")
                }
                Some(v) => match v.snapshot(&dir) {
                    Ok(()) => Response::Ok(v.info()),
                    Err(e) => Response::error(ErrorKind::Snapshot, format!("snapshot to {}: {e:#}", dir.display())),
                },
            },
            Request::Restore(rc) => match self.restore(&rc) {
                Ok(()) => Response::Ok(self.info()),
                Err(r) => r,
            },
            Request::Shutdown => {
                let mut info = self.info();
                info.status = VmStatus::ShuttingDown;
                let _ = reply.send(Response::Ok(info));
                return Some(Outcome::Clean("shutdown requested over the API".into()));
            }
        };
        let _ = reply.send(resp);
        None
    }
}
