//! Transact: one message on an open connection. Takes its assembled message
//! ([`super::assembly`]), checks it against the server's capabilities, sends it to the group's
//! recipients, and hands each recipient's outcome to [`super::finish`].

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{Histogram, IntCounterVec, register_histogram, register_int_counter_vec};

use super::assembly::Assembly;
use super::pick::Prepared;
use super::site::Site;
use super::{Delivery, stats};
use crate::outbound::outcome::{self, Outcome};
use crate::outbound::smtp::client::Envelope;
use crate::outbound::smtp::reply::{Command, EnhancedCode};

pub(crate) static TRANSACTION_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_smtp_transaction_seconds",
        "Duration of one SMTP transaction (MAIL to the reply to the final dot) on an open connection.",
        prometheus::exponential_buckets(0.0005, 2.0, 18).expect("static buckets")
    )
    .expect("metric registers once")
});

static CONTENT_COMMANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_smtp_content_total",
        "Transactions by the command that carried the message: data, or bdat (RFC 3030 CHUNKING, for 8-bit or large messages to servers that offer it).",
        &["command"]
    )
    .expect("metric registers once")
});

impl Delivery {
    /// Sends the group's message (`assembly`, started by [`Delivery::start_assembly`]) on `conn`
    /// to the group's recipients (one job, or several of a campaign that is not personalised),
    /// then records each one's outcome.
    pub(super) async fn attempt(
        &self,
        mut group: Vec<Prepared>,
        assembly: Assembly,
        site: &Site,
        conn: &mut stats::Held,
    ) {
        let Some(lead) = group.first() else { return };
        let from = &lead.campaign.record.from;
        let rendered = match assembly.rendered().await {
            Ok(r) => r,
            Err(o) => return self.finish_all(&group, |_| o.clone(), site, None, 0).await,
        };
        let size = rendered.size();
        let smtputf8 = !from.is_ascii() || group.iter().any(|p| !p.record.address.is_ascii());
        if smtputf8 && !conn.capabilities.smtputf8 {
            let o = outcome::local_failure(
                EnhancedCode(5, 6, 7),
                "the address needs SMTPUTF8, which the server does not offer",
                Command::Mail,
            );
            return self
                .finish_all(&group, |_| o.clone(), site, Some(&*conn), size)
                .await;
        }
        if let Some(limit) = conn.capabilities.size
            && limit > 0
            && size as u64 > limit
        {
            let o = outcome::local_failure(
                EnhancedCode(5, 3, 4),
                format!("message of {size} bytes exceeds the server's limit of {limit}"),
                Command::Mail,
            );
            return self
                .finish_all(&group, |_| o.clone(), site, Some(&*conn), size)
                .await;
        }
        // Every recipient of a merged message is sent with the lead's envelope sender.
        let sender = lead.sender.clone();
        for p in group.iter_mut().skip(1) {
            p.sender.clone_from(&sender);
        }
        let recipients: Vec<&str> = group.iter().map(|p| p.record.address.as_str()).collect();
        let dsn = group[0].campaign.record.raw.as_ref().map(|raw| {
            let rcpts: Vec<String> = group
                .iter()
                .map(|p| crate::effects::dsn::Request::parse(&p.record.vars).rcpt_params())
                .collect();
            (crate::effects::dsn::mail_params(raw), rcpts)
        });
        let env = Envelope {
            sender: &sender,
            recipients: &recipients,
            smtputf8,
            eight_bit: rendered.eight_bit,
            dsn: dsn.as_ref().map(|(m, r)| (m.as_str(), r.as_slice())),
            chunking: self.config.delivery.bdat
                && (rendered.eight_bit || size >= self.config.delivery.bdat_min_bytes),
        };
        let command = if env.chunking && conn.capabilities.chunking {
            "bdat"
        } else {
            "data"
        };
        CONTENT_COMMANDS.with_label_values(&[command]).inc();
        let started = Instant::now();
        let result = conn.send_parts(&env, &rendered.parts()).await;
        TRANSACTION_SECONDS.observe(started.elapsed().as_secs_f64());
        let outcomes: Vec<Outcome> = match result {
            Ok(replies) => (0..group.len())
                .map(|i| match replies.get(i) {
                    Some(r) => outcome::from_reply(r),
                    None => outcome::local_failure(
                        EnhancedCode(4, 0, 0),
                        "no reply for the recipient",
                        Command::Rcpt,
                    ),
                })
                .collect(),
            Err(e) => vec![outcome::from_error(&e); group.len()],
        };
        // The shaping rules look at the transaction's first failure reply, once.
        if let Some(o) = outcomes
            .iter()
            .find(|o| o.verdict != outcome::Verdict::Delivered && o.code.is_some())
        {
            self.react(site, conn.source, o).await;
        }
        self.finish_all(&group, |i| outcomes[i].clone(), site, Some(&*conn), size)
            .await;
    }
}
