//! The load generator's HTTP client: one HTTP/1.0 GET per connection,
//! bounded in time, and the figures it reports from what it measured.

/// `HOST:PORT` of a web service base URL (`http://HOST:PORT/`).
pub fn host_port(base: &str) -> &str {
    base.trim_start_matches("http://").trim_end_matches('/')
}

/// One HTTP/1.0 GET whose answer must be 200 with a JSON body, within 30 s.
pub async fn get_json(addr: &str, path: &str) -> Result<serde_json::Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: loadgen\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(std::time::Duration::from_secs(30), io)
        .await
        .map_err(|_| format!("{path}: no answer within 30 s"))?
        .map_err(|e| format!("{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{path}: truncated response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(format!("{path}: HTTP {status}"));
    }
    serde_json::from_str(body).map_err(|e| format!("{path}: body is not JSON: {e}"))
}

/// The `p`th percentile of sorted values (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    sorted[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1]
}
