//! Bounded reads of a peer's answer. Every body Brokerage reads from another system
//! (upstream brokers, their token endpoints, UAA, Cloud Controller, swauth and Swift) goes
//! through [`read`]: streamed, and cut as soon as it passes the cap, never buffered past it.

use std::future::Future;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use oauth2::{AsyncHttpClient, HttpClientError, HttpRequest, HttpResponse};

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The body (or its announced length) passed the cap; reading stopped there.
    #[error("the answer is larger than {cap} bytes")]
    TooLarge { cap: usize },
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// The whole body, or [`ReadError::TooLarge`] as soon as more than `cap` bytes arrive (or a
/// `Content-Length` over `cap` is announced, before any is read).
pub async fn read(mut response: reqwest::Response, cap: usize) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(ReadError::TooLarge { cap });
    }
    // Chunks are kept as they come and joined once at the end, so a body cut at the cap
    // never cost more than the cap (a growing buffer would double past it).
    let mut chunks = Vec::new();
    let mut len = 0usize;
    while let Some(chunk) = response.chunk().await? {
        len += chunk.len();
        if len > cap {
            return Err(ReadError::TooLarge { cap });
        }
        chunks.push(chunk);
    }
    if chunks.len() == 1 {
        return Ok(chunks.pop().expect("one chunk"));
    }
    let mut body = BytesMut::with_capacity(len);
    for chunk in chunks {
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The body parsed as JSON, read with [`read`]'s cap.
pub async fn json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    cap: usize,
) -> Result<T, String> {
    let bytes = read(response, cap).await.map_err(|e| match e {
        ReadError::Transport(e) => e.without_url().to_string(),
        other => other.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("the answer is not the JSON expected: {e}"))
}

/// An HTTP client for the `oauth2` crate whose answers are read with a cap: token
/// endpoints are peers like any other.
pub struct OAuthClient<'a> {
    pub http: &'a reqwest::Client,
    pub cap: usize,
}

impl<'c> AsyncHttpClient<'c> for OAuthClient<'_> {
    type Error = HttpClientError<reqwest::Error>;
    type Future =
        Pin<Box<dyn Future<Output = Result<HttpResponse, Self::Error>> + Send + Sync + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request = request.try_into().map_err(Box::new)?;
            let response = self.http.execute(request).await.map_err(Box::new)?;
            let mut builder = http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let body = read(response, self.cap).await.map_err(|e| match e {
                ReadError::Transport(e) => HttpClientError::Reqwest(Box::new(e)),
                too_large => HttpClientError::Other(too_large.to_string()),
            })?;
            builder.body(body.to_vec()).map_err(HttpClientError::Http)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers with a chunked body that never ends.
    async fn endless() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 4096];
            let _ = socket.read(&mut head).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        (base, task)
    }

    #[tokio::test]
    async fn an_endless_body_is_cut_at_the_cap() {
        let (base, task) = endless().await;
        let response = reqwest::get(&base).await.unwrap();
        match read(response, 100_000).await {
            Err(ReadError::TooLarge { cap }) => assert_eq!(cap, 100_000),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        task.abort();
    }
}
