//! TLS reporting (RFC 8460): connections made under a DANE or MTA-STS policy, counted per
//! policy domain and UTC day, successes and failures by result type, receiving host and
//! address. `GET /v1/tls-reports` shows the aggregates; a day's aggregates become the JSON
//! report of §4.4.
//!
//! The aggregates are kept in the spool (written once a minute while they change), so a restart
//! loses at most a minute of counts. After its UTC day, a domain's aggregate goes to the `rua`
//! addresses of its `_smtp._tls` TXT record: by mail (through our own delivery, signed like any
//! message from the report's From domain) or by HTTPS POST, gzipped (§5).
//!
//! A leaf: its lock is held for one map update at a time.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::store::spool::{Durability, STATE_TLSRPT, Spool, SpoolError};

pub const DAY_MS: u64 = 86_400_000;

/// Failed sessions, by (result type, receiving MX host, receiving IP).
type Failures = BTreeMap<(String, String, String), u64>;

/// One policy's counts for one domain and day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// `sts` or `tlsa` (RFC 8460 §4.3).
    pub policy_type: String,
    /// The policy as published: the MTA-STS policy lines, or the TLSA records.
    pub policy_string: Vec<String>,
    /// MTA-STS `mx` patterns.
    pub mx_host: Vec<String>,
    pub successes: u64,
    #[serde(with = "failures_as_list")]
    pub failures: Failures,
}

impl Aggregate {
    pub fn failure_count(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Aggregates by (day, policy domain, policy type), and the report mail on its way to the
/// queue.
pub struct TlsReports {
    days: Mutex<BTreeMap<(u64, String, String), Aggregate>>,
    /// Counts changed since the last [`TlsReports::flush`].
    dirty: AtomicBool,
    mail: tokio::sync::mpsc::Sender<ReportOut>,
    mail_rx: Mutex<Option<tokio::sync::mpsc::Receiver<ReportOut>>>,
}

/// A report mail to queue: built by the delivery engine, queued by the task that takes our own
/// mail in ([`crate::intake::raw::send_report_mail`]).
pub struct ReportOut {
    pub to: String,
    pub bytes: Vec<u8>,
}

impl Default for TlsReports {
    fn default() -> Self {
        let (mail, rx) = tokio::sync::mpsc::channel(1024);
        TlsReports {
            days: Mutex::default(),
            dirty: AtomicBool::new(false),
            mail,
            mail_rx: Mutex::new(Some(rx)),
        }
    }
}

/// The spool key of an aggregate: `<day>/<domain>/<policy type>`.
fn state_key(day: u64, domain: &str, policy_type: &str) -> String {
    format!("{day:010}/{domain}/{policy_type}")
}

/// What a session was made under.
pub struct PolicyRef<'a> {
    pub policy_type: &'a str,
    pub policy_string: &'a [String],
    pub mx_host: &'a [String],
}

impl TlsReports {
    /// Counts one session to `domain` at `now` under `policy`: `result` is `success` or an
    /// RFC 8460 result type.
    pub fn session(
        &self,
        now: u64,
        domain: &str,
        policy: &PolicyRef<'_>,
        result: &str,
        host: &str,
        ip: Option<IpAddr>,
    ) {
        let mut days = self.days.lock().expect("tls reports lock");
        let a = days
            .entry((
                now / DAY_MS,
                domain.to_ascii_lowercase(),
                policy.policy_type.to_owned(),
            ))
            .or_insert_with(|| Aggregate {
                policy_type: policy.policy_type.to_owned(),
                ..Aggregate::default()
            });
        // The latest policy seen that day describes the day.
        if a.policy_string != policy.policy_string {
            a.policy_string = policy.policy_string.to_vec();
            a.mx_host = policy.mx_host.to_vec();
        }
        self.dirty.store(true, Ordering::Relaxed);
        if result == "success" {
            a.successes += 1;
        } else {
            *a.failures
                .entry((
                    result.to_owned(),
                    host.to_owned(),
                    ip.map(|i| i.to_string()).unwrap_or_default(),
                ))
                .or_default() += 1;
        }
    }

    /// The aggregates of day `day` (days since the epoch), by domain and policy type.
    pub fn day(&self, day: u64) -> Vec<(String, Aggregate)> {
        let days = self.days.lock().expect("tls reports lock");
        days.range((day, String::new(), String::new())..(day + 1, String::new(), String::new()))
            .map(|((_, domain, _), a)| (domain.clone(), a.clone()))
            .collect()
    }

    /// Takes out the aggregates of the days before `day`, oldest first, grouped by (day,
    /// domain).
    pub fn take_before(&self, day: u64) -> Vec<(u64, String, Vec<Aggregate>)> {
        let earlier = {
            let mut days = self.days.lock().expect("tls reports lock");
            let later = days.split_off(&(day, String::new(), String::new()));
            std::mem::replace(&mut *days, later)
        };
        let mut out: Vec<(u64, String, Vec<Aggregate>)> = Vec::new();
        for ((d, domain, _), a) in earlier {
            match out.last_mut() {
                Some((ld, ldomain, list)) if *ld == d && *ldomain == domain => list.push(a),
                _ => out.push((d, domain, vec![a])),
            }
        }
        out
    }

    /// Hands a report mail to the task that queues it; `Err` when its queue is full.
    pub fn queue_mail(&self, out: ReportOut) -> Result<(), String> {
        self.mail
            .try_send(out)
            .map_err(|_| "the report mail queue is full".to_owned())
    }

    /// The receiving end of the report mail, the first time it is asked for.
    pub fn mail_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<ReportOut>> {
        self.mail_rx.lock().expect("tls reports lock").take()
    }

    /// Loads the stored aggregates. Blocking.
    pub fn load(&self, spool: &Spool) -> Result<usize, SpoolError> {
        let mut days = self.days.lock().expect("tls reports lock");
        spool.scan_state(STATE_TLSRPT, |k, v| {
            let key = String::from_utf8_lossy(k);
            let mut parts = key.splitn(3, '/');
            let (Some(day), Some(domain), Some(kind)) = (parts.next(), parts.next(), parts.next())
            else {
                return;
            };
            let (Ok(day), Ok(a)) = (day.parse::<u64>(), serde_json::from_slice::<Aggregate>(v))
            else {
                tracing::warn!(key = %key, "unreadable TLS report aggregate dropped");
                return;
            };
            days.insert((day, domain.to_owned(), kind.to_owned()), a);
        })?;
        Ok(days.len())
    }

    /// Writes the aggregates if they changed since the last call (buffered: the WAL is synced
    /// with the next synced write).
    pub async fn flush(&self, spool: &Spool) -> Result<(), SpoolError> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let mut batch = spool.batch();
        {
            let days = self.days.lock().expect("tls reports lock");
            for ((day, domain, kind), a) in days.iter() {
                let json = serde_json::to_vec(a).expect("an aggregate serialises");
                batch.put_state(
                    STATE_TLSRPT,
                    state_key(*day, domain, kind).as_bytes(),
                    &json,
                );
            }
        }
        let written = spool.write(batch, Durability::Buffered).await;
        if written.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        written
    }

    /// Deletes the stored aggregates of `day` for `domain` (sent, or given up on).
    pub async fn forget(
        &self,
        spool: &Spool,
        day: u64,
        domain: &str,
        aggregates: &[Aggregate],
    ) -> Result<(), SpoolError> {
        let mut batch = spool.batch();
        for a in aggregates {
            batch.delete_state(
                STATE_TLSRPT,
                state_key(day, domain, &a.policy_type).as_bytes(),
            );
        }
        spool.write(batch, Durability::Buffered).await
    }
}

/// Where a domain wants its reports: the `rua` of its `_smtp._tls` TXT record (RFC 8460 §3),
/// `mailto:` addresses and `https:` URLs. Exactly one record must start with `v=TLSRPTv1`.
pub fn parse_rua<S: AsRef<str>>(records: &[S]) -> Result<Vec<Rua>, String> {
    let ours: Vec<&str> = records
        .iter()
        .map(AsRef::as_ref)
        .filter(|r| {
            r.trim_start()
                .strip_prefix("v=TLSRPTv1")
                .is_some_and(|rest| rest.trim_start().starts_with(';') || rest.trim().is_empty())
        })
        .collect();
    let [record] = ours.as_slice() else {
        return Err(format!(
            "{} TXT records start with v=TLSRPTv1; exactly one must",
            ours.len()
        ));
    };
    let rua = record
        .split(';')
        .filter_map(|f| f.split_once('='))
        .find(|(k, _)| k.trim() == "rua")
        .map(|(_, v)| v)
        .ok_or("the record has no rua field")?;
    let mut out = Vec::new();
    for uri in rua.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        if let Some(address) = uri.strip_prefix("mailto:") {
            let address = address.split('?').next().unwrap_or("");
            let parsed = crate::intake::address::Address::parse(address)
                .map_err(|e| format!("rua {uri:?}: {e}"))?;
            out.push(Rua::Mail(parsed.to_string()));
        } else if uri.starts_with("https://") {
            out.push(Rua::Https(uri.to_owned()));
        } else {
            return Err(format!(
                "rua {uri:?}: only mailto: and https: are supported"
            ));
        }
    }
    if out.is_empty() {
        return Err("the rua field names no address".into());
    }
    Ok(out)
}

/// One report destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rua {
    Mail(String),
    Https(String),
}

/// `json` gzipped.
pub fn gzip(json: &Value) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let bytes = serde_json::to_vec(json).expect("a report serialises");
    enc.write_all(&bytes).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

/// The report mail (RFC 8460 §5.3): a `multipart/report; report-type="tlsrpt"` message with a
/// line of text and the gzipped JSON.
pub struct ReportMail<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub submitter: &'a str,
    pub domain: &'a str,
    pub report_id: &'a str,
    pub day: u64,
    pub gzipped: &'a [u8],
}

impl ReportMail<'_> {
    pub fn build(&self) -> Vec<u8> {
        use base64::Engine;
        let boundary = format!("tlsrpt-{:016x}", fastrand::u64(..));
        let (start, end) = (self.day * 86_400, (self.day + 1) * 86_400);
        let filename = format!("{}!{}!{start}!{end}.json.gz", self.submitter, self.domain);
        let encoded = base64::engine::general_purpose::STANDARD.encode(self.gzipped);
        let mut body = String::new();
        body.push_str(&format!("From: {}\r\n", self.from));
        body.push_str(&format!("To: {}\r\n", self.to));
        body.push_str(&format!(
            "Subject: Report Domain: {} Submitter: {} Report-ID: <{}>\r\n",
            self.domain, self.submitter, self.report_id
        ));
        body.push_str(&format!("TLS-Report-Domain: {}\r\n", self.domain));
        body.push_str(&format!("TLS-Report-Submitter: {}\r\n", self.submitter));
        body.push_str("MIME-Version: 1.0\r\n");
        body.push_str(&format!(
            "Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n boundary=\"{boundary}\"\r\n\r\n"
        ));
        body.push_str(&format!(
            "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ));
        body.push_str(&format!(
            "This is an aggregate TLS report from {} for {}.\r\n\r\n",
            self.submitter, self.domain
        ));
        body.push_str(&format!(
            "--{boundary}\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n filename=\"{filename}\"\r\n\r\n"
        ));
        for line in encoded.as_bytes().chunks(76) {
            body.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            body.push_str("\r\n");
        }
        body.push_str(&format!("--{boundary}--\r\n"));
        body.into_bytes()
    }
}

/// The JSON of the aggregates of `domain` on `day` (RFC 8460 §4.4).
pub fn report_json(
    organization: &str,
    contact: &str,
    report_id: &str,
    day: u64,
    domain: &str,
    aggregates: &[Aggregate],
) -> Value {
    // Whole days: RFC 3339 times without the milliseconds.
    let time = |ms: u64| crate::effects::delivery_log::rfc3339(ms).replace(".000Z", "Z");
    let (start, end) = (time(day * DAY_MS), time((day + 1) * DAY_MS));
    let policies: Vec<Value> = aggregates
        .iter()
        .map(|a| {
            let mut policy = json!({
                "policy-type": a.policy_type,
                "policy-string": a.policy_string,
                "policy-domain": domain,
            });
            if !a.mx_host.is_empty() {
                policy["mx-host"] = json!(a.mx_host);
            }
            json!({
                "policy": policy,
                "summary": {
                    "total-successful-session-count": a.successes,
                    "total-failure-session-count": a.failure_count(),
                },
                "failure-details": failure_details(&a.failures),
            })
        })
        .collect();
    json!({
        "organization-name": organization,
        "date-range": {"start-datetime": start, "end-datetime": end},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    })
}

fn failure_details(failures: &Failures) -> Vec<Value> {
    failures
        .iter()
        .map(|((result, host, ip), n)| {
            let mut d = json!({
                "result-type": result,
                "failed-session-count": n,
            });
            if !host.is_empty() {
                d["receiving-mx-hostname"] = json!(host);
            }
            if !ip.is_empty() {
                d["receiving-ip"] = json!(ip);
            }
            d
        })
        .collect()
}

mod failures_as_list {
    use super::Failures;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Row {
        result: String,
        host: String,
        ip: String,
        count: u64,
    }

    pub fn serialize<S: Serializer>(f: &Failures, s: S) -> Result<S::Ok, S::Error> {
        f.iter()
            .map(|((result, host, ip), count)| Row {
                result: result.clone(),
                host: host.clone(),
                ip: ip.clone(),
                count: *count,
            })
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Failures, D::Error> {
        Ok(Vec::<Row>::deserialize(d)?
            .into_iter()
            .map(|r| ((r.result, r.host, r.ip), r.count))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn sessions_aggregate_per_domain_day_and_policy_into_rfc_8460_json() {
        let r = TlsReports::default();
        let lines = sts(&[
            "version: STSv1",
            "mode: enforce",
            "mx: mx.example",
            "max_age: 86400",
        ]);
        let mx = vec!["mx.example".to_owned()];
        let p = PolicyRef {
            policy_type: "sts",
            policy_string: &lines,
            mx_host: &mx,
        };
        let ip: IpAddr = "127.0.0.5".parse().unwrap();
        let day = 20_000;
        let t = day * DAY_MS + 5;
        r.session(t, "Example.com", &p, "success", "mx.example", Some(ip));
        r.session(t, "example.com", &p, "success", "mx.example", Some(ip));
        for _ in 0..3 {
            r.session(
                t,
                "example.com",
                &p,
                "certificate-host-mismatch",
                "mx.example",
                Some(ip),
            );
        }
        // The next day is another aggregate.
        r.session(
            t + DAY_MS,
            "example.com",
            &p,
            "success",
            "mx.example",
            Some(ip),
        );

        let today = r.day(day);
        assert_eq!(today.len(), 1);
        let (domain, a) = &today[0];
        assert_eq!(
            (domain.as_str(), a.successes, a.failure_count()),
            ("example.com", 2, 3)
        );
        let v = report_json(
            "Sluice",
            "mailto:ops@example.net",
            "id-1",
            day,
            domain,
            std::slice::from_ref(a),
        );
        assert_eq!(v["date-range"]["start-datetime"], "2024-10-04T00:00:00Z");
        let p0 = &v["policies"][0];
        assert_eq!(p0["policy"]["policy-type"], "sts");
        assert_eq!(p0["policy"]["mx-host"][0], "mx.example");
        assert_eq!(p0["summary"]["total-successful-session-count"], 2);
        assert_eq!(p0["summary"]["total-failure-session-count"], 3);
        let d = &p0["failure-details"][0];
        assert_eq!(
            (
                d["result-type"].as_str(),
                d["receiving-ip"].as_str(),
                d["failed-session-count"].as_u64()
            ),
            (
                Some("certificate-host-mismatch"),
                Some("127.0.0.5"),
                Some(3)
            )
        );

        // Taking the days before tomorrow leaves tomorrow's.
        let taken = r.take_before(day + 1);
        assert_eq!(taken.len(), 1);
        assert!(r.day(day).is_empty());
        assert_eq!(r.day(day + 1).len(), 1);
    }

    #[test]
    fn the_rua_record_names_mail_and_https_destinations() {
        assert_eq!(
            parse_rua(&[
                "v=spf1 -all",
                "v=TLSRPTv1; rua=mailto:tls@example.com,https://r.example.com/tlsrpt"
            ]),
            Ok(vec![
                Rua::Mail("tls@example.com".into()),
                Rua::Https("https://r.example.com/tlsrpt".into())
            ])
        );
        for bad in [
            vec!["v=spf1 -all"],
            vec![
                "v=TLSRPTv1; rua=mailto:a@b.test",
                "v=TLSRPTv1; rua=mailto:c@d.test",
            ],
            vec!["v=TLSRPTv1; rua=ftp://r.example.com/"],
            vec!["v=TLSRPTv1; rua=mailto:not an address"],
            vec!["v=TLSRPTv1;"],
            vec!["v=TLSRPTv10; rua=mailto:a@b.test"],
        ] {
            assert!(parse_rua(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_report_mail_passes_the_raw_message_checks_and_carries_the_gzipped_json() {
        let json = json!({"report-id": "r1", "policies": []});
        let gz = gzip(&json);
        let mail = ReportMail {
            from: "noreply-tlsrpt@mta.example.net",
            to: "tls@example.com",
            submitter: "mta.example.net",
            domain: "example.com",
            report_id: "r1",
            day: 20_000,
            gzipped: &gz,
        }
        .build();
        let checked = crate::intake::raw::check(&mail).expect("a valid message");
        assert_eq!(checked.from, "noreply-tlsrpt@mta.example.net");
        let text = String::from_utf8(mail).unwrap();
        assert!(
            text.contains("TLS-Report-Domain: example.com\r\n"),
            "{text}"
        );
        assert!(text.contains("report-type=\"tlsrpt\""), "{text}");
        assert!(
            text.contains("filename=\"mta.example.net!example.com!1728000000!1728086400.json.gz\""),
            "{text}"
        );
        // The attachment decodes back to the JSON.
        use base64::Engine;
        use std::io::Read;
        let b64: String = text
            .split("Content-Transfer-Encoding: base64")
            .nth(1)
            .unwrap()
            .split("\r\n\r\n")
            .nth(1)
            .unwrap()
            .lines()
            .take_while(|l| !l.starts_with("--"))
            .collect();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let mut out = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json);
    }

    #[test]
    fn an_aggregate_round_trips_through_json() {
        let mut a = Aggregate {
            policy_type: "tlsa".into(),
            policy_string: vec!["3 1 1 abcd".into()],
            successes: 4,
            ..Aggregate::default()
        };
        a.failures.insert(
            ("validation-failure".into(), "mx".into(), "127.0.0.1".into()),
            2,
        );
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Aggregate>(&json).unwrap(), a);
    }
}
