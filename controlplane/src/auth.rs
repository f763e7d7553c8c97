//! Node authentication: who is calling, and which node it may speak for.
//!
//! Owns [`Authenticator`] (the server's question "which node is this caller?"), [`bearer`]
//! (the `authorization: Bearer <token>` metadata) and [`BootstrapTokens`] (standalone: a file
//! of `<token> [<node>]` lines; a token without a node may speak for any node).
//!
//! In Kubernetes only the daemon may speak for a node: [`decide`] (in `node_token`) is that
//! rule, pure; the I/O around it (TokenReview, pod lookup) lives in [`crate::kubernetes`].
//!
//! Must not touch: the view, the Kubernetes API; tokens are never logged.

use std::fmt;
use std::path::Path;

use futures::future::BoxFuture;
use tonic::Status;

use crate::error::{Error, Result};

mod node_token;

pub use node_token::{
    BoundPod, Claimed, DEFAULT_DAEMON_ACCOUNT, InvalidServiceAccount, NodeTokenRule,
    POD_NAME_EXTRA, POD_UID_EXTRA, Refusal, Refused, ServiceAccountRef, bound_pod, decide,
};

/// Who an authenticated caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node, which may watch only its own view.
    Node(String),
    /// A caller trusted for every node (a bootstrap token without a node).
    AnyNode,
}

/// Decides which node a bearer token speaks for.
pub trait Authenticator: Send + Sync + fmt::Debug + 'static {
    /// The caller `token` authenticates, or `Unauthenticated` (or `Unavailable` when the
    /// authority cannot be asked).
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Status>>;
}

/// The bearer token of a request, or `Unauthenticated` with the fix.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| {
            Status::unauthenticated(
                "no authorization metadata; send `authorization: Bearer <token>` (the bootstrap \
                 token, or the daemon pod's projected service-account token with audience \
                 nodeproxy-controlplane)",
            )
        })?
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
        })
}

/// Checks that `caller` may watch `node`.
pub fn authorize(caller: &Caller, node: &str) -> Result<(), Status> {
    match caller {
        Caller::AnyNode => Ok(()),
        Caller::Node(own) if own == node => Ok(()),
        Caller::Node(own) => Err(Status::permission_denied(format!(
            "authenticated as node {own:?}, which may watch only its own view, not {node:?}"
        ))),
    }
}

/// Standalone authentication: tokens from a file, each optionally bound to a node.
#[derive(Clone, Default)]
pub struct BootstrapTokens {
    tokens: Vec<(String, Option<String>)>,
}

impl fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapTokens")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl BootstrapTokens {
    /// One token bound to `node` (or to any node).
    pub fn single(token: impl Into<String>, node: Option<String>) -> Self {
        Self {
            tokens: vec![(token.into(), node)],
        }
    }

    /// Parses `<token> [<node>]` lines; `#` starts a comment.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let token = parts.next().unwrap_or_default().to_owned();
            let node = parts.next().map(str::to_owned);
            if parts.next().is_some() || token.len() < 16 {
                return Err(Error::TokenFile {
                    path: path.to_owned(),
                    reason: format!(
                        "line {}: expected `<token> [<node>]` with a token of at least 16 \
                         characters",
                        i + 1
                    ),
                });
            }
            tokens.push((token, node));
        }
        if tokens.is_empty() {
            return Err(Error::TokenFile {
                path: path.to_owned(),
                reason: "no tokens; add a line `<token> [<node>]`".to_owned(),
            });
        }
        Ok(Self { tokens })
    }

    /// Reads [`BootstrapTokens::parse`] from a file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::TokenFile {
            path: path.to_owned(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::parse(path, &text)
    }
}

/// Compares without an early exit on the first differing byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Status>> {
        let found = self
            .tokens
            .iter()
            .find(|(t, _)| same(t, token))
            .map(|(_, node)| node.clone().map_or(Caller::AnyNode, Caller::Node));
        Box::pin(async move {
            found.ok_or_else(|| {
                Status::unauthenticated(
                    "unknown bootstrap token; use a token from the control plane's \
                     --bootstrap-token-file",
                )
            })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bootstrap_tokens_bind_nodes() {
        let path = Path::new("tokens");
        let tokens = BootstrapTokens::parse(
            path,
            "# comment\n0123456789abcdef node-a\nfedcba9876543210fedcba\n",
        )
        .unwrap();
        assert_eq!(
            tokens.authenticate("0123456789abcdef").await.unwrap(),
            Caller::Node("node-a".into())
        );
        assert_eq!(
            tokens.authenticate("fedcba9876543210fedcba").await.unwrap(),
            Caller::AnyNode
        );
        assert!(tokens.authenticate("nope").await.is_err());
        assert!(authorize(&Caller::Node("node-a".into()), "node-b").is_err());
        let err = BootstrapTokens::parse(path, "short\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
