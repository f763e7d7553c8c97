//! The Kubernetes tier: the control plane against a real kube-apiserver + etcd (1.20, built
//! from Debian's `kubernetes` source package by `tests/kube/build.sh`, started on loopback by
//! `tests/kube/start.sh`). One API server for the whole file, steps in order: the opt-in label
//! meshes a namespace's pods on a watching node, pod create/delete arrive as deltas, our CRDs
//! reach the view (and a conflicting TenantPolicy gets `Accepted=False`), TokenReview accepts
//! a real bound token and refuses a forged one or another node's view, only the daemon's own
//! ServiceAccount speaks for a node (another pod's token on the same node, a token of another
//! audience and one bound to a deleted pod are refused for `Watch` and `Certify`, each naming
//! the account, each counted), and the API server stopped and restarted: the node keeps its
//! last view meanwhile and the source recovers.
//!
//! Absences (pods of an unlabelled namespace, a change while the API server is down) are
//! asserted only after a positive signal: a later pod the source must see after the ones that
//! must stay out; a counted watch error, then the first update after the restart.
//!
//! Ignored by default (a plain `cargo test` may lack the binary); `scripts/test.sh` runs it with
//! `--include-ignored`, and then a missing binary or etcd fails the test, naming the fix.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use controlplane::api::discovery_client::DiscoveryClient;
use controlplane::api::identity_client::IdentityClient;
use controlplane::api::{CertifyRequest, NodeRequest};
use controlplane::auth::{Authenticator as _, Caller};
use controlplane::client::{self, Backoff, ClientConfig, Token, VersionedView};
use controlplane::crd::{AllowedIdentity, AuthorizationPolicy, AuthorizationPolicySpec};
use controlplane::crd::{TenantPolicy, TenantPolicySpec};
use controlplane::feed::Publisher;
use controlplane::kubernetes::{
    AUDIENCE, KubeSource, NODE_TOKEN_REFUSALS_TOTAL, TokenReviewAuth, WATCH_ERRORS_TOTAL,
};
use controlplane::view::Mode;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt as _};
use nodeproxy_tests::local_counter as counter;
use serde_json::json;
use tokio::sync::watch;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kube");

/// The API server's directory (`NODEPROXY_KUBE_DIR`, default `/var/tmp/nodeproxy-kube`);
/// panics naming what is missing and how to build it (the test was asked to run).
fn gate() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("NODEPROXY_KUBE_DIR").unwrap_or_else(|_| "/var/tmp/nodeproxy-kube".into()),
    );
    let bin = dir.join("bin/kube-apiserver");
    let missing: Vec<String> = [bin.as_path(), Path::new("/usr/bin/etcd")]
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "the kube-apiserver tier cannot run: missing {}; build it with tests/kube/build.sh \
         (as root, ~8 min once; it also installs etcd-server), or set NODEPROXY_KUBE_DIR to \
         where it was built",
        missing.join(", ")
    );
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// etcd + kube-apiserver started by the project's scripts; stopped (by pid) on drop.
struct ApiServer {
    run: tempfile::TempDir,
    kube_dir: PathBuf,
    ports: [(String, u16); 3],
}

impl ApiServer {
    fn start(kube_dir: PathBuf) -> Self {
        let this = Self {
            run: tempfile::tempdir().unwrap(),
            kube_dir,
            ports: [
                ("API_PORT".into(), free_port()),
                ("ETCD_PORT".into(), free_port()),
                ("ETCD_PEER".into(), free_port()),
            ],
        };
        this.script("start.sh", "all");
        this
    }

    fn script(&self, name: &str, what: &str) {
        let mut cmd = Command::new(Path::new(SCRIPTS).join(name));
        cmd.arg(what)
            .env("RUN", self.run.path())
            .env("NODEPROXY_KUBE_DIR", &self.kube_dir);
        for (k, v) in &self.ports {
            cmd.env(k, v.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{name} {what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.run.path().join("kubeconfig")).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        Client::try_from(config).unwrap()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.script("stop.sh", "all");
    }
}

fn meta(name: &str, ns: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, node: &str, sa: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            labels: Some([("app".to_owned(), sa.to_owned())].into()),
            ..meta(name, Some(ns))
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(sa.into()),
            containers: vec![Container {
                name: "main".into(),
                image: Some("example/app".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

async fn create_pod(
    c: &Client,
    ns: &str,
    name: &str,
    node: &str,
    sa: &str,
    ip: Option<&str>,
) -> Pod {
    let api: Api<Pod> = Api::namespaced(c.clone(), ns);
    let created = api
        .create(&PostParams::default(), &pod(ns, name, node, sa))
        .await
        .unwrap();
    if let Some(ip) = ip {
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        return api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }
    created
}

async fn wait_for(
    rx: &mut watch::Receiver<Option<Arc<VersionedView>>>,
    what: &str,
    f: impl Fn(&VersionedView) -> bool,
) -> Arc<VersionedView> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = rx.borrow_and_update().clone()
            && f(&v)
        {
            return v;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let last = rx.borrow().clone();
        assert!(
            !left.is_zero(),
            "timed out waiting for {what}; last view: {last:#?}"
        );
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

fn local(v: &VersionedView) -> Vec<String> {
    v.view
        .local
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

fn remote(v: &VersionedView) -> Vec<String> {
    v.view
        .remote
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

/// A projected-style token of `pod`'s service account, bound to `pod`, with our audience:
/// what the kubelet would mount.
async fn bound_token(c: &Client, pod: &Pod) -> String {
    token_for(c, pod, AUDIENCE).await
}

/// A token of `pod`'s service account, bound to `pod`, for `audience` (what the kubelet
/// mounts for a projected volume with that audience).
async fn token_for(c: &Client, pod: &Pod, audience: &str) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap();
    let sa = pod.spec.as_ref().unwrap().service_account_name.as_deref();
    let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    sas.create_token_request(sa.unwrap(), &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn watch_request(node: &str, token: &str) -> tonic::Request<NodeRequest> {
    with_token(NodeRequest { node: node.into() }, token)
}

/// The identity of app1's pods (`web-0` runs on node-a).
const WEB: &str = "spiffe://cluster.local/ns/app1/sa/web";

fn certify_request(token: &str) -> tonic::Request<CertifyRequest> {
    let csr_pem = certs::test_util::csr_pem(WEB);
    let identity = WEB.to_owned();
    with_token(
        CertifyRequest {
            csr_pem,
            identity,
            validity_seconds: 0,
        },
        token,
    )
}

async fn create_service_account(c: &Client, ns: &str, name: &str) {
    Api::<ServiceAccount>::namespaced(c.clone(), ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta(name, Some(ns)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

fn refusals(reason: &str) -> f64 {
    counter(NODE_TOKEN_REFUSALS_TOTAL, &[("reason", reason)])
}

/// `token` is refused for both node-a's `Watch` and a `Certify` of an identity with a pod on
/// node-a, each with one of the `answers` (a code and the refusal reason it is counted
/// under), each message containing every one of `parts`.
async fn refused_for_watch_and_certify(
    endpoint: &str,
    token: &str,
    answers: &[(tonic::Code, &str)],
    parts: &[&str],
) {
    let before: Vec<f64> = answers.iter().map(|(_, reason)| refusals(reason)).collect();
    let mut expected = before.clone();
    let mut discovery = DiscoveryClient::connect(endpoint.to_owned()).await.unwrap();
    let mut identity = IdentityClient::connect(endpoint.to_owned()).await.unwrap();
    let watched = discovery.watch(watch_request("node-a", token)).await;
    let certified = identity.certify(certify_request(token)).await;
    for (call, err) in [("watch", watched.err()), ("certify", certified.err())] {
        let err = err.unwrap_or_else(|| panic!("{call} accepted a token that must be refused"));
        let Some(i) = answers.iter().position(|(code, _)| *code == err.code()) else {
            panic!("{call}: {err:?} is none of {answers:?}");
        };
        expected[i] += 1.0;
        for part in parts {
            assert!(
                err.message().contains(part),
                "{call}: {:?} lacks {part:?}",
                err.message()
            );
        }
    }
    let counted: Vec<f64> = answers.iter().map(|(_, reason)| refusals(reason)).collect();
    assert_eq!(
        counted, expected,
        "{answers:?}: one count per call, from {before:?}"
    );
}

/// Only the daemon's own ServiceAccount speaks for a node. The daemon's token certifies an
/// identity of a pod on its node; another pod's token on the same node, the daemon's token
/// for another audience, and its token bound to a pod since deleted are refused for both
/// `Watch` and `Certify`, naming the account.
async fn only_the_daemon_speaks_for_a_node(c: &Client, endpoint: &str, token_a: &str) {
    let auth = TokenReviewAuth::new(c.clone(), AUDIENCE);
    assert_eq!(
        auth.authenticate(token_a).await.unwrap(),
        Caller::Node("node-a".into())
    );
    let mut identity = IdentityClient::connect(endpoint.to_owned()).await.unwrap();
    let signed = identity
        .certify(certify_request(token_a))
        .await
        .unwrap()
        .into_inner();
    assert!(!signed.cert_chain_pem.is_empty(), "{signed:?}");

    // Another pod on node-a, of another account, with a valid token of our audience.
    Api::<Namespace>::all(c.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta("intruder", None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    create_service_account(c, "intruder", "web").await;
    let intruder = create_pod(c, "intruder", "web-0", "node-a", "web", None).await;
    let intruder_token = bound_token(c, &intruder).await;
    refused_for_watch_and_certify(
        endpoint,
        &intruder_token,
        &[(tonic::Code::PermissionDenied, "wrong_account")],
        &[
            "token of system:serviceaccount:intruder:web: only nodeproxy-system/nodeproxy may \
           speak for a node",
        ],
    )
    .await;

    // The daemon's own token, bound to its own pod, for another audience.
    let daemon_a = Api::<Pod>::namespaced(c.clone(), "nodeproxy-system")
        .get("nodeproxy-a")
        .await
        .unwrap();
    let other_audience = token_for(c, &daemon_a, "some-other-service").await;
    refused_for_watch_and_certify(
        endpoint,
        &other_audience,
        &[(tonic::Code::Unauthenticated, "not_authenticated")],
        &[
            "\"system:serviceaccount:nodeproxy-system:nodeproxy\", audiences \
             [\"some-other-service\"]",
            "with audience nodeproxy-controlplane may speak for a node",
        ],
    )
    .await;

    // The daemon's token, bound to a daemon pod on node-a that was accepted, then deleted.
    let gone = create_pod(
        c,
        "nodeproxy-system",
        "nodeproxy-gone",
        "node-a",
        "nodeproxy",
        None,
    )
    .await;
    let gone_token = bound_token(c, &gone).await;
    assert_eq!(
        auth.authenticate(&gone_token).await.unwrap(),
        Caller::Node("node-a".into())
    );
    let pods: Api<Pod> = Api::namespaced(c.clone(), "nodeproxy-system");
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    pods.delete("nodeproxy-gone", &now).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods.get_opt("nodeproxy-gone").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "pod nodeproxy-gone never went away"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The API server caches a token's successful review for 10 s (measured on 1.20: it
    // authenticated this token for 10 s after the delete, then answered "Token has been
    // invalidated"), so within that window only the control plane's own lookup refuses it
    // (pod_missing); later the API server does (not_authenticated). Either way, refused.
    refused_for_watch_and_certify(
        endpoint,
        &gone_token,
        &[
            (tonic::Code::PermissionDenied, "pod_missing"),
            (tonic::Code::Unauthenticated, "not_authenticated"),
        ],
        &[
            "system:serviceaccount:nodeproxy-system:nodeproxy",
            "nodeproxy-system/nodeproxy-gone",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the kube-apiserver built by tests/kube/build.sh; scripts/test.sh runs it (--include-ignored)"]
async fn control_plane_against_a_real_kube_apiserver() {
    let kube_dir = gate();
    // Installs the recorder before the source counts anything.
    counter(WATCH_ERRORS_TOTAL, &[]);
    let apiserver = ApiServer::start(kube_dir);
    let c = apiserver.client().await;

    // Our CRDs, established.
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    for crd in [TenantPolicy::crd(), AuthorizationPolicy::crd()] {
        let name = crd.metadata.name.clone().unwrap();
        crds.create(&PostParams::default(), &crd).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap()
        .unwrap();
    }

    // The daemons' own pods and service account, and node-a's bound token.
    let namespaces: Api<Namespace> = Api::all(c.clone());
    // `probe` is meshed from the start: its pods are the later events that show the source
    // has seen what came before them.
    for (ns, meshed) in [
        ("nodeproxy-system", false),
        ("app1", false),
        ("probe", true),
    ] {
        let labels =
            meshed.then(|| [("nodeproxy.io/mesh".to_owned(), "enabled".to_owned())].into());
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        labels,
                        ..meta(ns, None)
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    create_service_account(&c, "nodeproxy-system", "nodeproxy").await;
    let daemon_a = create_pod(
        &c,
        "nodeproxy-system",
        "nodeproxy-a",
        "node-a",
        "nodeproxy",
        Some("192.0.2.10"),
    )
    .await;
    let token_a = bound_token(&c, &daemon_a).await;

    // The control plane: Kubernetes source + TokenReview, on loopback.
    let (publisher, feed) = Publisher::new("cluster.local", Mode::Lenient);
    KubeSource::spawn(c.clone(), publisher);
    let auth = Arc::new(TokenReviewAuth::new(c.clone(), AUDIENCE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let ca = Arc::new(certs::Ca::generate("cluster.local").unwrap());
    tokio::spawn(controlplane::server::serve_with_ca(
        listener,
        feed,
        auth,
        Some(ca),
        std::future::pending(),
    ));

    // TokenReview: a forged token and another node's view are refused.
    let mut raw = DiscoveryClient::connect(endpoint.clone()).await.unwrap();
    // Same header and claims, a different signature: what a node forging another's token has.
    let sig = token_a.rfind('.').unwrap() + 10;
    let flipped = if &token_a[sig..=sig] == "A" { "B" } else { "A" };
    let forged = format!("{}{flipped}{}", &token_a[..sig], &token_a[sig + 1..]);
    let err = raw
        .watch(watch_request("node-a", &forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = raw
        .watch(watch_request("node-b", &token_a))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // Node a watches with its real token (TokenReview accepts it).
    let (tx, mut rx) = watch::channel(None);
    let mut config = ClientConfig::new(&endpoint, "node-a", Token::Fixed(token_a.clone()));
    config.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    tokio::spawn(client::run(config, tx));
    let first = wait_for(&mut rx, "the first snapshot", |_| true).await;
    assert!(first.view.local.is_empty(), "{first:?}");
    assert_eq!(first.view.meshed_namespaces, ["probe"]);

    // Pods in an unlabelled namespace are not meshed: once a pod created after them (in the
    // meshed `probe`) is in the view, the source has seen them too (one watch of all pods,
    // in order), and they are not in it. Labelling the namespace meshes them, live.
    create_pod(&c, "app1", "web-0", "node-a", "web", Some("10.200.1.2")).await;
    create_pod(&c, "app1", "web-1", "node-b", "web", Some("10.201.1.2")).await;
    create_pod(&c, "app1", "pending-0", "node-a", "web", None).await;
    create_pod(
        &c,
        "probe",
        "marker-0",
        "node-b",
        "probe",
        Some("10.201.9.1"),
    )
    .await;
    let v = wait_for(&mut rx, "the probe pod", |v| {
        remote(v).contains(&"probe/marker-0".to_owned())
    })
    .await;
    assert!(local(&v).is_empty(), "{v:#?}");
    assert_eq!(remote(&v), ["probe/marker-0"]);
    let label = json!({"metadata": {"labels": {"nodeproxy.io/mesh": "enabled"}}});
    namespaces
        .patch("app1", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    let v = wait_for(&mut rx, "app1's pods after labelling", |v| {
        !v.view.local.is_empty()
    })
    .await;
    assert_eq!(
        local(&v),
        ["app1/web-0"],
        "the pending pod (no IP) is skipped"
    );
    assert_eq!(remote(&v), ["app1/web-1", "probe/marker-0"]);
    assert_eq!(v.view.meshed_namespaces, ["app1", "probe"]);
    assert_eq!(v.view.tenants.len(), 1);
    assert_eq!(
        v.view.tenants[0].weight, 100,
        "default weight without a TenantPolicy"
    );
    only_the_daemon_speaks_for_a_node(&c, &endpoint, &token_a).await;

    // Pod create and delete arrive as deltas.
    create_pod(&c, "app1", "web-2", "node-a", "web", Some("10.200.1.3")).await;
    wait_for(&mut rx, "web-2", |v| {
        local(v) == ["app1/web-0", "app1/web-2"]
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "app1");
    pods.delete(
        "web-0",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    wait_for(&mut rx, "web-0 gone", |v| local(v) == ["app1/web-2"]).await;

    // Our CRDs reach the view.
    let tps: Api<TenantPolicy> = Api::namespaced(c.clone(), "app1");
    let tp = |name: &str, weight| TenantPolicy {
        metadata: meta(name, Some("app1")),
        spec: TenantPolicySpec {
            service_account: "web".into(),
            weight: Some(weight),
            limits: None,
        },
        status: None,
    };
    tps.create(&PostParams::default(), &tp("web", 300))
        .await
        .unwrap();
    let aps: Api<AuthorizationPolicy> = Api::namespaced(c.clone(), "app1");
    let ap = AuthorizationPolicy {
        metadata: meta("admin-http", Some("app1")),
        spec: AuthorizationPolicySpec {
            pod_selector: Some([("app".to_owned(), "web".to_owned())].into()),
            port: IntOrString::String("admin-http".into()),
            allow: vec![AllowedIdentity {
                namespace: None,
                service_account: "metrics-api".into(),
            }],
            allow_probes: true,
        },
        status: None,
    };
    aps.create(&PostParams::default(), &ap).await.unwrap();
    let v = wait_for(&mut rx, "the policies", |v| {
        v.view.tenants.first().is_some_and(|t| t.weight == 300) && !v.view.policies.is_empty()
    })
    .await;
    assert_eq!(v.view.policies[0].allowed[0].short(), "app1/metrics-api");
    assert!(v.view.policies[0].allow_probes);
    assert_eq!(
        v.view.policies[0].targets,
        ["10.200.1.3".parse::<std::net::IpAddr>().unwrap()]
    );
    // The API server itself refuses an out-of-range weight (the CRD's schema).
    assert!(
        tps.create(&PostParams::default(), &tp("zero", 0))
            .await
            .is_err()
    );
    // A second policy for the same tenant is skipped, with a status condition saying why.
    tps.create(&PostParams::default(), &tp("web-again", 5))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = tps.get("web-again").await.unwrap();
        let cond = got.status.and_then(|s| s.conditions.into_iter().next());
        if let Some(cond) = cond {
            assert_eq!(cond.status, "False", "{cond:?}");
            assert!(
                cond.message
                    .contains("already configured by TenantPolicy app1/web"),
                "{cond:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no status condition on TenantPolicy app1/web-again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        tps.get("web").await.unwrap().status.unwrap().conditions[0].status,
        "True"
    );
    assert_eq!(rx.borrow().as_ref().unwrap().view.tenants[0].weight, 300);

    // The API server goes away: the node keeps its last view. A raw stream records every
    // update the control plane sends from here on. Once the source has counted a failed pod
    // watch (it noticed the outage), the node must have been sent nothing; when the API
    // server is back, web-3's arrival must be the very next update (no view was published
    // for the outage in between).
    let before = rx.borrow_and_update().clone().unwrap();
    assert_eq!(local(&before), ["app1/web-2"]);
    let mut updates = raw
        .watch(watch_request("node-a", &token_a))
        .await
        .unwrap()
        .into_inner();
    let snapshot = updates.message().await.unwrap().unwrap();
    assert!(snapshot.snapshot);
    let pod_watch = [("kind", "Pod")];
    let errors = counter(WATCH_ERRORS_TOTAL, &pod_watch);
    apiserver.script("stop.sh", "apiserver");
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(WATCH_ERRORS_TOTAL, &pod_watch) <= errors {
        assert!(
            Instant::now() < deadline,
            "no pod watch error counted with the api server stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !rx.has_changed().unwrap(),
        "a view was published with the api server stopped: {:#?}",
        rx.borrow()
    );
    apiserver.script("start.sh", "apiserver");
    create_pod(&c, "app1", "web-3", "node-a", "web", Some("10.200.1.4")).await;
    let next = tokio::time::timeout(Duration::from_secs(60), updates.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let added: Vec<String> = next
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    assert_eq!(added, ["app1/web-3"], "{next:#?}");
    assert!(next.removed_workloads.is_empty(), "{next:#?}");
    wait_for(&mut rx, "web-3 after the restart", |v| {
        local(v) == ["app1/web-2", "app1/web-3"]
    })
    .await;

    // Removing the label unmeshes the namespace.
    let unlabel = json!({"metadata": {"labels": {"nodeproxy.io/mesh": null}}});
    namespaces
        .patch("app1", &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    let v = wait_for(&mut rx, "app1 unmeshed", |v| v.view.local.is_empty()).await;
    assert!(
        v.view.policies.is_empty() && v.view.tenants.is_empty(),
        "{v:#?}"
    );
    assert_eq!(remote(&v), ["probe/marker-0"]);
    assert_eq!(v.view.meshed_namespaces, ["probe"]);
}
