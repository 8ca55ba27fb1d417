//! Assembly: a job's message rendered, built and DKIM-signed, on this task when it is cheap,
//! else on the **assembly pool**: one thread per core, fed from one queue.
//!
//! RSA signing costs a few hundred microseconds of CPU per message and is most of the CPU a
//! signed campaign needs, so the pool is what keeps the cores busy. Its threads are its own (not
//! tokio's blocking pool): a thread that finds the queue non-empty takes the next message at
//! once, without a hand-off through a sleeping thread, and stays warm with its signer's state.
//! A lane submits the messages of its batch ahead of their turn ([`Ahead`], up to
//! [`LOOKAHEAD_BYTES`] of templates), so they are signed back to back while it sends the first
//! ones: the connection does not wait for the signer, and the lane wakes for a finished
//! signature about once per batch rather than once per message. The queue is not capped by a
//! constant: its depth follows from the lanes open (a batch each at most), and it holds exactly
//! the work that keeps the signers from waiting for the connections.
//!
//! A message whose lane gave it up (the group went back to the queue, the connection failed)
//! before a thread took it is skipped, not signed.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::Instant;

use prometheus::{Histogram, IntGauge, register_histogram, register_int_gauge};
use tokio::sync::oneshot;

use super::Delivery;
use super::pick::Prepared;
use crate::outbound::outcome::{self, Outcome};
use crate::outbound::render::{AssembleError, Rendered};
use crate::outbound::smtp::reply::{Command, EnhancedCode};
use crate::store::campaign::Campaign;

pub(crate) static ASSEMBLY_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_message_assembly_seconds",
        "Time to render, build and DKIM-sign one message, from its submission to the assembly pool to its signed bytes (the wait in the pool's queue included). Rising values with flat signing time mean the CPU is saturated.",
        prometheus::exponential_buckets(0.00005, 2.0, 18).expect("static buckets")
    )
    .expect("metric registers once")
});

pub(crate) static ASSEMBLY_WAIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_message_assembly_wait_seconds",
        "Time a connection ready to send waited for its message to be assembled (zero when it was signed while the previous transaction was on the wire).",
        prometheus::exponential_buckets(0.00001, 2.0, 20).expect("static buckets")
    )
    .expect("metric registers once")
});

pub(crate) static ASSEMBLY_QUEUED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_message_assembly_queued",
        "Messages waiting in the assembly pool's queue for a thread. Persistently above the number of cores: signing is the bottleneck."
    )
    .expect("metric registers once")
});

/// Campaigns whose templates and attachments come to at most this many bytes, and whose From
/// domain has no RSA key, are assembled on the delivery task itself rather than in the pool.
const INLINE_ASSEMBLY_BYTES: usize = 32 * 1024;

type Work = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running CPU-bound closures from one FIFO queue.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

struct Queue {
    work: VecDeque<Work>,
    closed: bool,
}

/// The result of work submitted to a [`Pool`]; `Err` if it panicked.
pub struct Ticket<R>(oneshot::Receiver<std::thread::Result<R>>);

impl<R> Ticket<R> {
    /// Waits for the result. `Err` says why there is none (the work panicked).
    pub async fn wait(self) -> Result<R, String> {
        match self.0.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(panic)) => Err(panic_message(&*panic)),
            Err(_) => Err("the assembly pool stopped".into()),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    format!("assembly panicked: {what}")
}

impl Pool {
    /// Starts `threads` threads named `{name}-{i}`.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                work: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    crate::schedule_as_batch();
                    shared.run()
                })?;
        }
        Ok(Pool { shared })
    }

    /// Queues `work`; a thread runs it unless the ticket has been dropped by then.
    pub fn submit<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Ticket<R> {
        let (tx, rx) = oneshot::channel();
        let job: Work = Box::new(move || {
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
        });
        let mut q = self.shared.queue.lock().expect("assembly queue lock");
        q.work.push_back(job);
        ASSEMBLY_QUEUED.set(q.work.len() as i64);
        drop(q);
        self.shared.ready.notify_one();
        Ticket(rx)
    }
}

impl Drop for Pool {
    /// The threads finish what is queued (skipping what nobody waits for) and end.
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.closed = true;
        }
        self.shared.ready.notify_all();
    }
}

impl Shared {
    fn run(&self) {
        loop {
            let job = {
                let Ok(mut q) = self.queue.lock() else { return };
                loop {
                    if let Some(job) = q.work.pop_front() {
                        ASSEMBLY_QUEUED.set(q.work.len() as i64);
                        break job;
                    }
                    if q.closed {
                        return;
                    }
                    q = match self.ready.wait(q) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                }
            };
            job();
        }
    }
}

/// One group's message on its way: assembled on the task when awaited (cheap), or in the pool.
pub(super) enum Assembly {
    Inline(Box<dyn FnOnce() -> Result<Rendered, AssembleError> + Send>),
    Queued(Ticket<Result<Rendered, AssembleError>>),
    Failed(Outcome),
}

impl Assembly {
    /// The message, or the outcome for its recipients when it cannot be assembled.
    pub(super) async fn rendered(self) -> Result<Rendered, Outcome> {
        let started = Instant::now();
        let result = match self {
            Assembly::Failed(o) => return Err(o),
            Assembly::Inline(work) => {
                let r = work();
                ASSEMBLY_SECONDS.observe(started.elapsed().as_secs_f64());
                Ok(r)
            }
            Assembly::Queued(ticket) => {
                let r = ticket.wait().await;
                ASSEMBLY_WAIT_SECONDS.observe(started.elapsed().as_secs_f64());
                r
            }
        };
        assembled(result)
    }
}

/// How much of a lane's batch is submitted for assembly ahead of its turn: groups whose
/// templates come to at most this many bytes in all (always the next one). A lane's messages are
/// then signed back to back while it sends them, and the lane wakes for a finished signature
/// once per batch rather than once per message; the bound keeps large messages from piling up
/// signed and unsent.
const LOOKAHEAD_BYTES: usize = 256 * 1024;

/// A lane's batch of groups, in order, each with its message's assembly once started.
pub(super) struct Ahead {
    groups: VecDeque<(Vec<Prepared>, Option<Assembly>)>,
}

impl Ahead {
    pub(super) fn new(delivery: &Delivery, groups: Vec<Vec<Prepared>>) -> Ahead {
        let mut ahead = Ahead {
            groups: groups
                .into_iter()
                .filter(|g| !g.is_empty())
                .map(|g| (g, None))
                .collect(),
        };
        ahead.start(delivery);
        ahead
    }

    /// The next group and its message's assembly; the ones after it are started as the
    /// lookahead allows.
    pub(super) fn next(&mut self, delivery: &Delivery) -> Option<(Vec<Prepared>, Assembly)> {
        let (g, started) = self.groups.pop_front()?;
        let assembly = started.unwrap_or_else(|| delivery.start_assembly(&g[0]));
        self.start(delivery);
        Some((g, assembly))
    }

    /// The jobs not taken yet (their assemblies are dropped: skipped if not begun).
    pub(super) fn rest(self) -> impl Iterator<Item = Prepared> {
        self.groups.into_iter().flat_map(|(g, _)| g)
    }

    fn start(&mut self, delivery: &Delivery) {
        let mut bytes = 0;
        for (i, (g, started)) in self.groups.iter_mut().enumerate() {
            let lead = &g[0];
            bytes += assembly_bytes(&lead.campaign);
            if i > 0 && bytes > LOOKAHEAD_BYTES {
                return;
            }
            if started.is_none() {
                *started = Some(delivery.start_assembly(lead));
            }
        }
    }
}

impl Delivery {
    /// Starts the assembly of the message for the group led by `lead`: RSA signing (a quarter of
    /// a millisecond to one, by CPU) and large templates go to the assembly pool at once, and
    /// are done by the time the lane awaits them if a thread was free; a small message without
    /// an RSA key (tens of microseconds) is assembled on the lane's task when awaited, which
    /// spares two thread hand-offs per message.
    ///
    /// Every message of a campaign that is not personalised has the shared form
    /// ([`crate::outbound::render::Assembler::assemble_merged`]), also when one recipient
    /// happens to go alone: what a recipient gets must not depend on timing.
    pub(super) fn start_assembly(&self, lead: &Prepared) -> Assembly {
        let campaign = &lead.campaign.record;
        let job = lead.job.id;
        let (node, shared) = (Arc::clone(&self.node), Arc::clone(&lead.campaign));
        let work: Box<dyn FnOnce() -> Result<Rendered, AssembleError> + Send> =
            if campaign.raw.is_some() {
                let Some(body) = lead.campaign.body.clone() else {
                    // Its bytes go only when its last job is final, so this is a damaged spool.
                    return Assembly::Failed(outcome::local_failure(
                        EnhancedCode(5, 3, 0),
                        "the message's stored bytes are missing",
                        Command::Data,
                    ));
                };
                Box::new(move || node.assembler.assemble_raw(&shared.record, &body, job))
            } else {
                let compiled = match self.node.assembler.compiled(&lead.campaign) {
                    Ok(c) => c,
                    Err(e) => {
                        return Assembly::Failed(outcome::local_failure(
                            EnhancedCode(5, 6, 0),
                            format!("message could not be rendered: {e}"),
                            Command::Data,
                        ));
                    }
                };
                let merged = !campaign.personalised;
                let record = lead.record.clone();
                Box::new(move || {
                    node.assembler.assemble_job(
                        &shared.record,
                        &compiled,
                        job,
                        &record.as_record(),
                        merged,
                    )
                })
            };
        if assembly_bytes(&lead.campaign) <= INLINE_ASSEMBLY_BYTES
            && !self
                .node
                .assembler
                .signs_with_rsa(crate::intake::address::domain_of(&campaign.from))
        {
            return Assembly::Inline(work);
        }
        let submitted = Instant::now();
        Assembly::Queued(self.assembly.submit(move || {
            let r = work();
            ASSEMBLY_SECONDS.observe(submitted.elapsed().as_secs_f64());
            r
        }))
    }
}

/// What a campaign's messages are assembled from, in bytes: a raw message's stored bytes, else
/// its templates and attachments.
fn assembly_bytes(campaign: &Campaign) -> usize {
    campaign
        .body
        .as_ref()
        .map_or_else(|| campaign.record.template_bytes(), |body| body.len())
}

/// The outcome of an assembly that failed, or its message.
fn assembled(result: Result<Result<Rendered, AssembleError>, String>) -> Result<Rendered, Outcome> {
    match result {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(AssembleError::Render(e))) => Err(outcome::local_failure(
            EnhancedCode(5, 6, 0),
            format!("message could not be rendered: {e}"),
            Command::Data,
        )),
        Ok(Err(AssembleError::Sign(e))) => {
            tracing::error!(error = %e, "DKIM signing failed; the message waits");
            Err(outcome::local_failure(
                EnhancedCode(4, 7, 0),
                e.to_string(),
                Command::Data,
            ))
        }
        Err(e) => Err(outcome::local_failure(
            EnhancedCode(4, 3, 0),
            format!("message assembly did not finish: {e}"),
            Command::Data,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_pool_threads_in_order_and_a_panic_is_an_error() {
        let pool = Pool::new("test-assembly", 1).unwrap();
        let tickets: Vec<_> = (0..5)
            .map(|i| {
                pool.submit(move || {
                    (
                        i,
                        std::thread::current().name().unwrap_or_default().to_owned(),
                    )
                })
            })
            .collect();
        for (i, t) in tickets.into_iter().enumerate() {
            assert_eq!(t.wait().await.unwrap(), (i, "test-assembly-0".to_owned()));
        }
        let bad = pool.submit(|| -> u32 { panic!("boom") });
        assert_eq!(bad.wait().await.unwrap_err(), "assembly panicked: boom");
        // The thread survived the panic.
        assert_eq!(pool.submit(|| 7).wait().await.unwrap(), 7);
    }

    #[tokio::test]
    async fn work_whose_ticket_was_dropped_is_skipped() {
        let pool = Pool::new("test-assembly", 1).unwrap();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        // Keeps the one thread busy until released, so the next work is still queued.
        let blocker = pool.submit(move || hold_rx.recv().is_ok());
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        drop(pool.submit(move || flag.store(true, std::sync::atomic::Ordering::SeqCst)));
        hold_tx.send(()).unwrap();
        assert!(blocker.wait().await.unwrap());
        // Work queued after the dropped one has run, so the dropped one was passed over.
        pool.submit(|| ()).wait().await.unwrap();
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
