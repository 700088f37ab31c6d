//! Recovery by position on the embedded bus: a client that resubscribes
//! with its last (epoch, offset) gets exactly what it missed, in order, then
//! live publications — or an explicit `recovered = false`.

mod common;

use common::{rss_kib, Client, Server, BULK_PUBLISHER};
use shardcast::protocol::wire::{Position, ServerMessage};

/// Receives `n` publications of `channel` and returns their offsets and
/// payloads.
async fn receive(c: &mut Client, channel: &str, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let (ch, _, offset, payload) = c.publication().await;
        assert_eq!(ch, channel);
        got.push((offset, payload));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_position_gets_exactly_the_missed_then_live() {
    let s = Server::start(&BULK_PUBLISHER);
    let mut publisher = Client::connect(s.addr).await;
    let mut c = Client::connect(s.addr).await;
    c.subscribe("feed").await;
    let first = publisher.publish("feed", b"before").await;
    let (_, epoch, offset, _) = c.publication().await;
    assert_eq!((epoch, offset), (first.epoch, first.offset));
    drop(c);

    for i in 0..100u32 {
        publisher.publish("feed", &i.to_be_bytes()).await;
    }
    let mut c = Client::connect(s.addr).await;
    let (pos, recovered) = c.subscribe_from("feed", Some(first)).await;
    assert!(recovered, "recovery within retention must succeed");
    assert_eq!(pos, first, "position echoes where the client resumes");
    let missed = receive(&mut c, "feed", 100).await;
    for (k, (offset, payload)) in missed.iter().enumerate() {
        assert_eq!(*offset, first.offset + 1 + k as u64);
        assert_eq!(payload, &(k as u32).to_be_bytes());
    }
    // Then live, with no duplicate and no gap.
    for i in 0..5u32 {
        publisher.publish("feed", &(1000 + i).to_be_bytes()).await;
    }
    let live = receive(&mut c, "feed", 5).await;
    let offsets: Vec<u64> = live.iter().map(|x| x.0).collect();
    let base = first.offset + 101;
    assert_eq!(offsets, (base..base + 5).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_while_publishing_has_no_gap_and_no_duplicate() {
    let s = Server::start(&BULK_PUBLISHER);
    // Keep the channel live on both shards while the client recovers.
    let mut keepers = common::clients_on_both_shards(s.addr, 1).await;
    for k in keepers.iter_mut() {
        k.subscribe("busy").await;
    }
    let mut c = Client::connect(s.addr).await;
    let start = c.subscribe("busy").await;
    drop(c);
    let mut publisher = Client::connect(s.addr).await;
    for i in 0..200u32 {
        publisher.publish_nowait("busy", &i.to_be_bytes()).await;
    }
    // Resubscribe while a second burst is in flight.
    let mut c = Client::connect(s.addr).await;
    let burst = tokio::spawn(async move {
        for i in 200..400u32 {
            publisher.publish_nowait("busy", &i.to_be_bytes()).await;
        }
        publisher
    });
    let (_, recovered) = c.subscribe_from("busy", Some(start)).await;
    assert!(recovered);
    let got = receive(&mut c, "busy", 400).await;
    for (k, (offset, payload)) in got.iter().enumerate() {
        assert_eq!(
            *offset,
            start.offset + 1 + k as u64,
            "gap or duplicate at {k}"
        );
        assert_eq!(payload, &(k as u32).to_be_bytes());
    }
    drop(burst.await.unwrap());
}

#[tokio::test]
async fn positions_that_cannot_be_continued_say_so() {
    let s = Server::start(&["--history-size", "10"]);
    let mut publisher = Client::connect(s.addr).await;
    let first = publisher.publish("short", b"0").await;
    for i in 0..50u8 {
        publisher.publish("short", &[i]).await;
    }
    // Trimmed: only the last 10 are kept.
    let mut c = Client::connect(s.addr).await;
    let (pos, recovered) = c.subscribe_from("short", Some(first)).await;
    assert!(!recovered);
    assert_eq!(
        pos.offset,
        first.offset + 50,
        "live continues from the newest"
    );
    // Another epoch.
    let mut d = Client::connect(s.addr).await;
    let wrong = Position::new(first.epoch ^ 0xdead, first.offset);
    let (_, recovered) = d.subscribe_from("short", Some(wrong)).await;
    assert!(!recovered);
    // Nothing missed is a successful recovery with no publications.
    let mut e = Client::connect(s.addr).await;
    let (now, recovered) = e.subscribe_from("short", Some(pos)).await;
    assert!(recovered);
    assert_eq!(now, pos);
    let next = publisher.publish("short", b"next").await;
    let (_, _, offset, _) = e.publication().await;
    assert_eq!(offset, next.offset);
}

/// A position ahead of the shard (the client saw publications elsewhere
/// that have not reached this shard yet) is held until the shard gets
/// there, then recovered with no duplicate (the wiring; the rules,
/// including a position never reached, are tested on simulated time in
/// `shard::state::tests`).
#[tokio::test]
async fn a_position_ahead_of_the_shard_waits_for_it() {
    let s = Server::start(&BULK_PUBLISHER);
    let mut publisher = Client::connect(s.addr).await;
    let base = publisher.publish("ahead", b"base").await;
    let ahead = Position::new(base.epoch, base.offset + 2);
    let mut c = Client::connect(s.addr).await;
    let id = c
        .request(|e, id| e.subscribe(id, "ahead", Some(ahead)))
        .await;
    // Give the shard time to (wrongly) answer before it gets there.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for p in [&b"one"[..], b"two", b"three"] {
        publisher.publish("ahead", p).await;
    }
    match c.reply(id).await {
        ServerMessage::Subscribed {
            position,
            recovered,
            ..
        } => {
            assert!(recovered, "the shard reached the client's position");
            assert_eq!(position, ahead);
        }
        other => panic!("expected Subscribed, got {other:?}"),
    }
    let (_, _, offset, payload) = c.publication().await;
    assert_eq!(
        (offset, payload.as_slice()),
        (base.offset + 3, &b"three"[..])
    );
    let next = publisher.publish("ahead", b"four").await;
    let (_, _, offset, _) = c.publication().await;
    assert_eq!(offset, next.offset, "then live, no duplicate, no gap");
    // A position never reached is answered `recovered = false` after the
    // 5 s wait: `shard::state::tests` shows it on simulated time.
}

/// `history.max_mib` bounds what all channels' history holds together:
/// publishing 64 MB across 200 channels under a 16 MiB bound keeps the
/// server near the bound, and recovery from a dropped position answers
/// `recovered = false`, never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_history_is_bounded_over_all_channels() {
    let s = Server::start(&[
        "--history-max-mib",
        "16",
        "--limits-messages-per-second",
        "100000",
        "--limits-message-burst",
        "100000",
    ]);
    let before = rss_kib(s.pid());
    let mut publishers = Vec::new();
    for _ in 0..4 {
        publishers.push(Client::connect(s.addr).await);
    }
    let payload = vec![b'h'; 16 << 10];
    let mut first = None;
    for round in 0..20 {
        for (k, p) in publishers.iter_mut().enumerate() {
            let mut ids = Vec::new();
            for ch in 0..50 {
                let channel = format!("bounded-{}", k * 50 + ch);
                ids.push(p.publish_nowait(&channel, &payload).await);
            }
            for id in ids {
                match p.reply(id).await {
                    ServerMessage::PublishAck { position, .. } => {
                        if round == 0 && k == 0 {
                            first.get_or_insert(position);
                        }
                    }
                    other => panic!("expected PublishAck, got {other:?}"),
                }
            }
        }
    }
    // 4,000 × 16 KiB = 64 MB published; the bound is 16 MiB.
    let grown = rss_kib(s.pid()).saturating_sub(before);
    eprintln!("RSS grew {grown} KiB under a 16 MiB history bound");
    assert!(
        grown < 40 << 10,
        "server RSS grew {grown} KiB holding history under a 16 MiB bound"
    );
    // The first channel's first publication was among the oldest: gone.
    let first = first.unwrap();
    let mut c = Client::connect(s.addr).await;
    let (at, recovered) = c
        .subscribe_from(
            "bounded-0",
            Some(Position {
                epoch: first.epoch,
                offset: first.offset - 1,
            }),
        )
        .await;
    assert!(!recovered, "recovered from an evicted position");
    assert_eq!(at.offset, first.offset + 19);
}
