//! The delivery log: one JSON line per attempt, modelled on PowerMTA's accounting records.
//!
//! Owns the log file. Records are handed over a bounded channel to a dedicated thread that does
//! the (blocking) file writes, so delivery never waits on the disk; if the channel is full the
//! record is counted as dropped rather than stalling a connection. The writer drains the channel,
//! writes, then pauses [`DRAIN_PAUSE`] before waiting again: records pile up meanwhile and are
//! written together, so a busy node does not wake the thread (and switch tasks) once per record.
//!
//! The writer rotates the file by size and/or on UTC period boundaries: the current file is
//! renamed `<name>.<UTC time>` and a new one started; the oldest rotated files beyond `keep` are
//! deleted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, register_int_counter};
use serde::Serialize;

pub(crate) static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_delivery_log_dropped_total",
        "Delivery log records dropped because the log writer fell behind (disk too slow). Should stay 0."
    )
    .expect("metric registers once")
});

/// One attempt, report or other fate of a recipient. Field names follow PowerMTA's accounting
/// file where one exists.
#[derive(Debug, Clone, Serialize)]
pub struct LogRecord {
    /// `d` delivered, `b` bounced, `t` transient failure (deferred), `x` expired; from reports
    /// received later: `rb` remote bounce (a DSN), `rs` remote status (a delay or delivery DSN),
    /// `f` feedback (an ARF report), `u` unsubscribe; never sent: `s` suppressed (at ingest or
    /// before delivery), `c` cancelled with its campaign, `r` rejected at ingest (no job).
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
    /// The TLS policy the connection was made under: `dane`, `sts-enforce`, `sts-testing`, or
    /// the site's `tls` setting (`opportunistic`, `required`, `verify`, `none`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_policy: Option<&'static str>,
    /// The egress source the attempt went from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The pool of sources the recipient's campaign or message sends through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub size: usize,
    pub attempt: u32,
    /// Bounce category of a failure (`config/bounce-rules.toml`), PowerMTA's `bounceCat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_cat: Option<&'static str>,
    /// ARF Feedback-Type of an `f` record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<&'static str>,
    /// The campaign's tags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The tenant the campaign or message belongs to (absent: the default tenant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The parts of a record about a recipient that was never sent (see [`LogRecord::unsent`]).
pub struct Unsent<'a> {
    /// `s`, `c` or `r`.
    pub kind: &'static str,
    pub campaign: String,
    /// The job id; empty for a recipient rejected at ingest, which never had one.
    pub job: String,
    pub recipient: &'a str,
    pub accepted_at_ms: u64,
    pub attempts: u32,
    /// Why: the suppression reason, "campaign cancelled", the field and error of a reject.
    pub detail: String,
    /// Where it was decided: `ingest` or `delivery`.
    pub stage: &'static str,
}

impl LogRecord {
    /// The event type of this record, as webhooks and lookups name it.
    pub fn event(&self) -> &'static str {
        match self.kind {
            "d" => "delivered",
            "t" => "deferred",
            "b" | "rb" => "bounced",
            "x" => "expired",
            "rs" if self.dsn_action == "delayed" => "delayed",
            "rs" => "delivery_report",
            "f" if matches!(self.feedback_type, Some("abuse" | "fraud" | "virus")) => "complained",
            "f" => "feedback",
            "u" => "unsubscribed",
            "s" => "suppressed",
            "c" => "cancelled",
            "r" => "rejected",
            _ => "other",
        }
    }

    /// The job-history entry of this record (see `history` in the spool): what happened, when,
    /// and the reply, without what the job itself says (campaign, recipient, sender).
    pub fn history_entry(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Entry<'a> {
            event: &'static str,
            #[serde(rename = "type")]
            kind: &'static str,
            time: &'a str,
            attempt: u32,
            dsn_action: &'static str,
            dsn_status: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            reply_code: Option<u16>,
            #[serde(skip_serializing_if = "str::is_empty")]
            dsn_diag: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            stage: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            mx_host: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            mx_ip: Option<&'a str>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            tls: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            bounce_cat: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            feedback_type: Option<&'static str>,
        }
        let e = Entry {
            event: self.event(),
            kind: self.kind,
            time: &self.time_logged,
            attempt: self.attempt,
            dsn_action: self.dsn_action,
            dsn_status: &self.dsn_status,
            reply_code: self.reply_code,
            dsn_diag: &self.dsn_diag,
            stage: &self.stage,
            mx_host: self.mx_host.as_deref(),
            mx_ip: self.mx_ip.as_deref(),
            tls: self.tls,
            bounce_cat: self.bounce_cat,
            feedback_type: self.feedback_type,
        };
        serde_json::to_vec(&e).expect("a history entry serialises")
    }
    /// The record of a recipient that ends without a (further) attempt.
    pub fn unsent(u: Unsent<'_>) -> LogRecord {
        LogRecord {
            kind: u.kind,
            time_queued: rfc3339(u.accepted_at_ms),
            time_logged: rfc3339(crate::now_ms()),
            campaign: u.campaign,
            job: u.job,
            recipient: u.recipient.to_owned(),
            sender: String::new(),
            dsn_action: "failed",
            dsn_status: String::new(),
            reply_code: None,
            dsn_diag: u.detail,
            stage: u.stage.to_owned(),
            mx_host: None,
            mx_ip: None,
            tls: false,
            tls_policy: None,
            source: None,
            pool: None,
            size: 0,
            attempt: u.attempts,
            bounce_cat: None,
            feedback_type: None,
            tags: Vec::new(),
            tenant: None,
        }
    }
}

/// A record's time: RFC 3339 in UTC with milliseconds.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

enum Msg {
    Record(Box<LogRecord>),
    /// Write out everything before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// When the writer starts a new file.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// Rotate at this size; 0: never by size.
    pub max_bytes: u64,
    /// Rotate when this UTC period (counted from the epoch) turns over.
    pub every: Option<Duration>,
    /// Rotated files kept.
    pub keep: usize,
}

impl Rotation {
    pub fn from_config(c: &crate::config::LogConfig) -> Rotation {
        Rotation {
            max_bytes: c.delivery_log_max_bytes,
            every: c.delivery_log_rotate_every,
            keep: c.delivery_log_keep,
        }
    }

    /// The period `t` falls in (0 when rotation by time is off).
    fn period(&self, t: SystemTime) -> u64 {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.every.map_or(0, |e| secs / e.as_secs().max(1))
    }
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct DeliveryLog {
    tx: SyncSender<Msg>,
}

impl DeliveryLog {
    /// Opens (appends to) `path`, creating its directory, and starts the writer thread.
    pub fn open(path: &Path, rotation: Rotation) -> std::io::Result<DeliveryLog> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let file = LogFile::open(path.to_owned(), rotation)?;
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

/// The open file with what rotation needs to know about it.
struct LogFile {
    path: PathBuf,
    rotation: Rotation,
    out: std::io::BufWriter<std::fs::File>,
    bytes: u64,
    period: u64,
}

impl LogFile {
    fn open(path: PathBuf, rotation: Rotation) -> std::io::Result<LogFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let meta = file.metadata()?;
        // An existing file belongs to the period it was last written in.
        let period = rotation.period(meta.modified().unwrap_or_else(|_| SystemTime::now()));
        let bytes = drop_torn_tail(&file, meta.len())?;
        if bytes < meta.len() {
            tracing::warn!(
                file = %path.display(),
                bytes = meta.len() - bytes,
                "the delivery log ended in a partly written record (the process was killed while \
                 writing it); removed it"
            );
        }
        Ok(LogFile {
            path,
            rotation,
            out: std::io::BufWriter::with_capacity(256 * 1024, file),
            bytes,
            period,
        })
    }

    fn due(&self) -> bool {
        self.bytes > 0
            && ((self.rotation.max_bytes > 0 && self.bytes >= self.rotation.max_bytes)
                || (self.rotation.every.is_some()
                    && self.rotation.period(SystemTime::now()) != self.period))
    }

    /// Renames the file with a UTC time suffix, starts a new one, and prunes old ones.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let stamp = humantime::format_rfc3339_millis(SystemTime::now())
            .to_string()
            .replace([':', '-'], "");
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(format!(".{stamp}"));
        std::fs::rename(&self.path, &rotated)?;
        *self = LogFile::open(std::mem::take(&mut self.path), self.rotation)?;
        self.period = self.rotation.period(SystemTime::now());
        self.prune();
        Ok(())
    }

    fn prune(&self) {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let prefix = format!("{}.", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        // The suffix is a UTC time in a fixed format, so name order is age order.
        let mut old: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        old.sort();
        let excess = old.len().saturating_sub(self.rotation.keep);
        for p in &old[..excess] {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(file = %p.display(), error = %e, "removing an old delivery log failed");
            }
        }
    }
}

/// Cuts `file` (of `len` bytes) back to just after its last newline, so that a record torn by
/// a kill during a write does not run into the next one; returns the length kept.
fn drop_torn_tail(file: &std::fs::File, len: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
            }
            return Ok(keep);
        }
        end = start;
    }
    if len > 0 {
        file.set_len(0)?;
    }
    Ok(0)
}

/// How long the writer lets records gather after each drain: the delay before a record reaches
/// the file, at most.
const DRAIN_PAUSE: Duration = Duration::from_millis(20);

fn writer(mut file: LogFile, rx: Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut waiting = Vec::new();
        while let Some(m) = next {
            match m {
                Msg::Record(r) => {
                    if file.due()
                        && let Err(e) = file.rotate()
                    {
                        tracing::error!(error = %e, "rotating the delivery log failed");
                    }
                    let mut line = serde_json::to_vec(&r).unwrap_or_default();
                    line.push(b'\n');
                    if file.out.write_all(&line).is_err() {
                        tracing::error!("writing the delivery log failed");
                    }
                    file.bytes += line.len() as u64;
                }
                Msg::Flush(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        // Flushed whenever the queue runs dry, so `tail -f` sees records promptly.
        if let Err(e) = file.out.flush() {
            tracing::error!(error = %e, "flushing the delivery log failed");
        }
        for done in waiting {
            let _ = done.send(());
        }
        std::thread::sleep(DRAIN_PAUSE);
    }
    let _ = file.out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> LogRecord {
        LogRecord {
            kind: "d",
            time_queued: String::new(),
            time_logged: String::new(),
            campaign: "c".into(),
            job: format!("j{i}"),
            recipient: format!("user{i}@example.com"),
            sender: String::new(),
            dsn_action: "delivered",
            dsn_status: "2.0.0".into(),
            reply_code: Some(250),
            dsn_diag: "ok".into(),
            stage: "DATA".into(),
            mx_host: None,
            mx_ip: None,
            tls: false,
            tls_policy: None,
            source: None,
            pool: None,
            size: 1,
            attempt: 1,
            bounce_cat: None,
            feedback_type: None,
            tags: Vec::new(),
            tenant: None,
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.jsonl");
        let rotation = Rotation {
            max_bytes: 2_000,
            every: None,
            keep: 3,
        };
        let log = DeliveryLog::open(&path, rotation).unwrap();
        for i in 0..200 {
            log.record(record(i));
            if i % 10 == 9 {
                log.flush();
                // Rotated names carry the time to the millisecond.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        log.flush();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!(names[0], "delivery.jsonl");
        for n in &names[1..] {
            assert!(n.starts_with("delivery.jsonl.2"), "{n}");
            let len = std::fs::metadata(dir.path().join(n)).unwrap().len();
            assert!((2_000..2_400).contains(&len), "{n}: {len} bytes");
        }
        // The newest record is in the current file, the oldest kept one in the first rotated.
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.contains("\"job\":\"j199\""), "{current}");
    }

    #[test]
    fn a_record_torn_by_a_kill_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.jsonl");
        let rotation = Rotation {
            max_bytes: 0,
            every: None,
            keep: 1,
        };
        // Two whole records, then most of a third, as a kill in the middle of a write leaves.
        let whole = "{\"job\":\"a\"}\n{\"job\":\"b\"}\n";
        std::fs::write(&path, format!("{whole}{{\"job\":\"c\",\"recipi")).unwrap();
        let log = DeliveryLog::open(&path, rotation).unwrap();
        log.record(record(1));
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(whole), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for l in lines {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }

        // A tail longer than one read chunk, and a file with no newline at all.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(0).unwrap();
        use std::os::unix::fs::FileExt;
        let long = format!("x\n{}", "y".repeat(200_000));
        file.write_all_at(long.as_bytes(), 0).unwrap();
        assert_eq!(drop_torn_tail(&file, long.len() as u64).unwrap(), 2);
        assert_eq!(std::fs::read(&path).unwrap(), b"x\n");
        file.write_all_at(b"zzz", 0).unwrap();
        file.set_len(3).unwrap();
        assert_eq!(drop_torn_tail(&file, 3).unwrap(), 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn periods_count_from_the_epoch() {
        let r = Rotation {
            max_bytes: 0,
            every: Some(Duration::from_secs(86_400)),
            keep: 1,
        };
        let day = |s: u64| r.period(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(day(86_399), 0);
        assert_eq!(day(86_400), 1);
        let off = Rotation { every: None, ..r };
        assert_eq!(off.period(SystemTime::now()), 0);

        // Every second: a record after the turn of the second starts a new file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let every = Rotation {
            max_bytes: 0,
            every: Some(Duration::from_secs(1)),
            keep: 5,
        };
        let log = DeliveryLog::open(&path, every).unwrap();
        log.record(record(1));
        log.flush();
        std::thread::sleep(Duration::from_millis(1100));
        log.record(record(2));
        log.flush();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("\"job\":\"j2\"")
        );
    }
}
