//! A QMP client: QEMU's monitor protocol, one JSON object a line over a
//! Unix socket. A greeting, `qmp_capabilities`, then commands, each with
//! an id its reply must carry; events in between are skipped (state is
//! polled instead, which no lost event can mislead).
//!
//! Every line from QEMU is untrusted: a line too long, not JSON, a reply
//! for another id, or an error is an [`Error::Qmp`], never a panic.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// The longest line accepted from QEMU (query-named-block-nodes of a big
/// VM is tens of KiB).
const MAX_LINE: u64 = 16 << 20;
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A connected monitor.
pub struct Qmp {
    reader: BufReader<Box<dyn Read + Send + Sync>>,
    writer: Box<dyn Write + Send + Sync>,
    next_id: u64,
    peer: String,
}

/// A command QEMU refused: its error class and description.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub class: String,
    pub desc: String,
}

fn bad(peer: &str, what: impl Into<String>) -> Error {
    Error::Qmp {
        peer: peer.to_string(),
        what: what.into(),
    }
}

impl Qmp {
    /// Connects to the monitor socket `path` and leaves capabilities
    /// negotiation.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let peer = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|e| {
            bad(
                &peer,
                format!("cannot connect: {e}; is QEMU running with a QMP monitor on this socket (one client at a time)?"),
            )
        })?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|e| bad(&peer, e.to_string()))?;
        let writer = stream.try_clone().map_err(|e| bad(&peer, e.to_string()))?;
        Qmp::over(Box::new(stream), Box::new(writer), &peer)
    }

    /// The greeting and capabilities negotiation over any byte streams
    /// (a socket's two halves; the fuzz target's bytes).
    pub fn over(
        reader: Box<dyn Read + Send + Sync>,
        writer: Box<dyn Write + Send + Sync>,
        peer: &str,
    ) -> Result<Qmp> {
        let mut qmp = Qmp {
            reader: BufReader::new(reader),
            writer,
            next_id: 1,
            peer: peer.to_string(),
        };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            return Err(bad(
                &qmp.peer,
                "no QMP greeting: is this a QEMU monitor socket?",
            ));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `cmd` with `args`; its `return` value, or an error.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let t = std::time::Instant::now();
        let r = self.try_execute(cmd, args);
        if std::env::var_os("BLOCKSNAP_QMP_TRACE").is_some() {
            eprintln!("qmp {cmd}: {:?}", t.elapsed());
        }
        match r? {
            Ok(v) => Ok(v),
            Err(r) => Err(bad(&self.peer, format!("{cmd}: {} ({})", r.desc, r.class))),
        }
    }

    /// Runs `cmd`; QEMU's refusal as a value the caller may expect.
    pub fn try_execute(
        &mut self,
        cmd: &str,
        args: Value,
    ) -> Result<std::result::Result<Value, Refusal>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&json!({"execute": cmd, "arguments": args, "id": id}))
            .map_err(|e| Error::Internal(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| bad(&self.peer, format!("{cmd}: connection lost: {e}")))?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            // A reply to an earlier command whose wait timed out: skipped,
            // so that one slow command does not put every later one out of
            // step.
            if v.get("id")
                .and_then(Value::as_u64)
                .is_some_and(|old| old < id)
            {
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(bad(
                    &self.peer,
                    format!("{cmd}: a reply for another command: {}", short(&v)),
                ));
            }
            if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = v.get("error") {
                let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Ok(Err(Refusal {
                    class: text("class"),
                    desc: text("desc").chars().take(500).collect(),
                }));
            }
            return Err(bad(
                &self.peer,
                format!(
                    "{cmd}: a reply with neither return nor error: {}",
                    short(&v)
                ),
            ));
        }
    }

    fn line(&mut self) -> Result<Value> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .map_err(|e| bad(&self.peer, format!("connection lost: {e}")))?;
        if n == 0 {
            return Err(bad(&self.peer, "QEMU closed the monitor connection"));
        }
        if buf.last() != Some(&b'\n') {
            return Err(bad(&self.peer, "a line longer than 16 MiB or cut off"));
        }
        serde_json::from_slice(&buf)
            .map_err(|e| bad(&self.peer, format!("a line that is not JSON: {e}")))
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(300).collect()
}
