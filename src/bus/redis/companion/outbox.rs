//! The batch of events the shard gets at the end of a main-loop turn,
//! with a channel's publications merged into one event.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::{BusEvent, Publication};

/// What the shard gets at the end of a turn, in order; publications of a
/// channel are merged into one event per turn.
enum Out {
    Event(BusEvent),
    Pubs {
        channel: Arc<str>,
        epoch: u64,
        items: Vec<Publication>,
    },
}

#[derive(Default)]
pub(super) struct Outbox {
    items: Vec<Out>,
    open: HashMap<Arc<str>, usize>,
}

impl Outbox {
    pub(super) fn event(&mut self, ev: BusEvent) {
        // Later publications of the channel must follow this event.
        if let BusEvent::Subscribed { channel, .. } | BusEvent::Presence { channel, .. } = &ev {
            self.open.remove(channel);
        }
        self.items.push(Out::Event(ev));
    }

    pub(super) fn publication(&mut self, channel: &Arc<str>, epoch: u64, p: Publication) {
        if let Some(&i) = self.open.get(channel) {
            if let Out::Pubs {
                epoch: e, items, ..
            } = &mut self.items[i]
            {
                if *e == epoch {
                    items.push(p);
                    return;
                }
            }
        }
        self.open.insert(channel.clone(), self.items.len());
        self.items.push(Out::Pubs {
            channel: channel.clone(),
            epoch,
            items: vec![p],
        });
    }

    pub(super) fn take(&mut self) -> Vec<BusEvent> {
        self.open.clear();
        self.items
            .drain(..)
            .map(|o| match o {
                Out::Event(e) => e,
                Out::Pubs {
                    channel,
                    epoch,
                    items,
                } => BusEvent::Publications {
                    channel,
                    epoch,
                    items: Arc::from(items),
                },
            })
            .collect()
    }
}
