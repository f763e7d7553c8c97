//! The Identity service (`Identity.Certify`): signs workload CSRs for nodes.
//!
//! Owns [`IdentityService`] and the node-authorization rule [`authorize_identity`]: a caller
//! is authenticated as a node (bootstrap token bound to a node, or TokenReview), and a node may
//! obtain a certificate only for an identity that has a pod **on that node** in the current
//! view. The signing itself (the CSR must name exactly that SPIFFE ID, short lifetime) is
//! `certs::Ca`'s. Every refusal is a gRPC status naming node and identity, and a log line.
//! Without a CA configured, every call is answered `UNIMPLEMENTED`.
//!
//! Must not touch: private keys (the CA key stays inside `certs::Ca`), the view's sources.

use std::sync::Arc;
use std::time::Duration;

use certs::Identity as SpiffeId;
use tonic::{Request, Response, Status};

use crate::api::identity_server::Identity;
use crate::api::{CertifyRequest, CertifyResponse};
use crate::auth::{self, Authenticator, Caller};
use crate::feed::Feed;
use crate::view::Cluster;

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    auth: Arc<dyn Authenticator>,
    signing: Option<Signing>,
}

#[derive(Debug, Clone)]
struct Signing {
    ca: Arc<certs::Ca>,
    feed: Feed,
}

impl IdentityService {
    /// A service authenticating callers with `auth` and signing nothing (`UNIMPLEMENTED`).
    pub fn new(auth: Arc<dyn Authenticator>) -> Self {
        Self {
            auth,
            signing: None,
        }
    }

    /// A service that signs with `ca`, authorizing against the view published on `feed`.
    pub fn with_ca(auth: Arc<dyn Authenticator>, feed: Feed, ca: Arc<certs::Ca>) -> Self {
        Self {
            auth,
            signing: Some(Signing { ca, feed }),
        }
    }
}

/// Node authorization: `node` may obtain certificates for `identity` only if a pod with that
/// identity runs on it. The refusal names both.
pub fn authorize_identity(
    cluster: &Cluster,
    node: &str,
    identity: &SpiffeId,
) -> Result<(), Status> {
    if cluster
        .node_view(node)
        .local
        .iter()
        .any(|w| &w.identity == identity)
    {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "node {node:?} has no pod with identity {identity}; a node may obtain certificates only \
         for identities of its own pods"
    )))
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let token = auth::bearer(request.metadata())?;
        let caller = self.auth.authenticate(token).await?;
        let Some(signing) = &self.signing else {
            return Err(Status::unimplemented(
                "this control plane has no CA configured; start it with --ca-cert and --ca-key",
            ));
        };
        let req = request.into_inner();
        let result = certify(signing, &caller, &req);
        match &result {
            Ok(_) => {
                tracing::info!(caller = ?caller, identity = %req.identity, "certificate issued")
            }
            Err(status) => tracing::warn!(
                caller = ?caller, identity = %req.identity, code = ?status.code(),
                reason = status.message(), "certificate refused"
            ),
        }
        result.map(Response::new)
    }
}

fn certify(
    signing: &Signing,
    caller: &Caller,
    req: &CertifyRequest,
) -> Result<CertifyResponse, Status> {
    let node = match caller {
        Caller::Node(node) => node,
        Caller::AnyNode => {
            return Err(Status::permission_denied(format!(
                "a token that is not bound to a node cannot obtain certificates (asked for {}); \
                 bind the bootstrap token to the node (`<token> <node>`)",
                req.identity
            )));
        }
    };
    let identity: SpiffeId = req
        .identity
        .parse()
        .map_err(|e| Status::invalid_argument(format!("node {node:?}: {e}")))?;
    let published = signing.feed.borrow().clone().ok_or_else(|| {
        Status::unavailable("the control plane has not loaded its source yet; retry shortly")
    })?;
    authorize_identity(&published.cluster, node, &identity)?;
    let csr = certs::ca::csr_from_pem(&req.csr_pem).map_err(|e| {
        Status::invalid_argument(format!("node {node:?}, identity {identity}: {e}"))
    })?;
    let requested = (req.validity_seconds > 0).then(|| Duration::from_secs(req.validity_seconds));
    let signed = signing
        .ca
        .sign_for(&identity, &csr, requested)
        .map_err(|e| match e {
            certs::Error::CsrRefused { .. } => {
                Status::invalid_argument(format!("node {node:?}: {e}"))
            }
            other => Status::internal(format!("node {node:?}, identity {identity}: {other}")),
        })?;
    Ok(CertifyResponse {
        cert_chain_pem: signed.chain.iter().map(certs::ca::cert_to_pem).collect(),
        trust_bundle_pem: signed
            .trust_bundle
            .iter()
            .map(certs::ca::cert_to_pem)
            .collect(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::auth::BootstrapTokens;
    use crate::feed::Publisher;
    use crate::view::Mode;

    const VIEW: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop}\n\
        spec: {serviceAccountName: web, nodeName: node-a, containers: [{name: c, image: i}]}\n\
        status: {phase: Running, podIP: 10.0.0.2}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop}\n\
        spec: {serviceAccountName: db, nodeName: node-b, containers: [{name: c, image: i}]}\n\
        status: {phase: Running, podIP: 10.0.1.2}\n";

    fn service(token_node: Option<&str>) -> (IdentityService, Publisher, Arc<certs::Ca>) {
        let (mut publisher, feed) = Publisher::new("cluster.local", Mode::Strict);
        publisher.publish(&crate::FileSource::parse_str("test", VIEW).unwrap());
        let ca = Arc::new(certs::Ca::generate("cluster.local").unwrap());
        let auth = Arc::new(BootstrapTokens::single(
            "tok",
            token_node.map(str::to_owned),
        ));
        (
            IdentityService::with_ca(auth, feed, ca.clone()),
            publisher,
            ca,
        )
    }

    fn csr(id: &str) -> String {
        certs::test_util::csr_pem(id)
    }

    fn request(identity: &str, csr_pem: String) -> Request<CertifyRequest> {
        let mut req = Request::new(CertifyRequest {
            csr_pem,
            identity: identity.to_owned(),
            validity_seconds: 0,
        });
        req.metadata_mut()
            .insert("authorization", "Bearer tok".parse().unwrap());
        req
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

    #[tokio::test]
    async fn signs_identities_of_the_callers_own_pods() {
        let (svc, _p, ca) = service(Some("node-a"));
        let resp = svc
            .certify(request(WEB, csr(WEB)))
            .await
            .unwrap()
            .into_inner();
        let leaf = certs::ca::cert_from_pem(&resp.cert_chain_pem[0]).unwrap();
        assert_eq!(certs::verify::spiffe_id_of(&leaf).unwrap().to_string(), WEB);
        assert_eq!(resp.trust_bundle_pem, vec![ca.root_pem().to_owned()]);
    }

    #[tokio::test]
    async fn refuses_identities_without_a_pod_on_the_node() {
        let (svc, _p, _) = service(Some("node-a"));
        let err = svc.certify(request(DB, csr(DB))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("node \"node-a\""),
            "{}",
            err.message()
        );
        assert!(err.message().contains(DB), "{}", err.message());
    }

    #[tokio::test]
    async fn refuses_a_csr_for_another_identity_and_unbound_tokens() {
        let (svc, _p, _) = service(Some("node-a"));
        let err = svc.certify(request(WEB, csr(DB))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("exactly"), "{}", err.message());

        let (svc, _p, _) = service(None);
        let err = svc.certify(request(WEB, csr(WEB))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("not bound to a node"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn without_a_ca_it_is_unimplemented() {
        let auth = Arc::new(BootstrapTokens::single("tok", Some("node-a".into())));
        let err = IdentityService::new(auth)
            .certify(request(WEB, csr(WEB)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
    }
}
