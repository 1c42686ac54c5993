//! Captured plugin output: every line labelled with its instance and stream, logged through
//! the manager's own log, kept in a bounded ring per instance, and broadcast to followers.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::SystemTime,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    sync::broadcast,
};

/// Lines kept per instance.
pub const RING_LINES: usize = 1000;
/// Longest line kept; the rest of a longer line is dropped (a plugin that never writes a
/// newline must not grow the manager's memory).
const MAX_LINE: usize = 16 * 1024;

/// Which output a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One captured line.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Position in the plugin's log book: later lines have higher numbers.
    pub seq: u64,
    /// When it was read.
    pub at: SystemTime,
    /// Instance id (`echo-0`).
    pub instance: String,
    /// Which output.
    pub stream: Stream,
    /// The text, without its newline.
    pub text: String,
}

/// The captured output of one plugin's instances.
#[derive(Debug)]
pub struct LogBook {
    rings: Mutex<Rings>,
    follow: broadcast::Sender<LogLine>,
}

#[derive(Debug, Default)]
struct Rings {
    by_instance: HashMap<String, VecDeque<LogLine>>,
    next_seq: u64,
}

impl Default for LogBook {
    fn default() -> Self {
        Self {
            rings: Mutex::default(),
            follow: broadcast::Sender::new(RING_LINES),
        }
    }
}

impl LogBook {
    fn rings(&self) -> std::sync::MutexGuard<'_, Rings> {
        self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, mut line: LogLine) {
        let mut rings = self.rings();
        line.seq = rings.next_seq;
        rings.next_seq += 1;
        let ring = rings.by_instance.entry(line.instance.clone()).or_default();
        if ring.len() == RING_LINES {
            ring.pop_front();
        }
        ring.push_back(line.clone());
        // Sent under the lock, so followers see lines in sequence order.
        let _ = self.follow.send(line);
    }

    /// The kept lines of every instance, oldest first.
    pub fn lines(&self) -> Vec<LogLine> {
        let rings = self.rings();
        let mut lines: Vec<LogLine> = rings.by_instance.values().flatten().cloned().collect();
        lines.sort_by_key(|l| l.seq);
        lines
    }

    /// The last `n` lines `instance` wrote to `stream`.
    pub fn tail(&self, instance: &str, stream: Stream, n: usize) -> Vec<String> {
        let rings = self.rings();
        let Some(ring) = rings.by_instance.get(instance) else {
            return Vec::new();
        };
        let mut tail: Vec<String> = ring
            .iter()
            .rev()
            .filter(|l| l.stream == stream)
            .take(n)
            .map(|l| l.text.clone())
            .collect();
        tail.reverse();
        tail
    }

    /// Lines as they arrive.
    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.follow.subscribe()
    }

    /// Reads `output` line by line until it closes, recording each line.
    pub async fn capture(&self, instance: String, stream: Stream, output: impl AsyncRead + Unpin) {
        let mut reader = BufReader::new(output);
        let mut line = Vec::new();
        loop {
            line.clear();
            match read_line(&mut reader, &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            tracing::info!(target: "plugin", "{instance} {}: {text}", stream.as_str());
            self.push(LogLine {
                seq: 0,
                at: SystemTime::now(),
                instance: instance.clone(),
                stream,
                text,
            });
        }
    }
}

/// Reads through the next newline, keeping at most [`MAX_LINE`] bytes of it.
async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut read = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(read);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        reader.consume(used);
        read += used;
        if done {
            return Ok(read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_lines_per_stream_and_bounds_long_ones() {
        let book = LogBook::default();
        let long = "x".repeat(MAX_LINE * 2);
        let input = format!("one\ntwo\r\n{long}\nlast-without-newline");
        book.capture("echo-0".into(), Stream::Stderr, input.as_bytes())
            .await;
        book.capture("echo-0".into(), Stream::Stdout, &b"out\n"[..])
            .await;
        let tail = book.tail("echo-0", Stream::Stderr, 10);
        assert_eq!(tail.len(), 4);
        assert_eq!(&tail[..2], ["one", "two"]);
        assert_eq!(tail[2].len(), MAX_LINE);
        assert_eq!(tail[3], "last-without-newline");
        assert_eq!(book.tail("echo-0", Stream::Stdout, 10), ["out"]);
        assert_eq!(
            book.tail("echo-0", Stream::Stderr, 1),
            ["last-without-newline"]
        );
        assert!(book.tail("echo-9", Stream::Stderr, 1).is_empty());
    }

    #[tokio::test]
    async fn the_ring_is_bounded() {
        let book = LogBook::default();
        let input: String = (0..RING_LINES + 10).map(|i| format!("{i}\n")).collect();
        book.capture("a-0".into(), Stream::Stdout, input.as_bytes())
            .await;
        let lines = book.lines();
        assert_eq!(lines.len(), RING_LINES);
        assert_eq!(lines[0].text, "10");
    }
}
