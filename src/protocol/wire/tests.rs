use flatbuffers::{FlatBufferBuilder, InvalidFlatbuffer};

use super::*;

fn lim() -> DecodeLimits {
    DecodeLimits::default()
}

fn client_roundtrip(frame: &[u8]) -> Vec<(u32, ClientRequest<'_>)> {
    decode_client_frame(frame, &lim()).expect("valid client frame")
}

fn server_roundtrip(frame: &[u8]) -> Vec<(u32, ServerMessage)> {
    decode_server_frame(frame, &lim()).expect("valid server frame")
}

/// Body type of the single message of a frame (checked through the verifier).
fn body_type(frame: &[u8]) -> fb::Body {
    let f = fb::root_as_frame(frame).unwrap();
    let msgs = f.messages().unwrap();
    assert_eq!(msgs.len(), 1);
    msgs.get(0).body_type()
}

/// Deterministic pseudo-random bytes (xorshift64*), no dependency needed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ------------------------------------------------------------ client -> server

#[test]
fn client_requests_round_trip() {
    let mut c = ClientEncoder::new();
    let p = Position::new(7, 41);

    assert_eq!(
        client_roundtrip(&c.connect(1, Some("tok.en"))),
        vec![(
            1,
            ClientRequest::Connect {
                token: Some("tok.en")
            }
        )]
    );
    assert_eq!(
        client_roundtrip(&c.connect(0, None)),
        vec![(0, ClientRequest::Connect { token: None })]
    );
    assert_eq!(
        client_roundtrip(&c.subscribe(2, "chat:room-1", Some(p))),
        vec![(
            2,
            ClientRequest::Subscribe {
                channel: "chat:room-1",
                recover: Some(p)
            }
        )]
    );
    assert_eq!(
        client_roundtrip(&c.subscribe(3, "metrics", None)),
        vec![(
            3,
            ClientRequest::Subscribe {
                channel: "metrics",
                recover: None
            }
        )]
    );
    assert_eq!(
        client_roundtrip(&c.unsubscribe(u32::MAX, "metrics")),
        vec![(u32::MAX, ClientRequest::Unsubscribe { channel: "metrics" })]
    );
    assert_eq!(
        client_roundtrip(&c.publish(5, "chat:room-1", b"hello \x00\xff", Some("k-1"))),
        vec![(
            5,
            ClientRequest::Publish {
                channel: "chat:room-1",
                payload: b"hello \x00\xff",
                idempotency_key: Some("k-1")
            }
        )]
    );
    assert_eq!(
        client_roundtrip(&c.publish(6, "c", b"", None)),
        vec![(
            6,
            ClientRequest::Publish {
                channel: "c",
                payload: b"",
                idempotency_key: None
            }
        )]
    );
    assert_eq!(client_roundtrip(&c.ping(9)), vec![(9, ClientRequest::Ping)]);
    assert_eq!(
        client_roundtrip(&c.presence_query(10, "presence-lobby")),
        vec![(
            10,
            ClientRequest::PresenceQuery {
                channel: "presence-lobby"
            }
        )]
    );
}

#[test]
fn client_frame_with_several_requests_keeps_order() {
    let mut c = ClientEncoder::new();
    let reqs = [
        (1, ClientRequest::Connect { token: Some("t") }),
        (
            2,
            ClientRequest::Subscribe {
                channel: "a",
                recover: Some(Position::new(1, 2)),
            },
        ),
        (
            3,
            ClientRequest::Publish {
                channel: "a",
                payload: &[1, 2, 3],
                idempotency_key: None,
            },
        ),
        (4, ClientRequest::Unsubscribe { channel: "a" }),
        (0, ClientRequest::Ping),
        (5, ClientRequest::PresenceQuery { channel: "p" }),
    ];
    let frame = c.frame(&reqs);
    assert_eq!(client_roundtrip(&frame), reqs.to_vec());
}

#[test]
fn absent_publish_payload_decodes_as_empty() {
    let mut fbb = FlatBufferBuilder::new();
    let ch = fbb.create_string("c");
    let p = fb::Publish::create(
        &mut fbb,
        &fb::PublishArgs {
            channel: Some(ch),
            payload: None,
            idempotency_key: None,
        },
    );
    let frame = raw_frame(
        &mut fbb,
        &[(1, fb::Body::Publish, Some(p.as_union_value()))],
    );
    assert_eq!(
        client_roundtrip(&frame),
        vec![(
            1,
            ClientRequest::Publish {
                channel: "c",
                payload: b"",
                idempotency_key: None
            }
        )]
    );
}

// ------------------------------------------------------------ server -> client

#[test]
fn server_messages_round_trip() {
    let mut e = Encoder::new();
    let p = Position::new(3, 99);

    assert_eq!(
        server_roundtrip(e.connected(1, 12345, 3, 1_700_000_000_000)),
        vec![(
            1,
            ServerMessage::Connected {
                client_id: 12345,
                shard: 3,
                server_time_ms: 1_700_000_000_000
            }
        )]
    );
    assert_eq!(
        server_roundtrip(e.subscribed(2, "chat:r", p, true)),
        vec![(
            2,
            ServerMessage::Subscribed {
                channel: "chat:r".into(),
                position: p,
                recovered: true
            }
        )]
    );
    assert_eq!(
        server_roundtrip(e.subscribed(2, "chat:r", Position::default(), false)),
        vec![(
            2,
            ServerMessage::Subscribed {
                channel: "chat:r".into(),
                position: Position::default(),
                recovered: false
            }
        )]
    );
    assert_eq!(
        server_roundtrip(e.unsubscribed(3, "chat:r")),
        vec![(
            3,
            ServerMessage::Unsubscribed {
                channel: "chat:r".into()
            }
        )]
    );
    assert_eq!(
        server_roundtrip(e.publish_ack(4, "chat:r", p)),
        vec![(
            4,
            ServerMessage::PublishAck {
                channel: "chat:r".into(),
                position: p
            }
        )]
    );
    for code in ErrorCode::ALL {
        assert_eq!(
            server_roundtrip(e.error(5, code, "why")),
            vec![(
                5,
                ServerMessage::Error {
                    code: code.as_u16(),
                    message: "why".into()
                }
            )]
        );
    }
    assert_eq!(server_roundtrip(e.pong(6)), vec![(6, ServerMessage::Pong)]);
    for joined in [true, false] {
        assert_eq!(
            server_roundtrip(e.presence_event("presence-r", "u-1", joined)),
            vec![(
                0,
                ServerMessage::PresenceEvent {
                    channel: "presence-r".into(),
                    user: "u-1".into(),
                    joined
                }
            )]
        );
    }
    assert_eq!(
        server_roundtrip(e.presence_members(7, "presence-r", ["alice", "bob", ""])),
        vec![(
            7,
            ServerMessage::PresenceMembers {
                channel: "presence-r".into(),
                users: vec!["alice".into(), "bob".into(), String::new()]
            }
        )]
    );
    assert_eq!(
        server_roundtrip(e.presence_members(8, "presence-r", [])),
        vec![(
            8,
            ServerMessage::PresenceMembers {
                channel: "presence-r".into(),
                users: Vec::new()
            }
        )]
    );

    let one = e.publications("chat:r", 3, [(100u64, 5u64, &b"x"[..])].into_iter());
    assert_eq!(body_type(one), fb::Body::Publication);
    assert_eq!(
        server_roundtrip(one),
        vec![(
            0,
            ServerMessage::Publication {
                channel: "chat:r".into(),
                epoch: 3,
                offset: 100,
                timestamp_ms: 5,
                payload: b"x".to_vec()
            }
        )]
    );
}

#[test]
fn batch_flattens_in_order() {
    let mut e = Encoder::new();
    let payloads: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; i as usize]).collect();
    let items = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| (1000 + i as u64, 77 + i as u64, p.as_slice()));
    let frame = e.publications("dash", 9, items);
    assert_eq!(body_type(frame), fb::Body::PublicationBatch);
    let got = server_roundtrip(frame);
    assert_eq!(got.len(), 50);
    for (i, (id, m)) in got.into_iter().enumerate() {
        assert_eq!(id, 0);
        assert_eq!(
            m,
            ServerMessage::Publication {
                channel: "dash".into(),
                epoch: 9,
                offset: 1000 + i as u64,
                timestamp_ms: 77 + i as u64,
                payload: payloads[i].clone(),
            }
        );
    }
}

#[test]
fn batch_items_count_against_max_messages() {
    let mut e = Encoder::new();
    let items = (0..10usize).map(|i| (i as u64, 0, &b"p"[..]));
    let frame = e.publications("c", 1, items).to_vec();
    let tight = DecodeLimits {
        max_messages: 9,
        ..lim()
    };
    assert!(matches!(
        decode_server_frame(&frame, &tight),
        Err(WireError::TooManyMessages)
    ));
    let ok = DecodeLimits {
        max_messages: 10,
        ..lim()
    };
    assert_eq!(decode_server_frame(&frame, &ok).unwrap().len(), 10);
}

#[test]
fn server_frame_with_several_messages_keeps_order() {
    let mut e = Encoder::new();
    let msgs = vec![
        (
            1,
            ServerMessage::Connected {
                client_id: 1,
                shard: 0,
                server_time_ms: 2,
            },
        ),
        (
            2,
            ServerMessage::Subscribed {
                channel: "a".into(),
                position: Position::new(1, 5),
                recovered: true,
            },
        ),
        (
            0,
            ServerMessage::Publication {
                channel: "a".into(),
                epoch: 1,
                offset: 6,
                timestamp_ms: 3,
                payload: vec![1, 2],
            },
        ),
        (
            3,
            ServerMessage::Error {
                code: 999, // unknown to this build: survives as a raw value
                message: String::new(),
            },
        ),
        (
            4,
            ServerMessage::PublishAck {
                channel: "a".into(),
                position: Position::new(1, 7),
            },
        ),
        (
            5,
            ServerMessage::Unsubscribed {
                channel: "a".into(),
            },
        ),
        (6, ServerMessage::Pong),
        (
            0,
            ServerMessage::PresenceEvent {
                channel: "presence-a".into(),
                user: "u".into(),
                joined: true,
            },
        ),
        (
            7,
            ServerMessage::PresenceMembers {
                channel: "presence-a".into(),
                users: vec!["u".into(), "v".into()],
            },
        ),
    ];
    assert_eq!(server_roundtrip(e.frame(&msgs)), msgs);
}

#[test]
fn error_code_default_and_absent_fields() {
    // An Error whose code equals the schema default is stored without the
    // field; it must still read back as Internal (10).
    let mut e = Encoder::new();
    assert_eq!(
        server_roundtrip(e.error(0, ErrorCode::Internal, "")),
        vec![(
            0,
            ServerMessage::Error {
                code: 10,
                message: String::new()
            }
        )]
    );
    // PublishAck without channel decodes with an empty channel.
    let mut fbb = FlatBufferBuilder::new();
    let pos = fb::Position::new(1, 2);
    let ack = fb::PublishAck::create(
        &mut fbb,
        &fb::PublishAckArgs {
            channel: None,
            position: Some(&pos),
        },
    );
    let frame = raw_frame(
        &mut fbb,
        &[(8, fb::Body::PublishAck, Some(ack.as_union_value()))],
    );
    assert_eq!(
        server_roundtrip(&frame),
        vec![(
            8,
            ServerMessage::PublishAck {
                channel: String::new(),
                position: Position::new(1, 2)
            }
        )]
    );
}

#[test]
fn error_code_mirror_matches_schema() {
    assert_eq!(ErrorCode::ALL.len(), fb::ErrorCode::ENUM_VALUES.len());
    for (mine, gen) in ErrorCode::ALL.iter().zip(fb::ErrorCode::ENUM_VALUES) {
        assert_eq!(mine.as_u16(), gen.0);
        assert_eq!(Some(mine.name()), gen.variant_name());
        assert_eq!(ErrorCode::from_u16(gen.0), Some(*mine));
        assert_eq!(mine.to_string(), mine.name());
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    assert_eq!(ErrorCode::from_u16(12), None);
}

// ------------------------------------------------------------ direction

#[test]
fn server_message_sent_by_client_is_unexpected() {
    let mut e = Encoder::new();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (e.connected(1, 1, 1, 1).to_vec(), "Connected"),
        (
            e.subscribed(1, "a", Position::default(), false).to_vec(),
            "Subscribed",
        ),
        (e.unsubscribed(1, "a").to_vec(), "Unsubscribed"),
        (
            e.publications("a", 1, [(1, 1, &b""[..])].into_iter())
                .to_vec(),
            "Publication",
        ),
        (
            e.publications("a", 1, [(1, 1, &b""[..]), (2, 1, &b""[..])].into_iter())
                .to_vec(),
            "PublicationBatch",
        ),
        (
            e.publish_ack(1, "a", Position::default()).to_vec(),
            "PublishAck",
        ),
        (e.error(1, ErrorCode::BadRequest, "x").to_vec(), "Error"),
        (e.pong(1).to_vec(), "Pong"),
        (
            e.presence_event("presence-a", "u", true).to_vec(),
            "PresenceEvent",
        ),
        (
            e.presence_members(1, "presence-a", ["u"]).to_vec(),
            "PresenceMembers",
        ),
    ];
    for (frame, name) in cases {
        match decode_client_frame(&frame, &lim()) {
            Err(WireError::UnexpectedMessage(n)) => assert_eq!(n, name),
            other => panic!("{name}: expected UnexpectedMessage, got {other:?}"),
        }
    }
}

#[test]
fn client_message_in_server_frame_is_unexpected() {
    let mut c = ClientEncoder::new();
    let cases = [
        (c.connect(1, None), "Connect"),
        (c.subscribe(1, "a", None), "Subscribe"),
        (c.unsubscribe(1, "a"), "Unsubscribe"),
        (c.publish(1, "a", b"", None), "Publish"),
        (c.ping(1), "Ping"),
        (c.presence_query(1, "presence-a"), "PresenceQuery"),
    ];
    for (frame, name) in cases {
        match decode_server_frame(&frame, &lim()) {
            Err(WireError::UnexpectedMessage(n)) => assert_eq!(n, name),
            other => panic!("{name}: expected UnexpectedMessage, got {other:?}"),
        }
    }
}

#[test]
fn one_bad_message_rejects_the_whole_frame() {
    // A valid Ping followed by a server-only Pong: nothing is returned.
    let mut fbb = FlatBufferBuilder::new();
    let ping = fb::Ping::create(&mut fbb, &fb::PingArgs {});
    let pong = fb::Pong::create(&mut fbb, &fb::PongArgs {});
    let frame = raw_frame(
        &mut fbb,
        &[
            (1, fb::Body::Ping, Some(ping.as_union_value())),
            (2, fb::Body::Pong, Some(pong.as_union_value())),
        ],
    );
    assert!(matches!(
        decode_client_frame(&frame, &lim()),
        Err(WireError::UnexpectedMessage("Pong"))
    ));
}

// ------------------------------------------------------------ malformed input

/// Build a frame from raw (id, body type, body) triples, bypassing the
/// encoders so tests can produce frames they never would.
fn raw_frame(
    fbb: &mut FlatBufferBuilder<'static>,
    msgs: &[(
        u32,
        fb::Body,
        Option<flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>>,
    )],
) -> Vec<u8> {
    let offsets: Vec<_> = msgs
        .iter()
        .map(|&(id, body_type, body)| {
            fb::Message::create(
                fbb,
                &fb::MessageArgs {
                    id,
                    body_type,
                    body,
                },
            )
        })
        .collect();
    let v = fbb.create_vector(&offsets);
    let f = fb::Frame::create(fbb, &fb::FrameArgs { messages: Some(v) });
    fb::finish_frame_buffer(fbb, f);
    fbb.finished_data().to_vec()
}

fn decode_both(buf: &[u8]) -> (Result<usize, WireError>, Result<usize, WireError>) {
    (
        decode_client_frame(buf, &lim()).map(|v| v.len()),
        decode_server_frame(buf, &lim()).map(|v| v.len()),
    )
}

#[test]
fn garbage_never_panics() {
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    for len in 0..300 {
        for _ in 0..20 {
            let buf = rng.bytes(len);
            let (a, b) = decode_both(&buf);
            assert!(a.is_err() && b.is_err(), "random bytes decoded: {buf:?}");
        }
    }
    // Garbage behind a correct file identifier gets as far as the verifier.
    for _ in 0..2000 {
        let len = 8 + rng.below(200);
        let mut buf = rng.bytes(len);
        buf[0..4].copy_from_slice(&((rng.below(len) as u32).to_le_bytes()));
        buf[4..8].copy_from_slice(FILE_IDENTIFIER.as_bytes());
        let _ = decode_both(&buf);
    }
}

#[test]
fn short_inputs_are_rejected_cleanly() {
    for buf in [&b""[..], b"S", b"SCW1", b"\x08\0\0\0SCW", b"\x08\0\0\0SCW1"] {
        let (a, b) = decode_both(buf);
        assert!(a.is_err() && b.is_err());
    }
    assert!(matches!(
        decode_client_frame(b"\x08\0\0\0SC", &lim()),
        Err(WireError::FileIdentifier)
    ));
}

#[test]
fn truncated_and_mutated_frames_never_panic() {
    let mut c = ClientEncoder::new();
    let mut e = Encoder::new();
    let frames = vec![
        c.frame(&[
            (
                1,
                ClientRequest::Connect {
                    token: Some("token"),
                },
            ),
            (
                2,
                ClientRequest::Subscribe {
                    channel: "chan",
                    recover: Some(Position::new(1, 2)),
                },
            ),
            (
                3,
                ClientRequest::Publish {
                    channel: "chan",
                    payload: b"payload bytes",
                    idempotency_key: Some("key"),
                },
            ),
        ]),
        e.publications(
            "chan",
            4,
            [(1, 2, &b"abc"[..]), (2, 3, &b"defg"[..]), (3, 4, &b""[..])].into_iter(),
        )
        .to_vec(),
        e.subscribed(7, "chan", Position::new(3, 4), true).to_vec(),
    ];
    let mut rng = Rng(42);
    for frame in &frames {
        // Every strict prefix is rejected, unless the cut only dropped
        // trailing alignment padding: then it must decode to the same thing.
        let full_c = decode_client_frame(frame, &lim()).ok();
        let full_s = decode_server_frame(frame, &lim()).ok();
        for cut in 0..frame.len() {
            let prefix = &frame[..cut];
            if let Ok(got) = decode_client_frame(prefix, &lim()) {
                assert!(frame[cut..].iter().all(|&b| b == 0), "prefix {cut} decoded");
                assert_eq!(Some(got), full_c.clone(), "prefix {cut}");
            }
            if let Ok(got) = decode_server_frame(prefix, &lim()) {
                assert!(frame[cut..].iter().all(|&b| b == 0), "prefix {cut} decoded");
                assert_eq!(Some(got), full_s.clone(), "prefix {cut}");
            }
        }
        // Cutting into the root offset or the identifier is always an error.
        for cut in 0..8 {
            let (a, b) = decode_both(&frame[..cut]);
            assert!(a.is_err() && b.is_err());
        }
        // Every single-byte corruption, three values each: no panic.
        for i in 0..frame.len() {
            for v in [0x00, 0xff, frame[i] ^ 0x80] {
                let mut m = frame.clone();
                m[i] = v;
                let _ = decode_both(&m);
            }
        }
        // Random multi-byte corruption: no panic.
        for _ in 0..3000 {
            let mut m = frame.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(m.len());
                m[i] = rng.next() as u8;
            }
            let _ = decode_both(&m);
        }
    }
}

#[test]
fn wrong_file_identifier() {
    let mut c = ClientEncoder::new();
    let mut frame = c.ping(1);
    assert!(decode_client_frame(&frame, &lim()).is_ok());
    frame[4..8].copy_from_slice(b"SCW2");
    assert!(matches!(
        decode_client_frame(&frame, &lim()),
        Err(WireError::FileIdentifier)
    ));
    assert!(matches!(
        decode_server_frame(&frame, &lim()),
        Err(WireError::FileIdentifier)
    ));

    // A structurally valid Frame finished without any identifier.
    let mut fbb = FlatBufferBuilder::new();
    let ping = fb::Ping::create(&mut fbb, &fb::PingArgs {});
    let m = fb::Message::create(
        &mut fbb,
        &fb::MessageArgs {
            id: 1,
            body_type: fb::Body::Ping,
            body: Some(ping.as_union_value()),
        },
    );
    let v = fbb.create_vector(&[m]);
    let f = fb::Frame::create(&mut fbb, &fb::FrameArgs { messages: Some(v) });
    fbb.finish(f, None);
    assert!(fb::root_as_frame(fbb.finished_data()).is_ok());
    assert!(matches!(
        decode_client_frame(fbb.finished_data(), &lim()),
        Err(WireError::FileIdentifier)
    ));
}

fn pings(n: usize) -> Vec<u8> {
    let mut c = ClientEncoder::new();
    let reqs: Vec<_> = (0..n as u32).map(|i| (i, ClientRequest::Ping)).collect();
    c.frame(&reqs)
}

#[test]
fn too_many_messages() {
    let l = lim();
    assert_eq!(
        decode_client_frame(&pings(l.max_messages), &l)
            .unwrap()
            .len(),
        l.max_messages
    );
    assert!(matches!(
        decode_client_frame(&pings(l.max_messages + 1), &l),
        Err(WireError::TooManyMessages)
    ));
    // Far over the limit, the verifier's table budget stops it first.
    match decode_client_frame(&pings(20 * l.max_messages), &l) {
        Err(WireError::Verify(InvalidFlatbuffer::TooManyTables)) => {}
        other => panic!("expected TooManyTables, got {other:?}"),
    }
    let tight = DecodeLimits {
        max_messages: 2,
        ..l
    };
    assert!(matches!(
        decode_client_frame(&pings(3), &tight),
        Err(WireError::TooManyMessages)
    ));
    assert!(matches!(
        decode_server_frame(&pings(3), &tight),
        Err(WireError::TooManyMessages)
    ));
}

#[test]
fn oversized_frame_is_rejected_before_verification() {
    let mut c = ClientEncoder::new();
    let frame = c.publish(1, "c", &vec![7u8; 4096], None);
    let small = DecodeLimits {
        max_bytes: 4096,
        ..lim()
    };
    match decode_client_frame(&frame, &small) {
        Err(WireError::TooLarge { len, max }) => {
            assert_eq!((len, max), (frame.len(), 4096));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let exact = DecodeLimits {
        max_bytes: frame.len(),
        ..lim()
    };
    assert!(decode_client_frame(&frame, &exact).is_ok());
}

#[test]
fn frame_at_both_limits_is_accepted() {
    // max_messages messages and exactly max_bytes: the apparent-size budget
    // must not reject legitimate frames whose vtables are shared.
    let l = lim();
    let frame = pings(l.max_messages);
    let exact = DecodeLimits {
        max_bytes: frame.len(),
        ..l
    };
    assert_eq!(
        decode_client_frame(&frame, &exact).unwrap().len(),
        l.max_messages
    );
    let mut c = ClientEncoder::new();
    let body = vec![1u8; 3000];
    let reqs: Vec<_> = (0..l.max_messages as u32)
        .map(|i| {
            (
                i,
                ClientRequest::Publish {
                    channel: "c",
                    payload: &body,
                    idempotency_key: Some("k"),
                },
            )
        })
        .collect();
    let frame = c.frame(&reqs);
    assert!(frame.len() < l.max_bytes);
    let exact = DecodeLimits {
        max_bytes: frame.len(),
        ..l
    };
    assert_eq!(
        decode_client_frame(&frame, &exact).unwrap().len(),
        l.max_messages
    );
}

#[test]
fn shared_payload_amplification_is_rejected() {
    // One 100 KiB Publish referenced 200 times: 100 KiB on the wire, 20 MiB
    // if expanded. The verifier's apparent-size limit must stop it.
    let mut fbb = FlatBufferBuilder::new();
    let ch = fbb.create_string("c");
    let payload = fbb.create_vector(&vec![0u8; 100 * 1024]);
    let p = fb::Publish::create(
        &mut fbb,
        &fb::PublishArgs {
            channel: Some(ch),
            payload: Some(payload),
            idempotency_key: None,
        },
    );
    let m = fb::Message::create(
        &mut fbb,
        &fb::MessageArgs {
            id: 1,
            body_type: fb::Body::Publish,
            body: Some(p.as_union_value()),
        },
    );
    let v = fbb.create_vector(&vec![m; 200]);
    let f = fb::Frame::create(&mut fbb, &fb::FrameArgs { messages: Some(v) });
    fb::finish_frame_buffer(&mut fbb, f);
    let frame = fbb.finished_data();
    assert!(frame.len() < 110 * 1024);
    match decode_client_frame(frame, &lim()) {
        Err(WireError::Verify(InvalidFlatbuffer::ApparentSizeTooLarge)) => {}
        other => panic!(
            "expected ApparentSizeTooLarge, got {:?}",
            other.map(|v| v.len())
        ),
    }
}

#[test]
fn empty_frames_and_missing_bodies() {
    // No messages vector.
    let mut fbb = FlatBufferBuilder::new();
    let f = fb::Frame::create(&mut fbb, &fb::FrameArgs { messages: None });
    fb::finish_frame_buffer(&mut fbb, f);
    assert!(matches!(
        decode_client_frame(fbb.finished_data(), &lim()),
        Err(WireError::EmptyFrame)
    ));
    // Empty messages vector.
    let mut fbb = FlatBufferBuilder::new();
    let frame = raw_frame(&mut fbb, &[]);
    assert!(matches!(
        decode_server_frame(&frame, &lim()),
        Err(WireError::EmptyFrame)
    ));
    // A message with no body.
    let mut fbb = FlatBufferBuilder::new();
    let frame = raw_frame(&mut fbb, &[(1, fb::Body::NONE, None)]);
    assert!(matches!(
        decode_client_frame(&frame, &lim()),
        Err(WireError::MissingBody)
    ));
    assert!(matches!(
        decode_server_frame(&frame, &lim()),
        Err(WireError::MissingBody)
    ));
    // A body type without a body (or the reverse) fails verification.
    let mut fbb = FlatBufferBuilder::new();
    let frame = raw_frame(&mut fbb, &[(1, fb::Body::Ping, None)]);
    assert!(matches!(
        decode_client_frame(&frame, &lim()),
        Err(WireError::Verify(
            InvalidFlatbuffer::InconsistentUnion { .. }
        ))
    ));
}

#[test]
fn unknown_body_type() {
    let mut fbb = FlatBufferBuilder::new();
    let ping = fb::Ping::create(&mut fbb, &fb::PingArgs {});
    let frame = raw_frame(&mut fbb, &[(1, fb::Body(200), Some(ping.as_union_value()))]);
    assert!(matches!(
        decode_client_frame(&frame, &lim()),
        Err(WireError::UnknownBody(200))
    ));
    assert!(matches!(
        decode_server_frame(&frame, &lim()),
        Err(WireError::UnknownBody(200))
    ));
}

#[test]
fn missing_required_field_fails_verification() {
    // A Subscribe table without its required channel.
    let mut fbb = FlatBufferBuilder::new();
    let start = fbb.start_table();
    let t = fbb.end_table(start);
    let body = flatbuffers::WIPOffset::new(t.value());
    let frame = raw_frame(&mut fbb, &[(1, fb::Body::Subscribe, Some(body))]);
    match decode_client_frame(&frame, &lim()) {
        Err(WireError::Verify(InvalidFlatbuffer::MissingRequiredField { .. })) => {}
        other => panic!("expected MissingRequiredField, got {other:?}"),
    }
}

#[test]
fn invalid_utf8_fails_verification() {
    let mut c = ClientEncoder::new();
    let mut frame = c.unsubscribe(1, "chan-XYZ");
    let at = frame
        .windows(3)
        .position(|w| w == b"XYZ")
        .expect("channel bytes in frame");
    frame[at] = 0xff;
    match decode_client_frame(&frame, &lim()) {
        Err(WireError::Verify(InvalidFlatbuffer::Utf8Error { .. })) => {}
        other => panic!("expected Utf8Error, got {other:?}"),
    }
}

#[test]
fn errors_have_short_reasons() {
    let errs = [
        WireError::TooLarge { len: 1, max: 0 },
        WireError::FileIdentifier,
        WireError::Verify(InvalidFlatbuffer::TooManyTables),
        WireError::EmptyFrame,
        WireError::TooManyMessages,
        WireError::MissingBody,
        WireError::UnexpectedMessage("Pong"),
        WireError::UnknownBody(99),
    ];
    for e in errs {
        assert!(!e.reason().is_empty() && e.reason().len() <= 123);
        assert!(!e.to_string().is_empty());
    }
    assert!(WireError::Verify(InvalidFlatbuffer::TooManyTables)
        .to_string()
        .starts_with("envelope failed verification: "));
}

#[test]
fn absent_member_list_decodes_as_empty_and_user_is_required() {
    let mut fbb = FlatBufferBuilder::new();
    let ch = fbb.create_string("presence-a");
    let m = fb::PresenceMembers::create(
        &mut fbb,
        &fb::PresenceMembersArgs {
            channel: Some(ch),
            users: None,
        },
    );
    let frame = raw_frame(
        &mut fbb,
        &[(3, fb::Body::PresenceMembers, Some(m.as_union_value()))],
    );
    assert_eq!(
        server_roundtrip(&frame),
        vec![(
            3,
            ServerMessage::PresenceMembers {
                channel: "presence-a".into(),
                users: Vec::new()
            }
        )]
    );
    // A PresenceEvent without its required user fails verification.
    // (Built by hand: the generated builder refuses to omit it.)
    let mut fbb = FlatBufferBuilder::new();
    let ch = fbb.create_string("presence-a");
    let start = fbb.start_table();
    fbb.push_slot_always(fb::PresenceEvent::VT_CHANNEL, ch);
    fbb.push_slot::<bool>(fb::PresenceEvent::VT_JOINED, true, false);
    let t = fbb.end_table(start);
    let body = flatbuffers::WIPOffset::new(t.value());
    let frame = raw_frame(&mut fbb, &[(0, fb::Body::PresenceEvent, Some(body))]);
    match decode_server_frame(&frame, &lim()) {
        Err(WireError::Verify(InvalidFlatbuffer::MissingRequiredField { .. })) => {}
        other => panic!("expected MissingRequiredField, got {other:?}"),
    }
}

#[test]
fn member_lists_reuse_the_builder() {
    let mut e = Encoder::new();
    let users: Vec<String> = (0..500).map(|i| format!("user-{i}")).collect();
    e.presence_members(1, "presence-big", users.iter().map(String::as_str));
    let cap = e.capacity();
    for _ in 0..100 {
        let frame = e.presence_members(1, "presence-big", users.iter().map(String::as_str));
        assert!(!frame.is_empty());
        assert_eq!(e.capacity(), cap);
    }
    match &server_roundtrip(e.presence_members(2, "presence-big", users.iter().map(String::as_str)))
        [0]
    .1
    {
        ServerMessage::PresenceMembers { users: got, .. } => assert_eq!(got, &users),
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------ allocation

#[test]
fn steady_state_publications_reuse_the_builder() {
    let mut e = Encoder::new();
    let big = vec![0xabu8; 1024];
    let initial = {
        e.pong(0);
        e.capacity()
    };
    // Warm-up: the largest frame of the run (64 x 1 KiB).
    let warm = e
        .publications(
            "metrics:cpu",
            1,
            (0..64usize).map(|i| (i as u64, i as u64, big.as_slice())),
        )
        .len();
    assert!(warm > 64 * 1024);
    let cap = e.capacity();
    let scratch = e.scratch_capacity();
    assert!(cap > initial, "warm-up should have grown the builder");
    assert!(scratch >= 64);

    let mut rng = Rng(7);
    for round in 0..2000u64 {
        let n = 1 + rng.below(64);
        let len = rng.below(big.len() + 1);
        let frame = e.publications(
            "metrics:cpu",
            1,
            (0..n).map(|i| (round * 64 + i as u64, round, &big[..len])),
        );
        assert!(!frame.is_empty());
        assert_eq!(e.capacity(), cap, "builder grew at round {round}");
        assert_eq!(
            e.scratch_capacity(),
            scratch,
            "scratch grew at round {round}"
        );
    }
    // Small frames keep using the same (large) buffer: it is reset, not
    // replaced.
    e.pong(1);
    assert_eq!(e.capacity(), cap);
    // And the frames are still correct after thousands of resets.
    let got = server_roundtrip(e.publications(
        "metrics:cpu",
        1,
        [(5u64, 6u64, &b"ok"[..]), (6, 7, &b"ok2"[..])].into_iter(),
    ));
    assert_eq!(got.len(), 2);
}

#[test]
fn huge_frame_does_not_pin_memory() {
    let mut e = Encoder::new();
    let big = vec![1u8; 8 << 20];
    let n = e
        .publications("c", 1, [(1u64, 1u64, big.as_slice())].into_iter())
        .len();
    assert!(n > 8 << 20);
    assert!(e.capacity() > 8 << 20);
    e.pong(0);
    assert!(
        e.capacity() <= 1 << 20,
        "builder not shrunk: {}",
        e.capacity()
    );
}
