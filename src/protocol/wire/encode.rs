//! Building frames: [`Encoder`] (server → client, the hot path) and
//! [`ClientEncoder`] (client → server, for tests and the load generator).

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};

use super::{fb, ClientRequest, ErrorCode, Position, ServerMessage};

type Body = (fb::Body, WIPOffset<UnionWIPOffset>);

/// Initial builder capacity: a typical reply or a small batch fits.
const INITIAL_CAPACITY: usize = 4 * 1024;

/// Past this capacity the builder is dropped and re-created before the next
/// frame, so one huge batch does not pin memory in a shard forever. Frames up
/// to this size are encoded without allocating once the builder has grown.
const SHRINK_ABOVE: usize = 4 * 1024 * 1024;

/// Server-side encoder; keep one per shard.
///
/// Every method builds one complete frame and returns its bytes, borrowed
/// from the encoder until the next call; the caller copies them into the
/// WebSocket frame it sends (and may share that frame between subscribers).
/// The builder and the scratch vector are reused (`reset` keeps their
/// capacity), so steady-state encoding does not allocate.
pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
    /// Offsets of the `BatchItem` tables of the batch being built.
    items: Vec<WIPOffset<fb::BatchItem<'static>>>,
    /// Offsets of the strings of the member list being built.
    names: Vec<WIPOffset<&'static str>>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// An encoder with a 4 KiB builder and room for 64 batch items; it grows
    /// as needed and shrinks back once past 4 MiB.
    pub fn new() -> Self {
        Self {
            fbb: FlatBufferBuilder::with_capacity(INITIAL_CAPACITY),
            items: Vec::with_capacity(64),
            names: Vec::new(),
        }
    }

    /// Reply to `Connect`.
    pub fn connected(&mut self, id: u32, client_id: u64, shard: u32, server_time_ms: u64) -> &[u8] {
        self.begin();
        let body = body_connected(&mut self.fbb, client_id, shard, server_time_ms);
        self.finish_one(id, body)
    }

    /// Reply to `Subscribe`; `position` is the last position already
    /// delivered or known at subscribe time.
    pub fn subscribed(
        &mut self,
        id: u32,
        channel: &str,
        position: Position,
        recovered: bool,
    ) -> &[u8] {
        self.begin();
        let body = body_subscribed(&mut self.fbb, channel, position, recovered);
        self.finish_one(id, body)
    }

    /// Reply to `Unsubscribe`.
    pub fn unsubscribed(&mut self, id: u32, channel: &str) -> &[u8] {
        self.begin();
        let body = body_unsubscribed(&mut self.fbb, channel);
        self.finish_one(id, body)
    }

    /// Reply to `Publish`: stored at `position`.
    pub fn publish_ack(&mut self, id: u32, channel: &str, position: Position) -> &[u8] {
        self.begin();
        let body = body_publish_ack(&mut self.fbb, channel, position);
        self.finish_one(id, body)
    }

    /// A failed request (`id` of the request), or a connection-level
    /// problem (`id` 0).
    pub fn error(&mut self, id: u32, code: ErrorCode, message: &str) -> &[u8] {
        self.begin();
        let body = body_error(&mut self.fbb, code.as_u16(), message);
        self.finish_one(id, body)
    }

    /// Reply to `Ping`.
    pub fn pong(&mut self, id: u32) -> &[u8] {
        self.begin();
        let body = body_pong(&mut self.fbb);
        self.finish_one(id, body)
    }

    /// A presence change on `channel` (message id 0): `user`'s first
    /// connection joined (`joined`), or its last one left.
    pub fn presence_event(&mut self, channel: &str, user: &str, joined: bool) -> &[u8] {
        self.begin();
        let body = body_presence_event(&mut self.fbb, channel, user, joined);
        self.finish_one(0, body)
    }

    /// Reply to `PresenceQuery`: the users present on `channel`, in the
    /// order given.
    pub fn presence_members<'u>(
        &mut self,
        id: u32,
        channel: &str,
        users: impl IntoIterator<Item = &'u str>,
    ) -> &[u8] {
        self.begin();
        let Self { fbb, names, .. } = self;
        names.clear();
        for user in users {
            names.push(fbb.create_string(user));
        }
        let users = fbb.create_vector(names.as_slice());
        names.clear();
        let body = body_presence_members(fbb, channel, users);
        self.finish_one(id, body)
    }

    /// Publications of one channel (message id 0): a `Publication` when
    /// `items` yields exactly one item, otherwise a `PublicationBatch`
    /// holding the items in the order given. Items are
    /// `(offset, timestamp_ms, payload)`; they must be consecutive offsets of
    /// `epoch` (not checked here) and should not be empty.
    pub fn publications<'p>(
        &mut self,
        channel: &str,
        epoch: u64,
        mut items: impl ExactSizeIterator<Item = (u64, u64, &'p [u8])>,
    ) -> &[u8] {
        self.begin();
        debug_assert!(items.len() > 0, "publications() needs at least one item");
        if items.len() == 1 {
            if let Some((offset, timestamp_ms, payload)) = items.next() {
                debug_assert!(items.next().is_none(), "ExactSizeIterator lied");
                let body =
                    body_publication(&mut self.fbb, channel, epoch, offset, timestamp_ms, payload);
                return self.finish_one(0, body);
            }
        }
        let Self {
            fbb, items: offs, ..
        } = self;
        offs.clear();
        for (offset, timestamp_ms, payload) in items {
            let payload = fbb.create_vector(payload);
            offs.push(fb::BatchItem::create(
                fbb,
                &fb::BatchItemArgs {
                    offset,
                    timestamp_ms,
                    payload: Some(payload),
                },
            ));
        }
        let items = fbb.create_vector(offs.as_slice());
        offs.clear();
        let channel = fbb.create_string(channel);
        let batch = fb::PublicationBatch::create(
            fbb,
            &fb::PublicationBatchArgs {
                channel: Some(channel),
                epoch,
                items: Some(items),
            },
        );
        let body = (fb::Body::PublicationBatch, batch.as_union_value());
        self.finish_one(0, body)
    }

    /// Several server messages in one frame, in order (e.g. coalesced
    /// replies). Builds from owned values, so it is meant for tests and cold
    /// paths; each `ServerMessage::Publication` becomes a `Publication`.
    pub fn frame(&mut self, msgs: &[(u32, ServerMessage)]) -> &[u8] {
        self.begin();
        let fbb = &mut self.fbb;
        // Cold path: a temporary vector is fine here.
        let offsets: Vec<_> = msgs
            .iter()
            .map(|(id, msg)| {
                let body = server_body(fbb, msg);
                message(fbb, *id, body)
            })
            .collect();
        finish_frame(fbb, &offsets);
        self.fbb.finished_data()
    }

    /// The frame the last call encoded (valid until the next call): lets a
    /// caller that encoded once use the bytes again without a copy.
    pub fn last(&self) -> &[u8] {
        self.fbb.finished_data()
    }

    /// Bytes currently reserved by the builder (for metrics and tests).
    pub fn capacity(&mut self) -> usize {
        // `mut_finished_buffer` exposes the whole backing buffer; its length
        // is the builder's capacity (nothing is modified).
        self.fbb.mut_finished_buffer().0.len()
    }

    fn begin(&mut self) {
        if self.capacity() > SHRINK_ABOVE {
            self.fbb = FlatBufferBuilder::with_capacity(INITIAL_CAPACITY);
        } else {
            self.fbb.reset();
        }
    }

    fn finish_one(&mut self, id: u32, body: Body) -> &[u8] {
        let msg = message(&mut self.fbb, id, body);
        finish_frame(&mut self.fbb, &[msg]);
        self.fbb.finished_data()
    }

    #[cfg(test)]
    pub(super) fn scratch_capacity(&self) -> usize {
        self.items.capacity()
    }
}

/// Client-side encoder (integration tests, load generator). Returns owned
/// frames; not tuned for allocation.
pub struct ClientEncoder {
    fbb: FlatBufferBuilder<'static>,
}

impl Default for ClientEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientEncoder {
    /// An encoder with a 1 KiB builder (it grows as needed).
    pub fn new() -> Self {
        Self {
            fbb: FlatBufferBuilder::with_capacity(1024),
        }
    }

    /// A frame with one `Connect` (request `id`); `token: None` = anonymous.
    pub fn connect(&mut self, id: u32, token: Option<&str>) -> Vec<u8> {
        self.frame(&[(id, ClientRequest::Connect { token })])
    }

    /// A frame with one `Subscribe` (request `id`); `recover` = the last
    /// position seen on `channel`, `None` = start from now.
    pub fn subscribe(&mut self, id: u32, channel: &str, recover: Option<Position>) -> Vec<u8> {
        self.frame(&[(id, ClientRequest::Subscribe { channel, recover })])
    }

    /// A frame with one `Unsubscribe` (request `id`).
    pub fn unsubscribe(&mut self, id: u32, channel: &str) -> Vec<u8> {
        self.frame(&[(id, ClientRequest::Unsubscribe { channel })])
    }

    /// A frame with one `Publish` (request `id`) of `payload` on `channel`;
    /// `idempotency_key: None` = no deduplication.
    pub fn publish(
        &mut self,
        id: u32,
        channel: &str,
        payload: &[u8],
        idempotency_key: Option<&str>,
    ) -> Vec<u8> {
        self.frame(&[(
            id,
            ClientRequest::Publish {
                channel,
                payload,
                idempotency_key,
            },
        )])
    }

    /// A frame with one `Ping` (request `id`).
    pub fn ping(&mut self, id: u32) -> Vec<u8> {
        self.frame(&[(id, ClientRequest::Ping)])
    }

    /// A frame with one `PresenceQuery` (request `id`) for `channel`.
    pub fn presence_query(&mut self, id: u32, channel: &str) -> Vec<u8> {
        self.frame(&[(id, ClientRequest::PresenceQuery { channel })])
    }

    /// Several requests in one frame, in order.
    pub fn frame(&mut self, reqs: &[(u32, ClientRequest<'_>)]) -> Vec<u8> {
        let fbb = &mut self.fbb;
        fbb.reset();
        let offsets: Vec<_> = reqs
            .iter()
            .map(|(id, req)| {
                let body = client_body(fbb, req);
                message(fbb, *id, body)
            })
            .collect();
        finish_frame(fbb, &offsets);
        fbb.finished_data().to_vec()
    }
}

// ------------------------------------------------------------------ helpers

fn message<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    id: u32,
    (body_type, body): Body,
) -> WIPOffset<fb::Message<'a>> {
    fb::Message::create(
        fbb,
        &fb::MessageArgs {
            id,
            body_type,
            body: Some(body),
        },
    )
}

fn finish_frame<'a>(fbb: &mut FlatBufferBuilder<'a>, msgs: &[WIPOffset<fb::Message<'a>>]) {
    let messages = fbb.create_vector(msgs);
    let frame = fb::Frame::create(
        fbb,
        &fb::FrameArgs {
            messages: Some(messages),
        },
    );
    fb::finish_frame_buffer(fbb, frame);
}

fn client_body(fbb: &mut FlatBufferBuilder<'_>, req: &ClientRequest<'_>) -> Body {
    match *req {
        ClientRequest::Connect { token } => {
            let token = token.map(|t| fbb.create_string(t));
            let t = fb::Connect::create(fbb, &fb::ConnectArgs { token });
            (fb::Body::Connect, t.as_union_value())
        }
        ClientRequest::Subscribe { channel, recover } => {
            let channel = fbb.create_string(channel);
            let recover = recover.map(Position::to_fb);
            let t = fb::Subscribe::create(
                fbb,
                &fb::SubscribeArgs {
                    channel: Some(channel),
                    recover: recover.as_ref(),
                },
            );
            (fb::Body::Subscribe, t.as_union_value())
        }
        ClientRequest::Unsubscribe { channel } => {
            let channel = fbb.create_string(channel);
            let t = fb::Unsubscribe::create(
                fbb,
                &fb::UnsubscribeArgs {
                    channel: Some(channel),
                },
            );
            (fb::Body::Unsubscribe, t.as_union_value())
        }
        ClientRequest::Publish {
            channel,
            payload,
            idempotency_key,
        } => {
            let channel = fbb.create_string(channel);
            let payload = fbb.create_vector(payload);
            let idempotency_key = idempotency_key.map(|k| fbb.create_string(k));
            let t = fb::Publish::create(
                fbb,
                &fb::PublishArgs {
                    channel: Some(channel),
                    payload: Some(payload),
                    idempotency_key,
                },
            );
            (fb::Body::Publish, t.as_union_value())
        }
        ClientRequest::Ping => {
            let t = fb::Ping::create(fbb, &fb::PingArgs {});
            (fb::Body::Ping, t.as_union_value())
        }
        ClientRequest::PresenceQuery { channel } => {
            let channel = fbb.create_string(channel);
            let t = fb::PresenceQuery::create(
                fbb,
                &fb::PresenceQueryArgs {
                    channel: Some(channel),
                },
            );
            (fb::Body::PresenceQuery, t.as_union_value())
        }
    }
}

fn server_body(fbb: &mut FlatBufferBuilder<'_>, msg: &ServerMessage) -> Body {
    match msg {
        ServerMessage::Connected {
            client_id,
            shard,
            server_time_ms,
        } => body_connected(fbb, *client_id, *shard, *server_time_ms),
        ServerMessage::Subscribed {
            channel,
            position,
            recovered,
        } => body_subscribed(fbb, channel, *position, *recovered),
        ServerMessage::Unsubscribed { channel } => body_unsubscribed(fbb, channel),
        ServerMessage::Publication {
            channel,
            epoch,
            offset,
            timestamp_ms,
            payload,
        } => body_publication(fbb, channel, *epoch, *offset, *timestamp_ms, payload),
        ServerMessage::PublishAck { channel, position } => {
            body_publish_ack(fbb, channel, *position)
        }
        ServerMessage::Error { code, message } => body_error(fbb, *code, message),
        ServerMessage::Pong => body_pong(fbb),
        ServerMessage::PresenceEvent {
            channel,
            user,
            joined,
        } => body_presence_event(fbb, channel, user, *joined),
        ServerMessage::PresenceMembers { channel, users } => {
            let names: Vec<_> = users.iter().map(|u| fbb.create_string(u)).collect();
            let users = fbb.create_vector(&names);
            body_presence_members(fbb, channel, users)
        }
    }
}

fn body_connected(
    fbb: &mut FlatBufferBuilder<'_>,
    client_id: u64,
    shard: u32,
    server_time_ms: u64,
) -> Body {
    let t = fb::Connected::create(
        fbb,
        &fb::ConnectedArgs {
            client_id,
            shard,
            server_time_ms,
        },
    );
    (fb::Body::Connected, t.as_union_value())
}

fn body_subscribed(
    fbb: &mut FlatBufferBuilder<'_>,
    channel: &str,
    position: Position,
    recovered: bool,
) -> Body {
    let channel = fbb.create_string(channel);
    let position = position.to_fb();
    let t = fb::Subscribed::create(
        fbb,
        &fb::SubscribedArgs {
            channel: Some(channel),
            position: Some(&position),
            recovered,
        },
    );
    (fb::Body::Subscribed, t.as_union_value())
}

fn body_unsubscribed(fbb: &mut FlatBufferBuilder<'_>, channel: &str) -> Body {
    let channel = fbb.create_string(channel);
    let t = fb::Unsubscribed::create(
        fbb,
        &fb::UnsubscribedArgs {
            channel: Some(channel),
        },
    );
    (fb::Body::Unsubscribed, t.as_union_value())
}

fn body_publication(
    fbb: &mut FlatBufferBuilder<'_>,
    channel: &str,
    epoch: u64,
    offset: u64,
    timestamp_ms: u64,
    payload: &[u8],
) -> Body {
    let payload = fbb.create_vector(payload);
    let channel = fbb.create_string(channel);
    let t = fb::Publication::create(
        fbb,
        &fb::PublicationArgs {
            channel: Some(channel),
            epoch,
            offset,
            timestamp_ms,
            payload: Some(payload),
        },
    );
    (fb::Body::Publication, t.as_union_value())
}

fn body_publish_ack(fbb: &mut FlatBufferBuilder<'_>, channel: &str, position: Position) -> Body {
    let channel = fbb.create_string(channel);
    let position = position.to_fb();
    let t = fb::PublishAck::create(
        fbb,
        &fb::PublishAckArgs {
            channel: Some(channel),
            position: Some(&position),
        },
    );
    (fb::Body::PublishAck, t.as_union_value())
}

fn body_error(fbb: &mut FlatBufferBuilder<'_>, code: u16, message: &str) -> Body {
    let message = fbb.create_string(message);
    let t = fb::Error::create(
        fbb,
        &fb::ErrorArgs {
            code: fb::ErrorCode(code),
            message: Some(message),
        },
    );
    (fb::Body::Error, t.as_union_value())
}

fn body_pong(fbb: &mut FlatBufferBuilder<'_>) -> Body {
    let t = fb::Pong::create(fbb, &fb::PongArgs {});
    (fb::Body::Pong, t.as_union_value())
}

fn body_presence_event(
    fbb: &mut FlatBufferBuilder<'_>,
    channel: &str,
    user: &str,
    joined: bool,
) -> Body {
    let channel = fbb.create_string(channel);
    let user = fbb.create_string(user);
    let t = fb::PresenceEvent::create(
        fbb,
        &fb::PresenceEventArgs {
            channel: Some(channel),
            user: Some(user),
            joined,
        },
    );
    (fb::Body::PresenceEvent, t.as_union_value())
}

fn body_presence_members<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    channel: &str,
    users: WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<&'a str>>>,
) -> Body {
    let channel = fbb.create_string(channel);
    let t = fb::PresenceMembers::create(
        fbb,
        &fb::PresenceMembersArgs {
            channel: Some(channel),
            users: Some(users),
        },
    );
    (fb::Body::PresenceMembers, t.as_union_value())
}
