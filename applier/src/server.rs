//! The applier's QUIC server: admits only primaries whose certificate names are on the
//! allow-list, and lets each write only the replicas it created.
//!
//! Per connection, the first bidirectional stream opened with `Hello` is the control stream
//! (cycle begin/resume, manifest, checksum requests); every other stream starts with a chunk
//! and carries chunks until the shipper finishes it, then gets one `Staged` answer once its
//! chunks are durably staged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use vmreplica_common::link::{self, LinkError, Tuning};
use vmreplica_common::tls::{self, AllowList, Identity};
use vmreplica_common::validate_name;
use vmreplica_common::wire::{code, Chunk, Message, PROTOCOL_VERSION};

use crate::store::{Retention, Store, StoreError, VmStore};

pub struct ApplierConfig {
    pub store: PathBuf,
    pub listen: SocketAddr,
    pub identity: Identity,
    pub allow: AllowList,
    pub retention: Retention,
    pub tuning: Tuning,
}

struct App {
    store: Store,
    allow: AllowList,
    vms: Mutex<HashMap<String, Arc<Mutex<VmStore>>>>,
}

type Vm = Arc<Mutex<VmStore>>;

fn error_code(e: &StoreError) -> u16 {
    match e {
        StoreError::NoSpace { .. } => code::NO_SPACE,
        StoreError::BadChunk { .. } => code::BAD_DATA,
        StoreError::NotOwner { .. } | StoreError::Name { .. } => code::NOT_ALLOWED,
        StoreError::Incomplete { .. } => code::INCOMPLETE,
        StoreError::OldCycle { .. }
        | StoreError::NoSuchCycle { .. }
        | StoreError::DiskMismatch { .. } => code::PROTOCOL,
        _ => code::INTERNAL,
    }
}

/// A running applier.
pub struct Applier {
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl Applier {
    /// Binds and starts serving.
    pub fn start(cfg: ApplierConfig) -> Result<Applier, Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::new(&cfg.store, cfg.retention)?;
        // Finish any apply a crash interrupted before accepting anybody.
        for vm in store.vms() {
            if let Err(e) = store.open_existing(&vm) {
                tracing::error!(vm, "replica needs attention: {e}");
            }
        }
        let endpoint = link::server(cfg.listen, &cfg.identity, &cfg.tuning)?;
        let app = Arc::new(App {
            store,
            allow: cfg.allow,
            vms: Mutex::new(HashMap::new()),
        });
        let ep = endpoint.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let app = Arc::clone(&app);
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => connection(app, conn).await,
                        Err(e) => tracing::warn!(
                            %remote,
                            "refused a connection: {}",
                            tls::describe_refusal(&e.to_string(), "replica", "primary")
                        ),
                    }
                });
            }
        });
        Ok(Applier { endpoint, task })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Stops accepting, closes connections, waits for them.
    pub async fn shutdown(self) {
        self.endpoint
            .close(VarInt::from_u32(0), b"applier shutting down");
        self.endpoint.wait_idle().await;
        self.task.abort();
    }
}

async fn connection(app: Arc<App>, conn: Connection) {
    let remote = conn.remote_address();
    let names = link::peer_names(&conn);
    let Some(peer) = app.allow.admit(&names) else {
        tracing::warn!(%remote, ?names, "refused primary: its certificate name is not in the allow-list");
        conn.close(
            VarInt::from_u32(u32::from(code::NOT_ALLOWED)),
            b"not allowed: certificate name is not in the applier's allow-list",
        );
        return;
    };
    tracing::info!(%remote, peer, "primary connected");
    let vm: Arc<OnceLock<(String, Vm)>> = Arc::new(OnceLock::new());
    let queued = Arc::new(Semaphore::new(QUEUED_BYTES));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%remote, peer, "primary disconnected: {e}");
                return;
            }
        };
        let (app, peer, vm) = (Arc::clone(&app), peer.clone(), Arc::clone(&vm));
        let queued = Arc::clone(&queued);
        tokio::spawn(async move {
            if let Err(e) = stream(app, &peer, vm, queued, send, recv).await {
                tracing::warn!(peer, "stream ended: {e}");
            }
        });
    }
}

async fn reply_error(send: &mut SendStream, code: u16, message: String) -> Result<(), LinkError> {
    link::send(send, &Message::Error { code, message }).await?;
    let _ = send.finish();
    Ok(())
}

thread_local! {
    /// Per blocking thread, where chunks are decompressed to be verified (and, for an initial
    /// copy, written): reused, so no chunk allocates or zeroes a buffer of its own.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Runs a store operation on a blocking thread.
async fn with_vm<T: Send + 'static>(
    vm: &Vm,
    f: impl FnOnce(&mut VmStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let vm = Arc::clone(vm);
    blocking(move || f(&mut vm.lock().unwrap_or_else(|e| e.into_inner()))).await
}

async fn stream(
    app: Arc<App>,
    peer: &str,
    vm: Arc<OnceLock<(String, Vm)>>,
    queued: Arc<Semaphore>,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), LinkError> {
    match link::recv(&mut recv).await? {
        Some(Message::Hello { version, vm: name }) => {
            if version != PROTOCOL_VERSION {
                return reply_error(
                    &mut send,
                    code::PROTOCOL,
                    format!("protocol version {version} is not supported"),
                )
                .await;
            }
            if let Err(e) = validate_name(&name) {
                return reply_error(&mut send, code::NOT_ALLOWED, format!("VM name: {e}")).await;
            }
            // Looked up and, on first contact, opened under the table's lock: two connections
            // of one primary (`connections` > 1) must share one store, not race to open two.
            let opened = {
                let mut vms = app.vms.lock().unwrap_or_else(|e| e.into_inner());
                match vms.get(&name).cloned() {
                    Some(v) => {
                        let owner = v
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .owner()
                            .to_string();
                        if owner == peer {
                            Ok(v)
                        } else {
                            Err(StoreError::NotOwner {
                                vm: name.clone(),
                                owner,
                                peer: peer.to_string(),
                            })
                        }
                    }
                    None => app.store.open_vm(&name, peer).map(|v| {
                        let v = Arc::new(Mutex::new(v));
                        vms.insert(name.clone(), Arc::clone(&v));
                        v
                    }),
                }
            };
            let store = match opened {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(peer, "refused VM {name}: {e}");
                    return reply_error(&mut send, error_code(&e), e.to_string()).await;
                }
            };
            let last_cycle = store.lock().unwrap_or_else(|e| e.into_inner()).last_cycle();
            let _ = vm.set((name.clone(), Arc::clone(&store)));
            link::send(
                &mut send,
                &Message::Welcome {
                    version: PROTOCOL_VERSION,
                    last_cycle,
                },
            )
            .await?;
            control(&store, &name, &mut send, &mut recv).await
        }
        Some(Message::Chunk(first)) => {
            let Some((name, store)) = vm.get().cloned() else {
                return reply_error(&mut send, code::PROTOCOL, "chunks before Hello".into()).await;
            };
            data_stream(&store, &name, peer, first, send, recv, queued).await
        }
        Some(other) => {
            reply_error(
                &mut send,
                code::PROTOCOL,
                format!("unexpected first message {other:?}"),
            )
            .await
        }
        None => Ok(()),
    }
}

/// Bytes of chunk payloads a connection's data streams may hold received but not yet staged
/// (besides what QUIC's windows hold).
const QUEUED_BYTES: usize = 32 << 20;

/// Chunks of one data stream staged together in one hop to a blocking thread, at most.
const BATCH: usize = 8;

/// How a data stream's reader stopped, when not at a clean end.
enum ReaderEnd {
    Link(LinkError),
    Protocol(String),
}

/// A data stream: a reader task receives chunks while those before them are verified and
/// staged; the chunks that arrived meanwhile are staged together, in one hop to a blocking
/// thread. Each is verified (decompressed, checksummed) and its range's old contents read
/// for the undo log before the VM's lock is taken, so streams verify in parallel.
async fn data_stream(
    store: &Vm,
    name: &str,
    peer: &str,
    first: Chunk,
    mut send: SendStream,
    mut recv: RecvStream,
    queued: Arc<Semaphore>,
) -> Result<(), LinkError> {
    let cycle = first.cycle;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Chunk, OwnedSemaphorePermit)>(BATCH);
    let reader = tokio::spawn(async move {
        let mut next = Some(first);
        while let Some(c) = next {
            let cost = c.payload.len().clamp(1, QUEUED_BYTES) as u32;
            let Ok(permit) = Arc::clone(&queued).acquire_many_owned(cost).await else {
                return Ok(());
            };
            if tx.send((c, permit)).await.is_err() {
                return Ok(()); // the stager stopped
            }
            next = match link::recv(&mut recv).await.map_err(ReaderEnd::Link)? {
                Some(Message::Chunk(c)) => Some(c),
                None => None,
                Some(other) => {
                    return Err(ReaderEnd::Protocol(format!(
                        "unexpected {other:?} on a data stream"
                    )))
                }
            };
        }
        Ok(())
    });
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let chunks = std::mem::take(&mut batch);
        let (vm, vm_name) = (Arc::clone(store), name.to_string());
        let staged = blocking(move || {
            SCRATCH.with_borrow_mut(|scratch| {
                for (c, _permit) in &chunks {
                    let data = c.unpack_into(scratch).map_err(|e| StoreError::BadChunk {
                        vm: vm_name.clone(),
                        reason: e.to_string(),
                    })?;
                    let source = vm.lock().unwrap_or_else(|e| e.into_inner()).undo_source();
                    let undo = source.and_then(|s| s.capture(c).ok());
                    let mut g = vm.lock().unwrap_or_else(|e| e.into_inner());
                    g.stage_verified(c, data, undo)?;
                }
                Ok(())
            })
        })
        .await;
        if let Err(e) = staged {
            reader.abort();
            tracing::warn!(vm = %name, peer, "refused a chunk: {e}");
            return reply_error(&mut send, error_code(&e), e.to_string()).await;
        }
    }
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(ReaderEnd::Link(e))) => return Err(e),
        Ok(Err(ReaderEnd::Protocol(m))) => return reply_error(&mut send, code::PROTOCOL, m).await,
        Err(e) => return reply_error(&mut send, code::INTERNAL, e.to_string()).await,
    }
    match with_vm(store, |v| v.staged()).await {
        Ok(_) => {
            link::send(
                &mut send,
                &Message::Staged {
                    cycle,
                    chunks: Vec::new(),
                },
            )
            .await?;
            send.finish()?;
            Ok(())
        }
        Err(e) => reply_error(&mut send, error_code(&e), e.to_string()).await,
    }
}

async fn control(
    vm: &Vm,
    name: &str,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), LinkError> {
    while let Some(m) = link::recv(recv).await? {
        let reply = match m {
            Message::BeginCycle { cycle, kind, disks } => {
                match with_vm(vm, move |v| v.begin(cycle, kind, &disks)).await {
                    Ok(chunks) => {
                        tracing::info!(
                            vm = name,
                            cycle,
                            ?kind,
                            staged = chunks.len(),
                            "cycle started"
                        );
                        Message::Staged { cycle, chunks }
                    }
                    Err(e) => Message::Error {
                        code: error_code(&e),
                        message: e.to_string(),
                    },
                }
            }
            Message::Manifest {
                cycle,
                chunks,
                digest,
            } => match with_vm(vm, move |v| v.commit(cycle, chunks, digest)).await {
                Ok(()) => Message::Applied { cycle },
                Err(e) => {
                    tracing::warn!(vm = name, cycle, "cycle not applied: {e}");
                    Message::Error {
                        code: error_code(&e),
                        message: e.to_string(),
                    }
                }
            },
            Message::HashRequest {
                disk,
                offset,
                block,
                count,
            } => {
                let d = disk.clone();
                match with_vm(vm, move |v| v.hashes(&d, offset, block, count)).await {
                    Ok(hashes) => Message::Hashes {
                        disk,
                        offset,
                        hashes,
                    },
                    Err(e) => Message::Error {
                        code: error_code(&e),
                        message: e.to_string(),
                    },
                }
            }
            other => Message::Error {
                code: code::PROTOCOL,
                message: format!("unexpected {other:?} on the control stream"),
            },
        };
        link::send(send, &reply).await?;
    }
    Ok(())
}
