//! The operator's Kubernetes client: kube's, with its retries of an overloaded or restarting
//! API server bounded to seconds.
//!
//! kube's default client retries every 429, 503 and 504 fifteen times, its backoff doubling
//! from 5 ms to 1000 s: a call can sit there for minutes, and with it the reconcile or the
//! autoscaling pass that made it, while the API server is back and other work waits. client-go
//! tries a few times and hands the error to the work queue, which requeues the object with its
//! own backoff; this client does the same: three retries within about two seconds, then the
//! error goes to the controller's error policy (logged once, requeued) or ends the autoscaling
//! pass (the next one runs an interval later).

use std::time::Duration;

use kube::client::{retry::RetryPolicy, ClientBuilder};
use tower::{buffer::BufferLayer, retry::RetryLayer};

/// Retries after the first try of one call.
pub const RETRIES: u32 = 3;

/// A client for `config` that retries an API server's 429, 503 and 504 answers [`RETRIES`]
/// times, backing off from 250 ms to at most 1 s, and then returns the error.
pub fn bounded(mut config: kube::Config) -> kube::Result<kube::Client> {
    config.default_retry = false;
    // A server's Retry-After is not followed: it could stretch the few tries to minutes again.
    let policy = RetryPolicy::new(
        Duration::from_millis(250),
        Duration::from_secs(1),
        RETRIES,
        false,
    )
    .expect("valid backoff");
    // tower's Retry clones the service for each try; kube's boxed stack is not Clone, a
    // buffer in front of it is.
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&BufferLayer::new(1024))
        .with_layer(&RetryLayer::new(policy))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::UnavailableApiServer;
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;

    #[tokio::test]
    async fn a_call_the_api_server_keeps_refusing_fails_after_a_few_tries_in_seconds() {
        let server = UnavailableApiServer::start().await;
        let pods: Api<Pod> = Api::namespaced(bounded(server.config.clone()).unwrap(), "default");
        // kube's default client would still be retrying (its last waits are 41 s and 82 s).
        let got = tokio::time::timeout(Duration::from_secs(20), pods.get("engine-0"))
            .await
            .expect("the call returns its error, not still retrying after 20 s");
        match got {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 503, "{status:?}"),
            other => panic!("expected the API server's 503, got {other:?}"),
        }
        assert_eq!(
            server.requests(),
            1 + RETRIES as usize,
            "one try and {RETRIES} retries"
        );
    }
}
