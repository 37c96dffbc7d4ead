//! A drain's phases: serving, lame duck, refusing.
//!
//! Kubernetes takes a pod out of its Service only after the readiness probe has failed and the
//! endpoint change has reached every node's proxy (and a cloud load balancer's target group):
//! seconds in which the Service still sends to a pod that has stopped admitting. A client
//! without retries sees those requests fail. So a drain turns `/ready` false at once but keeps
//! admitting for its lame-duck period, and only then refuses new requests (a retryable 503);
//! what it admitted runs to the end either way. (The same reason pod specs carry a `preStop`
//! sleep; "lame duck" is the name Google's SRE book gives the state.)

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Not ready (out of the Service), still admitting: the Service may not know yet.
    LameDuck,
    /// Admitting nothing new.
    Refusing,
}

#[derive(Debug, Clone)]
pub struct Drain {
    lame_duck: Duration,
    since: Option<Instant>,
}

impl Drain {
    pub fn new(lame_duck: Duration) -> Self {
        Self {
            lame_duck,
            since: None,
        }
    }

    /// Starts a drain; one already under way keeps its start, so asking again (the sidecar
    /// re-applying, then SIGTERM) never lengthens the time it admits.
    pub fn begin(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    pub fn cancel(&mut self) {
        self.since = None;
    }

    pub fn phase(&self, now: Instant) -> Phase {
        match self.since {
            None => Phase::Serving,
            Some(s) if now.saturating_duration_since(s) < self.lame_duck => Phase::LameDuck,
            Some(_) => Phase::Refusing,
        }
    }

    /// How long it admits still (zero once refusing or while serving).
    pub fn lame_duck_left(&self, now: Instant) -> Duration {
        self.since.map_or(Duration::ZERO, |s| {
            self.lame_duck
                .saturating_sub(now.saturating_duration_since(s))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_admits_through_its_lame_duck_then_refuses() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut d = Drain::new(s(5));
        assert_eq!(d.phase(t0), Phase::Serving);
        d.begin(t0);
        assert_eq!(d.phase(t0), Phase::LameDuck);
        assert_eq!(d.phase(t0 + Duration::from_millis(4999)), Phase::LameDuck);
        assert_eq!(d.lame_duck_left(t0 + s(2)), s(3));
        // Asked again (SIGTERM after the operator's drain): the first start holds.
        d.begin(t0 + s(4));
        assert_eq!(d.phase(t0 + s(5)), Phase::Refusing);
        assert_eq!(d.lame_duck_left(t0 + s(6)), Duration::ZERO);
        d.cancel();
        assert_eq!(d.phase(t0 + s(6)), Phase::Serving);
        // A new drain starts its own lame duck.
        d.begin(t0 + s(7));
        assert_eq!(d.phase(t0 + s(8)), Phase::LameDuck);
    }

    #[test]
    fn without_a_lame_duck_a_drain_refuses_at_once() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::ZERO);
        d.begin(t0);
        assert_eq!(d.phase(t0), Phase::Refusing);
    }
}
