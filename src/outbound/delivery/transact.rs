//! Transact: one message on an open connection. Renders, builds and signs it (on the blocking
//! pool when signing is costly), checks it against the server's capabilities, sends it to the
//! group's recipients, and hands each recipient's outcome to [`super::finish`].

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus::{Histogram, IntCounterVec, register_histogram, register_int_counter_vec};

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

pub(crate) static ASSEMBLY_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_message_assembly_seconds",
        "Time to render, build and DKIM-sign one message, including the wait for a free assembly slot. Rising values with flat signing time mean the CPU is saturated.",
        prometheus::exponential_buckets(0.00005, 2.0, 18).expect("static buckets")
    )
    .expect("metric registers once")
});

/// Campaigns whose templates and attachments come to at most this many bytes, and whose From
/// domain has no RSA key, are assembled on the delivery task itself rather than the blocking pool.
const INLINE_ASSEMBLY_BYTES: usize = 32 * 1024;

impl Delivery {
    /// Renders and sends one message on `conn` to the group's recipients (one job, or several
    /// of a campaign that is not personalised), then records each one's outcome.
    pub(super) async fn attempt(
        &self,
        mut group: Vec<Prepared>,
        site: &Site,
        conn: &mut stats::Held,
    ) {
        let Some(lead) = group.first() else { return };
        // Every message of a campaign that is not personalised has the shared form, also when
        // one recipient happens to go alone: what a recipient gets must not depend on timing.
        let merged = !lead.campaign.record.personalised;
        let from = &lead.campaign.record.from;
        let rendered = match self.assemble(lead, merged).await {
            Ok(r) => r,
            Err(o) => return self.finish_all(&group, |_| o.clone(), site, None, 0).await,
        };
        let size = rendered.bytes.len();
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
        let result = conn.send(&env, &rendered.bytes).await;
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

    /// Renders, builds and signs a job's message. RSA signing (a quarter of a millisecond to one,
    /// by CPU) and large templates go to the blocking pool, at most one per core at a time; a
    /// small message without an RSA key (tens of microseconds) is assembled right here, which
    /// spares two thread hand-offs per message. A failure is the outcome.
    ///
    /// With `merged`, the message is the campaign's shared one for several recipients, led by
    /// `p` ([`crate::outbound::render::Assembler::assemble_merged`]).
    async fn assemble(
        &self,
        p: &Prepared,
        merged: bool,
    ) -> Result<crate::outbound::render::Rendered, Outcome> {
        if p.campaign.record.raw.is_some() {
            return self.assemble_raw(p).await;
        }
        let compiled = self.node.assembler.compiled(&p.campaign).map_err(|e| {
            outcome::local_failure(
                EnhancedCode(5, 6, 0),
                format!("message could not be rendered: {e}"),
                Command::Data,
            )
        })?;
        let job = p.job.id;
        let campaign = &p.campaign.record;
        let inline = campaign.template_bytes() <= INLINE_ASSEMBLY_BYTES
            && !self
                .node
                .assembler
                .signs_with_rsa(crate::intake::address::domain_of(&campaign.from));
        let (node, campaign, record) = (
            Arc::clone(&self.node),
            Arc::clone(&p.campaign),
            p.record.clone(),
        );
        self.run_assembly(inline, move || {
            node.assembler.assemble_job(
                &campaign.record,
                &compiled,
                job,
                &record.as_record(),
                merged,
            )
        })
        .await
    }

    /// [`Delivery::assemble`] of a raw message: its stored bytes with our trace field, signed,
    /// on the blocking pool under the same conditions as a campaign's message.
    async fn assemble_raw(
        &self,
        p: &Prepared,
    ) -> Result<crate::outbound::render::Rendered, Outcome> {
        let Some(body) = p.campaign.body.clone() else {
            // Its bytes go only when its last job is final, so this is a damaged spool.
            return Err(outcome::local_failure(
                EnhancedCode(5, 3, 0),
                "the message's stored bytes are missing",
                Command::Data,
            ));
        };
        let job = p.job.id;
        let inline = body.len() <= INLINE_ASSEMBLY_BYTES
            && !self
                .node
                .assembler
                .signs_with_rsa(crate::intake::address::domain_of(&p.campaign.record.from));
        let (node, campaign) = (Arc::clone(&self.node), Arc::clone(&p.campaign));
        self.run_assembly(inline, move || {
            node.assembler.assemble_raw(&campaign.record, &body, job)
        })
        .await
    }

    /// Runs an assembly on this task when `inline` (small, no RSA), else on the blocking pool
    /// once one of the assembly slots is free; its time, wait included, goes to
    /// `sluice_message_assembly_seconds`.
    async fn run_assembly(
        &self,
        inline: bool,
        work: impl FnOnce() -> Result<
            crate::outbound::render::Rendered,
            crate::outbound::render::AssembleError,
        > + Send
        + 'static,
    ) -> Result<crate::outbound::render::Rendered, Outcome> {
        let started = Instant::now();
        let result = if inline {
            Ok(work())
        } else {
            let _permit = self
                .assembly_slots
                .acquire()
                .await
                .expect("the assembly semaphore is never closed");
            tokio::task::spawn_blocking(work).await
        };
        ASSEMBLY_SECONDS.observe(started.elapsed().as_secs_f64());
        assembled(result)
    }
}

/// The outcome of an assembly that failed, or its message.
fn assembled(
    result: Result<
        Result<crate::outbound::render::Rendered, crate::outbound::render::AssembleError>,
        tokio::task::JoinError,
    >,
) -> Result<crate::outbound::render::Rendered, Outcome> {
    match result {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(crate::outbound::render::AssembleError::Render(e))) => Err(outcome::local_failure(
            EnhancedCode(5, 6, 0),
            format!("message could not be rendered: {e}"),
            Command::Data,
        )),
        Ok(Err(crate::outbound::render::AssembleError::Sign(e))) => {
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
