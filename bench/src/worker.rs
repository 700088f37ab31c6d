//! A load-generator worker process (`shardcast-bench worker`, started by
//! the coordinator). It opens its slice of the plan's connections, reports
//! `ready`, waits for `go` with the measurement window, runs, and reports
//! its [`RecorderWire`]. Protocol: one JSON line each way per step, over
//! stdin/stdout.

use std::cell::RefCell;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use crate::clock::{instant_at, now_ns};
use crate::measure::{Recorder, RecorderWire, StreamTracker, Window};
use crate::net::{self, Ws};
use crate::payload::{self, Stamp};
use crate::plan::{Role, Scenario};
use crate::proto::{Conn, Event, Inflater, Proto};
use crate::pusher;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub scenario: Scenario,
    pub proto: Proto,
    pub addr: SocketAddr,
    pub source_ips: u32,
    /// Connection indices `[lo, hi)` this worker owns.
    pub range: (u64, u64),
    pub concurrency: usize,
    pub payload_bytes: usize,
    #[serde(default)]
    pub payload_kind: payload::Kind,
    /// Native protocol: negotiate `shardcast.v1+zstd`.
    #[serde(default)]
    pub zstd: bool,
    /// With `zstd`: a dictionary file and its id, for flag-0x02 frames.
    #[serde(default)]
    pub zstd_dict: Option<(u32, String)>,
    pub setup_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Go {
    /// Publishing starts (warm-up begins).
    pub start_ns: u64,
    /// Measured publications: intended time in the window.
    pub window: Window,
    /// A publisher this far behind its schedule stops trying (the rest of
    /// its window is reported as unsent).
    pub grace_ns: u64,
    /// Everyone stops reading.
    pub stop_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Report {
    Ready {
        opened: u64,
        failed: u64,
        first_error: Option<String>,
        /// Wall time from the worker's start to all connections set up.
        setup_secs: f64,
    },
    Result {
        // Boxed: it is much larger than the other reports.
        recorder: Box<RecorderWire>,
        first_error: Option<String>,
    },
}

fn emit(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(r).expect("serialisable"));
    let _ = out.flush();
}

pub fn main() -> Result<(), String> {
    net::raise_nofile();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let job: Job = serde_json::from_str(&line).map_err(|e| format!("bad job: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(job))
}

struct Live {
    ws: Ws,
    conn: Conn,
    role: Role,
    /// Pusher publishers trigger events over the HTTP API instead.
    http: Option<pusher::HttpPublisher>,
}

struct Shared {
    rec: Recorder,
    first_error: Option<String>,
}

impl Shared {
    fn error(&mut self, e: String) {
        self.rec.counts.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// Counts what the Pusher HTTP API answered: acks, errors, and publish →
/// ack for every answered event.
fn http_outcome(sh: &mut Shared, o: pusher::Outcome) {
    sh.rec.counts.acks += o.acks;
    for (intended, at) in o.answered {
        sh.rec.on_answer(intended, at);
    }
    for e in o.errors {
        sh.error(e);
    }
}

async fn run(job: Job) -> Result<(), String> {
    let t0 = now_ns();
    // The window is not known yet; setup figures do not depend on it.
    let shared = Rc::new(RefCell::new(Shared {
        rec: Recorder::new(Window {
            from_ns: 0,
            to_ns: 0,
        }),
        first_error: None,
    }));
    let live: Rc<RefCell<Vec<Live>>> = Rc::new(RefCell::new(Vec::new()));
    let failed = Rc::new(RefCell::new((0u64, None::<String>)));
    // One decompressor for all of this thread's zstd connections.
    let inflater = if job.zstd {
        let dict = match &job.zstd_dict {
            Some((id, path)) => Some((
                *id,
                std::fs::read(path).map_err(|e| format!("zstd dictionary {path}: {e}"))?,
            )),
            None => None,
        };
        let inf = Inflater::new(
            Conn::max_frame_bytes(),
            dict.as_ref().map(|(id, b)| (*id, b.as_slice())),
        )
        .map_err(|e| format!("zstd: {e}"))?;
        Some(Rc::new(RefCell::new(inf)))
    } else {
        None
    };
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(job.concurrency.max(1)));
    let timeout = Duration::from_millis(job.setup_timeout_ms);
    let mut tasks = Vec::new();
    for i in job.range.0..job.range.1 {
        if failed.borrow().0 > 0 {
            break; // a host limit was hit: report it instead of hammering
        }
        let permit = sem.clone().acquire_owned().await.expect("open semaphore");
        let (job2, shared, live, failed, inflater) = (
            job.clone(),
            shared.clone(),
            live.clone(),
            failed.clone(),
            inflater.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            let start = now_ns();
            match setup_one(&job2, i, timeout, inflater).await {
                Ok(l) => {
                    shared.borrow_mut().rec.on_setup((now_ns() - start) / 1000);
                    live.borrow_mut().push(l);
                }
                Err(e) => {
                    let mut f = failed.borrow_mut();
                    f.0 += 1;
                    f.1.get_or_insert(format!("connection {i}: {e}"));
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let (nfailed, first_error) = failed.borrow().clone();
    emit(&Report::Ready {
        opened: live.borrow().len() as u64,
        failed: nfailed,
        first_error,
        setup_secs: (now_ns() - t0) as f64 / 1e9,
    });
    shared.borrow_mut().rec.counts.setup_errors = nfailed;

    // Wait for `go` without blocking the runtime (connections keep being
    // read, so server pings are answered).
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(line);
    });
    let conns: Vec<Live> = std::mem::take(&mut *live.borrow_mut());
    let go_line = {
        let mut rx = rx;
        let mut conns = conns;
        let line = loop {
            // Poll every connection briefly while waiting.
            let idle = async {
                for c in conns.iter_mut() {
                    while let Some(Some(Ok(m))) = futures_util::FutureExt::now_or_never(c.ws.next())
                    {
                        let _ = m;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            tokio::select! {
                l = &mut rx => break l.map_err(|_| "coordinator went away".to_string())?,
                _ = idle => {}
            }
        };
        (line, conns)
    };
    let (line, conns) = go_line;
    let go: Go = serde_json::from_str(&line).map_err(|e| format!("bad go: {e}"))?;
    shared.borrow_mut().rec.window = go.window;

    // A worker whose connections only publish can afford to spin for exact
    // send times; one that also receives must not block its receivers.
    let precise = conns.iter().all(|c| c.role.subscribe.is_empty());
    let mut tasks = Vec::with_capacity(conns.len());
    for c in conns {
        let shared = shared.clone();
        tasks.push(tokio::task::spawn_local(run_conn(
            c,
            go,
            (job.payload_kind, job.payload_bytes),
            precise,
            shared,
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
    let s = shared.borrow();
    emit(&Report::Result {
        recorder: Box::new(s.rec.to_wire()),
        first_error: s.first_error.clone(),
    });
    Ok(())
}

async fn setup_one(
    job: &Job,
    i: u64,
    timeout: Duration,
    inflater: Option<Rc<RefCell<Inflater>>>,
) -> Result<Live, String> {
    let src = net::source_ip(i, job.source_ips);
    let mut ws = net::open(job.proto, inflater.is_some(), job.addr, src, timeout).await?;
    let role = job.scenario.role(i);
    let mut conn = match inflater {
        Some(inf) => Conn::with_zstd(job.proto, inf),
        None => Conn::new(job.proto),
    };
    let (frames, mut want) = conn.setup(&role.subscribe);
    for f in frames {
        ws.feed(f).await.map_err(|e| format!("send: {e}"))?;
    }
    ws.flush().await.map_err(|e| format!("send: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    while want > 0 {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "no subscribe confirmation in time".to_string())?;
        let m = match m {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("during setup: {e}")),
            None => return Err("closed during setup".into()),
        };
        if let Message::Close(c) = &m {
            return Err(format!("server closed during setup: {c:?}"));
        }
        let mut err = None;
        let mut replies = Vec::new();
        conn.handle(&m, &mut |e| match e {
            Event::Ready => want -= 1,
            Event::Error(s) | Event::Failed(_, s) => err = Some(s),
            Event::Reply(r) => replies.push(r),
            Event::Delivery(_) | Event::Ack(_) => {}
        });
        if let Some(e) = err {
            return Err(format!("server error during setup: {e}"));
        }
        for r in replies {
            ws.send(r).await.map_err(|e| format!("send: {e}"))?;
        }
    }
    let http = if job.proto == Proto::Pusher && role.streams.iter().any(|s| s.rate > 0.0) {
        Some(pusher::HttpPublisher::connect(job.addr, src, timeout).await?)
    } else {
        None
    };
    Ok(Live {
        ws,
        conn,
        role,
        http,
    })
}

struct Sched {
    channel: String,
    subscribers: u64,
    stream: u64,
    first_ns: u64,
    period_ns: f64,
    next_seq: u64,
}

impl Sched {
    fn due(&self, seq: u64) -> u64 {
        self.first_ns + (seq as f64 * self.period_ns) as u64
    }
}

/// Most messages one stream sends per wake-up before reading again.
const SEND_BURST: u32 = 256;

/// How early a precise publisher wakes before its next intended send.
const EARLY_NS: u64 = 1_500_000;

async fn run_conn(
    mut c: Live,
    go: Go,
    (payload_kind, payload_bytes): (payload::Kind, usize),
    precise: bool,
    shared: Rc<RefCell<Shared>>,
) {
    let mut scheds: Vec<Sched> = c
        .role
        .streams
        .iter()
        .filter(|s| s.rate > 0.0)
        .map(|s| Sched {
            channel: s.channel.clone(),
            subscribers: s.subscribers,
            stream: s.id,
            first_ns: go.start_ns + s.phase_ns,
            period_ns: 1e9 / s.rate,
            next_seq: 0,
        })
        .collect();
    let mut tracker = StreamTracker::default();
    // Intended send times of WebSocket publishes not answered yet, by
    // request id.
    let mut unanswered: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    let mut buf = Vec::with_capacity(payload_bytes + 64);
    // Timers are created once and re-armed: registering a fresh timer per
    // received frame costs more than the frame itself.
    let stop = tokio::time::sleep_until(instant_at(go.stop_ns));
    tokio::pin!(stop);
    let pub_timer = tokio::time::sleep_until(instant_at(go.stop_ns));
    tokio::pin!(pub_timer);
    let mut armed_for = u64::MAX;
    let mut publishing = !scheds.is_empty();
    let mut replies: Vec<Message> = Vec::new();
    loop {
        // Next intended send among streams still inside the window.
        let mut next_due = None;
        if publishing {
            next_due = scheds
                .iter()
                .map(|s| s.due(s.next_seq))
                .filter(|&t| t < go.window.to_ns)
                .min();
            match next_due {
                None => publishing = false,
                Some(t) => {
                    let wake = if precise {
                        t.saturating_sub(EARLY_NS)
                    } else {
                        t
                    };
                    if wake != armed_for {
                        pub_timer.as_mut().reset(instant_at(wake));
                        armed_for = wake;
                    }
                }
            }
        }
        tokio::select! {
            biased;
            _ = &mut pub_timer, if publishing => {
                armed_for = u64::MAX; // fired: re-arm next time round
                // tokio's timer has 1 ms granularity and rounds up; a worker
                // without receivers wakes early and spins the rest.
                if precise {
                    let due = next_due.unwrap_or(0);
                    while now_ns() < due {
                        std::hint::spin_loop();
                    }
                }
                let now = now_ns();
                if now > go.window.to_ns + go.grace_ns {
                    publishing = false;
                    continue;
                }
                let mut failed = false;
                for s in scheds.iter_mut() {
                    let mut n = 0;
                    while n < SEND_BURST {
                        let due = s.due(s.next_seq);
                        if due > now || due >= go.window.to_ns {
                            break;
                        }
                        payload::write(payload_kind, Stamp { stream: s.stream, seq: s.next_seq, intended_ns: due }, payload_bytes, &mut buf);
                        let sent = match c.http.as_mut() {
                            Some(h) => {
                                h.queue(&s.channel, &buf, due);
                                true
                            }
                            None => {
                                let sent = c.ws.feed(c.conn.publish(&s.channel, &buf)).await.is_ok();
                                if let (true, Some(id)) = (sent, c.conn.last_publish_id()) {
                                    unanswered.insert(id, due);
                                }
                                sent
                            }
                        };
                        if !sent {
                            failed = true;
                            break;
                        }
                        shared.borrow_mut().rec.on_sent(due, now_ns(), s.subscribers);
                        s.next_seq += 1;
                        n += 1;
                    }
                }
                if let Some(h) = c.http.as_mut() {
                    match h.flush().await {
                        Ok(o) => http_outcome(&mut shared.borrow_mut(), o),
                        Err(e) => {
                            shared.borrow_mut().first_error.get_or_insert(e);
                            failed = true;
                        }
                    }
                }
                if failed || c.ws.flush().await.is_err() {
                    shared.borrow_mut().rec.counts.closed += 1;
                    break;
                }
            }
            m = c.ws.next() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        let mut sh = shared.borrow_mut();
                        sh.rec.counts.closed += 1;
                        sh.first_error.get_or_insert(format!("connection failed: {e}"));
                        break;
                    }
                    None => {
                        shared.borrow_mut().rec.counts.closed += 1;
                        break;
                    }
                };
                let now = now_ns();
                if let Message::Close(f) = &m {
                    let mut sh = shared.borrow_mut();
                    sh.rec.counts.closed += 1;
                    sh.first_error.get_or_insert(format!("server closed the connection: {f:?}"));
                    break;
                }
                {
                    // No RefCell borrow may live across an await: other
                    // connection tasks of this thread use it too.
                    let mut sh = shared.borrow_mut();
                    let sh = &mut *sh;
                    let mut delivered = false;
                    let content = c.conn.handle(&m, &mut |e| match e {
                        Event::Delivery(p) => {
                            delivered = true;
                            sh.rec.on_delivery(payload::decode(p), now, &mut tracker);
                        }
                        Event::Ack(id) => {
                            sh.rec.counts.acks += 1;
                            if let Some(intended) = unanswered.remove(&id) {
                                sh.rec.on_answer(intended, now);
                            }
                        }
                        Event::Failed(id, s) => {
                            if let Some(intended) = unanswered.remove(&id) {
                                sh.rec.on_answer(intended, now);
                            }
                            sh.error(s)
                        }
                        Event::Error(s) => sh.error(s),
                        Event::Reply(r) => replies.push(r),
                        Event::Ready => {}
                    });
                    if delivered {
                        sh.rec.on_frame(now, m.len(), content.unwrap_or(0));
                    }
                }
                if !replies.is_empty() {
                    for r in replies.drain(..) {
                        let _ = c.ws.feed(r).await;
                    }
                    let _ = c.ws.flush().await;
                }
            }
            _ = &mut stop => break,
        }
    }
    // Publications due in the window that were never sent.
    let mut sh = shared.borrow_mut();
    // The HTTP API's answers to the last requests (publishing stopped
    // before they came back).
    if let Some(h) = c.http.as_mut() {
        http_outcome(&mut sh, h.take_outcome());
    }
    for s in &scheds {
        let mut seq = s.next_seq;
        while s.due(seq) < go.window.to_ns {
            if s.due(seq) >= go.window.from_ns {
                sh.rec.counts.unsent += 1;
            }
            seq += 1;
        }
    }
}
