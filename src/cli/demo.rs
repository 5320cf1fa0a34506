//! `ward demo app`: the small HTTP program behind each `ward up` service.
//!
//! `GET /stream` answers with a line every half second until the caller goes
//! away (the long-lived stream `ward up` watches); any other request gets
//! `hello from <name>` and the connection closes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Subcommand)]
pub enum DemoCommand {
    /// Serve the demo application.
    App {
        #[arg(long)]
        listen: SocketAddr,
        /// The name it answers with, e.g. acme/api.
        #[arg(long)]
        name: String,
    },
}

pub async fn run(cmd: DemoCommand) -> anyhow::Result<()> {
    let DemoCommand::App { listen, name } = cmd;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("demo app {name} listening on {listen}");
    let name: &'static str = Box::leak(name.into_boxed_str());
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = serve(conn, name).await;
        });
    }
}

async fn serve(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await??;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    if head.starts_with(b"GET /stream ") {
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
            .await?;
        for tick in 0u64.. {
            conn.write_all(format!("tick {tick} from {name}\n").as_bytes())
                .await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let body = format!("hello from {name}\n");
    conn.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    conn.shutdown().await
}
