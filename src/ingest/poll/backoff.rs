//! The wait between polls (pure: no I/O, no clock of its own; the caller passes `now`).
//!
//! [`Backoff`] starts at `interval_min`, grows by `backoff` after each poll that brought nothing
//! new (or failed) up to `interval_max`, and returns to `interval_min` after a change. A `429` or
//! `503` is waited out for its `Retry-After` ([`parse_retry_after`]: delta-seconds or an HTTP
//! date), which does not move the curve; the adapter caps every wait by the run's time left.

use std::time::{Duration, SystemTime};

use super::PollSettings;

/// The wait between polls: starts at `min`, grows by `factor` after each quiet poll (capped at
/// `max`), returns to `min` after a change. Pure.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    factor: f64,
    current: Duration,
}

impl Backoff {
    /// A back-off from `min` to `max` by `factor` (a factor below 1 or not finite counts as 1;
    /// a `max` below `min` as `min`).
    pub fn new(min: Duration, max: Duration, factor: f64) -> Backoff {
        let factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        Backoff {
            min,
            max: max.max(min),
            factor,
            current: min,
        }
    }

    /// The back-off of `settings`.
    pub fn of(settings: &PollSettings) -> Backoff {
        Backoff::new(
            settings.interval_min,
            settings.interval_max,
            settings.backoff,
        )
    }

    /// The wait before the next poll as things stand.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The last poll brought a change: wait `min`.
    pub fn after_change(&mut self) -> Duration {
        self.current = self.min;
        self.current
    }

    /// The last poll brought nothing new (or failed): wait longer.
    pub fn after_quiet(&mut self) -> Duration {
        let grown = self.current.as_secs_f64() * self.factor;
        let grown = Duration::try_from_secs_f64(grown).unwrap_or(self.max);
        self.current = grown.clamp(self.current, self.max);
        self.current
    }

    /// The backend asked us to slow down (`429`/`503`): wait its `Retry-After` (delta-seconds
    /// or an HTTP date, read at `now`; at least `min`), or, for nonsense or none, the current
    /// wait grown as after a quiet poll. The caller caps the wait by the run's time left.
    pub fn after_throttle(&mut self, retry_after: Option<&str>, now: SystemTime) -> Duration {
        match retry_after.and_then(|v| parse_retry_after(v, now)) {
            Some(d) => d.max(self.min),
            None => self.after_quiet(),
        }
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delta-seconds, or an HTTP date, which is read as
/// the time from `now` until then (zero when it has passed); `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        let at = httpdate::parse_http_date(v).ok()?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    }
    // An absurdly large number is still a (long) wait: the caller caps it by the time left.
    Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_while_quiet_and_resets_on_change() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), ms(5000), 1.5);
        assert_eq!(b.current(), ms(250));
        let quiet: Vec<_> = (0..9).map(|_| b.after_quiet().as_millis()).collect();
        assert_eq!(quiet, [375, 562, 843, 1265, 1898, 2847, 4271, 5000, 5000]);
        assert_eq!(b.after_change(), ms(250));
        assert_eq!(b.after_quiet(), ms(375));
        // Throttles: a delta-seconds value or a date is waited (at least min) without changing
        // the curve; anything else grows the wait as a quiet poll would.
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(b.after_throttle(Some("3"), now), ms(3000));
        assert_eq!(b.after_throttle(Some("0"), now), ms(250));
        assert_eq!(b.current(), ms(375));
        assert_eq!(
            b.after_throttle(Some("Wed, 21 Oct 2015 07:28:07 GMT"), now),
            ms(7000)
        );
        assert_eq!(
            b.after_throttle(Some("Wed, 21 Oct 2015 07:27:00 GMT"), now),
            ms(250)
        );
        assert_eq!(b.current(), ms(375));
        assert_eq!(b.after_throttle(Some("soon"), now).as_millis(), 562);
        assert_eq!(b.after_throttle(None, now).as_millis(), 843);
        assert_eq!(b.after_throttle(Some("-1"), now).as_millis(), 1265);
        // Odd settings stay sane.
        let mut flat = Backoff::new(ms(100), ms(10), f64::NAN);
        assert_eq!((flat.after_quiet(), flat.after_quiet()), (ms(100), ms(100)));
        let mut huge = Backoff::new(ms(100), Duration::MAX, 1e300);
        assert_eq!(huge.after_quiet(), Duration::MAX);
        assert_eq!(huge.after_quiet(), Duration::MAX);
    }

    #[test]
    fn retry_after_is_delta_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let p = |v: &str| parse_retry_after(v, now);
        assert_eq!(p("5"), Some(Duration::from_secs(5)));
        assert_eq!(p(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(
            p("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            p("Wed, 21 Oct 2015 07:29:30 GMT"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(p("Tue, 20 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        for bad in ["", "1.5", "-1", "+3", "soon", "1 2", "Wed, 99 Oct 2015"] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }
}
