//! An error met on every pass (an API call, a sidecar read) is logged when it begins or
//! changes, and its end once: never once per pass.

/// The last error of a call made every pass.
#[derive(Default)]
pub struct LastError(Option<String>);

impl LastError {
    /// Records `msg`; whether it is new (to be logged).
    pub fn failed(&mut self, msg: &str) -> bool {
        let new = self.0.as_deref() != Some(msg);
        self.0 = Some(msg.to_string());
        new
    }

    /// Records a success; whether it ends a failure (to be logged).
    pub fn worked(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// The error, while it lasts.
    pub fn current(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_news_when_it_begins_changes_or_ends() {
        let mut e = LastError::default();
        assert!(!e.worked(), "nothing failed");
        assert!(e.failed("refused"));
        assert!(!e.failed("refused"), "the same error again");
        assert!(e.failed("timed out"));
        assert_eq!(e.current(), Some("timed out"));
        assert!(e.worked());
        assert!(!e.worked());
        assert_eq!(e.current(), None);
    }
}
