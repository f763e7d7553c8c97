//! The file source: Kubernetes-shaped YAML objects read from a file or a string.
//!
//! Owns [`FileSource`], the door through which the standalone daemon and the demo load their
//! configuration (the demo embeds `examples/demo.yaml`). Loading checks the objects and the
//! node-independent mesh rules together, so one run reports every problem in the file.
//!
//! Must not touch: sockets, the data path, the environment; it reads only the file it is given.

use std::path::Path;

use crate::error::{Error, Result, sort_problems};
use crate::objects::{self, Objects};
use crate::view;

/// Loads [`Objects`] from YAML files or strings.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileSource;

impl FileSource {
    /// Reads and checks the YAML file at `path`; errors name the path.
    pub fn load(path: &Path) -> Result<Objects> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_str(&path.display().to_string(), &text)
    }

    /// Parses and checks YAML text; `source_name` names it in errors (e.g. a file name).
    ///
    /// Reports, all at once, objects of the wrong shape and meshed pods that no node's view
    /// could use (missing `spec.nodeName`, missing or bad addresses, shared addresses). The
    /// trust domain is not known here; identities are checked against the default one and the
    /// configured one is checked by [`view::NodeView::build`].
    pub fn parse_str(source_name: &str, text: &str) -> Result<Objects> {
        let (objects, mut problems) = objects::parse_collect(source_name, text)?;
        problems.extend(view::check(&objects));
        if problems.is_empty() {
            tracing::debug!(
                source = source_name,
                namespaces = objects.namespaces.len(),
                pods = objects.pods.len(),
                skipped = ?objects.skipped_kinds,
                "loaded objects"
            );
            return Ok(objects);
        }
        sort_problems(&mut problems);
        Err(Error::Config {
            file: source_name.to_owned(),
            problems,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::view::NodeView;
    use pretty_assertions::assert_eq;
    use std::net::IpAddr;

    const DEMO: &str = include_str!("../../examples/demo.yaml");

    #[test]
    fn the_demo_config_gives_three_local_tenants_and_one_remote_pod() {
        let objects = FileSource::parse_str("examples/demo.yaml", DEMO).unwrap();
        let view = NodeView::build(&objects, "demo-node", "cluster.local").unwrap();
        let tenants: Vec<(String, Vec<IpAddr>)> = view
            .tenants()
            .into_iter()
            .map(|(id, ws)| (id.short(), ws.iter().flat_map(|w| w.ips.clone()).collect()))
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            tenants,
            [
                ("billing/ledger".to_owned(), vec![ip("10.200.3.2")]),
                ("shop/cart".to_owned(), vec![ip("10.200.2.2")]),
                ("shop/frontend".to_owned(), vec![ip("10.200.1.2")]),
            ]
        );
        assert_eq!(view.meshed_namespaces, ["billing", "shop"]);
        assert_eq!(view.remote.len(), 1);
        assert_eq!(view.remote[0].name, "cart-1");
        assert_eq!(view.remote[0].node, "node-b");
        assert_eq!(view.remote[0].ips, [ip("10.201.1.2")]);
        assert!(
            view.local_ips()
                .all(|(ip, _)| ip != "10.200.4.2".parse::<IpAddr>().unwrap()),
            "the legacy pod is not meshed"
        );
    }

    #[test]
    fn the_demo_file_loads_from_disk() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.yaml");
        let objects = FileSource::load(&path).unwrap();
        assert_eq!(objects.pods.len(), 5);
        assert_eq!(objects.namespaces.len(), 3);
    }

    #[test]
    fn a_bad_file_reports_every_problem_at_once() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {nodeproxy.io/mesh: enabled}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {containers: [{name: web, image: nginx}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {containers: [{name: web, image: nginx}], nodeName: n1}
status: {podIP: 10.0.0.300}
---
apiVersion: v1
metadata: {name: mystery}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop}
spec: just a string
";
        let err = FileSource::parse_str("examples/bad.yaml", text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "examples/bad.yaml: document 2, line 7 (Pod shop/web-0): spec.nodeName: missing; \
             the file source has no scheduler, so set spec.nodeName to the node the pod runs on\n\
             examples/bad.yaml: document 3, line 13 (Pod shop/web-1): status.podIP: \
             \"10.0.0.300\" is not an ip address; set the pod's IPv4 or IPv6 address \
             (e.g. 10.200.1.2)\n\
             examples/bad.yaml: document 4, line 19: kind: missing; every document must be a \
             kubernetes object with apiVersion and kind (e.g. apiVersion: v1, kind: Pod)\n\
             examples/bad.yaml: document 5, line 22 (Pod shop/web-2): spec: invalid type: \
             string \"just a string\", expected PodSpec; see `kubectl explain pod.spec` for \
             the expected shape"
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_ignored() {
        let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {replicas: 3, selector: {matchLabels: {app: web}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}, brandNew: {x: 1}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, uid: abc}
spec: {nodeName: n1, containers: [{name: web, image: nginx}], notAField: [1, 2]}
status: {podIP: 10.0.0.1, hostIP: 192.0.2.2, qosClass: BestEffort, extra: true}
";
        let objects = FileSource::parse_str("t.yaml", text).unwrap();
        assert_eq!(objects.skipped_kinds.len(), 2);
        let view = NodeView::build(&objects, "n1", "cluster.local").unwrap();
        assert_eq!(view.local.len(), 1);
        assert_eq!(view.local[0].identity.short(), "shop/default");
    }

    #[test]
    fn tenant_policies_set_local_tenants_weights_and_limits_with_defaults_for_the_rest() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}}
---
apiVersion: nodeproxy.io/v1alpha1
kind: TenantPolicy
metadata: {name: web, namespace: shop}
spec:
  serviceAccount: web
  weight: 400
  limits: {maxConnections: 1000, maxConnectionsPerSecond: 50}
---
apiVersion: nodeproxy.io/v1alpha1
kind: TenantPolicy
metadata: {name: elsewhere, namespace: shop}
spec: {serviceAccount: remote-only, weight: 7}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {serviceAccountName: web, nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: job-0, namespace: shop}
spec: {serviceAccountName: job, nodeName: n1}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: r-0, namespace: shop}
spec: {serviceAccountName: remote-only, nodeName: n2}
status: {podIP: 10.0.0.3}
";
        let objects = FileSource::parse_str("t.yaml", text).unwrap();
        let view = NodeView::build(&objects, "n1", "cluster.local").unwrap();
        let id = |sa: &str| certs::Identity::new("cluster.local", "shop", sa).unwrap();
        assert_eq!(
            view.tenants,
            [
                crate::TenantSettings::defaults(id("job")),
                crate::TenantSettings {
                    identity: id("web"),
                    weight: 400,
                    limits: crate::TenantLimits {
                        max_connections: Some(1000),
                        max_connections_per_second: Some(50),
                        max_buffer_bytes: None,
                    },
                },
            ]
        );
        assert_eq!(view.tenants[0].weight, 100);
    }

    #[test]
    fn an_invalid_tenant_policy_is_a_problem_in_the_file_source() {
        let text = "\
apiVersion: nodeproxy.io/v1alpha1
kind: TenantPolicy
metadata: {name: web, namespace: shop}
spec: {serviceAccount: web, weight: 0, limits: {maxBufferBytes: 0}}
---
apiVersion: nodeproxy.io/v1alpha1
kind: TenantPolicy
metadata: {name: web2, namespace: shop}
spec: {serviceAccount: web, weight: 10001}
---
apiVersion: v1
kind: TenantPolicy
metadata: {name: web3, namespace: shop}
spec: {serviceAccount: web}
";
        let err = FileSource::parse_str("t.yaml", text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "document 1, line 1 (TenantPolicy shop/web): spec.weight: 0 is out of range; \
                 set a weight from 1 to 10000 (default 100)"
            ),
            "{err}"
        );
        assert!(
            err.contains("spec.limits.maxBufferBytes: 0 would refuse"),
            "{err}"
        );
        assert!(
            err.contains("(TenantPolicy shop/web2): spec.weight: 10001"),
            "{err}"
        );
        assert!(
            err.contains("apiVersion: expected nodeproxy.io/v1alpha1 for kind TenantPolicy"),
            "{err}"
        );
    }

    #[test]
    fn the_design_s_authorization_example_parses_into_the_view() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/authorization-policy.yaml");
        let objects = FileSource::load(&path).unwrap();
        let view = NodeView::build(&objects, "node-a", "cluster.local").unwrap();
        let id = |ns: &str, sa: &str| certs::Identity::new("cluster.local", ns, sa).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            view.policies,
            [crate::view::Policy {
                name: "admin-http".into(),
                namespace: "shop".into(),
                pod_selector: [("app".to_owned(), "web".to_owned())].into(),
                port: crate::view::PortRef::Name("admin-http".into()),
                allowed: vec![id("dive-viz", "dive-viz"), id("shop", "metrics-api")],
                allow_probes: true,
                targets: vec![ip("10.200.1.2")],
            }]
        );
        let web = &view.services[0];
        assert_eq!((web.namespace.as_str(), web.name.as_str()), ("shop", "web"));
        assert_eq!(web.cluster_ips, [ip("10.96.0.10")]);
        assert_eq!(web.endpoints.len(), 1);
        assert_eq!(web.endpoints[0].identity, id("shop", "web"));
        assert_eq!(
            web.ports[1].target,
            crate::view::PortRef::Name("admin-http".into())
        );
        // node-b holds no pod the policy protects, so its view carries no policy.
        let other = NodeView::build(&objects, "node-b", "cluster.local").unwrap();
        assert!(other.policies.is_empty());
    }

    #[test]
    fn lenient_mode_skips_pending_pods_and_invalid_policies_and_reports_them() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodeproxy.io/mesh: enabled}}
---
apiVersion: nodeproxy.io/v1alpha1
kind: TenantPolicy
metadata: {name: web, namespace: shop}
spec: {serviceAccount: web, weight: 0}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {serviceAccountName: web, nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: pending-0, namespace: shop}
spec: {serviceAccountName: web, nodeName: n1}
status: {phase: Pending}
";
        let (objects, _) = crate::objects::parse_collect("t.yaml", text).unwrap();
        assert!(NodeView::build(&objects, "n1", "cluster.local").is_err());
        let (view, problems) =
            NodeView::build_with(&objects, "n1", "cluster.local", crate::view::Mode::Lenient)
                .unwrap();
        assert_eq!(view.local.len(), 1, "the pending pod is skipped, silently");
        assert_eq!(view.tenants[0].weight, 100, "the invalid policy is skipped");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object.as_deref(), Some("TenantPolicy shop/web"));
    }

    #[test]
    fn an_unreadable_file_names_the_path() {
        let err = FileSource::load(Path::new("/nonexistent/nodeproxy.yaml")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("cannot read /nonexistent/nodeproxy.yaml: "),
            "{text}"
        );
        assert!(matches!(err, Error::Read { .. }));
    }

    #[test]
    fn a_yaml_syntax_error_keeps_the_parser_location() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0\nspec: {}\n";
        let err = FileSource::parse_str("broken.yaml", text).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Yaml { .. }), "{text}");
        assert!(text.contains("line"), "{text}");
        println!("{text}");
    }
}
