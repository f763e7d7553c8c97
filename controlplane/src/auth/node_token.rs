//! Which Kubernetes tokens may speak for a node: only the daemon's own ServiceAccount's.
//!
//! Owns [`decide`], pure: from a TokenReview's status and the lookup of the pod the token is
//! bound to, it accepts a token only of the daemon's ServiceAccount ([`NodeTokenRule`],
//! default [`DEFAULT_DAEMON_ACCOUNT`]), reviewed for the control plane's audience, bound to a
//! pod that exists with the same UID, runs as that account and is scheduled to a node; that
//! node is the caller. Anything else is [`Refused`] with a closed-set [`Refusal`] and a
//! message naming the account (or pod) seen and what was expected. [`bound_pod`] names the
//! pod to look up; [`Claimed`] reads a refused token's own claims, unverified, only to name
//! its account. The I/O (the TokenReview, the pod lookup, the log line and the metric) lives
//! in [`crate::kubernetes`].
//!
//! Must not touch: the Kubernetes API, the view; tokens are never logged.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use k8s_openapi::api::core::v1::Pod;
use tonic::{Code, Status};

use super::Caller;

/// The ServiceAccount whose tokens may speak for a node unless configured otherwise.
pub const DEFAULT_DAEMON_ACCOUNT: &str = "nodeproxy-system/nodeproxy";
/// The TokenReview `extra` key naming the pod a bound token belongs to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The TokenReview `extra` key with that pod's UID.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// The username prefix of every ServiceAccount.
const SA_PREFIX: &str = "system:serviceaccount:";

/// A ServiceAccount, written `<namespace>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccountRef {
    namespace: String,
    name: String,
}

/// A `<namespace>/<name>` that does not name a ServiceAccount.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid service account {value:?}: {reason}; write <namespace>/<name>, e.g. \
     {DEFAULT_DAEMON_ACCOUNT}"
)]
pub struct InvalidServiceAccount {
    value: String,
    reason: &'static str,
}

impl ServiceAccountRef {
    /// The account's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The account's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Kubernetes username of the account's tokens,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub fn username(&self) -> String {
        format!("{SA_PREFIX}{}:{}", self.namespace, self.name)
    }

    /// The account a Kubernetes username belongs to, if it is a ServiceAccount's.
    pub fn from_username(username: &str) -> Option<Self> {
        let (namespace, name) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
        (valid_name(namespace).is_ok() && valid_name(name).is_ok()).then(|| Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// A namespace or ServiceAccount name: a DNS-1123 subdomain (lowercase alphanumerics, `-`
/// and `.`, alphanumeric at both ends).
fn valid_name(part: &str) -> Result<(), &'static str> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if part.is_empty() || part.len() > 253 {
        return Err("each part must have 1 to 253 characters");
    }
    if !part.chars().all(|c| alnum(c) || c == '-' || c == '.') {
        return Err("names have only lowercase letters, digits, '-' and '.'");
    }
    if !part.starts_with(alnum) || !part.ends_with(alnum) {
        return Err("names start and end with a letter or digit");
    }
    Ok(())
}

impl Default for ServiceAccountRef {
    /// [`DEFAULT_DAEMON_ACCOUNT`].
    fn default() -> Self {
        Self {
            namespace: "nodeproxy-system".to_owned(),
            name: "nodeproxy".to_owned(),
        }
    }
}

impl FromStr for ServiceAccountRef {
    type Err = InvalidServiceAccount;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidServiceAccount {
            value: value.to_owned(),
            reason,
        };
        let (namespace, name) = value.split_once('/').ok_or_else(|| invalid("no '/'"))?;
        valid_name(namespace).map_err(invalid)?;
        valid_name(name).map_err(invalid)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Who may speak for a node with a Kubernetes token: pods of the daemon's ServiceAccount,
/// presenting tokens for the control plane's audience.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTokenRule {
    /// The daemon's ServiceAccount.
    pub account: ServiceAccountRef,
    /// The audience the TokenReview must confirm (`nodeproxy-controlplane`).
    pub audience: String,
}

/// Why a token may not speak for a node: a closed set, the `reason` label of the refusal
/// metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The TokenReview did not authenticate the token (forged, expired, another audience,
    /// its pod or account deleted).
    NotAuthenticated,
    /// Authenticated, but not as the daemon's ServiceAccount.
    WrongAccount,
    /// The reviewed audiences lack the control plane's.
    WrongAudience,
    /// The token is not bound to a pod (a legacy Secret token, or one bound to a Secret).
    NotBoundToPod,
    /// The pod the token is bound to does not exist.
    PodMissing,
    /// A pod of that name exists, with another UID: the token's pod was replaced.
    PodReplaced,
    /// The pod runs as another ServiceAccount.
    PodOfOtherAccount,
    /// The pod is not scheduled to a node.
    PodNotScheduled,
    /// The Kubernetes API could not be asked (not a verdict on the token).
    Unavailable,
}

impl Refusal {
    /// Every reason, for tests and dashboards.
    pub const ALL: [Refusal; 9] = [
        Refusal::NotAuthenticated,
        Refusal::WrongAccount,
        Refusal::WrongAudience,
        Refusal::NotBoundToPod,
        Refusal::PodMissing,
        Refusal::PodReplaced,
        Refusal::PodOfOtherAccount,
        Refusal::PodNotScheduled,
        Refusal::Unavailable,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAuthenticated => "not_authenticated",
            Refusal::WrongAccount => "wrong_account",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::NotBoundToPod => "not_bound_to_pod",
            Refusal::PodMissing => "pod_missing",
            Refusal::PodReplaced => "pod_replaced",
            Refusal::PodOfOtherAccount => "pod_of_other_account",
            Refusal::PodNotScheduled => "pod_not_scheduled",
            Refusal::Unavailable => "unavailable",
        }
    }

    /// The gRPC code: `UNAUTHENTICATED` when the token is not valid for us at all,
    /// `PERMISSION_DENIED` when it is valid but may not speak for a node.
    pub fn code(self) -> Code {
        match self {
            Refusal::NotAuthenticated | Refusal::WrongAudience => Code::Unauthenticated,
            Refusal::Unavailable => Code::Unavailable,
            _ => Code::PermissionDenied,
        }
    }
}

/// A token refused as a node's, with what was seen and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Why, from the closed set.
    pub reason: Refusal,
    /// The account (or pod) seen, for the log line.
    pub seen: String,
    /// The whole message: what was seen, what was expected, the fix.
    pub message: String,
}

impl Refused {
    /// The gRPC status the caller gets.
    pub fn status(&self) -> Status {
        Status::new(self.reason.code(), self.message.clone())
    }
}

/// What a token says about itself, read **without checking its signature**: used only to
/// name the account in a refusal the TokenReview already made, never to decide anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    /// The `sub` claim (a ServiceAccount's username).
    pub subject: Option<String>,
    /// The `aud` claim.
    pub audiences: Vec<String>,
    /// The bound pod, `<namespace>/<name>`.
    pub pod: Option<String>,
}

impl Claimed {
    /// The claims of a JWT's payload; empty when `token` is not one.
    pub fn read(token: &str) -> Self {
        Self::parse(token).unwrap_or_default()
    }

    fn parse(token: &str) -> Option<Self> {
        let payload = token.split('.').nth(1)?;
        // A JWT's base64url without padding, as the standard alphabet k8s-openapi decodes.
        let mut b64: String = payload
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        while !b64.len().is_multiple_of(4) {
            b64.push('=');
        }
        let ByteString(json) = serde_json::from_value(serde_json::Value::String(b64)).ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
        // Unverified: kept short, so a crafted token cannot flood the log.
        let text = |v: &serde_json::Value| v.as_str().map(|s| s.chars().take(253).collect());
        let audiences = match &claims["aud"] {
            serde_json::Value::Array(a) => a.iter().take(8).filter_map(text).collect(),
            other => text(other).into_iter().collect(),
        };
        let k8s = &claims["kubernetes.io"];
        let pod = text(&k8s["namespace"])
            .zip(text(&k8s["pod"]["name"]))
            .map(|(ns, name): (String, String)| format!("{ns}/{name}"));
        Some(Self {
            subject: text(&claims["sub"]),
            audiences,
            pod,
        })
    }
}

impl fmt::Display for Claimed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(subject) = &self.subject else {
            return f.write_str("a token that is not a service-account token");
        };
        write!(
            f,
            "a token claiming (unverified) {subject:?}, audiences {:?}",
            self.audiences
        )?;
        match &self.pod {
            Some(pod) => write!(f, ", pod {pod:?}"),
            None => f.write_str(", no pod"),
        }
    }
}

/// The pod a reviewed token is bound to: what [`decide`] needs looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    /// The pod's namespace (the daemon account's).
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The UID the token was issued for.
    pub uid: String,
}

/// The checks of [`decide`] that need only the TokenReview: the pod to look up, or why the
/// token is refused before any lookup.
pub fn bound_pod(
    review: &TokenReviewStatus,
    claimed: &Claimed,
    rule: &NodeTokenRule,
) -> Result<BoundPod, Refused> {
    let expected = &rule.account;
    let refused = |reason, seen: &str, message: String| Refused {
        reason,
        seen: seen.to_owned(),
        message,
    };
    if review.authenticated != Some(true) {
        let seen = claimed.subject.as_deref().unwrap_or("an unknown token");
        return Err(refused(
            Refusal::NotAuthenticated,
            seen,
            format!(
                "the kubernetes api did not authenticate {claimed} ({}); only a projected token \
                 of {} ({expected}) with audience {} may speak for a node",
                review.error.as_deref().unwrap_or("no reason given"),
                expected.username(),
                rule.audience
            ),
        ));
    }
    let user = review.user.as_ref();
    let username = user
        .and_then(|u| u.username.as_deref())
        .filter(|u| !u.is_empty())
        .unwrap_or("(no username)");
    if ServiceAccountRef::from_username(username).as_ref() != Some(expected) {
        return Err(refused(
            Refusal::WrongAccount,
            username,
            format!(
                "token of {username}: only {expected} may speak for a node; a node's daemon \
                 presents its own pod's token"
            ),
        ));
    }
    let audiences = review.audiences.as_deref().unwrap_or_default();
    if !audiences.contains(&rule.audience) {
        return Err(refused(
            Refusal::WrongAudience,
            username,
            format!(
                "token of {username}: its reviewed audiences {audiences:?} lack {}; mount the \
                 projected token with audience {}",
                rule.audience, rule.audience
            ),
        ));
    }
    let extra = user.and_then(|u| u.extra.as_ref());
    let one = |key: &str| {
        extra
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(name), Some(uid)) = (one(POD_NAME_EXTRA), one(POD_UID_EXTRA)) else {
        return Err(refused(
            Refusal::NotBoundToPod,
            username,
            format!(
                "token of {username} is not bound to a pod (a legacy secret token?); mount the \
                 projected service-account token in the daemon's pod"
            ),
        ));
    };
    Ok(BoundPod {
        namespace: expected.namespace.clone(),
        name,
        uid,
    })
}

/// The node a reviewed token may speak for, or why it may not. `pod` is the lookup of the
/// pod [`bound_pod`] names (`None`: it does not exist); `claimed` only names the account
/// when the TokenReview refused the token.
pub fn decide(
    review: &TokenReviewStatus,
    claimed: &Claimed,
    pod: Option<&Pod>,
    rule: &NodeTokenRule,
) -> Result<Caller, Refused> {
    let bound = bound_pod(review, claimed, rule)?;
    let expected = &rule.account;
    let username = expected.username();
    let at = format!("{}/{}", bound.namespace, bound.name);
    let refused = |reason, message| Refused {
        reason,
        seen: format!("pod {at}"),
        message,
    };
    let Some(pod) = pod else {
        return Err(refused(
            Refusal::PodMissing,
            format!(
                "token of {username} is bound to pod {at}, which does not exist; only the token \
                 of a daemon pod that still exists may speak for a node"
            ),
        ));
    };
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if uid != bound.uid {
        return Err(refused(
            Refusal::PodReplaced,
            format!(
                "token of {username} is bound to pod {at} with uid {}, but that pod now has uid \
                 {uid} (it was replaced); use the current pod's token",
                bound.uid
            ),
        ));
    }
    let spec = pod.spec.as_ref();
    let runs_as = spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or_default();
    if runs_as != expected.name {
        return Err(refused(
            Refusal::PodOfOtherAccount,
            format!(
                "token of {username} is bound to pod {at}, which runs as service account \
                 {:?}: only pods of {expected} may speak for a node",
                runs_as
            ),
        ));
    }
    spec.and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
        .map(|n| Caller::Node(n.to_owned()))
        .ok_or_else(|| {
            refused(
                Refusal::PodNotScheduled,
                format!(
                    "token of {username} is bound to pod {at}, which is not scheduled to a node \
                     yet; retry once it runs"
                ),
            )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    const DAEMON: &str = "system:serviceaccount:nodeproxy-system:nodeproxy";

    fn rule() -> NodeTokenRule {
        NodeTokenRule {
            account: DEFAULT_DAEMON_ACCOUNT.parse().unwrap(),
            audience: "nodeproxy-controlplane".to_owned(),
        }
    }

    /// What the API server answers for the daemon pod's projected token.
    fn review() -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["nodeproxy-controlplane".to_owned()]),
            user: Some(UserInfo {
                username: Some(DAEMON.to_owned()),
                uid: Some("sa-uid".to_owned()),
                groups: Some(vec!["system:serviceaccounts".to_owned()]),
                extra: Some(
                    [
                        (POD_NAME_EXTRA.to_owned(), vec!["nodeproxy-a".to_owned()]),
                        (POD_UID_EXTRA.to_owned(), vec!["pod-uid-1".to_owned()]),
                    ]
                    .into(),
                ),
            }),
            error: None,
        }
    }

    /// The daemon's pod on node-a.
    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("nodeproxy-a".to_owned()),
                namespace: Some("nodeproxy-system".to_owned()),
                uid: Some("pod-uid-1".to_owned()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".to_owned()),
                service_account_name: Some("nodeproxy".to_owned()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn user(r: &mut TokenReviewStatus) -> &mut UserInfo {
        r.user.as_mut().unwrap()
    }

    fn username(r: &mut TokenReviewStatus, name: &str) {
        user(r).username = Some(name.to_owned());
    }

    fn spec(p: &mut Pod) -> &mut PodSpec {
        p.spec.as_mut().unwrap()
    }

    /// A JWT-shaped token with these claims (the signature is not checked by `Claimed`).
    fn jwt(claims: serde_json::Value) -> String {
        let b64 = serde_json::to_value(ByteString(claims.to_string().into_bytes())).unwrap();
        let url: String = b64
            .as_str()
            .unwrap()
            .chars()
            .filter(|&c| c != '=')
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        format!("eyJhbGciOiJSUzI1NiJ9.{url}.c2ln")
    }

    type Review = fn(&mut TokenReviewStatus);
    type Lookup = fn(&mut Option<Pod>);
    /// The node, or the refusal and parts of its message.
    type Want = Result<&'static str, (Refusal, &'static [&'static str])>;

    #[test]
    fn only_the_daemons_own_pod_token_speaks_for_its_node() {
        let keep: Review = |_| {};
        let found: Lookup = |_| {};
        #[rustfmt::skip]
        let cases: [(&str, Review, Lookup, Want); 19] = [
            ("the daemon's pod token", keep, found, Ok("node-a")),
            ("not authenticated", |r| { r.authenticated = Some(false); r.user = None; r.error = Some("token has been invalidated".into()) }, found,
                Err((Refusal::NotAuthenticated, &["did not authenticate a token claiming (unverified) \"system:serviceaccount:nodeproxy-system:nodeproxy\", audiences [\"other\"], pod \"nodeproxy-system/gone-0\" (token has been invalidated)", "only a projected token of system:serviceaccount:nodeproxy-system:nodeproxy (nodeproxy-system/nodeproxy) with audience nodeproxy-controlplane"]))),
            ("no verdict", |r| r.authenticated = None, found, Err((Refusal::NotAuthenticated, &["no reason given"]))),
            ("another pod's account", |r| username(r, "system:serviceaccount:app1:web"), found,
                Err((Refusal::WrongAccount, &["token of system:serviceaccount:app1:web: only nodeproxy-system/nodeproxy may speak for a node"]))),
            ("another account of the namespace", |r| username(r, "system:serviceaccount:nodeproxy-system:default"), found,
                Err((Refusal::WrongAccount, &["token of system:serviceaccount:nodeproxy-system:default:"]))),
            ("the name in another namespace", |r| username(r, "system:serviceaccount:app1:nodeproxy"), found,
                Err((Refusal::WrongAccount, &["system:serviceaccount:app1:nodeproxy"]))),
            ("a user, not an account", |r| username(r, "alice"), found, Err((Refusal::WrongAccount, &["token of alice: only nodeproxy-system/nodeproxy"]))),
            ("a username with a suffix", |r| username(r, &format!("{DAEMON}:x")), found, Err((Refusal::WrongAccount, &[":nodeproxy:x:"]))),
            ("no user", |r| r.user = None, found, Err((Refusal::WrongAccount, &["token of (no username): only nodeproxy-system/nodeproxy"]))),
            ("no reviewed audiences", |r| r.audiences = None, found,
                Err((Refusal::WrongAudience, &["token of system:serviceaccount:nodeproxy-system:nodeproxy: its reviewed audiences [] lack nodeproxy-controlplane"]))),
            ("another audience", |r| r.audiences = Some(vec!["https://kubernetes.default.svc".into()]), found,
                Err((Refusal::WrongAudience, &["[\"https://kubernetes.default.svc\"] lack nodeproxy-controlplane"]))),
            ("not bound to a pod", |r| user(r).extra = None, found,
                Err((Refusal::NotBoundToPod, &["token of system:serviceaccount:nodeproxy-system:nodeproxy is not bound to a pod"]))),
            ("no pod uid", |r| { user(r).extra.as_mut().unwrap().remove(POD_UID_EXTRA); }, found, Err((Refusal::NotBoundToPod, &["not bound to a pod"]))),
            ("the pod is gone", keep, |p| *p = None,
                Err((Refusal::PodMissing, &["token of system:serviceaccount:nodeproxy-system:nodeproxy is bound to pod nodeproxy-system/nodeproxy-a, which does not exist"]))),
            ("the pod was replaced", keep, |p| p.as_mut().unwrap().metadata.uid = Some("pod-uid-2".into()),
                Err((Refusal::PodReplaced, &["pod nodeproxy-system/nodeproxy-a with uid pod-uid-1, but that pod now has uid pod-uid-2"]))),
            ("the pod runs as another account", keep, |p| spec(p.as_mut().unwrap()).service_account_name = Some("default".into()),
                Err((Refusal::PodOfOtherAccount, &["bound to pod nodeproxy-system/nodeproxy-a, which runs as service account \"default\": only pods of nodeproxy-system/nodeproxy"]))),
            ("the pod names no account", keep, |p| spec(p.as_mut().unwrap()).service_account_name = None,
                Err((Refusal::PodOfOtherAccount, &["runs as service account \"\""]))),
            ("the pod is not scheduled", keep, |p| spec(p.as_mut().unwrap()).node_name = None,
                Err((Refusal::PodNotScheduled, &["pod nodeproxy-system/nodeproxy-a, which is not scheduled to a node"]))),
            ("an empty node name", keep, |p| spec(p.as_mut().unwrap()).node_name = Some(String::new()),
                Err((Refusal::PodNotScheduled, &["not scheduled"]))),
        ];
        let claimed = Claimed::read(&jwt(serde_json::json!({
            "sub": DAEMON, "aud": ["other"],
            "kubernetes.io": {"namespace": "nodeproxy-system", "pod": {"name": "gone-0", "uid": "u"}},
        })));
        for (name, change_review, change_pod, want) in cases {
            let mut r = review();
            change_review(&mut r);
            let mut p = Some(pod());
            change_pod(&mut p);
            let got = decide(&r, &claimed, p.as_ref(), &rule());
            match (got, want) {
                (Ok(caller), Ok(node)) => assert_eq!(caller, Caller::Node(node.into()), "{name}"),
                (Err(refused), Err((reason, parts))) => {
                    assert_eq!(refused.reason, reason, "{name}: {refused:?}");
                    let status = refused.status();
                    assert_eq!(status.code(), reason.code(), "{name}");
                    for part in parts {
                        assert!(
                            status.message().contains(part),
                            "{name}: {:?} lacks {part:?}",
                            status.message()
                        );
                    }
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_pod_to_look_up_is_the_bound_one_in_the_daemons_namespace() {
        let bound = bound_pod(&review(), &Claimed::default(), &rule()).unwrap();
        assert_eq!(
            bound,
            BoundPod {
                namespace: "nodeproxy-system".into(),
                name: "nodeproxy-a".into(),
                uid: "pod-uid-1".into(),
            }
        );
        // A configured account: its namespace, its name.
        let mut r = review();
        username(&mut r, "system:serviceaccount:mesh:proxy");
        let other = NodeTokenRule {
            account: "mesh/proxy".parse().unwrap(),
            ..rule()
        };
        assert_eq!(
            bound_pod(&r, &Claimed::default(), &other)
                .unwrap()
                .namespace,
            "mesh"
        );
        assert_eq!(
            bound_pod(&review(), &Claimed::default(), &other)
                .unwrap_err()
                .reason,
            Refusal::WrongAccount
        );
    }

    #[test]
    fn refusal_codes_and_labels() {
        let labels: std::collections::HashSet<_> =
            Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        assert_eq!(Refusal::NotAuthenticated.code(), Code::Unauthenticated);
        assert_eq!(Refusal::WrongAudience.code(), Code::Unauthenticated);
        assert_eq!(Refusal::WrongAccount.code(), Code::PermissionDenied);
        assert_eq!(Refusal::PodMissing.code(), Code::PermissionDenied);
        assert_eq!(Refusal::Unavailable.code(), Code::Unavailable);
    }

    #[test]
    fn claims_are_read_for_messages_only() {
        // `?` and `>` in the subject make base64url's `-` and `_` appear in the payload.
        let token = jwt(serde_json::json!({"sub": "system:serviceaccount:a:b??>>", "aud": "one"}));
        assert!(token.contains('-') || token.contains('_'), "{token}");
        let claimed = Claimed::read(&token);
        assert_eq!(
            claimed.subject.as_deref(),
            Some("system:serviceaccount:a:b??>>")
        );
        assert_eq!(claimed.audiences, ["one"]);
        assert_eq!(claimed.pod, None);
        assert_eq!(
            claimed.to_string(),
            "a token claiming (unverified) \"system:serviceaccount:a:b??>>\", audiences [\"one\"], no pod"
        );
        for garbage in ["", "opaque-bootstrap-token", "a.!!!.c", "a.bm90IGpzb24.c"] {
            assert_eq!(Claimed::read(garbage), Claimed::default(), "{garbage}");
        }
        assert_eq!(
            Claimed::default().to_string(),
            "a token that is not a service-account token"
        );
        let long = jwt(serde_json::json!({"sub": "x".repeat(10_000)}));
        assert_eq!(Claimed::read(&long).subject.unwrap().len(), 253);
    }

    #[test]
    fn service_accounts_parse_as_namespace_slash_name() {
        let sa: ServiceAccountRef = DEFAULT_DAEMON_ACCOUNT.parse().unwrap();
        assert_eq!(sa, ServiceAccountRef::default());
        assert_eq!(
            (sa.namespace(), sa.name()),
            ("nodeproxy-system", "nodeproxy")
        );
        assert_eq!(sa.username(), DAEMON);
        assert_eq!(sa.to_string(), DEFAULT_DAEMON_ACCOUNT);
        assert_eq!(ServiceAccountRef::from_username(DAEMON), Some(sa));
        for bad in ["nodeproxy", "a/b/c", "/x", "x/", "A/b", "a/-b", "a:b/c"] {
            let err = bad.parse::<ServiceAccountRef>().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid service account {bad:?}: "))
                    && err.ends_with("write <namespace>/<name>, e.g. nodeproxy-system/nodeproxy"),
                "{err}"
            );
        }
        for bad in [
            "system:serviceaccount:a",
            "system:serviceaccount:a:b:c",
            "system:node:a",
            "a:b",
        ] {
            assert_eq!(ServiceAccountRef::from_username(bad), None, "{bad}");
        }
    }
}
