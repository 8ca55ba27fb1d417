//! The on-disk encoding of keys and job records. Pure code: no I/O.
//!
//! A job is one recipient of one campaign. Its key is the campaign sequence and the recipient
//! index, both big-endian, so RocksDB keeps a campaign's jobs together and in order. The value is a
//! compact, versioned record of a few hundred bytes at most; the rendered message is never stored.
//!
//! Record layout, version 1 (integers are unsigned LEB128 varints unless noted):
//!
//! ```text
//! u8 version = 1 | u8 state | upload | accepted_at_ms | attempts | next_attempt_ms
//! | address (len + UTF-8) | vars (len + JSON object text, len 0 = none)
//! | last_response (len + UTF-8, len 0 = none)
//! ```
//!
//! `upload` names the upload (request) that wrote the job; while that upload is open the job is
//! staged, and recovery deletes staged jobs of uploads that never committed.
//!
//! A final job keeps the same layout as a *tombstone* (see [`JobRecord::tombstone`]): no
//! variables, and `next_attempt_ms` holds the time it became final.
//!
//! A campaign's [`Tally`] (final counts and the next free recipient index) is a fixed-size
//! record that merge operands add to (`version = 1 | 5 × i64 LE counts | u32 LE next index`).

use std::fmt;

/// Encoding version written by this build.
pub const JOB_VERSION: u8 = 1;

/// Identifies a job: campaign sequence number and recipient index within the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId {
    pub campaign: u32,
    pub index: u32,
}

impl JobId {
    pub fn key(self) -> [u8; 8] {
        u64::from(self).to_be_bytes()
    }

    pub fn from_key(key: &[u8]) -> Result<JobId, DecodeError> {
        let bytes: [u8; 8] = key.try_into().map_err(|_| DecodeError::BadKey)?;
        Ok(JobId::from(u64::from_be_bytes(bytes)))
    }
}

impl From<JobId> for u64 {
    fn from(id: JobId) -> u64 {
        (u64::from(id.campaign) << 32) | u64::from(id.index)
    }
}

impl From<u64> for JobId {
    fn from(v: u64) -> JobId {
        JobId {
            campaign: (v >> 32) as u32,
            index: v as u32,
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.campaign, self.index)
    }
}

impl std::str::FromStr for JobId {
    type Err = ();

    /// Parses the [`fmt::Display`] form, `<campaign>.<index>`.
    fn from_str(s: &str) -> Result<JobId, ()> {
        let (campaign, index) = s.split_once('.').ok_or(())?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(campaign) || !digits(index) {
            return Err(());
        }
        Ok(JobId {
            campaign: campaign.parse().map_err(|_| ())?,
            index: index.parse().map_err(|_| ())?,
        })
    }
}

/// The life of a job. `Queued` is the only non-final state; a queued job with attempts is
/// "deferred" in the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum JobState {
    Queued = 0,
    Delivered = 1,
    Bounced = 2,
    Expired = 3,
    Suppressed = 4,
    Cancelled = 5,
}

impl JobState {
    fn from_u8(v: u8) -> Result<JobState, DecodeError> {
        Ok(match v {
            0 => JobState::Queued,
            1 => JobState::Delivered,
            2 => JobState::Bounced,
            3 => JobState::Expired,
            4 => JobState::Suppressed,
            5 => JobState::Cancelled,
            other => return Err(DecodeError::BadState(other)),
        })
    }

    pub fn is_final(self) -> bool {
        self != JobState::Queued
    }

    /// The name the API shows; a queued job that was attempted is `deferred`, as in the counts.
    pub fn name(self, attempts: u32) -> &'static str {
        match self {
            JobState::Queued if attempts == 0 => "queued",
            JobState::Queued => "deferred",
            JobState::Delivered => "delivered",
            JobState::Bounced => "bounced",
            JobState::Expired => "expired",
            JobState::Suppressed => "suppressed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A decoded job record, borrowing its strings from the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord<'a> {
    pub state: JobState,
    pub upload: u64,
    pub accepted_at_ms: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub address: &'a str,
    /// The recipient's variables as JSON object text; empty when there are none.
    pub vars: &'a str,
    pub last_response: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("job key is not 8 bytes")]
    BadKey,
    #[error("unknown job record version {0}")]
    BadVersion(u8),
    #[error("unknown job state {0}")]
    BadState(u8),
    #[error("job record is truncated")]
    Truncated,
    #[error("job record has an over-long integer")]
    BadVarint,
    #[error("job record has a string that is not UTF-8")]
    BadUtf8,
    #[error("job record has {0} trailing bytes")]
    Trailing(usize),
}

impl<'a> JobRecord<'a> {
    /// Appends the encoded record to `out` (which is not cleared).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(24 + self.address.len() + self.vars.len() + self.last_response.len());
        out.push(JOB_VERSION);
        out.push(self.state as u8);
        put_varint(out, self.upload);
        put_varint(out, self.accepted_at_ms);
        put_varint(out, u64::from(self.attempts));
        put_varint(out, self.next_attempt_ms);
        put_bytes(out, self.address.as_bytes());
        put_bytes(out, self.vars.as_bytes());
        put_bytes(out, self.last_response.as_bytes());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// The record a final job keeps: what later reports and lookups need (state, address,
    /// attempts, last response, times), without the variables. Its `next_attempt_ms` is the time
    /// it became final.
    pub fn tombstone(&self) -> JobRecord<'a> {
        JobRecord {
            vars: "",
            ..self.clone()
        }
    }

    pub fn decode(mut buf: &'a [u8]) -> Result<JobRecord<'a>, DecodeError> {
        let version = take_u8(&mut buf)?;
        if version != JOB_VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let state = JobState::from_u8(take_u8(&mut buf)?)?;
        let upload = take_varint(&mut buf)?;
        let accepted_at_ms = take_varint(&mut buf)?;
        let attempts = u32::try_from(take_varint(&mut buf)?).map_err(|_| DecodeError::BadVarint)?;
        let next_attempt_ms = take_varint(&mut buf)?;
        let address = take_str(&mut buf)?;
        let vars = take_str(&mut buf)?;
        let last_response = take_str(&mut buf)?;
        if !buf.is_empty() {
            return Err(DecodeError::Trailing(buf.len()));
        }
        Ok(JobRecord {
            state,
            upload,
            accepted_at_ms,
            attempts,
            next_attempt_ms,
            address,
            vars,
            last_response,
        })
    }
}

/// A decoded job record that owns its text, for code that keeps it across awaits (an attempt
/// decodes its job once and uses it from the read to the outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedJobRecord {
    pub state: JobState,
    pub upload: u64,
    pub accepted_at_ms: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub address: String,
    pub vars: String,
    pub last_response: String,
}

impl OwnedJobRecord {
    pub fn decode(bytes: &[u8]) -> Result<OwnedJobRecord, DecodeError> {
        let r = JobRecord::decode(bytes)?;
        Ok(OwnedJobRecord {
            state: r.state,
            upload: r.upload,
            accepted_at_ms: r.accepted_at_ms,
            attempts: r.attempts,
            next_attempt_ms: r.next_attempt_ms,
            address: r.address.to_owned(),
            vars: r.vars.to_owned(),
            last_response: r.last_response.to_owned(),
        })
    }

    /// The record as [`JobRecord`], to encode a changed copy.
    pub fn as_record(&self) -> JobRecord<'_> {
        JobRecord {
            state: self.state,
            upload: self.upload,
            accepted_at_ms: self.accepted_at_ms,
            attempts: self.attempts,
            next_attempt_ms: self.next_attempt_ms,
            address: &self.address,
            vars: &self.vars,
            last_response: &self.last_response,
        }
    }
}

/// Per-campaign figures kept apart from the job records: recipients per final state, and one
/// past the highest recipient index ever committed. Stored as a merge operand per change, so a
/// transition adds a few bytes to its batch instead of rewriting a campaign record, and recovery
/// reads one value per campaign instead of every final job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Delivered, bounced, expired, suppressed, cancelled (in [`Tally::slot`] order). Operands
    /// may be negative (a DSN turns a delivery into a bounce); merged values are not.
    pub finals: [i64; 5],
    /// Merged by maximum, not by sum.
    pub next_index: u32,
}

const TALLY_VERSION: u8 = 1;
const TALLY_LEN: usize = 1 + 5 * 8 + 4;

impl Tally {
    /// The index of `state` in [`Tally::finals`]; `None` for `Queued`, which is not tallied
    /// (queued jobs are counted from the live jobs at recovery).
    pub fn slot(state: JobState) -> Option<usize> {
        match state {
            JobState::Queued => None,
            JobState::Delivered => Some(0),
            JobState::Bounced => Some(1),
            JobState::Expired => Some(2),
            JobState::Suppressed => Some(3),
            JobState::Cancelled => Some(4),
        }
    }

    /// The tally of one job changing state from `from` to `to` (either may be non-final).
    pub fn moved(from: JobState, to: JobState) -> Tally {
        let mut t = Tally::default();
        if from != to {
            if let Some(i) = Tally::slot(from) {
                t.finals[i] -= 1;
            }
            if let Some(i) = Tally::slot(to) {
                t.finals[i] += 1;
            }
        }
        t
    }

    /// The count of `state` (0 for `Queued`, never negative).
    pub fn count(&self, state: JobState) -> u64 {
        Tally::slot(state).map_or(0, |i| self.finals[i].max(0) as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.finals == [0; 5] && self.next_index == 0
    }

    /// Adds `other` to this tally (counts summed, indexes by maximum).
    pub fn merge(&mut self, other: &Tally) {
        for (a, b) in self.finals.iter_mut().zip(other.finals) {
            *a = a.saturating_add(b);
        }
        self.next_index = self.next_index.max(other.next_index);
    }

    pub fn encode(&self) -> [u8; TALLY_LEN] {
        let mut out = [0u8; TALLY_LEN];
        out[0] = TALLY_VERSION;
        for (i, v) in self.finals.iter().enumerate() {
            out[1 + i * 8..9 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        out[41..].copy_from_slice(&self.next_index.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Tally, DecodeError> {
        let bytes: &[u8; TALLY_LEN] = bytes.try_into().map_err(|_| DecodeError::Truncated)?;
        if bytes[0] != TALLY_VERSION {
            return Err(DecodeError::BadVersion(bytes[0]));
        }
        let mut t = Tally::default();
        for (i, v) in t.finals.iter_mut().enumerate() {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes[1 + i * 8..9 + i * 8]);
            *v = i64::from_le_bytes(le);
        }
        let mut le = [0u8; 4];
        le.copy_from_slice(&bytes[41..]);
        t.next_index = u32::from_le_bytes(le);
        Ok(t)
    }
}

/// The merge of the tally column family: the stored value plus every operand. A value or
/// operand that does not decode is skipped (and counted in the second result) rather than
/// failing every later read of the campaign's counts.
pub fn merge_tallies<'a>(
    existing: Option<&'a [u8]>,
    operands: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<u8>, usize) {
    let mut skipped = 0;
    let mut total = Tally::default();
    for bytes in existing.into_iter().chain(operands) {
        match Tally::decode(bytes) {
            Ok(t) => total.merge(&t),
            Err(_) => skipped += 1,
        }
    }
    (total.encode().to_vec(), skipped)
}

/// Sums 8-byte big-endian counters: the merge of the `meta` column family's counters
/// (tenants' daily usage). Operands of another length are skipped.
pub fn merge_sum<'a>(
    existing: Option<&'a [u8]>,
    operands: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let total = existing
        .into_iter()
        .chain(operands)
        .filter_map(|b| <[u8; 8]>::try_from(b).ok())
        .fold(0u64, |sum, b| sum.saturating_add(u64::from_be_bytes(b)));
    total.to_be_bytes().to_vec()
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn take_u8(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    let (&b, rest) = buf.split_first().ok_or(DecodeError::Truncated)?;
    *buf = rest;
    Ok(b)
}

pub fn take_varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = take_u8(buf)?;
        let bits = u64::from(b & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(DecodeError::BadVarint);
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::BadVarint)
}

fn take_str<'a>(buf: &mut &'a [u8]) -> Result<&'a str, DecodeError> {
    let len = usize::try_from(take_varint(buf)?).map_err(|_| DecodeError::BadVarint)?;
    if buf.len() < len {
        return Err(DecodeError::Truncated);
    }
    let (s, rest) = buf.split_at(len);
    *buf = rest;
    std::str::from_utf8(s).map_err(|_| DecodeError::BadUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_and_skip_garbage() {
        let a = 5u64.to_be_bytes();
        let b = 7u64.to_be_bytes();
        let merged = merge_sum(Some(&a), [b.as_slice(), b"garbage".as_slice()]);
        assert_eq!(merged, 12u64.to_be_bytes());
    }

    fn sample() -> JobRecord<'static> {
        JobRecord {
            state: JobState::Queued,
            upload: 300,
            accepted_at_ms: 1_790_000_000_123,
            attempts: 2,
            next_attempt_ms: 1_790_000_600_000,
            address: "jörg@example.com",
            vars: r#"{"first_name":"Jörg","n":3}"#,
            last_response: "451 4.7.1 try later",
        }
    }

    #[test]
    fn job_ids_parse_their_display_form_only() {
        let id = JobId {
            campaign: 17,
            index: u32::MAX,
        };
        assert_eq!(id.to_string().parse::<JobId>(), Ok(id));
        for bad in [
            "",
            "17",
            "17.",
            ".4",
            "17.4.1",
            "+17.4",
            "17.-4",
            "17.4294967296",
            "a.b",
        ] {
            assert!(bad.parse::<JobId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn tallies_merge_by_sum_and_maximum() {
        let mut a = Tally::moved(JobState::Queued, JobState::Delivered);
        a.next_index = 7;
        let b = Tally::moved(JobState::Delivered, JobState::Bounced);
        let c = Tally {
            next_index: 3,
            ..Tally::moved(JobState::Queued, JobState::Suppressed)
        };
        let (merged, skipped) = merge_tallies(
            Some(&a.encode()),
            [&b.encode()[..], &c.encode()[..], b"garbage"],
        );
        assert_eq!(skipped, 1);
        let t = Tally::decode(&merged).unwrap();
        assert_eq!(t.count(JobState::Delivered), 0);
        assert_eq!(t.count(JobState::Bounced), 1);
        assert_eq!(t.count(JobState::Suppressed), 1);
        assert_eq!(t.count(JobState::Queued), 0);
        assert_eq!(t.next_index, 7);
        assert_eq!(
            Tally::moved(JobState::Bounced, JobState::Bounced),
            Tally::default()
        );
        assert!(Tally::decode(&[2; TALLY_LEN]).is_err());
        assert!(Tally::decode(&[1; 3]).is_err());
    }

    #[test]
    fn round_trips() {
        let rec = sample();
        let bytes = rec.encode();
        assert_eq!(JobRecord::decode(&bytes).unwrap(), rec);
        let empty = JobRecord {
            vars: "",
            last_response: "",
            ..sample()
        };
        assert_eq!(JobRecord::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn record_is_compact() {
        // Address 17 bytes + vars 28 bytes: the fixed overhead stays under 24 bytes.
        let bytes = JobRecord {
            last_response: "",
            ..sample()
        }
        .encode();
        assert!(bytes.len() < 17 + 28 + 24, "{} bytes", bytes.len());
    }

    #[test]
    fn job_keys_sort_by_campaign_then_index() {
        let a = JobId {
            campaign: 1,
            index: 0xffff_ffff,
        }
        .key();
        let b = JobId {
            campaign: 2,
            index: 0,
        }
        .key();
        assert!(a < b);
        assert_eq!(
            JobId::from_key(&b).unwrap(),
            JobId {
                campaign: 2,
                index: 0
            }
        );
        assert_eq!(JobId::from_key(&b[..7]), Err(DecodeError::BadKey));
    }

    #[test]
    fn rejects_garbage() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(JobRecord::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(JobRecord::decode(&trailing), Err(DecodeError::Trailing(1)));
        let mut version = bytes.clone();
        version[0] = 9;
        assert_eq!(JobRecord::decode(&version), Err(DecodeError::BadVersion(9)));
        let mut state = bytes;
        state[1] = 77;
        assert_eq!(JobRecord::decode(&state), Err(DecodeError::BadState(77)));
        assert_eq!(
            take_varint(&mut &[0xff; 11][..]),
            Err(DecodeError::BadVarint)
        );
    }

    #[test]
    fn varint_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(take_varint(&mut &out[..]).unwrap(), v);
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn state() -> impl Strategy<Value = JobState> {
            (0u8..6).prop_map(|v| JobState::from_u8(v).expect("0..6 are states"))
        }

        proptest! {
            #[test]
            fn records_round_trip(
                state in state(),
                upload: u64,
                accepted_at_ms: u64,
                attempts: u32,
                next_attempt_ms: u64,
                address in ".{0,300}",
                vars in ".{0,2000}",
                last_response in ".{0,600}",
            ) {
                let rec = JobRecord {
                    state,
                    upload,
                    accepted_at_ms,
                    attempts,
                    next_attempt_ms,
                    address: &address,
                    vars: &vars,
                    last_response: &last_response,
                };
                let bytes = rec.encode();
                prop_assert_eq!(JobRecord::decode(&bytes), Ok(rec));
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                // Ok or a typed error; and whatever decodes encodes to something that decodes the same.
                if let Ok(rec) = JobRecord::decode(&bytes) {
                    let again = rec.encode();
                    prop_assert_eq!(JobRecord::decode(&again), Ok(rec));
                }
            }

            #[test]
            fn keys_round_trip_and_sort_like_ids(a: u64, b: u64) {
                let (ia, ib) = (JobId::from(a), JobId::from(b));
                prop_assert_eq!(JobId::from_key(&ia.key()), Ok(ia));
                prop_assert_eq!(ia.key().cmp(&ib.key()), ia.cmp(&ib));
            }

            #[test]
            fn varints_round_trip(v: u64) {
                let mut out = Vec::new();
                put_varint(&mut out, v);
                let mut rest = &out[..];
                prop_assert_eq!(take_varint(&mut rest), Ok(v));
                prop_assert!(rest.is_empty());
            }
        }
    }
}
