//! TLS reports out (RFC 8460 §5): the aggregates are written to the spool once a minute, and
//! after each UTC day every domain's aggregates go to the `rua` of its `_smtp._tls` TXT
//! record, by mail through our own queue or by HTTPS POST. A domain without a valid record
//! gets none; a report that cannot be sent is logged and dropped (the next day has its own).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{IntCounterVec, register_int_counter_vec};

use super::Delivery;
use crate::effects::tls_reports::{self, Aggregate, DAY_MS, ReportMail, ReportOut, Rua};

static SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_tls_reports_total",
        "TLS reports (RFC 8460) by channel (mail, https) and result: queued or posted, no-record (the domain asks for none), failed.",
        &["channel", "result"]
    )
    .expect("metric registers once")
});

/// How long a report POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

impl Delivery {
    /// Once a minute until delivery stops: writes the aggregates, and sends the reports of the
    /// days that ended.
    pub(super) async fn tls_report_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.node.tls_reports.flush(&self.node.spool).await {
                tracing::warn!(error = %e, "writing TLS report counts failed");
            }
            self.send_tls_reports(crate::now_ms()).await;
        }
    }

    /// Sends the reports of the days before `now`'s; returns how many reports went out
    /// (queued as mail or accepted by a POST).
    pub async fn send_tls_reports(&self, now: u64) -> usize {
        if !self.config.tls_reports.enabled {
            return 0;
        }
        let mut sent = 0;
        for (day, domain, aggregates) in self.node.tls_reports.take_before(now / DAY_MS) {
            sent += self.send_report(day, &domain, &aggregates).await;
            if let Err(e) = self
                .node
                .tls_reports
                .forget(&self.node.spool, day, &domain, &aggregates)
                .await
            {
                tracing::warn!(domain, error = %e, "deleting a sent TLS report's counts failed");
            }
        }
        sent
    }

    async fn send_report(&self, day: u64, domain: &str, aggregates: &[Aggregate]) -> usize {
        let txt = self.dns.txt(&format!("_smtp._tls.{domain}")).await;
        let rua = match txt
            .map_err(|e| e.to_string())
            .and_then(|t| tls_reports::parse_rua(&t))
        {
            Ok(rua) => rua,
            Err(reason) => {
                SENT.with_label_values(&["any", "no-record"]).inc();
                tracing::info!(domain, reason, "no TLS report sent");
                return 0;
            }
        };
        let ehlo = &self.config.delivery.ehlo_name;
        let (organization, contact, from) = self.config.tls_reports.identity(ehlo);
        let date = crate::effects::delivery_log::rfc3339(day * DAY_MS);
        let report_id = format!(
            "{}.{domain}.{:08x}@{ehlo}",
            date.get(..10).unwrap_or(&date),
            fastrand::u32(..)
        );
        let json =
            tls_reports::report_json(&organization, &contact, &report_id, day, domain, aggregates);
        let gzipped = tls_reports::gzip(&json);
        let mut sent = 0;
        for destination in rua {
            let result = match &destination {
                Rua::Mail(to) => {
                    let mail = ReportMail {
                        from: &from,
                        to,
                        submitter: ehlo,
                        domain,
                        report_id: &report_id,
                        day,
                        gzipped: &gzipped,
                    };
                    self.mail_report(&mail).await
                }
                Rua::Https(url) => self.post_report(url, &gzipped).await,
            };
            let channel = match destination {
                Rua::Mail(_) => "mail",
                Rua::Https(_) => "https",
            };
            match result {
                Ok(()) => {
                    SENT.with_label_values(&[channel, "sent"]).inc();
                    tracing::info!(domain, channel, report_id, "TLS report sent");
                    sent += 1;
                }
                Err(e) => {
                    SENT.with_label_values(&[channel, "failed"]).inc();
                    tracing::warn!(domain, channel, error = %e, "TLS report not sent");
                }
            }
        }
        sent
    }

    /// Hands `mail` to the task that queues it to its recipient with the null return path.
    async fn mail_report(&self, mail: &ReportMail<'_>) -> Result<(), String> {
        self.node.tls_reports.queue_mail(ReportOut {
            to: mail.to.to_owned(),
            bytes: mail.build(),
        })
    }

    async fn post_report(&self, url: &str, gzipped: &[u8]) -> Result<(), String> {
        let resp = self
            .https
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/tlsrpt+gzip")
            .timeout(POST_TIMEOUT)
            .body(gzipped.to_vec())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{url} answered {}", resp.status()))
        }
    }
}
