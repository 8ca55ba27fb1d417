//! A plain SMTP client for tests that talk to Sluice's listeners: one command at a time, whole
//! replies, DATA with dot-stuffing.
#![allow(dead_code)]

use std::time::Duration;

/// A minimal SMTP client for talking to the bounce and submission listeners.
pub struct Smtp {
    rd: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    pub async fn connect(addr: std::net::SocketAddr) -> (Smtp, String) {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (rd, wr) = s.into_split();
        let mut c = Smtp {
            rd: tokio::io::BufReader::new(rd),
            wr,
        };
        let greeting = c.reply().await;
        (c, greeting)
    }

    /// The whole reply, lines joined with `\n`.
    pub async fn reply(&mut self) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut all = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.rd.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap();
            if n == 0 {
                return all.join("\n");
            }
            let line = line.trim_end().to_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            all.push(line);
            if last {
                return all.join("\n");
            }
        }
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        use tokio::io::AsyncWriteExt;
        self.wr
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }

    /// DATA with `message` (LF or CRLF line ends), dot-stuffed; the reply to the final dot.
    pub async fn data(&mut self, message: &[u8]) -> String {
        use tokio::io::AsyncWriteExt;
        let r = self.cmd("DATA").await;
        assert!(r.starts_with("354"), "{r}");
        let mut out = Vec::with_capacity(message.len() + 1024);
        for line in message.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.wr.write_all(&out).await.unwrap();
        self.reply().await
    }

    /// One whole transaction from the null sender.
    pub async fn send(addr: std::net::SocketAddr, rcpt: &str, message: &[u8]) -> String {
        let (mut c, greeting) = Smtp::connect(addr).await;
        assert!(greeting.starts_with("220"), "{greeting}");
        assert!(c.cmd("EHLO mx.example.org").await.starts_with("250"));
        assert!(c.cmd("MAIL FROM:<>").await.starts_with("250"));
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(r.starts_with("250"), "RCPT {rcpt}: {r}");
        let r = c.data(message).await;
        c.cmd("QUIT").await;
        r
    }
}
