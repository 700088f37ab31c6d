//! Yielding to the back of a shard's run queue.
//!
//! monoio puts a task that wakes itself at the *front* of its run queue
//! (`yield_now` does exactly that), so a dispatcher that keeps finding work
//! would tick again and again while the readers that are ready wait behind
//! it. A wake from another task goes to the *back*. [`Requeue`] pairs the
//! dispatcher with a small relay task that does that wake, so after
//! [`Requeue::yield_back`] the dispatcher runs again only after every task
//! that was ready before it. (monoio bounds each round of ready tasks and
//! then reaps I/O completions, so readers whose data just arrived get their
//! turn as well.) No allocation: two stored wakers.

#![forbid(unsafe_code)]

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Requeue {
    /// The yielding task, waiting for the relay.
    parked: Cell<Option<Waker>>,
    /// The relay task, waiting for a yield.
    relay: Cell<Option<Waker>>,
}

impl Requeue {
    /// The relay: spawn once per shard; it never ends.
    pub async fn relay(self: Rc<Self>) {
        poll_fn(|cx| {
            if let Some(parked) = self.parked.take() {
                parked.wake();
            }
            self.relay.set(Some(cx.waker().clone()));
            Poll::<()>::Pending
        })
        .await
    }

    /// Lets every task that is ready now run before the caller continues.
    pub fn yield_back(&self) -> YieldBack<'_> {
        YieldBack {
            requeue: self,
            armed: false,
        }
    }
}

pub struct YieldBack<'a> {
    requeue: &'a Requeue,
    armed: bool,
}

impl Future for YieldBack<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed {
            // Woken by the relay, or earlier by new work (also a wake from
            // another task, so also from the back): either way, go on.
            self.requeue.parked.take();
            return Poll::Ready(());
        }
        self.armed = true;
        self.requeue.parked.set(Some(cx.waker().clone()));
        match self.requeue.relay.take() {
            Some(relay) => relay.wake(),
            // The relay has not run yet (first tick of the shard): a
            // front-of-queue yield is the best there is.
            None => cx.waker().wake_by_ref(),
        }
        Poll::Pending
    }
}
