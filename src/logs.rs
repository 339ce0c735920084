//! Application logs (the seed's section 2.4): what Cloud Foundry's syslog agent sends to a
//! binding's drain, kept per instance in the state store so every broker process shows the
//! same lines.
//!
//! A message is parsed ([`parse`]) and queued in memory per instance ([`Logs::accept`],
//! no I/O, so a flood never waits on the store and never slows an OSB call); a flusher
//! writes each instance's queue once per interval as one compare-and-swap of its
//! [`Book`]. The book is bounded by its plan's lines and bytes: past them, the oldest
//! lines of the app holding the most lines go first (a flooding app loses its own lines,
//! not its neighbours'), and every dropped line is counted for its app.

pub mod read;
pub mod syslog;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::records;
use crate::store::{BindingRecord, Insert, Link, StateStore, StoreError, Table};

/// One log line as shown: where it came from and what it said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Position in the instance's log, from 1; `brokerage logs --follow` asks for what
    /// follows the last one it printed.
    pub seq: u64,
    /// The message's timestamp (RFC 3339), or when it arrived.
    pub at: String,
    /// The app: its GUID (APP-NAME) and, where given, `org.space.app` (HOSTNAME).
    pub app: String,
    #[serde(default)]
    pub host: String,
    /// The process: `APP/PROC/WEB/0`, `RTR/0`, `STG/0`, ...
    pub process: String,
    pub text: String,
}

impl Line {
    fn bytes(&self) -> u64 {
        (self.text.len() + self.app.len() + self.host.len() + self.process.len() + 40) as u64
    }
}

/// How much of an instance's log is kept (the plan's `max_log_lines`, `max_log_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub lines: u64,
    pub bytes: u64,
}

/// An instance's log as stored: the recent lines, oldest first, and what was dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Book {
    pub retention: Retention,
    pub next_seq: u64,
    pub lines: VecDeque<Line>,
    /// Lines dropped to stay within the retention, by app.
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
}

impl Book {
    pub fn new(retention: Retention) -> Self {
        Book {
            retention,
            next_seq: 1,
            lines: VecDeque::new(),
            dropped: BTreeMap::new(),
        }
    }

    /// Appends lines (numbering them) and trims to the retention.
    fn append(&mut self, lines: impl IntoIterator<Item = Line>) {
        for mut line in lines {
            line.seq = self.next_seq;
            self.next_seq += 1;
            self.lines.push_back(line);
        }
        trim(&mut self.lines, self.retention, &mut self.dropped);
    }
}

/// Drops lines until `lines` is within `retention`: each time the oldest line of the app
/// that holds the most, so one app's flood costs that app only.
fn trim(lines: &mut VecDeque<Line>, retention: Retention, dropped: &mut BTreeMap<String, u64>) {
    // Counted only where bytes are bounded: the queues bound lines alone, and summing a
    // queue on every accept would cost a flood its length each time.
    let mut total_bytes: u64 = match retention.bytes {
        u64::MAX => 0,
        _ => lines.iter().map(Line::bytes).sum(),
    };
    let mut total_lines = lines.len() as u64;
    if total_lines <= retention.lines && total_bytes <= retention.bytes {
        return;
    }
    let mut by_app: HashMap<&str, VecDeque<usize>> = HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        by_app.entry(line.app.as_str()).or_default().push_back(i);
    }
    let mut gone = vec![false; lines.len()];
    while total_lines > retention.lines || total_bytes > retention.bytes {
        let Some((_, queue)) = by_app.iter_mut().max_by_key(|(app, q)| (q.len(), *app)) else {
            break;
        };
        let Some(i) = queue.pop_front() else { break };
        gone[i] = true;
        total_lines -= 1;
        total_bytes = total_bytes.saturating_sub(lines[i].bytes());
    }
    let mut i = 0;
    lines.retain(|line| {
        let drop = gone[i];
        i += 1;
        if drop {
            *dropped.entry(line.app.clone()).or_default() += 1;
        }
        !drop
    });
}

/// One RFC 5424 message, as Cloud Foundry's agent and `logger --rfc5424` write it:
/// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG`.
pub fn parse(message: &[u8]) -> Option<Line> {
    let text = String::from_utf8_lossy(message);
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    let rest = text.strip_prefix('<')?;
    let (pri, rest) = rest.split_once('>')?;
    if pri.is_empty() || pri.len() > 3 || !pri.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut fields = rest.splitn(7, ' ');
    let version = fields.next()?;
    if version != "1" {
        return None;
    }
    let nil = |s: &str| {
        if s == "-" {
            String::new()
        } else {
            s.to_string()
        }
    };
    let at = fields.next().map(nil)?;
    let host = fields.next().map(nil)?;
    let app = fields.next().map(nil)?;
    let process = fields.next().map(nil)?;
    let _msgid = fields.next()?;
    let rest = fields.next().unwrap_or("");
    let message = skip_structured_data(rest)?;
    let message = message.strip_prefix('\u{feff}').unwrap_or(message);
    let process = process
        .strip_prefix('[')
        .and_then(|p| p.strip_suffix(']'))
        .map(str::to_string)
        .unwrap_or(process);
    Some(Line {
        seq: 0,
        at: if at.is_empty() {
            chrono::Utc::now().to_rfc3339()
        } else {
            at
        },
        app,
        host,
        process,
        text: message.chars().take(16 * 1024).collect(),
    })
}

/// The MSG after STRUCTURED-DATA (`-` or `[id k="v" ...]...`, where `\]` and `\"` are
/// escaped inside values).
fn skip_structured_data(rest: &str) -> Option<&str> {
    if let Some(after) = rest.strip_prefix('-') {
        return Some(after.strip_prefix(' ').unwrap_or(after));
    }
    if rest.is_empty() {
        return Some("");
    }
    let bytes = rest.as_bytes();
    let mut i = 0;
    while i < bytes.len() && bytes[i] == b'[' {
        let mut quoted = false;
        i += 1;
        loop {
            match bytes.get(i)? {
                b'\\' => i += 1,
                b'"' => quoted = !quoted,
                b']' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
        i += 1;
    }
    let after = &rest[i..];
    Some(after.strip_prefix(' ').unwrap_or(after))
}

/// Splits a drain body into messages: RFC 6587 octet counting (`LEN SP MSG`, as
/// `https-batch` drains and syslog over TCP send), else one message per body.
pub fn frames(body: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let framed = digits > 0 && digits <= 7 && rest.get(digits) == Some(&b' ');
        if !framed {
            break;
        }
        let len: usize = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(usize::MAX);
        let start = digits + 1;
        let Some(message) = rest.get(start..start.saturating_add(len)) else {
            break;
        };
        out.push(message);
        rest = &rest[start + len..];
        while rest.first().is_some_and(|b| b.is_ascii_whitespace()) {
            rest = &rest[1..];
        }
    }
    if out.is_empty() && !body.is_empty() {
        out.push(body);
    }
    out
}

/// Where a binding's drain delivers: its instance. Kept under `app:<guid>` for the
/// syslog listener, which knows a message's app only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct AppTargets {
    /// (instance id, binding id) of each log binding of the app.
    targets: Vec<(String, String)>,
}

fn app_key(app_guid: &str) -> String {
    format!("app:{app_guid}")
}

/// What [`Logs::change`] does with a document.
enum Change<T> {
    Keep,
    Put(T),
    Delete,
}

/// The lines waiting for the next flush, per instance.
#[derive(Default)]
struct Pending {
    lines: VecDeque<Line>,
    dropped: BTreeMap<String, u64>,
}

/// The log service's shared part: the queues, the flusher, and the books in the store.
pub struct Logs {
    store: Arc<dyn StateStore>,
    pending: Mutex<HashMap<String, Pending>>,
    /// The most lines one instance may have waiting; past it the same trimming applies.
    max_pending_lines: u64,
    /// The app → instances map the syslog listener reads, cached briefly.
    apps: moka::future::Cache<String, Arc<AppTargets>>,
    /// binding id → (its drain token, its instance), or `None` for no live log binding;
    /// cached for a second, dropped here at once when this process unbinds.
    drains: moka::future::Cache<String, Option<Arc<(String, String)>>>,
}

impl Logs {
    pub fn new(store: Arc<dyn StateStore>, max_pending_lines: u64) -> Arc<Self> {
        Arc::new(Logs {
            store,
            pending: Mutex::new(HashMap::new()),
            max_pending_lines,
            apps: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(1))
                .build(),
            drains: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(1))
                .build(),
        })
    }

    /// A drain POST: queues the messages in `body` for the binding's instance when `token`
    /// is the binding's (compared in constant time). `Ok(None)`: no such live drain.
    pub async fn deliver(
        &self,
        binding_id: &str,
        token: &str,
        body: &[u8],
    ) -> Result<Option<usize>, StoreError> {
        use subtle::ConstantTimeEq;
        let store = self.store.clone();
        let id = binding_id.to_string();
        let found = self
            .drains
            .try_get_with(id.clone(), async move {
                let stored = records::load::<BindingRecord>(&*store, &id).await?;
                Ok::<_, StoreError>(stored.and_then(|s| {
                    let r = s.record;
                    if r.operation.kind.deletes() {
                        return None;
                    }
                    Some(Arc::new((r.drain?.token, r.instance_id)))
                }))
            })
            .await
            .map_err(|e: Arc<StoreError>| StoreError::Unavailable(e.to_string()))?;
        let Some(found) = found else { return Ok(None) };
        let (expected, instance_id) = &*found;
        if !bool::from(expected.as_bytes().ct_eq(token.as_bytes())) {
            return Ok(None);
        }
        let lines: Vec<Line> = frames(body).into_iter().filter_map(parse).collect();
        let n = lines.len();
        self.accept(instance_id, lines);
        Ok(Some(n))
    }

    /// Forgets a binding's drain in this process at once (other processes within a second).
    pub async fn revoke(&self, binding_id: &str) {
        self.drains.invalidate(binding_id).await;
    }

    /// Queues lines for an instance; never waits on the store.
    pub fn accept(&self, instance_id: &str, lines: Vec<Line>) {
        if lines.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().expect("log queue");
        let queue = pending.entry(instance_id.to_string()).or_default();
        queue.lines.extend(lines);
        let cap = Retention {
            lines: self.max_pending_lines,
            bytes: u64::MAX,
        };
        trim(&mut queue.lines, cap, &mut queue.dropped);
    }

    /// Writes every queue to its book: one compare-and-swap per instance with lines waiting.
    /// Lines for an instance with no book (deprovisioned meanwhile) are discarded.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let taken = std::mem::take(&mut *self.pending.lock().expect("log queue"));
        let mut first_error = None;
        for (instance_id, queue) in taken {
            if let Err(e) = self.write(&instance_id, queue).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Appends a queue to its book; lines for an instance with no book are discarded.
    async fn write(&self, instance_id: &str, queue: Pending) -> Result<(), StoreError> {
        self.change(instance_id, |book: Option<Book>| {
            let Some(mut book) = book else {
                return Change::Keep;
            };
            for (app, n) in &queue.dropped {
                *book.dropped.entry(app.clone()).or_default() += n;
            }
            book.append(queue.lines.iter().cloned());
            Change::Put(book)
        })
        .await
    }

    /// Runs [`Logs::flush`] every `every` until `stop`, and once more after it.
    pub fn spawn_flusher(
        self: &Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let logs = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                if let Err(e) = logs.flush().await {
                    tracing::warn!(error = %e, "log lines could not be written; they are dropped");
                }
            }
            let _ = logs.flush().await;
        })
    }

    /// Starts an instance's book, or sets its retention if it has one.
    pub async fn open_book(
        &self,
        instance_id: &str,
        retention: Retention,
    ) -> Result<(), StoreError> {
        self.change(instance_id, |book: Option<Book>| match book {
            None => Change::Put(Book::new(retention)),
            Some(book) if book.retention == retention => Change::Keep,
            Some(mut book) => {
                book.retention = retention;
                book.append([]);
                Change::Put(book)
            }
        })
        .await
    }

    /// Deletes an instance's book and whatever is queued for it.
    pub async fn delete_book(&self, instance_id: &str) -> Result<(), StoreError> {
        self.pending.lock().expect("log queue").remove(instance_id);
        self.change(instance_id, |_: Option<Book>| Change::Delete)
            .await
    }

    /// The instance's book, or `None` when it has none.
    pub async fn book(&self, instance_id: &str) -> Result<Option<Book>, StoreError> {
        match self.store.get(Table::Logs, instance_id).await? {
            Some(stored) => Ok(Some(decode(instance_id, &stored.doc)?)),
            None => Ok(None),
        }
    }

    /// Notes that `app_guid`'s messages on the syslog listener go to `instance_id` too.
    pub async fn add_app(
        &self,
        app_guid: &str,
        instance_id: &str,
        binding_id: &str,
    ) -> Result<(), StoreError> {
        let key = app_key(app_guid);
        let target = (instance_id.to_string(), binding_id.to_string());
        self.change(&key, |apps: Option<AppTargets>| {
            let mut apps = apps.unwrap_or_default();
            if apps.targets.contains(&target) {
                return Change::Keep;
            }
            apps.targets.push(target.clone());
            Change::Put(apps)
        })
        .await?;
        self.apps.invalidate(&key).await;
        Ok(())
    }

    /// Stops delivering `app_guid`'s syslog messages for this binding.
    pub async fn remove_app(&self, app_guid: &str, binding_id: &str) -> Result<(), StoreError> {
        let key = app_key(app_guid);
        self.change(&key, |apps: Option<AppTargets>| {
            let Some(mut apps) = apps else {
                return Change::Keep;
            };
            apps.targets.retain(|(_, b)| b != binding_id);
            match apps.targets.is_empty() {
                true => Change::Delete,
                false => Change::Put(apps),
            }
        })
        .await?;
        self.apps.invalidate(&key).await;
        Ok(())
    }

    /// The one read-modify-write of a document in the logs table: `f` sees it (or `None`)
    /// and says what becomes of it; a change lost to another writer is tried again on what
    /// that writer left, at most 20 times.
    async fn change<T, F>(&self, key: &str, mut f: F) -> Result<(), StoreError>
    where
        T: Serialize + for<'de> Deserialize<'de>,
        F: FnMut(Option<T>) -> Change<T>,
    {
        for _ in 0..20 {
            let stored = self.store.get(Table::Logs, key).await?;
            let current = match &stored {
                Some(s) => Some(decode::<T>(key, &s.doc)?),
                None => None,
            };
            let done = match (f(current), stored) {
                (Change::Keep, _) | (Change::Delete, None) => true,
                (Change::Put(doc), None) => matches!(
                    self.store
                        .insert(Table::Logs, key, Link::None, &encode(&doc))
                        .await?,
                    Insert::Inserted
                ),
                (Change::Put(doc), Some(s)) => {
                    self.store
                        .replace(Table::Logs, key, s.version, &encode(&doc))
                        .await?
                }
                (Change::Delete, Some(s)) => self.store.remove(Table::Logs, key, s.version).await?,
            };
            if done {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(format!(
            "{key} in the logs table kept changing under 20 attempts"
        )))
    }

    /// Queues syslog messages (already parsed) by their app: every instance bound to it.
    pub async fn accept_by_app(&self, lines: Vec<Line>) -> Result<(), StoreError> {
        let mut by_app: HashMap<String, Vec<Line>> = HashMap::new();
        for line in lines {
            by_app.entry(line.app.clone()).or_default().push(line);
        }
        for (app, lines) in by_app {
            let key = app_key(&app);
            let store = self.store.clone();
            let targets = self
                .apps
                .try_get_with(key.clone(), async move {
                    let found = match store.get(Table::Logs, &key).await? {
                        Some(stored) => decode::<AppTargets>(&key, &stored.doc)?,
                        None => AppTargets::default(),
                    };
                    Ok::<_, StoreError>(Arc::new(found))
                })
                .await
                .map_err(|e: Arc<StoreError>| StoreError::Unavailable(e.to_string()))?;
            let mut instances: Vec<&str> =
                targets.targets.iter().map(|(i, _)| i.as_str()).collect();
            instances.sort_unstable();
            instances.dedup();
            for instance in instances {
                self.accept(instance, lines.clone());
            }
        }
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("log documents serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(id: &str, doc: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(doc).map_err(|e| StoreError::Corrupt {
        table: Table::Logs.name(),
        id: id.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(app: &str, text: &str) -> Line {
        Line {
            seq: 0,
            at: "t".into(),
            app: app.into(),
            host: String::new(),
            process: "APP/PROC/WEB/0".into(),
            text: text.into(),
        }
    }

    #[test]
    fn a_cloud_foundry_message_yields_app_process_and_text() {
        let m = b"<14>1 2017-10-05T15:00:55.432180389Z org.space.app 3e0b1150-6e4c-4b3c-a1ba-3f6cc7b3a7c5 [APP/PROC/WEB/0] - - hello world\n";
        let l = parse(m).unwrap();
        assert_eq!(l.app, "3e0b1150-6e4c-4b3c-a1ba-3f6cc7b3a7c5");
        assert_eq!(l.host, "org.space.app");
        assert_eq!(l.process, "APP/PROC/WEB/0");
        assert_eq!(l.text, "hello world");
        assert_eq!(l.at, "2017-10-05T15:00:55.432180389Z");
        let sd = br#"<14>1 - host app 42 - [timeQuality tzKnown="1" x="a\]b"][y z="1"] the text"#;
        let l = parse(sd).unwrap();
        assert_eq!((l.process.as_str(), l.text.as_str()), ("42", "the text"));
        assert!(parse(b"hello").is_none());
        assert!(parse(b"<14>2 - - - - - -").is_none());
    }

    #[test]
    fn octet_counted_frames_split_and_a_plain_body_is_one_message() {
        assert_eq!(frames(b"5 hello3 abc"), vec![&b"hello"[..], b"abc"]);
        assert_eq!(frames(b"<14>1 x"), vec![&b"<14>1 x"[..]]);
        assert_eq!(frames(b"9 short"), vec![&b"9 short"[..]]);
    }

    #[test]
    fn a_flood_costs_the_flooding_app_its_oldest_lines_and_is_counted() {
        let mut book = Book::new(Retention {
            lines: 10,
            bytes: u64::MAX,
        });
        book.append((0..3).map(|i| line("quiet", &format!("q{i}"))));
        book.append((0..100).map(|i| line("loud", &format!("l{i}"))));
        assert_eq!(book.lines.len(), 10);
        let quiet: Vec<_> = book.lines.iter().filter(|l| l.app == "quiet").collect();
        assert_eq!(quiet.len(), 3);
        assert_eq!(book.lines.back().unwrap().text, "l99");
        assert_eq!(
            book.lines.iter().find(|l| l.app == "loud").unwrap().text,
            "l93"
        );
        assert_eq!(book.dropped.get("loud"), Some(&93));
        assert_eq!(book.dropped.get("quiet"), None);
        assert_eq!(book.next_seq, 104);
        let mut small = book.clone();
        small.retention.bytes = 200;
        small.append([]);
        assert!(small.lines.iter().map(Line::bytes).sum::<u64>() <= 200);
    }
}
