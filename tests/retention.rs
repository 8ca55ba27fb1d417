//! Retention end to end: final jobs keep a tombstone that later reports still find, a finished
//! campaign's tombstones are deleted after `retention.job_tombstones` (reports are unmapped from
//! then on), its templates after `retention.campaigns`, and the counts survive all of it and a
//! restart. Passes are run with a clock moved forward rather than by waiting.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{
    KEY, client, delivery_config, get_json, post_body, post_campaign, recipients, start,
    trace_token, url, wait_counts, wait_keys,
};
use serde_json::Value;
use sluice::store::retention::{self, Pass};
use sluice::store::spool::{CF_FINALS, CF_JOBS};

const DAY_MS: u64 = 86_400_000;

/// A sample report from `tests/data/reports` with its placeholders filled for `m`.
fn report(name: &str, m: &common::sink::Captured) -> Vec<u8> {
    let text = std::fs::read_to_string(format!(
        "{}/tests/data/reports/{name}.eml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let (_, body) = text.split_once('\n').unwrap();
    body.replace("{{VERP}}", &m.mail_from)
        .replace("{{RCPT}}", &m.rcpts[0])
        .replace("{{REF}}", &trace_token(&m.data))
        .replace("{{FEEDBACK}}", "fbl@bounces.example.com")
        .into_bytes()
}

async fn feedback(addr: std::net::SocketAddr, body: Vec<u8>) -> Value {
    let r = client()
        .post(url(addr, "/v1/feedback"))
        .bearer_auth(KEY)
        .header("content-type", "message/rfc822")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn keys(node: &sluice::server::Running) -> (usize, usize) {
    let n = Arc::clone(&node.node);
    let counts = tokio::task::spawn_blocking(move || {
        n.spool.count_keys_together(&[CF_JOBS, CF_FINALS]).unwrap()
    })
    .await
    .unwrap();
    (counts[0], counts[1])
}

/// Acceptance 2: a DSN and a complaint after the job is final, inside and after the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_find_final_jobs_until_retention_deletes_their_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions::default()).await;
    let mut cfg = delivery_config(dir.path(), &sink);
    // The node's own passes stay out of the way of the ones run here.
    cfg.retention.interval = Duration::from_secs(3600);
    cfg.bounce.domain = Some("bounces.example.com".into());
    cfg.bounce.feedback_addresses = vec!["fbl@bounces.example.com".into()];
    let node = start(cfg.clone()).await;
    let addr = node.http_addr;
    let id = post_campaign(addr, recipients(4)).await;
    wait_counts(addr, &id, Duration::from_secs(20), |c| c["delivered"] == 4).await;
    let mut msgs = sink.messages();
    msgs.sort_by_key(|m| m.rcpts[0].clone());
    // Every job is final: none is left among the live jobs.
    wait_keys(&node, &[CF_JOBS, CF_FINALS], &[0, 4]).await;

    // Inside the window: a bounce DSN turns a delivery into a bounce and suppresses, a complaint
    // suppresses and counts.
    let p = feedback(addr, report("postfix", &msgs[0])).await;
    assert_eq!(
        (p["kind"].as_str(), p["result"].as_str()),
        (Some("bounce"), Some("applied")),
        "{p}"
    );
    let p = feedback(addr, report("arf-redacted", &msgs[1])).await;
    assert_eq!(
        (p["kind"].as_str(), p["result"].as_str()),
        (Some("complaint"), Some("applied")),
        "{p}"
    );
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    let counts = c["counts"].clone();
    assert_eq!(
        (
            &counts["delivered"],
            &counts["bounced"],
            &counts["complained"]
        ),
        (&Value::from(3), &Value::from(1), &Value::from(1)),
        "{c}"
    );

    // The campaign is finished; before the window ends nothing is deleted.
    let now = sluice::now_ms();
    let first = retention::pass(&node.node, now).await.unwrap();
    assert_eq!(first.finished, 1);
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert!(c["finished_at"].is_string(), "{c}");
    let day = retention::pass(&node.node, now + DAY_MS).await.unwrap();
    assert_eq!(day, Pass::default());
    assert_eq!(keys(&node).await, (0, 4));

    // After `job_tombstones` (30 days by default) the tombstones go, by range.
    let later = now + 30 * DAY_MS + 1;
    let p = retention::pass(&node.node, later).await.unwrap();
    assert_eq!((p.tombstones_deleted, p.compacted), (1, 0));
    assert_eq!(keys(&node).await, (0, 0));
    let p = feedback(addr, report("postfix", &msgs[2])).await;
    assert_eq!(p["result"], "unmapped", "{p}");
    let p = feedback(addr, report("arf-redacted", &msgs[3])).await;
    assert_eq!(p["result"], "unmapped", "{p}");

    let archived_seq = node.node.campaigns.all()[0].seq;
    // After `campaigns` (90 days) the templates go. With its tombstones gone too, nothing about
    // the campaign can change any more: it moves to the archive, out of memory.
    let p = retention::pass(&node.node, now + 90 * DAY_MS + 1)
        .await
        .unwrap();
    assert_eq!((p.compacted, p.archived), (1, 1));
    assert!(node.node.campaigns.all().is_empty());
    let (status, _, body) = post_body(
        addr,
        &format!("/v1/campaigns/{id}/recipients"),
        "application/x-ndjson",
        "{\"email\":\"late@sink.test\",\"vars\":{\"name\":\"Late\"}}\n",
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "campaign_archived", "{body}");
    assert_eq!(body["error"]["field"], "id", "{body}");
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"], counts, "{c}");
    node.shutdown().await;

    // The counts are stored, not derived from the (deleted) jobs: a restart keeps them. The
    // archived campaign is not loaded, but found by id and listed.
    let node = start(cfg).await;
    assert!(node.node.campaigns.all().is_empty());
    let (_, c) = get_json(node.http_addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"], counts, "{c}");
    assert!(c["compacted_at"].is_string(), "{c}");
    assert!(c["archived_at"].is_string(), "{c}");
    assert_eq!(c["from"], "news@example.com", "{c}");
    let (status, _, _) = post_body(
        node.http_addr,
        &format!("/v1/campaigns/{id}/pause"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, 409);

    // A new campaign is numbered above the archived one and listed before it.
    let newer = post_campaign(node.http_addr, recipients(1)).await;
    let (_, list) = get_json(node.http_addr, "/v1/campaigns").await;
    assert_eq!(list["total"], 2, "{list}");
    let ids: Vec<&str> = list["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [newer.as_str(), id.as_str()]);
    let stored = node.node.campaigns.all();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].seq > archived_seq, "{}", stored[0].seq);

    // Pages follow `next_cursor` from the campaigns in memory into the archive, whatever the
    // page size: a page may end inside the memory part, exactly at its end, or in the archive.
    let n2 = post_campaign(node.http_addr, recipients(1)).await;
    let n3 = post_campaign(node.http_addr, recipients(1)).await;
    let all = [n3.as_str(), n2.as_str(), newer.as_str(), id.as_str()];
    for limit in 1..=5 {
        let mut pages: Vec<Vec<String>> = Vec::new();
        let mut path = format!("/v1/campaigns?limit={limit}");
        loop {
            let (status, list) = get_json(node.http_addr, &path).await;
            assert_eq!(status, 200, "{list}");
            assert_eq!(list["total"], 4, "{list}");
            pages.push(
                list["campaigns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["id"].as_str().unwrap().to_owned())
                    .collect(),
            );
            match list["next_cursor"].as_str() {
                Some(cursor) => path = format!("/v1/campaigns?limit={limit}&cursor={cursor}"),
                None => break,
            }
            assert!(pages.len() <= 4, "{pages:?}");
        }
        assert!(
            pages.iter().all(|p| !p.is_empty() && p.len() <= limit),
            "{pages:?}"
        );
        assert_eq!(pages.concat(), all, "limit {limit}: {pages:?}");
        assert_eq!(
            pages.len(),
            4usize.div_ceil(limit),
            "limit {limit}: {pages:?}"
        );
    }
    let (status, body) = get_json(node.http_addr, "/v1/campaigns?cursor=x12").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "cursor", "{body}");
    node.shutdown().await;
}

/// A finished campaign that takes recipients again is not finished any more, and keeps the
/// tombstones of its new recipients when the old ones are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_that_takes_recipients_again_is_not_finished() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions::default()).await;
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.retention.interval = Duration::from_secs(3600);
    let node = start(cfg).await;
    let addr = node.http_addr;
    let id = post_campaign(addr, recipients(2)).await;
    wait_counts(addr, &id, Duration::from_secs(20), |c| c["delivered"] == 2).await;
    wait_keys(&node, &[CF_JOBS, CF_FINALS], &[0, 2]).await;
    let now = sluice::now_ms();
    assert_eq!(retention::pass(&node.node, now).await.unwrap().finished, 1);

    let r = client()
        .post(url(addr, &format!("/v1/campaigns/{id}/recipients")))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body("{\"email\":\"again@sink.test\",\"vars\":{\"name\":\"Again\"}}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_counts(addr, &id, Duration::from_secs(20), |c| c["delivered"] == 3).await;
    wait_keys(&node, &[CF_JOBS, CF_FINALS], &[0, 3]).await;
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert!(c.get("finished_at").is_none(), "{c}");
    // Finished again from the next pass on: the first finish time no longer counts.
    let again = now + 10 * DAY_MS;
    assert_eq!(
        retention::pass(&node.node, again).await.unwrap().finished,
        1
    );
    let p = retention::pass(&node.node, now + 31 * DAY_MS)
        .await
        .unwrap();
    assert_eq!(p, Pass::default());
    assert_eq!(keys(&node).await, (0, 3));
    let p = retention::pass(&node.node, again + 30 * DAY_MS)
        .await
        .unwrap();
    assert_eq!(p.tombstones_deleted, 1);
    assert_eq!(keys(&node).await, (0, 0));
    node.shutdown().await;
}
