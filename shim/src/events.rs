//! Task events to containerd (its Events service, `forward`), without
//! protobuf reflection.
//!
//! The containerd-shim crate's publisher names an event's type through its
//! message descriptor. Building that descriptor parses the event's proto
//! file and its imports (gogo.proto, descriptor.proto): 350 KiB of heap,
//! measured with mallinfo2, that every shim kept for the life of its pod.
//! Here the type URL is the message's package plus its name, which is what
//! the descriptor would give.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::{Client, EventsClient};
use containerd_shim::protos::ttrpc;
use containerd_shim::Context;
use log::warn;
use std::time::Duration;
use tokio::sync::mpsc;

/// The protobuf package of containerd's task events.
pub const EVENTS_PACKAGE: &str = "containerd.events";

/// Tries per event before it is dropped (containerd gone for good).
const TRIES: u32 = 5;
/// Events waiting to be sent; a full queue makes `publish` wait.
const QUEUE: usize = 1024;

/// `m` packed as an `Any` named `PACKAGE.Name`.
pub fn any_of<M: Message>(package: &str, m: &M) -> Result<Any, String> {
    let value = m.write_to_bytes().map_err(|e| format!("encoding {}: {e}", M::NAME))?;
    Ok(Any { type_url: format!("{package}.{}", M::NAME), value, ..Default::default() })
}

/// Sends events in order on one connection to containerd's ttrpc address,
/// reconnecting when it drops (containerd restarted).
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Envelope>,
}

impl Publisher {
    /// Starts the sending task (on the current tokio runtime); it connects on
    /// the first event.
    pub fn new(address: String) -> Publisher {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(send_loop(address, rx));
        Publisher { tx }
    }

    /// Queues task event `ev` (of package `containerd.events`) on `topic`.
    pub async fn publish<M: Message>(&self, topic: &str, namespace: &str, ev: &M) -> Result<(), String> {
        let envelope = Envelope {
            timestamp: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::util::timestamp().map_err(|e| e.to_string())?,
            ),
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event: containerd_shim::protos::protobuf::MessageField::some(any_of(EVENTS_PACKAGE, ev)?),
            ..Default::default()
        };
        self.tx.send(envelope).await.map_err(|_| "the event sender has stopped".to_string())
    }
}

async fn send_loop(address: String, mut rx: mpsc::Receiver<Envelope>) {
    let mut client: Option<EventsClient> = None;
    while let Some(envelope) = rx.recv().await {
        let req = ForwardRequest { envelope: Some(envelope).into(), ..Default::default() };
        let mut sent = false;
        for attempt in 1..=TRIES {
            if attempt > 1 {
                tokio::time::sleep(Duration::from_secs((attempt - 1).into())).await;
            }
            let c = match &client {
                Some(c) => c.clone(),
                None => match connect(&address) {
                    Ok(c) => client.insert(c).clone(),
                    Err(e) => {
                        warn!("events: connecting to {address}: {e}");
                        continue;
                    }
                },
            };
            match c.forward(Context::default(), &req).await {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    warn!("events: forwarding {} (try {attempt} of {TRIES}): {e:?}", req.envelope.topic);
                    if matches!(e, ttrpc::error::Error::RemoteClosed | ttrpc::error::Error::LocalClosed) {
                        client = None;
                    }
                }
            }
        }
        if !sent {
            warn!("events: dropped {} after {TRIES} tries", req.envelope.topic);
        }
    }
}

fn connect(address: &str) -> Result<EventsClient, String> {
    let fd = containerd_shim::util::connect(address).map_err(|e| e.to_string())?;
    // SAFETY: `fd` is a connected socket this function owns from here on.
    Ok(EventsClient::new(unsafe { Client::from_raw_unix_socket_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused, TaskResumed, TaskStart,
    };
    use containerd_shim::protos::protobuf::MessageFull;

    /// The type URL is what the reflective name (the descriptor) gives, for
    /// every event the shim publishes.
    fn same_name<M: MessageFull + Default>() {
        let any = any_of(EVENTS_PACKAGE, &M::default()).unwrap();
        assert_eq!(any.type_url, M::descriptor().full_name());
    }

    #[test]
    fn type_urls_match_the_descriptors() {
        same_name::<TaskCreate>();
        same_name::<TaskStart>();
        same_name::<TaskExit>();
        same_name::<TaskDelete>();
        same_name::<TaskOOM>();
        same_name::<TaskExecAdded>();
        same_name::<TaskExecStarted>();
        same_name::<TaskPaused>();
        same_name::<TaskResumed>();
    }

    #[test]
    fn the_value_decodes_to_the_event() {
        let ev = TaskExit { container_id: "c1".into(), id: "e1".into(), pid: 7, exit_status: 3, ..Default::default() };
        let any = any_of(EVENTS_PACKAGE, &ev).unwrap();
        assert_eq!(TaskExit::parse_from_bytes(&any.value).unwrap(), ev);
    }

    #[test]
    fn metrics_name() {
        use containerd_shim::protos::cgroups_v2::metrics::Metrics;
        let any = any_of(crate::service::METRICS_PACKAGE, &Metrics::default()).unwrap();
        assert_eq!(any.type_url, Metrics::descriptor().full_name());
    }
}
