//! The syslog listener: RFC 5424 messages over TCP, framed by RFC 6587 octet counting
//! (`LEN SP MSG`) or, failing that, one per line. A syslog drain URL carries only host and
//! port, so each message goes to the log instances its app (APP-NAME) is bound to.
//!
//! Every limit is the listener's own: connections at once, bytes per message, time a
//! connection may stay silent.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{parse, Logs};

/// The longest message read; a longer one closes the connection.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// How long a connection may send nothing before it is closed.
pub const IDLE: Duration = Duration::from_secs(300);

pub async fn serve(
    listener: TcpListener,
    logs: Arc<Logs>,
    max_connections: usize,
    stop: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!("syslog listener at its connection limit; a connection is refused");
            continue;
        };
        let (logs, stop) = (logs.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = connection(stream, &logs) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn connection(stream: TcpStream, logs: &Logs) {
    let mut reader = BufReader::new(stream);
    loop {
        let frame = match tokio::time::timeout(IDLE, next_frame(&mut reader)).await {
            Ok(Ok(Some(frame))) => frame,
            _ => return,
        };
        if let Some(line) = parse(&frame) {
            if let Err(e) = logs.accept_by_app(vec![line]).await {
                tracing::warn!(error = %e, "a syslog message could not be routed");
            }
        }
    }
}

/// The next message: octet counted when it starts with a digit, else up to a newline.
/// `None` at the end of the stream; an error for a message that breaks the limits.
async fn next_frame(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let too_long = || std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long");
    let first = loop {
        let buf = reader.fill_buf().await?;
        let Some(&b) = buf.first() else {
            return Ok(None);
        };
        if b.is_ascii_whitespace() {
            reader.consume(1);
            continue;
        }
        break b;
    };
    if first.is_ascii_digit() {
        let mut len = 0usize;
        loop {
            let b = reader.read_u8().await?;
            match b {
                b'0'..=b'9' => {
                    len = len * 10 + usize::from(b - b'0');
                    if len > MAX_MESSAGE {
                        return Err(too_long());
                    }
                }
                b' ' => break,
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "bad octet count",
                    ))
                }
            }
        }
        let mut message = vec![0; len];
        reader.read_exact(&mut message).await?;
        Ok(Some(message))
    } else {
        let mut message = Vec::new();
        let mut limited = (&mut *reader).take(MAX_MESSAGE as u64 + 1);
        limited.read_until(b'\n', &mut message).await?;
        if message.len() > MAX_MESSAGE {
            return Err(too_long());
        }
        Ok(Some(message))
    }
}
