//! The Kubernetes source and node authentication by TokenReview (feature `kube`).
//!
//! Owns [`KubeSource`] and [`TokenReviewAuth`] (the TokenReview and pod lookup around the
//! pure [`auth::decide`]: only the daemon's own ServiceAccount speaks for a node). The source runs one reflector per kind —
//! Namespaces labelled [`MESH_LABEL`]`=`[`MESH_ENABLED`] (a label selector, so removing the
//! label is a delete), Pods, ServiceAccounts, Services, and our [`TenantPolicy`] and
//! [`AuthorizationPolicy`] — and, after every change (coalesced for [`DEBOUNCE`]), feeds the
//! stores' contents as [`Objects`] to the one translation in [`Mode::Lenient`](crate::view::Mode::Lenient): a bad object
//! is skipped with a log line (and, for our resources, an `Accepted=False` status condition);
//! a pod without an address yet is skipped with one log line. The reflectors list, then watch;
//! on `410 Gone` they relist, and while the API server is away they retry with backoff, so the
//! last published view stays in force. Endpoints come from pods matching Service selectors
//! (no EndpointSlice: the 1.20 test API server does not serve `discovery.k8s.io/v1`).
//!
//! Must not touch: the gRPC layer (it reads the [`crate::feed`]), private keys.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tonic::Status;

use crate::auth::{
    self, Authenticator, Caller, Claimed, NodeTokenRule, Refusal, Refused, ServiceAccountRef,
};
use crate::crd::{AuthorizationPolicy, Condition, PolicyStatus, TenantPolicy};
use crate::error::Problem;
use crate::feed::Publisher;
use crate::objects::Objects;
use crate::view::{MESH_ENABLED, MESH_LABEL};

/// Changes closer together than this are published together.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// The audience of the projected service-account token nodes present.
pub const AUDIENCE: &str = "nodeproxy-controlplane";
/// Metric: watch errors of the Kubernetes source (counter).
pub const WATCH_ERRORS_TOTAL: &str = "nodeproxy_controlplane_kube_watch_errors_total";
/// Metric: node tokens refused, by `reason` ([`Refusal::as_str`], a closed set) (counter).
pub const NODE_TOKEN_REFUSALS_TOTAL: &str = "nodeproxy_controlplane_node_token_refusals_total";

/// The stores of every kind the source watches.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    service_accounts: Store<ServiceAccount>,
    services: Store<Service>,
    tenant_policies: Store<TenantPolicy>,
    authorization_policies: Store<AuthorizationPolicy>,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("pods", &self.pods.state().len())
            .finish_non_exhaustive()
    }
}

/// Drives one reflector, waking `changed` after every event; logs and counts errors (the
/// stream retries with backoff by itself).
fn drive<K>(
    kind: &'static str,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: Arc<Notify>,
) where
    K: Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    metrics::counter!(WATCH_ERRORS_TOTAL, "kind" => kind).increment(1);
                    tracing::warn!(kind, error = %e, "kubernetes watch failed; retrying with backoff, last view stays in force");
                }
            }
        }
    });
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    changed: &Arc<Notify>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    drive(kind, stream, changed.clone());
    store
}

impl KubeSource {
    /// Starts the reflectors on the current runtime and a task that publishes into
    /// `publisher` once every store has listed, then after every change.
    pub fn spawn(client: Client, mut publisher: Publisher) -> Self {
        let changed = Arc::new(Notify::new());
        let mesh = watcher::Config::default().labels(&format!("{MESH_LABEL}={MESH_ENABLED}"));
        let all = watcher::Config::default;
        let source = Self {
            namespaces: reflect(Api::all(client.clone()), mesh, "Namespace", &changed),
            pods: reflect(Api::all(client.clone()), all(), "Pod", &changed),
            service_accounts: reflect(Api::all(client.clone()), all(), "ServiceAccount", &changed),
            services: reflect(Api::all(client.clone()), all(), "Service", &changed),
            tenant_policies: reflect(Api::all(client.clone()), all(), "TenantPolicy", &changed),
            authorization_policies: reflect(
                Api::all(client.clone()),
                all(),
                "AuthorizationPolicy",
                &changed,
            ),
            client,
        };
        let this = source.clone();
        tokio::spawn(async move {
            if this.wait_until_ready().await.is_err() {
                return;
            }
            tracing::info!("kubernetes source: initial lists done");
            let mut logged_pending = HashSet::new();
            loop {
                let objects = this.objects(&mut logged_pending);
                let published = publisher.publish(&objects);
                tracing::debug!(
                    version = published.version,
                    pods = objects.pods.len(),
                    "kubernetes source published"
                );
                this.update_conditions(&objects, &published.cluster.problems)
                    .await;
                changed.notified().await;
                tokio::time::sleep(DEBOUNCE).await;
            }
        });
        source
    }

    async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.namespaces.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.service_accounts.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.tenant_policies.wait_until_ready().await?;
        self.authorization_policies.wait_until_ready().await
    }

    /// The stores' contents as one set of objects. Logs, once per pod, a meshed pod that has
    /// no address yet (the translation skips it until it has one).
    pub fn objects(&self, logged_pending: &mut HashSet<String>) -> Objects {
        fn all<K>(store: &Store<K>) -> Vec<K>
        where
            K: Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            // Stores iterate in no particular order; the translation's "first one wins" rules
            // (duplicate addresses, two policies for one tenant) need a stable one: oldest
            // first, then by namespace and name.
            let mut all: Vec<K> = store.state().iter().map(|k| (**k).clone()).collect();
            all.sort_by(|a, b| {
                let key = |k: &K| {
                    let m = k.meta();
                    (
                        m.creation_timestamp.as_ref().map(|t| t.0),
                        m.namespace.clone(),
                        m.name.clone(),
                    )
                };
                key(a).cmp(&key(b))
            });
            all
        }
        let objects = Objects {
            namespaces: all(&self.namespaces),
            pods: all(&self.pods),
            services: all(&self.services),
            tenant_policies: all(&self.tenant_policies),
            authorization_policies: all(&self.authorization_policies),
            ..Objects::new("kubernetes")
        };
        let meshed: HashSet<String> = objects.namespaces.iter().map(|n| n.name_any()).collect();
        for pod in &objects.pods {
            let ns = pod.namespace().unwrap_or_default();
            let has_ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty());
            let key = format!("{ns}/{}", pod.name_any());
            if meshed.contains(&ns) && !has_ip {
                if logged_pending.insert(key.clone()) {
                    tracing::info!(pod = %key, "meshed pod has no address yet; skipping it until the kubelet reports one");
                }
            } else {
                logged_pending.remove(&key);
            }
        }
        objects
    }

    /// The service accounts the source knows (for the CA's node authorization, later).
    pub fn service_accounts(&self) -> Vec<Arc<ServiceAccount>> {
        self.service_accounts.state()
    }

    /// Writes `Accepted` conditions on our resources whose acceptance changed.
    async fn update_conditions(&self, objects: &Objects, problems: &[Problem]) {
        let mut by_object: BTreeMap<&str, Vec<&Problem>> = BTreeMap::new();
        for p in problems {
            if let Some(object) = p.object.as_deref() {
                by_object.entry(object).or_default().push(p);
            }
        }
        for tp in &objects.tenant_policies {
            let label = format!(
                "TenantPolicy {}/{}",
                tp.namespace().unwrap_or_default(),
                tp.name_any()
            );
            let api: Api<TenantPolicy> =
                Api::namespaced(self.client.clone(), &tp.namespace().unwrap_or_default());
            let wanted = condition(tp.metadata.generation, by_object.get(label.as_str()));
            set_condition(&api, &label, &tp.name_any(), tp.status.as_ref(), wanted).await;
        }
        for ap in &objects.authorization_policies {
            let label = format!(
                "AuthorizationPolicy {}/{}",
                ap.namespace().unwrap_or_default(),
                ap.name_any()
            );
            let api: Api<AuthorizationPolicy> =
                Api::namespaced(self.client.clone(), &ap.namespace().unwrap_or_default());
            let wanted = condition(ap.metadata.generation, by_object.get(label.as_str()));
            set_condition(&api, &label, &ap.name_any(), ap.status.as_ref(), wanted).await;
        }
    }
}

/// The `Accepted` condition for an object with these problems.
fn condition(generation: Option<i64>, problems: Option<&Vec<&Problem>>) -> Condition {
    match problems {
        None => Condition {
            type_: "Accepted".to_owned(),
            status: "True".to_owned(),
            reason: "Valid".to_owned(),
            message: "in force on every node it applies to".to_owned(),
            observed_generation: generation,
        },
        Some(problems) => Condition {
            type_: "Accepted".to_owned(),
            status: "False".to_owned(),
            reason: "Invalid".to_owned(),
            message: problems
                .iter()
                .map(|p| match &p.field {
                    Some(f) => format!("{f}: {}", p.message),
                    None => p.message.clone(),
                })
                .collect::<Vec<_>>()
                .join("; "),
            observed_generation: generation,
        },
    }
}

async fn set_condition<K>(
    api: &Api<K>,
    label: &str,
    name: &str,
    current: Option<&PolicyStatus>,
    wanted: Condition,
) where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    if current.is_some_and(|s| s.conditions == [wanted.clone()]) {
        return;
    }
    if wanted.status == "False" {
        tracing::warn!(object = label, reason = %wanted.message, "skipping an invalid object");
    }
    let patch = serde_json::json!({ "status": PolicyStatus { conditions: vec![wanted] } });
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(object = label, error = %e, "cannot write the status condition");
    }
}

/// Node authentication in Kubernetes: a node's daemon presents its pod's projected
/// service-account token with audience [`AUDIENCE`]. A TokenReview checks the token, a GET
/// finds the pod it is bound to, and [`auth::decide`] (pure) says whether it may speak for a
/// node (only the daemon's ServiceAccount, [`auth::DEFAULT_DAEMON_ACCOUNT`] unless configured) and
/// which: the pod's `spec.nodeName`. Every refusal is logged and counted in
/// [`NODE_TOKEN_REFUSALS_TOTAL`] by its [`Refusal`].
#[derive(Clone)]
pub struct TokenReviewAuth {
    client: Client,
    rule: NodeTokenRule,
}

impl fmt::Debug for TokenReviewAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewAuth")
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuth {
    /// Reviews tokens with `client` for `audience`; only the ServiceAccount
    /// [`auth::DEFAULT_DAEMON_ACCOUNT`] may speak for a node.
    pub fn new(client: Client, audience: impl Into<String>) -> Self {
        Self::with_account(client, audience, ServiceAccountRef::default())
    }

    /// Like [`TokenReviewAuth::new`], with the daemon's ServiceAccount `account`.
    pub fn with_account(
        client: Client,
        audience: impl Into<String>,
        account: ServiceAccountRef,
    ) -> Self {
        Self {
            client,
            rule: NodeTokenRule {
                account,
                audience: audience.into(),
            },
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, Status> {
        let verdict = self.check(token).await;
        if let Err(refused) = &verdict {
            metrics::counter!(NODE_TOKEN_REFUSALS_TOTAL, "reason" => refused.reason.as_str())
                .increment(1);
            tracing::warn!(
                reason = refused.reason.as_str(),
                seen = %refused.seen,
                expected = %self.rule.account,
                "node token refused: {}",
                refused.message
            );
        }
        verdict.map_err(|refused| refused.status())
    }

    /// The I/O around [`auth::decide`]: the TokenReview, then the bound pod's lookup.
    async fn check(&self, token: &str) -> Result<Caller, Refused> {
        let unavailable = |message: String| Refused {
            reason: Refusal::Unavailable,
            seen: "nothing (the kubernetes api could not be asked)".to_owned(),
            message,
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.rule.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "cannot review the token with the kubernetes api: {e}; retry, and check the \
                     control plane may create tokenreviews"
                ))
            })?;
        let status = reviewed.status.unwrap_or_default();
        let claimed = Claimed::read(token);
        let bound = auth::bound_pod(&status, &claimed, &self.rule)?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), &bound.namespace)
            .get_opt(&bound.name)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "cannot look up the token's pod {}/{}: {e}; retry, and check the control \
                     plane may get pods",
                    bound.namespace, bound.name
                ))
            })?;
        auth::decide(&status, &claimed, pod.as_ref(), &self.rule)
    }
}

impl Authenticator for TokenReviewAuth {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Status>> {
        Box::pin(self.review(token))
    }
}
