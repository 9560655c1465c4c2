//! Acking rows in runs: one `basic.ack` with `multiple` for many rows at once.
//!
//! RabbitMQ spends as much on each ack as on the rest of a short row's trip (a bare
//! consumer acking once per 100 deliveries takes rows 1.7 times as fast as one acking
//! each). Rows are recorded in the ledger in batches, so their acks come due in
//! batches too: each row task hands its ack to [`Acks`] and waits; one task sends what
//! is due, as a single ack with `multiple` for the run of delivery tags from the oldest
//! unsettled delivery up, and one ack each for rows beyond a row still in hand (never
//! holding them back behind it).
//!
//! A `multiple` ack settles every delivery up to its tag on the channel, so it is only
//! ever sent for a run in which every delivery is due to be acked: every delivery is
//! registered here as it arrives, and a reject is sent here too, under the same lock,
//! so no ack can overtake it.

use std::collections::{BTreeMap, BTreeSet};

use lapin::{
    Acker,
    options::{BasicAckOptions, BasicRejectOptions},
};
use tokio::sync::{Mutex, Notify, oneshot};

/// What sending an ack came to: lapin's answer (`Ok(false)`: the channel is gone).
pub type Sent = Result<bool, lapin::Error>;

/// The acks of one consuming channel.
#[derive(Default)]
pub struct Acks {
    state: Mutex<State>,
    due: Notify,
}

#[derive(Default)]
struct State {
    /// Delivered and not yet acked or rejected, by delivery tag.
    unsettled: BTreeSet<u64>,
    /// Acks due, by delivery tag: the delivery's acker and who waits for it to be sent.
    due: BTreeMap<u64, (Acker, oneshot::Sender<Sent>)>,
}

/// The acks to send for `due` given the deliveries still `unsettled` (due ones among
/// them): the tag ending the run of due deliveries from the oldest unsettled one, if it
/// is due, and the due tags beyond it, each to be acked on its own.
fn plan(unsettled: &BTreeSet<u64>, due: &BTreeSet<u64>) -> (Option<u64>, Vec<u64>) {
    let run_end = unsettled
        .iter()
        .take_while(|tag| due.contains(tag))
        .last()
        .copied();
    let single = due
        .iter()
        .copied()
        .filter(|tag| run_end.is_none_or(|end| *tag > end))
        .collect();
    (run_end, single)
}

impl Acks {
    /// Registers a delivery as it arrives, before anything can settle it.
    pub async fn delivered(&self, tag: u64) {
        self.state.lock().await.unsettled.insert(tag);
    }

    /// Acks the delivery `tag` (whose acker is `acker`) with the next run; returns once
    /// the ack is sent.
    pub async fn ack(&self, tag: u64, acker: Acker) -> Sent {
        let (sent, answer) = oneshot::channel();
        self.state.lock().await.due.insert(tag, (acker, sent));
        self.due.notify_one();
        answer.await.unwrap_or(Ok(false))
    }

    /// Rejects the delivery `tag` now: no ack covers it after this.
    pub async fn reject(&self, tag: u64, acker: &Acker, options: BasicRejectOptions) -> Sent {
        let mut state = self.state.lock().await;
        let sent = acker.reject(options).await;
        state.unsettled.remove(&tag);
        // The run it held back may be whole now.
        if !state.due.is_empty() {
            self.due.notify_one();
        }
        sent
    }

    /// Sends the acks that come due, until the session ends (the task is aborted).
    pub async fn run(&self) {
        loop {
            self.due.notified().await;
            self.send_due().await;
        }
    }

    async fn send_due(&self) {
        let mut state = self.state.lock().await;
        let due_tags: BTreeSet<u64> = state.due.keys().copied().collect();
        let (run_end, single) = plan(&state.unsettled, &due_tags);
        if let Some(end) = run_end {
            let rest = state.due.split_off(&(end + 1));
            let run = std::mem::replace(&mut state.due, rest);
            let (last_acker, _) = &run[&end];
            let sent = last_acker.ack(BasicAckOptions { multiple: true }).await;
            for (tag, (_, waiter)) in run {
                state.unsettled.remove(&tag);
                let _ = waiter.send(sent.clone());
            }
        }
        for tag in single {
            let Some((acker, waiter)) = state.due.remove(&tag) else {
                continue;
            };
            let sent = acker.ack(BasicAckOptions::default()).await;
            state.unsettled.remove(&tag);
            let _ = waiter.send(sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn a_run_covers_only_due_deliveries_from_the_oldest_unsettled_one() {
        // Everything in hand is due: one ack for all of it.
        assert_eq!(plan(&set(&[3, 4, 5]), &set(&[3, 4, 5])), (Some(5), vec![]));
        // A row still in hand (4) ends the run before it; rows after it go one by one.
        assert_eq!(
            plan(&set(&[3, 4, 5, 6]), &set(&[3, 5, 6])),
            (Some(3), vec![5, 6])
        );
        // The oldest is in hand: no run at all, the due ones go one by one.
        assert_eq!(plan(&set(&[3, 4, 5]), &set(&[4, 5])), (None, vec![4, 5]));
        // Gaps in the tags are settled deliveries (rejected, acked): they do not end a run.
        assert_eq!(plan(&set(&[2, 7, 9]), &set(&[2, 7, 9])), (Some(9), vec![]));
        assert_eq!(plan(&set(&[2, 7, 9]), &set(&[])), (None, vec![]));
    }
}
