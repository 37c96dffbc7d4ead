//! The InferenceService reconciler: level-triggered and idempotent. Children (Deployment,
//! Service, token Secret) by server-side apply with owner references, so deleting the service
//! garbage-collects them and no finalizer is needed; status by server-side apply on the status
//! subresource; one Event per action; invalid specs become a `Degraded` condition while every
//! other InferenceService keeps reconciling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::Discovery;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::autoscaler::Stop;
use crate::children::{self, Defaults};
use crate::conditions::{self, Cond, AUTOSCALER_OWNED, DEGRADED, INVALID_SPEC, PROGRESSING, READY};
use crate::crd::{AutoscalingPolicy, InferenceService, InferenceServiceStatus};
use crate::metrics::Metrics;
use crate::validate;

pub const MANAGER: &str = "redline-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    MissingKey(&'static str),
    #[error("no answer within {0:?} (the API server throttling or unavailable)")]
    Timeout(Duration),
}

impl Error {
    /// Label for the errors metric, and the basis of the retry delay.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 429 || s.code >= 500 => "server",
            // Usually final, but also what a restarted API server answers until its RBAC
            // caches are filled: retried sooner than other rejections.
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(_)) => "rejected",
            Error::Kube(_) => "transport",
            Error::MissingKey(_) => "invalid_object",
            Error::Timeout(_) => "timeout",
        }
    }
}

/// Shared by every reconciliation.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub defaults: Defaults,
    pub metrics: Arc<Metrics>,
    /// The last error logged per object, so a failure repeating on every retry is logged once.
    last_error: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// The PodDisruptionBudget's API, discovered once (`Context::pdb_api`).
    pdb_api: tokio::sync::OnceCell<Option<ApiResource>>,
    /// The one namespace the operator watches (`--watch-namespace`); every one when `None`.
    namespace: Option<String>,
}

impl Context {
    pub fn new(
        client: Client,
        defaults: Defaults,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            metrics,
            last_error: Default::default(),
            pdb_api: Default::default(),
            namespace: None,
        }
    }

    /// Watches and reconciles in `namespace` alone (`None`: in every namespace). Namespaced,
    /// the operator needs only a Role there, not a ClusterRole (the chart's `watchNamespace`).
    pub fn watching(mut self, namespace: Option<String>) -> Self {
        self.namespace = namespace;
        self
    }

    /// The API of `K` over what the operator watches: its one namespace, or all of them.
    pub fn watched<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    pub(crate) async fn event(
        &self,
        isvc: &InferenceService,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        info!(isvc = %format!("{}/{}", isvc.namespace().unwrap_or_default(), isvc.name_any()), reason, "{note}");
        self.metrics.events.with_label_values(&[reason]).inc();
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &isvc.object_ref(&())).await {
            warn!("publishing event {reason}: {e}");
        }
    }

    /// [`pdb_api`], discovered on first use and said once; a failed discovery is the
    /// reconcile's error, tried again.
    async fn pdb_api(&self) -> Result<Option<ApiResource>, Error> {
        let api = self
            .pdb_api
            .get_or_try_init(|| async {
                let api = pdb_api(&self.client).await?;
                match &api {
                    Some(a) => info!(api = %a.api_version, "PodDisruptionBudgets"),
                    None => {
                        warn!("this API server serves no PodDisruptionBudgets: services get none")
                    }
                }
                Ok::<_, Error>(api)
            })
            .await?;
        Ok(api.clone())
    }
}

/// The PodDisruptionBudget as this API server serves it: `policy/v1` (1.21 on), else
/// `policy/v1beta1` (the local cluster's 1.20; gone in 1.25); `None` where neither is.
pub async fn pdb_api(client: &Client) -> Result<Option<ApiResource>, kube::Error> {
    let d = Discovery::new(client.clone())
        .filter(&["policy"])
        .run()
        .await?;
    Ok(d.get("policy")
        .and_then(|g| g.recommended_kind("PodDisruptionBudget"))
        .map(|(api, _)| api))
}

/// Applies a child by server-side apply, with an Event when the apply created it.
async fn apply_child<K>(
    ctx: &Context,
    isvc: &InferenceService,
    api: &Api<K>,
    child: &K,
    what: &str,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let name = child.name_any();
    if apply_created(&ctx.client, api, child).await? {
        ctx.event(
            isvc,
            EventType::Normal,
            "Created",
            &format!("Create{what}"),
            format!("created {what} {name}"),
        )
        .await;
    }
    Ok(())
}

/// Server-side applies `child`; whether that created it. The API server answers an apply
/// that creates with 201 and one that updates with 200, so the "Created" Event needs no GET
/// before every apply (two calls of each reconcile's nine, for the Service and the budget).
async fn apply_created<K>(client: &Client, api: &Api<K>, child: &K) -> Result<bool, Error>
where
    K: kube::Resource + serde::Serialize,
{
    let req = kube::core::Request::new(api.resource_url())
        .patch(&child.name_any(), &apply_params(), &Patch::Apply(child))
        .map_err(kube::Error::BuildRequest)?;
    let res = client.send(req.map(kube::client::Body::from)).await?;
    let status = res.status();
    if status.is_success() {
        return Ok(status.as_u16() == 201);
    }
    // As kube's own calls report it.
    let body = res.into_body().collect_bytes().await?;
    let s = serde_json::from_slice::<kube::core::Status>(&body).unwrap_or_else(|_| {
        kube::core::Status::failure(
            &String::from_utf8_lossy(&body),
            "Failed to parse error data",
        )
        .with_code(status.as_u16())
    });
    Err(kube::Error::Api(s.boxed()).into())
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

pub async fn reconcile(isvc: Arc<InferenceService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics.reconciles.inc();
    let r = reconcile_inner(&isvc, &ctx).await;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    if r.is_ok() {
        let key = format!(
            "{}/{}",
            isvc.namespace().unwrap_or_default(),
            isvc.name_any()
        );
        if ctx.last_error.lock().unwrap().remove(&key).is_some() {
            info!(isvc = %key, "reconciling again after errors");
        }
    }
    r
}

async fn reconcile_inner(isvc: &InferenceService, ctx: &Context) -> Result<Action, Error> {
    let ns = isvc.namespace().ok_or(Error::MissingKey("namespace"))?;
    let name = isvc.name_any();
    if isvc.metadata.deletion_timestamp.is_some() {
        // Being deleted (foreground: the garbage collector is removing the children):
        // re-applying them now would resurrect what is being collected.
        return Ok(Action::await_change());
    }
    let isvcs: Api<InferenceService> = Api::namespaced(ctx.client.clone(), &ns);
    let previous = isvc.status.clone().unwrap_or_default();
    let generation = isvc.metadata.generation;
    let now = Timestamp::now();

    let problems = validate::problems(&isvc.spec);
    if !problems.is_empty() {
        return report_invalid(ctx, isvc, &isvcs, &previous, problems.join("; ")).await;
    }

    // What the spec refers to must exist: a missing one is reported (Degraded), and the
    // children are still applied, so the service comes up once it is created.
    let missing = missing_references(isvc, ctx, &ns).await?;
    // Children.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let before = deployments.get_opt(&name).await?;
    let want = children::deployment(isvc, &ctx.defaults);
    let dep = match deployments
        .patch(&name, &apply_params(), &Patch::Apply(&want))
        .await
    {
        Ok(d) => d,
        // What a 1.20 schema cannot check and the API server's validation of a pod template
        // does (a toleration's operator, a node selector's label syntax, ...): the spec is at
        // fault, and retrying it cannot help. The Deployment, if any, keeps its last good spec.
        Err(kube::Error::Api(e)) if e.code == 422 => {
            let message = format!("the API server rejected the Deployment: {}", e.message);
            return report_invalid(ctx, isvc, &isvcs, &previous, message).await;
        }
        Err(e) => return Err(e.into()),
    };
    let replicas_of = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    match &before {
        None => {
            ctx.event(
                isvc,
                EventType::Normal,
                "Created",
                "CreateDeployment",
                format!(
                    "created Deployment {name} with {} replicas",
                    replicas_of(&dep)
                ),
            )
            .await;
        }
        Some(b) if replicas_of(b) != replicas_of(&dep) => {
            ctx.event(
                isvc,
                EventType::Normal,
                "Scaled",
                "ScaleDeployment",
                format!(
                    "scaled Deployment {name} from {} to {} replicas",
                    replicas_of(b),
                    replicas_of(&dep)
                ),
            )
            .await;
        }
        Some(b) if b.metadata.generation != dep.metadata.generation => {
            ctx.event(
                isvc,
                EventType::Normal,
                "Updated",
                "UpdateDeployment",
                format!(
                    "updated Deployment {name} (generation {})",
                    dep.metadata.generation.unwrap_or(0)
                ),
            )
            .await;
        }
        _ => {}
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    apply_child(ctx, isvc, &services, &children::service(isvc), "Service").await?;
    if let Some(api) = ctx.pdb_api().await? {
        let pdbs: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &api);
        let pdb = children::disruption_budget(isvc, &api);
        apply_child(ctx, isvc, &pdbs, &pdb, "PodDisruptionBudget").await?;
    }
    if isvc.spec.sidecar.enabled {
        ensure_token_secret(isvc, ctx, &ns).await?;
    }

    // Status from what the Deployment reports.
    let ds = dep.status.clone().unwrap_or_default();
    let desired = replicas_of(&dep);
    let ready = ds.ready_replicas.unwrap_or(0);
    let updated = ds.updated_replicas.unwrap_or(0);
    let total = ds.replicas.unwrap_or(0);
    let rolled_out =
        ds.observed_generation >= dep.metadata.generation && updated == desired && total == desired;
    let all_ready = ready >= desired;
    let conds = vec![
        Cond {
            type_: READY,
            ok: Some(all_ready && desired > 0 || desired == 0),
            reason: if desired == 0 {
                "ScaledToZero"
            } else if all_ready {
                "AllReplicasReady"
            } else {
                "ReplicasNotReady"
            },
            message: format!("{ready}/{desired} replicas ready"),
        },
        Cond {
            type_: PROGRESSING,
            ok: Some(!(rolled_out && all_ready)),
            reason: if rolled_out && all_ready {
                "Stable"
            } else if !rolled_out {
                "RollingOut"
            } else {
                "WaitingForReady"
            },
            message: format!("{updated} updated, {total} total, {ready} ready of {desired}"),
        },
        match missing.first() {
            Some((reason, _)) => Cond {
                type_: DEGRADED,
                ok: Some(true),
                reason,
                message: missing
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            },
            None => Cond {
                type_: DEGRADED,
                ok: Some(false),
                reason: "AsExpected",
                message: "children applied".into(),
            },
        },
    ];
    let status = InferenceServiceStatus {
        replicas: total,
        ready_replicas: ready,
        selector: Some(children::selector_string(isvc)),
        observed_generation: generation,
        conditions: with_autoscaler_conditions(
            conditions::merge(&previous.conditions, now, generation, conds),
            &previous,
        ),
        served_model: Some(children::served_model(isvc)),
        url: Some(children::url(isvc)),
        ..reconciler_fields(&previous)
    };
    if status != reconciler_fields(&previous) {
        write_status(&isvcs, &name, &status).await?;
    }
    // Children changes wake us through the owned-object watches; the requeue is a safety net.
    Ok(Action::requeue(if all_ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(10)
    }))
}

/// The referenced objects that do not exist, as `(reason, message)`: the AutoscalingPolicy (the
/// autoscaler reads it) and the API key Secret and its entry (the engine pods cannot start
/// without them: the kubelet waits to mount it). The Secret's keys are read only to see the
/// entry is there; never logged.
async fn missing_references(
    isvc: &InferenceService,
    ctx: &Context,
    ns: &str,
) -> Result<Vec<(&'static str, String)>, Error> {
    let mut missing = Vec::new();
    if let Some(r) = isvc
        .spec
        .autoscaling
        .as_ref()
        .and_then(|a| a.policy_ref.as_ref())
    {
        let policies: Api<AutoscalingPolicy> = Api::namespaced(ctx.client.clone(), ns);
        if policies.get_opt(r).await?.is_none() {
            missing.push((
                "PolicyNotFound",
                format!("AutoscalingPolicy {r:?} not found in namespace {ns}"),
            ));
        }
    }
    if let Some(k) = &isvc.spec.api_key_secret {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let problem = match secrets.get_opt(&k.name).await? {
            None => Some(format!(
                "the API key Secret {:?} is not found in namespace {ns}; the engine pods wait for it",
                k.name
            )),
            Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key(&k.key)) => Some(format!(
                "the API key Secret {:?} has no entry {:?}; the engine pods wait for it",
                k.name, k.key
            )),
            Some(_) => None,
        };
        if let Some(m) = problem {
            missing.push(("ApiKeySecretNotFound", m));
        }
    }
    Ok(missing)
}

/// Reports a spec that cannot be served: Degraded (reason `InvalidSpec`, with `message`), a
/// Warning Event when the message is new; then nothing to do until the spec changes (which
/// triggers a reconcile by itself).
async fn report_invalid(
    ctx: &Context,
    isvc: &InferenceService,
    isvcs: &Api<InferenceService>,
    previous: &InferenceServiceStatus,
    message: String,
) -> Result<Action, Error> {
    let generation = isvc.metadata.generation;
    let now = Timestamp::now();
    let already = conditions::find(&previous.conditions, DEGRADED)
        .is_some_and(|c| c.status == "True" && c.message == message);
    if !already {
        ctx.event(
            isvc,
            EventType::Warning,
            INVALID_SPEC,
            "Validate",
            message.clone(),
        )
        .await;
    }
    let status = InferenceServiceStatus {
        observed_generation: generation,
        conditions: with_autoscaler_conditions(
            conditions::merge(
                &previous.conditions,
                now,
                generation,
                vec![
                    Cond {
                        type_: READY,
                        ok: Some(false),
                        reason: INVALID_SPEC,
                        message: "the spec is invalid; see Degraded".into(),
                    },
                    Cond {
                        type_: PROGRESSING,
                        ok: Some(false),
                        reason: INVALID_SPEC,
                        message: String::new(),
                    },
                    Cond {
                        type_: DEGRADED,
                        ok: Some(true),
                        reason: INVALID_SPEC,
                        message,
                    },
                ],
            ),
            previous,
        ),
        ..reconciler_fields(previous)
    };
    write_status(isvcs, &isvc.name_any(), &status).await?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

/// The part of the status this reconciler writes. The autoscaling loop writes `kvUsage`,
/// `lateRequests`, `podLimits`, `lastDecision` and `autoscalerMemory` (never sent here, so a
/// server-side apply leaves them alone: sent as this reconciler last saw them, they would put
/// back what the loop has since replaced, and a new leader would go on from an older memory)
/// and its conditions (`AUTOSCALER_OWNED`), which are passed through as found: a 1.20 API
/// server treats the conditions list as one value, whatever the schema says.
fn reconciler_fields(s: &InferenceServiceStatus) -> InferenceServiceStatus {
    InferenceServiceStatus {
        kv_usage: None,
        late_requests: None,
        pod_limits: Vec::new(),
        last_decision: None,
        autoscaler_memory: None,
        ..s.clone()
    }
}

/// `conds` plus the autoscaling loop's conditions found in `previous`.
fn with_autoscaler_conditions(
    mut conds: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    previous: &InferenceServiceStatus,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    for t in AUTOSCALER_OWNED {
        conds.extend(conditions::find(&previous.conditions, t).cloned());
    }
    conds
}

async fn write_status(
    isvcs: &Api<InferenceService>,
    name: &str,
    status: &InferenceServiceStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": InferenceService::api_version(&()),
        "kind": InferenceService::kind(&()),
        "status": status,
    });
    isvcs
        .patch_status(name, &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// The sidecar's bearer token: generated once, never rotated by a reconcile (pods read it).
async fn ensure_token_secret(
    isvc: &InferenceService,
    ctx: &Context,
    ns: &str,
) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = children::token_secret_name(isvc);
    if secrets.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    let token: [u8; 32] = rand::random();
    let secret = Secret {
        metadata: children::token_secret_meta(isvc),
        data: Some(
            [(
                "token".to_string(),
                ByteString(hex::encode(token).into_bytes()),
            )]
            .into(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            ctx.event(
                isvc,
                EventType::Normal,
                "Created",
                "CreateSecret",
                format!("created Secret {name} (sidecar token)"),
            )
            .await;
            Ok(())
        }
        // Created meanwhile (e.g. by the previous leader): fine.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub fn error_policy(isvc: Arc<InferenceService>, err: &Error, ctx: Arc<Context>) -> Action {
    let kind = err.kind();
    ctx.metrics.errors.with_label_values(&[kind]).inc();
    let key = format!(
        "{}/{}",
        isvc.namespace().unwrap_or_default(),
        isvc.name_any()
    );
    let msg = err.to_string();
    let repeated = ctx
        .last_error
        .lock()
        .unwrap()
        .insert(key.clone(), msg.clone())
        .as_ref()
        == Some(&msg);
    if repeated {
        tracing::debug!(isvc = %key, kind, "reconcile failed again: {msg}");
    } else {
        warn!(isvc = %key, kind, "reconcile failed (retrying): {msg}");
    }
    Action::requeue(match kind {
        "conflict" => Duration::from_millis(500),
        "server" | "transport" | "timeout" => Duration::from_secs(5),
        "forbidden" => Duration::from_secs(15),
        _ => Duration::from_secs(60),
    })
}

/// The controller's watches share one backoff, and it pauses all of them at once: kube applies
/// it to the merged trigger stream, so every error of any watch (after an API server restart
/// each watch fails several times: connection refused, 403 until the new server's RBAC caches
/// fill, 410 Gone) sleeps every watch. kube's client-go-like default (0.8 s doubling to 30 s,
/// reset only after 120 s quiet) then keeps the controller deaf for minutes; even a 5 s cap
/// cost ~35 s per recovery on a loaded machine (4 watches x a few errors x 5 s). A 1 s cap
/// recovers within seconds and is at most one request per second per watch on a struggling
/// server.
fn trigger_backoff() -> impl kube::runtime::utils::Backoff {
    let exp: watcher::ExponentialBackoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into();
    kube::runtime::utils::ResetTimerBackoff::new(exp, Duration::from_secs(5))
}

/// The InferenceServices into `store` (every change: the autoscaling loop reads their status
/// from it), and the reconciler woken only by a change of spec (`metadata.generation`, which
/// the scale subresource moves too) or by its first sight of one. Status changes are not its
/// work: under load the loop writes status every pass (KV usage, its decision, its memory),
/// and each write woke a reconcile that GETs the Deployment and its references and applies
/// every child, 5-7 API calls a service every 5 s. Its children's changes still wake it (the
/// owned watches), and so does its requeue.
fn spec_changes(
    api: Api<InferenceService>,
    cfg: watcher::Config,
    store: reflector::store::Writer<InferenceService>,
) -> impl futures::Stream<Item = Result<InferenceService, watcher::Error>> + Send {
    use kube::runtime::{predicates, WatchStreamExt};
    watcher::watcher(api, cfg)
        .reflect(store)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default())
}

/// Runs the controller, and the autoscaling loop every `interval`, until `shutdown` resolves
/// (the loop then hands its policies over if it says so).
pub async fn run(
    ctx: Arc<Context>,
    interval: Duration,
    shutdown: impl std::future::Future<Output = Stop> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let shutdown = shutdown.shared();
    let isvcs: Api<InferenceService> = ctx.watched();
    let (reader, writer) = reflector::store();
    // Lists in pages of 50 and at most 16 reconciles at once: 500 services created together
    // then cost a few pages and requests in flight, not all of them in memory at once (the API
    // server, not the operator, bounds how fast they converge).
    let cfg = watcher::Config::default().page_size(50);
    let controller = Controller::for_stream(spec_changes(isvcs, cfg.clone(), writer), reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(16))
        .trigger_backoff(trigger_backoff());
    // A policy change (or creation) wakes the services that reference it.
    let store = controller.store();
    let scaler = crate::autoscaler::Autoscaler::new(ctx.clone()).run(
        store.clone(),
        interval,
        shutdown.clone(),
    );
    let controller = controller
        .watches(
            ctx.watched::<AutoscalingPolicy>(),
            cfg.clone(),
            move |policy| {
                let (ns, name) = (policy.namespace(), policy.name_any());
                store
                    .state()
                    .into_iter()
                    .filter(|i| {
                        i.namespace() == ns
                            && i.spec
                                .autoscaling
                                .as_ref()
                                .and_then(|a| a.policy_ref.as_deref())
                                == Some(name.as_str())
                    })
                    .map(|i| kube::runtime::reflector::ObjectRef::from_obj(&*i))
                    .collect::<Vec<_>>()
            },
        )
        .owns(
            ctx.watched::<Deployment>(),
            cfg.clone()
                .labels("app.kubernetes.io/managed-by=redline-operator"),
        )
        .owns(
            ctx.watched::<Service>(),
            cfg.clone()
                .labels("app.kubernetes.io/managed-by=redline-operator"),
        )
        .graceful_shutdown_on(shutdown.map(|_| ()))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("controller: {e}");
            }
        });
    // The loop runs as long as the controller (it stops with leadership); when both stop, the
    // loop's last writes are let finish.
    tokio::pin!(scaler);
    tokio::select! {
        _ = controller => scaler.await,
        _ = &mut scaler => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AutoscalerMemory, Decision, PodLimits};

    /// The loop's status writes reach the store (it reads status from there) but wake no
    /// reconcile; a spec change, and a service first seen, do.
    #[tokio::test]
    async fn status_writes_wake_no_reconcile_a_spec_change_does() {
        let at = |generation: i64, kv: Option<&str>| {
            let mut i: InferenceService = serde_yaml::from_str(
                "apiVersion: redline.dev/v1alpha1\nkind: InferenceService\n\
                 metadata: {name: a, namespace: n}\nspec: {model: {default: {}}}\n",
            )
            .unwrap();
            i.metadata.generation = Some(generation);
            i.metadata.resource_version = Some(format!("{generation}{}", kv.unwrap_or("")));
            i.status = kv.map(|kv| InferenceServiceStatus {
                kv_usage: Some(kv.into()),
                ..Default::default()
            });
            serde_json::to_value(i).unwrap()
        };
        let client = crate::test_support::inference_service_watch(vec![
            ("ADDED", at(1, None)),
            ("MODIFIED", at(1, Some("10%"))),
            ("MODIFIED", at(1, Some("40%"))),
            ("MODIFIED", at(2, Some("40%"))),
            ("MODIFIED", at(2, Some("70%"))),
        ])
        .await;
        let (reader, writer) = reflector::store();
        let woken = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut triggers =
            spec_changes(Api::all(client), watcher::Config::default(), writer).boxed();
        let seen = woken.clone();
        tokio::spawn(async move {
            while let Some(i) = triggers.next().await {
                seen.lock().unwrap().push(i.unwrap().metadata.generation);
            }
        });
        // The store has every write, the last status included...
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let kv = reader
                    .state()
                    .first()
                    .and_then(|i| i.status.as_ref()?.kv_usage.clone());
                if kv.as_deref() == Some("70%") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the last status write in the store");
        // ...and the reconciler was woken twice: first sight, and the spec's change.
        assert_eq!(*woken.lock().unwrap(), vec![Some(1), Some(2)]);
    }

    /// A server-side apply of what the reconciler read would own and put back the loop's
    /// fields as they were then.
    #[test]
    fn the_reconciler_sends_none_of_the_loops_fields() {
        let s = InferenceServiceStatus {
            replicas: 2,
            kv_usage: Some("40%".into()),
            late_requests: Some("0.4/s".into()),
            pod_limits: vec![PodLimits {
                pod: "p".into(),
                max_num_seqs: 8,
                max_batched_tokens: 512,
                draining: true,
            }],
            last_decision: Some(Decision {
                summary: "scale 2->3".into(),
                reason: "r".into(),
                time: "2026-11-29T10:00:00Z".into(),
            }),
            autoscaler_memory: Some(AutoscalerMemory::default()),
            ..Default::default()
        };
        let sent = serde_json::to_value(reconciler_fields(&s)).unwrap();
        for loop_field in [
            "kvUsage",
            "lateRequests",
            "podLimits",
            "lastDecision",
            "autoscalerMemory",
        ] {
            assert!(sent.get(loop_field).is_none(), "{loop_field}: {sent}");
        }
        assert_eq!(sent["replicas"], 2);
    }
}
