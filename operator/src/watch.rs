//! Caches the autoscaling loop reads every pass, kept current by a watch (a reflector): one
//! list, then changes. Listing them on every pass instead costs the API server a full list
//! every few seconds: of a big cluster's HPAs, and of every engine pod with its status (a
//! thousand engine pods is megabytes a pass).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::log_once::LastError;

/// A store and whether its watch works now.
pub struct Cache<K: Resource + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: Store<K>,
    healthy: Arc<AtomicBool>,
}

impl<K> Cache<K>
where
    K: Resource + Clone + std::fmt::Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default,
{
    /// The store's objects while they are current: after the first list, and not while the
    /// watch fails (an API server restarting, RBAC). The store then keeps what it last saw,
    /// which a caller that must not act on stale data (the loop's engine pods: it never
    /// scales on stale data) must not read.
    pub fn current(&self) -> Option<Vec<Arc<K>>> {
        self.current_ready()?;
        Some(self.store.state())
    }

    /// The object `key` names while the store is current (`Some(None)`: it has none), without
    /// copying the store as [`Self::current`] does; `None` while not current.
    pub fn current_get(&self, key: &reflector::ObjectRef<K>) -> Option<Option<Arc<K>>> {
        self.current_ready()?;
        Some(self.store.get(key))
    }

    /// `Some` once the store has its first list and while its watch works.
    fn current_ready(&self) -> Option<()> {
        use futures::FutureExt;
        self.store.wait_until_ready().now_or_never()?.ok()?;
        self.healthy.load(Ordering::SeqCst).then_some(())
    }

    /// The store's objects once it has its first list, however stale since.
    pub fn last_seen(&self) -> Option<Vec<Arc<K>>> {
        use futures::FutureExt;
        self.store.wait_until_ready().now_or_never()?.ok()?;
        Some(self.store.state())
    }
}

/// A cache of `api`'s objects (selected by `config`) and the task that keeps it: it runs
/// until dropped; a failing watch is logged once while it fails (`what` names the objects,
/// `meanwhile` what waits for them).
///
/// After an error the watch starts over from a list (after a backoff of 1 s, doubling to
/// 30 s while it keeps failing), which says when the store is current again. kube's watcher
/// would resume from where it was instead, and a watch that resumes says nothing until
/// something changes: on a quiet cluster the store could never be told current again, and
/// the loop would list the pods itself every pass meanwhile.
pub fn cache<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    meanwhile: &'static str,
) -> (
    Cache<K>,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    K: Resource + Clone + std::fmt::Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default + Send + Sync,
{
    let (store, mut writer) = reflector::store();
    let healthy = Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    let task = async move {
        let mut failing = LastError::default();
        let mut backoff = RESTART_BACKOFF_MIN;
        loop {
            // Managed fields are most of an object's size and nothing the loop reads.
            let events =
                watcher(api.clone(), config.clone()).modify(|o| o.meta_mut().managed_fields = None);
            futures::pin_mut!(events);
            while let Some(e) = events.next().await {
                match e {
                    Ok(e) => {
                        writer.apply_watcher_event(&e);
                        match e {
                            // A list: the store keeps the old objects until it is complete.
                            watcher::Event::Init => h.store(false, Ordering::SeqCst),
                            watcher::Event::InitApply(_) => {}
                            _ => {
                                h.store(true, Ordering::SeqCst);
                                backoff = RESTART_BACKOFF_MIN;
                                if failing.worked() {
                                    info!("autoscaling loop: watching {what} works again");
                                }
                            }
                        }
                    }
                    Err(e) => {
                        h.store(false, Ordering::SeqCst);
                        if failing.failed(&e.to_string()) {
                            warn!(
                                "autoscaling loop: watching {what} ({meanwhile} until it \
                                 works): {e}"
                            );
                        }
                        break;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
        }
    };
    (Cache { store, healthy }, task)
}

const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;

    async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        for _ in 0..100 {
            if let Some(v) = f() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: not within 5 s");
    }

    /// A cache of the pods `client`'s API server lists, its task running, once it has had
    /// its first list (returned) and then seen its watch fail.
    async fn listed_then_failed(
        client: kube::Client,
    ) -> (Cache<Pod>, Vec<Arc<Pod>>, tokio::task::JoinHandle<()>) {
        let (pods, task) = cache(
            Api::<Pod>::all(client),
            watcher::Config::default(),
            "pods",
            "nothing",
        );
        let task = tokio::spawn(task);
        let listed = until("the first list", || pods.current()).await;
        until("the watch failing", || {
            pods.current().is_none().then_some(())
        })
        .await;
        (pods, listed, task)
    }

    #[tokio::test]
    async fn a_cache_whose_watch_fails_is_not_current_but_keeps_what_it_last_saw() {
        let (pods, listed, _task) =
            listed_then_failed(crate::test_support::list_then_fail().await).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].metadata.managed_fields, None, "stripped");
        let kept = pods.last_seen().expect("what it last saw");
        assert_eq!(kept[0].metadata.name.as_deref(), Some("p"));
    }

    /// A watch that fails once, on a cluster where nothing changes after: the cache is
    /// current again once its watch has listed afresh (resumed where it was, it would wait
    /// for a change that never comes).
    #[tokio::test]
    async fn a_cache_is_current_again_after_a_failed_watch_on_a_quiet_cluster() {
        let (pods, _, _task) =
            listed_then_failed(crate::test_support::one_failed_watch().await).await;
        let again = until("current again", || pods.current()).await;
        assert_eq!(again[0].metadata.name.as_deref(), Some("p"));
    }
}
