//! The delivery log: one JSON line per attempt, modelled on PowerMTA's accounting records.
//!
//! Owns the log file. Records are handed over a bounded channel to a dedicated thread that does
//! the (blocking) file writes, so delivery never waits on the disk; if the channel is full the
//! record is counted as dropped rather than stalling a connection.

use std::io::Write;
use std::path::Path;
use std::sync::LazyLock;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use prometheus::{IntCounter, register_int_counter};
use serde::Serialize;

pub(crate) static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_delivery_log_dropped_total",
        "Delivery log records dropped because the log writer fell behind (disk too slow). Should stay 0."
    )
    .expect("metric registers once")
});

/// One attempt. Field names follow PowerMTA's accounting file where one exists.
#[derive(Debug, Clone, Serialize)]
pub struct LogRecord {
    /// `d` delivered, `b` bounced, `t` transient failure (deferred), `x` expired; from reports
    /// received later: `rb` remote bounce (a DSN), `rs` remote status (a delay or delivery DSN),
    /// `f` feedback (an ARF report), `u` unsubscribe.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time_queued: String,
    pub time_logged: String,
    pub campaign: String,
    pub job: String,
    pub recipient: String,
    pub sender: String,
    /// `delivered`, `failed` or `delayed` (RFC 3464 Action).
    pub dsn_action: &'static str,
    /// RFC 3463 status, e.g. `5.1.1`.
    pub dsn_status: String,
    /// The reply code, when a server answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_code: Option<u16>,
    pub dsn_diag: String,
    /// The SMTP stage that decided the attempt.
    pub stage: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx_ip: Option<String>,
    pub tls: bool,
    pub size: usize,
    pub attempt: u32,
    /// Bounce category of a failure (`config/bounce-rules.toml`), PowerMTA's `bounceCat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_cat: Option<&'static str>,
    /// ARF Feedback-Type of an `f` record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<&'static str>,
}

enum Msg {
    Record(Box<LogRecord>),
    /// Write out everything before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct DeliveryLog {
    tx: SyncSender<Msg>,
}

impl DeliveryLog {
    /// Opens (appends to) `path`, creating its directory, and starts the writer thread.
    pub fn open(path: &Path) -> std::io::Result<DeliveryLog> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(65_536);
        std::thread::Builder::new()
            .name("delivery-log".into())
            .spawn(move || writer(file, rx))?;
        Ok(DeliveryLog { tx })
    }

    pub fn record(&self, r: LogRecord) {
        match self.tx.try_send(Msg::Record(Box::new(r))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => DROPPED.inc(),
        }
    }

    /// Waits until every record handed over so far is written to the file. Blocking: for
    /// shutdown, on the blocking pool.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(10));
        }
    }
}

fn writer(file: std::fs::File, rx: Receiver<Msg>) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut waiting = Vec::new();
        while let Some(m) = next {
            match m {
                Msg::Record(r) => {
                    if serde_json::to_writer(&mut out, &r).is_err() || out.write_all(b"\n").is_err()
                    {
                        tracing::error!("writing the delivery log failed");
                    }
                }
                Msg::Flush(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        // Flushed whenever the queue runs dry, so `tail -f` sees records promptly.
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "flushing the delivery log failed");
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
    let _ = out.flush();
}
