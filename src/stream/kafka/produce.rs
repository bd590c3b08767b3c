//! Producing a stream at a steady rate (what `replay` and `demo` do): a pacer that schedules
//! message `i` at `i / rate` seconds from the start, independent of how long deliveries take,
//! and a bounded window of deliveries in flight, checked without waiting.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rdkafka::producer::DeliveryFuture;
use tokio::time::Instant;

/// At most this many deliveries wait for their acknowledgement before the producer waits for
/// the oldest: bounds memory and how late a failure is noticed, far above what one broker round
/// trip holds at any rate this machine produces.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// Schedules messages at `rate` per second from the first call (none: as fast as possible).
/// Message `i` is due at `start + i / rate`: a late message does not delay the ones after it,
/// so the average rate holds whatever each send costs.
#[derive(Debug)]
pub struct Pacer {
    rate: Option<f64>,
    start: Option<Instant>,
    sent: u64,
}

impl Pacer {
    /// A pacer for `rate` messages a second (`None` or a non-positive rate: unpaced).
    pub fn new(rate: Option<f64>) -> Self {
        Pacer {
            rate: rate.filter(|r| *r > 0.0 && r.is_finite()),
            start: None,
            sent: 0,
        }
    }

    /// Waits until the next message is due.
    pub async fn wait(&mut self) {
        let start = *self.start.get_or_insert_with(Instant::now);
        if let Some(rate) = self.rate {
            let due = start + Duration::from_secs_f64(self.sent as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        self.sent += 1;
    }
}

/// Deliveries not yet acknowledged, oldest first.
#[derive(Default)]
pub struct InFlight {
    pending: VecDeque<DeliveryFuture>,
}

impl InFlight {
    /// Adds a delivery, then takes every acknowledged one off the front without waiting, and
    /// waits for the oldest only while more than [`MAX_IN_FLIGHT`] are in flight. Errors with
    /// the first failed delivery.
    pub async fn push(&mut self, delivery: DeliveryFuture) -> Result<(), String> {
        self.pending.push_back(delivery);
        loop {
            let full = self.pending.len() > MAX_IN_FLIGHT;
            let Some(front) = self.pending.front_mut() else {
                return Ok(());
            };
            let acked = match poll_once(front) {
                Poll::Ready(result) => result,
                Poll::Pending if full => front.await,
                Poll::Pending => return Ok(()),
            };
            self.pending.pop_front();
            check(acked)?;
        }
    }

    /// Waits for every delivery.
    pub async fn finish(&mut self) -> Result<(), String> {
        while let Some(front) = self.pending.pop_front() {
            check(front.await)?;
        }
        Ok(())
    }

    /// Deliveries in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Polls a delivery once without registering interest: whether it is acknowledged already.
fn poll_once(delivery: &mut DeliveryFuture) -> Poll<<DeliveryFuture as Future>::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    Pin::new(delivery).poll(&mut cx)
}

fn check(acked: <DeliveryFuture as Future>::Output) -> Result<(), String> {
    match acked {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(format!("delivery failed: {e}")),
        Err(_) => Err("the producer was dropped before delivery".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_holds_its_rate_on_a_controlled_clock() {
        let began = Instant::now();
        let mut pacer = Pacer::new(Some(500.0));
        for _ in 0..5_000 {
            pacer.wait().await;
        }
        // The 5,000th message is due at 4,999 / 500 s.
        assert_eq!(began.elapsed(), Duration::from_secs_f64(4_999.0 / 500.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_send_does_not_slow_the_ones_after_it() {
        let began = Instant::now();
        let mut pacer = Pacer::new(Some(100.0));
        for i in 0..200 {
            pacer.wait().await;
            if i == 10 {
                // One send takes half a second (a broker round trip, a full queue).
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        assert_eq!(began.elapsed(), Duration::from_secs_f64(199.0 / 100.0));
    }

    #[tokio::test(start_paused = true)]
    async fn unpaced_never_waits() {
        let began = Instant::now();
        let mut pacer = Pacer::new(None);
        for _ in 0..1_000 {
            pacer.wait().await;
        }
        assert_eq!(began.elapsed(), Duration::ZERO);
        let mut zero = Pacer::new(Some(0.0));
        zero.wait().await;
        assert_eq!(began.elapsed(), Duration::ZERO);
    }
}
