//! `sluice sink`: a capture SMTP server for development, so a first campaign has somewhere to
//! arrive and something to look at. It accepts any mail (on loopback unless told otherwise),
//! writes each message as an `.eml` file whose first headers are the envelope
//! (`X-Sluice-Sink-*`), and `sluice sink --list` prints the latest ones with their DKIM result,
//! verified with mail-auth against the public halves of the config's `[[dkim]]` keys (never
//! through DNS: the point is to check what this Sluice signs).
//!
//! Not a mail server: no relaying anywhere, no authentication, no TLS.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use clap::Args;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, ResolverCache, Txt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest command line the sink reads.
const MAX_LINE: usize = 4096;
/// Largest message it keeps.
const MAX_MESSAGE: usize = 50 * 1024 * 1024;
/// Recipients per transaction.
const MAX_RCPTS: usize = 1000;

#[derive(Args)]
pub struct SinkArgs {
    /// Where to listen for SMTP.
    #[arg(long, default_value = "127.0.0.1:2525")]
    pub listen: SocketAddr,
    /// Where messages are written, one `.eml` file each.
    #[arg(long, default_value = "var/sink")]
    pub dir: PathBuf,
    /// Listen on an address that is not loopback (the sink accepts anyone's mail).
    #[arg(long)]
    pub allow_remote: bool,
    /// Print the latest captured messages instead of listening.
    #[arg(long)]
    pub list: bool,
    /// With --list: how many.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// With --list: the config whose `[[dkim]]` keys signatures are checked against.
    #[arg(long, short, default_value = "config/sluice.toml")]
    pub config: PathBuf,
}

pub async fn sink(args: SinkArgs, json: bool) -> anyhow::Result<bool> {
    if args.list {
        return list(&args, json).await.map(|()| true);
    }
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        bail!(
            "--listen {}: not a loopback address; the sink takes anyone's mail, so pass --allow-remote if that is meant",
            args.listen
        );
    }
    tokio::fs::create_dir_all(&args.dir)
        .await
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "sluice sink: listening on {}, writing to {} (sluice sink --list shows them)",
        listener.local_addr()?,
        args.dir.display()
    );
    let dir = Arc::new(args.dir);
    let seq = Arc::new(AtomicU64::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("sluice sink: accept: {e}");
                        continue;
                    }
                };
                let (dir, seq) = (Arc::clone(&dir), Arc::clone(&seq));
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    if let Err(e) = session(BufReader::new(tcp), peer, &dir, &seq).await {
                        eprintln!("sluice sink: {peer}: {e}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => return Ok(true),
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (CRLF or LF); `None` at the end of the stream.
async fn read_line<S: AsyncRead + Unpin>(
    io: &mut BufReader<S>,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = (&mut *io)
        .take(max as u64 + 1)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    let complete = buf.ends_with(b"\n");
    while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        buf.pop();
    }
    Ok(Some(complete))
}

async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    text: &str,
) -> std::io::Result<()> {
    io.get_mut().write_all(text.as_bytes()).await?;
    io.get_mut().write_all(b"\r\n").await
}

/// The address inside `<...>` after a `MAIL FROM:` / `RCPT TO:` prefix, parameters dropped.
fn path_arg(rest: &str) -> Option<String> {
    let rest = rest.trim_start();
    let inner = rest.strip_prefix('<')?.split('>').next()?;
    (!inner.contains(['\r', '\n'])).then(|| inner.to_owned())
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: BufReader<S>,
    peer: SocketAddr,
    dir: &Path,
    seq: &AtomicU64,
) -> anyhow::Result<()> {
    reply(
        &mut io,
        "220 sluice-sink ESMTP (captures mail; delivers none)",
    )
    .await?;
    let mut line = Vec::new();
    let mut helo = String::new();
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let Some(complete) = read_line(&mut io, &mut line, MAX_LINE).await? else {
            return Ok(());
        };
        if !complete {
            reply(&mut io, "500 5.5.2 line too long").await?;
            return Ok(());
        }
        let cmd = String::from_utf8_lossy(&line).into_owned();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO ") || upper.starts_with("HELO ") {
            helo = cmd[5..].trim().chars().take(255).collect();
            from = None;
            rcpts.clear();
            if upper.starts_with("EHLO") {
                reply(
                    &mut io,
                    &format!(
                        "250-sluice-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE {MAX_MESSAGE}"
                    ),
                )
                .await?;
            } else {
                reply(&mut io, "250 sluice-sink").await?;
            }
        } else if let Some(rest) = upper.strip_prefix("MAIL FROM:").map(|_| &cmd[10..]) {
            match path_arg(rest) {
                Some(a) => {
                    from = Some(a);
                    rcpts.clear();
                    reply(&mut io, "250 2.1.0 ok").await?;
                }
                None => reply(&mut io, "501 5.5.4 MAIL FROM:<address> expected").await?,
            }
        } else if let Some(rest) = upper.strip_prefix("RCPT TO:").map(|_| &cmd[8..]) {
            match (path_arg(rest), &from) {
                (_, None) => reply(&mut io, "503 5.5.1 MAIL first").await?,
                (_, Some(_)) if rcpts.len() >= MAX_RCPTS => {
                    reply(&mut io, "452 4.5.3 too many recipients").await?
                }
                (Some(a), Some(_)) if !a.is_empty() => {
                    rcpts.push(a);
                    reply(&mut io, "250 2.1.5 ok").await?;
                }
                _ => reply(&mut io, "501 5.5.4 RCPT TO:<address> expected").await?,
            }
        } else if upper == "DATA" {
            let Some(sender) = from.clone().filter(|_| !rcpts.is_empty()) else {
                reply(&mut io, "503 5.5.1 MAIL and RCPT first").await?;
                continue;
            };
            reply(&mut io, "354 end with <CRLF>.<CRLF>").await?;
            let mut body = Vec::new();
            let mut too_big = false;
            loop {
                let Some(_) = read_line(&mut io, &mut line, MAX_MESSAGE).await? else {
                    return Ok(());
                };
                if line == b"." {
                    break;
                }
                let content = line.strip_prefix(b".").unwrap_or(&line);
                if body.len() + content.len() + 2 > MAX_MESSAGE {
                    too_big = true;
                    continue;
                }
                body.extend_from_slice(content);
                body.extend_from_slice(b"\r\n");
            }
            if too_big {
                reply(&mut io, "552 5.3.4 message too big").await?;
            } else {
                let name = store(dir, seq, peer, &helo, &sender, &rcpts, &body).await?;
                reply(&mut io, &format!("250 2.0.0 captured as {name}")).await?;
            }
            from = None;
            rcpts.clear();
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            reply(&mut io, "250 2.0.0 ok").await?;
        } else if upper == "NOOP" || upper.starts_with("NOOP ") {
            reply(&mut io, "250 2.0.0 ok").await?;
        } else if upper == "QUIT" {
            reply(&mut io, "221 2.0.0 bye").await?;
            return Ok(());
        } else {
            reply(&mut io, "502 5.5.2 not implemented").await?;
        }
    }
}

/// Writes a message with its envelope headers, atomically (a temporary file renamed), and
/// returns the file's name.
async fn store(
    dir: &Path,
    seq: &AtomicU64,
    peer: SocketAddr,
    helo: &str,
    from: &str,
    rcpts: &[String],
    body: &[u8],
) -> anyhow::Result<String> {
    let now = sluice::now_ms();
    let name = format!("{now:013}-{:06}.eml", seq.fetch_add(1, Ordering::Relaxed));
    let mut out = Vec::with_capacity(body.len() + 256);
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    out.extend_from_slice(
        format!(
            "X-Sluice-Sink-Received: {}\r\nX-Sluice-Sink-Client: {peer} ({})\r\nX-Sluice-Sink-Mail-From: <{}>\r\n",
            sluice::effects::delivery_log::rfc3339(now),
            clean(helo),
            clean(from)
        )
        .as_bytes(),
    );
    for r in rcpts {
        out.extend_from_slice(format!("X-Sluice-Sink-Rcpt-To: <{}>\r\n", clean(r)).as_bytes());
    }
    out.extend_from_slice(body);
    let tmp = dir.join(format!(".{name}.tmp"));
    tokio::fs::write(&tmp, &out)
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::rename(&tmp, dir.join(&name)).await?;
    Ok(name)
}

/// TXT answers for DKIM key lookups, from the config's keys only.
struct Keys(HashMap<Box<str>, Txt>);

impl ResolverCache<Box<str>, Txt> for Keys {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }

    fn remove<Q>(&self, _: &Q) -> Option<Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _: Box<str>, _: Txt, _: std::time::Instant) {}
}

/// The DKIM key records the config's `[[dkim]]` keys would publish, by
/// `<selector>._domainkey.<domain>.`.
fn config_keys(config: &Path) -> anyhow::Result<Keys> {
    let settings = sluice::server::Settings::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut keys = HashMap::new();
    for entry in &settings.config.dkim {
        let record =
            sluice::outbound::dkim::public_record(entry).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = mail_auth::common::verify::DomainKey::parse(record.as_bytes())
            .map_err(|e| anyhow::anyhow!("the public half of {}: {e}", entry.key_file.display()))?;
        let name = format!("{}._domainkey.{}", entry.selector, entry.domain);
        keys.insert(Box::from(name.to_fqdn().as_ref()), Txt::from(key));
    }
    Ok(Keys(keys))
}

/// One captured message, as `--list` shows it.
fn describe(path: &Path, raw: &[u8]) -> Value {
    let parsed = mail_parser::MessageParser::default().parse(raw);
    let header = |name: &str| {
        parsed
            .as_ref()
            .and_then(|m| m.header_raw(name))
            .map(|v| v.trim().to_owned())
    };
    let rcpts: Vec<String> = parsed
        .as_ref()
        .map(|m| {
            m.header_values("X-Sluice-Sink-Rcpt-To")
                .filter_map(|v| {
                    v.as_text()
                        .map(|t| t.trim().trim_matches(['<', '>']).to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let unsubscribe = header("List-Unsubscribe").and_then(|v| {
        v.split(',')
            .map(|p| p.trim().trim_matches(['<', '>']).to_owned())
            .find(|u| u.starts_with("http"))
    });
    json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "received": header("X-Sluice-Sink-Received"),
        "mail_from": header("X-Sluice-Sink-Mail-From").map(|v| v.trim_matches(['<', '>']).to_owned()),
        "rcpt_to": rcpts,
        "from": header("From"),
        "subject": parsed.as_ref().and_then(|m| m.subject()).map(str::to_owned),
        "size": raw.len(),
        "unsubscribe": unsubscribe,
    })
}

/// The DKIM verdict of a message: `pass (d=… s=…)` for each passing signature, else the first
/// failure, `none` without a signature.
async fn dkim_result(auth: &MessageAuthenticator, keys: &Keys, raw: &[u8]) -> String {
    let Some(msg) = AuthenticatedMessage::parse(raw) else {
        return "unreadable".into();
    };
    let outputs = auth
        .verify_dkim(mail_auth::Parameters::new(&msg).with_txt_cache(keys))
        .await;
    if outputs.is_empty() {
        return "none".into();
    }
    let mut out = Vec::new();
    for o in &outputs {
        let who = o
            .signature()
            .map(|s| format!("d={} s={}", s.d, s.s))
            .unwrap_or_default();
        let verdict = match o.result() {
            DkimResult::Pass => "pass".to_owned(),
            DkimResult::None => "none".to_owned(),
            DkimResult::Fail(e) | DkimResult::Neutral(e) | DkimResult::PermError(e) => {
                format!("fail: {e}")
            }
            // Only the config's keys are known: any other lookup fails.
            DkimResult::TempError(_) => "not checked: key not in the config".to_owned(),
        };
        out.push(format!("{verdict} ({who})"));
    }
    out.join("; ")
}

async fn list(args: &SinkArgs, json: bool) -> anyhow::Result<()> {
    let keys = config_keys(&args.config)?;
    // A resolver with no servers: every key must come from the config.
    let resolver = mail_auth::hickory_resolver::TokioResolver::builder_with_config(
        mail_auth::hickory_resolver::config::ResolverConfig::from_name_servers(Vec::new()),
        mail_auth::hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    )
    .build()
    .context("building the resolver")?;
    let auth = MessageAuthenticator(resolver);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&args.dir) {
        Ok(d) => d
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", args.dir.display())),
    };
    // Names start with the capture time: newest last after sorting, so take from the end.
    files.sort();
    let start = files.len().saturating_sub(args.limit);
    let mut shown = Vec::new();
    for path in &files[start..] {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut v = describe(path, &raw);
        v["dkim"] = dkim_result(&auth, &keys, &raw).await.into();
        shown.push(v);
    }
    if json {
        super::print_json(&json!({"messages": shown, "total": files.len()}));
        return Ok(());
    }
    if shown.is_empty() {
        println!("no messages in {}", args.dir.display());
        return Ok(());
    }
    let s = super::s;
    for m in &shown {
        let to = super::strings(&m["rcpt_to"]);
        println!(
            "{}  from {}  to {}  {} bytes",
            s(&m["received"]),
            s(&m["mail_from"]),
            to.join(", "),
            s(&m["size"])
        );
        println!("    Subject: {}", s(&m["subject"]));
        println!("    DKIM: {}", s(&m["dkim"]));
        if !m["unsubscribe"].is_null() {
            println!("    Unsubscribe: {}", s(&m["unsubscribe"]));
        }
        println!("    {}", args.dir.join(s(&m["file"])).display());
    }
    println!("{} of {} messages", shown.len(), files.len());
    Ok(())
}
