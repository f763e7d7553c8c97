//! Kubernetes-shaped objects, as read from a YAML stream.
//!
//! Owns [`Objects`] (the namespaces, pods, services and our policies a source knows about, as
//! `k8s-openapi` and [`crate::crd`] types) and [`parse`], which reads a multi-document YAML
//! stream into it. Real manifests load as they are: unknown fields are ignored, kinds other
//! than `v1` `Namespace`, `Pod`, `Service`, `List` and `nodeproxy.io/v1alpha1` `TenantPolicy`
//! and `AuthorizationPolicy` are skipped and counted, empty documents are ignored. Defaults the API server or kubectl would
//! apply are applied here too (a pod without `metadata.namespace` is in `default`). Every
//! problem in the stream is collected; a YAML syntax error stops parsing, with its line.
//!
//! Must not touch: sockets, the data path, the environment, the file system (see
//! [`crate::file`]); it decides nothing about the mesh (see [`crate::view`]).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::crd::{self, AuthorizationPolicy, TenantPolicy};
use serde_json::{Map, Value};

use crate::error::{Error, Origin, Problem, Result, sort_problems};

/// The namespace of a namespaced object that does not name one (as kubectl does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The objects one source knows about, in the order they were defined.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    /// Where the objects came from (a file name), used in error messages.
    pub source: String,
    /// `v1` `Namespace` objects.
    pub namespaces: Vec<Namespace>,
    /// `v1` `Pod` objects; `metadata.namespace` is always set.
    pub pods: Vec<Pod>,
    /// `v1` `Service` objects; `metadata.namespace` is always set.
    pub services: Vec<Service>,
    /// `nodeproxy.io/v1alpha1` `TenantPolicy` objects; `metadata.namespace` is always set.
    pub tenant_policies: Vec<TenantPolicy>,
    /// `nodeproxy.io/v1alpha1` `AuthorizationPolicy` objects; `metadata.namespace` is set.
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Kinds that were present but are not used (e.g. `Deployment`), with how many of each.
    pub skipped_kinds: BTreeMap<String, usize>,
    /// Where each pod was defined, index for index with `pods`, when it came from a file.
    pub(crate) pod_origins: Vec<Origin>,
    /// Where each tenant policy was defined, index for index with `tenant_policies`.
    pub(crate) tenant_policy_origins: Vec<Origin>,
}

impl Objects {
    /// An empty set of objects from the named source.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            ..Self::default()
        }
    }

    /// Where the pod at `index` of [`Objects::pods`] was defined, if it came from a file.
    ///
    /// Returns `None` once `pods` was changed by hand, rather than a wrong document.
    pub fn pod_origin(&self, index: usize) -> Option<Origin> {
        if self.pod_origins.len() == self.pods.len() {
            self.pod_origins.get(index).copied()
        } else {
            None
        }
    }

    /// Where the tenant policy at `index` of [`Objects::tenant_policies`] was defined, if it
    /// came from a file.
    pub fn tenant_policy_origin(&self, index: usize) -> Option<Origin> {
        if self.tenant_policy_origins.len() == self.tenant_policies.len() {
            self.tenant_policy_origins.get(index).copied()
        } else {
            None
        }
    }
}

/// Parses a YAML stream of Kubernetes objects, reporting every problem at once.
///
/// `source_name` names the stream in errors. This checks only the shape of the objects; a
/// configuration that parses may still be unusable for the mesh (see
/// [`crate::FileSource::parse_str`], which checks both).
pub fn parse(source_name: &str, text: &str) -> Result<Objects> {
    let (objects, mut problems) = parse_collect(source_name, text)?;
    if problems.is_empty() {
        Ok(objects)
    } else {
        sort_problems(&mut problems);
        Err(Error::Config {
            file: source_name.to_owned(),
            problems,
        })
    }
}

/// Parses what can be parsed and returns it with the problems found. Fails only on YAML syntax.
pub(crate) fn parse_collect(source_name: &str, text: &str) -> Result<(Objects, Vec<Problem>)> {
    let documents: Vec<serde_saphyr::Spanned<Value>> =
        serde_saphyr::from_multiple(text).map_err(|source| Error::Yaml {
            file: source_name.to_owned(),
            source: Box::new(source),
        })?;
    let markers = DocumentMarkers::scan(text);
    let mut parser = Parser {
        objects: Objects::new(source_name),
        problems: Vec::new(),
        namespaces_seen: HashMap::new(),
        seen: HashMap::new(),
    };
    for (index, document) in documents.into_iter().enumerate() {
        let line = document.referenced.line();
        let origin = if line == 0 {
            // The parser gave no location: fall back to counting non-empty documents.
            Origin {
                document: index + 1,
                line: None,
            }
        } else {
            Origin {
                document: markers.document_at(line),
                line: Some(line),
            }
        };
        parser.add(origin, document.value, "");
    }
    Ok((parser.objects, parser.problems))
}

/// State while walking the documents of one stream.
struct Parser {
    objects: Objects,
    problems: Vec<Problem>,
    /// Namespace name -> where it was first defined, to report duplicates.
    namespaces_seen: HashMap<String, Origin>,
    /// (kind, namespace, name) of a namespaced object -> where it was first defined, to
    /// report duplicates.
    seen: HashMap<(String, String, String), Origin>,
}

impl Parser {
    /// Adds one object (a document, or an item of a `List` when `prefix` is `items[i].`).
    fn add(&mut self, origin: Origin, value: Value, prefix: &str) {
        let Value::Object(map) = &value else {
            self.problems.push(
                Problem::new(format!(
                    "expected a kubernetes object (a mapping with apiVersion and kind), found {}",
                    describe(&value)
                ))
                .at(Some(origin))
                .field(prefix.trim_end_matches('.')),
            );
            return;
        };
        let kind = match map.get("kind") {
            Some(Value::String(kind)) if !kind.is_empty() => kind.clone(),
            other => {
                let found = other.map_or("missing".to_owned(), |v| {
                    format!("expected a kind such as Pod, found {}", describe(v))
                });
                self.problems.push(
                    Problem::new(format!(
                        "{found}; every document must be a kubernetes object with apiVersion \
                         and kind (e.g. apiVersion: v1, kind: Pod)"
                    ))
                    .at(Some(origin))
                    .field(format!("{prefix}kind")),
                );
                return;
            }
        };
        let want_version = match kind.as_str() {
            "Namespace" | "Pod" | "Service" | "List" => "v1",
            "TenantPolicy" | "AuthorizationPolicy" => crd::API_VERSION,
            _ => "",
        };
        if want_version.is_empty() {
            tracing::debug!(
                source = %self.objects.source, document = origin.document, %kind,
                "skipping an object of a kind nodeproxy does not use"
            );
            *self.objects.skipped_kinds.entry(kind).or_default() += 1;
            return;
        }
        let label = object_label(&kind, map);
        let problem = |message: String, field: String| {
            Problem::new(message)
                .at(Some(origin))
                .object(label.clone())
                .field(field)
        };
        match map.get("apiVersion") {
            Some(Value::String(v)) if v == want_version => {}
            other => {
                let found = other.map_or("missing".to_owned(), |v| {
                    format!(
                        "expected {want_version} for kind {kind}, found {}",
                        describe(v)
                    )
                });
                self.problems.push(problem(
                    format!("{found}; set apiVersion: {want_version}"),
                    format!("{prefix}apiVersion"),
                ));
                return;
            }
        }
        match kind.as_str() {
            "List" => self.add_list(origin, value, prefix),
            "Namespace" => {
                let Some(namespace) = self.typed::<Namespace>(origin, &label, value, prefix) else {
                    return;
                };
                let Some(name) = namespace.metadata.name.clone().filter(|n| !n.is_empty()) else {
                    self.problems.push(problem(
                        "missing; a namespace needs a name".to_owned(),
                        format!("{prefix}metadata.name"),
                    ));
                    return;
                };
                if let Some(first) = self.namespaces_seen.get(&name) {
                    self.problems.push(problem(
                        format!("defined twice (first in {first}); remove one of them"),
                        format!("{prefix}metadata.name"),
                    ));
                    return;
                }
                self.namespaces_seen.insert(name, origin);
                self.objects.namespaces.push(namespace);
            }
            "Pod" => {
                let Some(mut pod) = self.typed::<Pod>(origin, &label, value, prefix) else {
                    return;
                };
                if self.namespaced(&kind, &mut pod.metadata, origin, &label, prefix) {
                    self.objects.pods.push(pod);
                    self.objects.pod_origins.push(origin);
                }
            }
            "Service" => {
                let Some(mut service) = self.typed::<Service>(origin, &label, value, prefix) else {
                    return;
                };
                if self.namespaced(&kind, &mut service.metadata, origin, &label, prefix) {
                    self.objects.services.push(service);
                }
            }
            "TenantPolicy" => {
                let Some(CustomResource::<crd::TenantPolicySpec> { mut metadata, spec }) =
                    self.typed(origin, &label, value, prefix)
                else {
                    return;
                };
                if self.namespaced(&kind, &mut metadata, origin, &label, prefix) {
                    self.objects.tenant_policies.push(TenantPolicy {
                        metadata,
                        spec,
                        status: None,
                    });
                    self.objects.tenant_policy_origins.push(origin);
                }
            }
            _ => {
                let Some(CustomResource::<crd::AuthorizationPolicySpec> { mut metadata, spec }) =
                    self.typed(origin, &label, value, prefix)
                else {
                    return;
                };
                if self.namespaced(&kind, &mut metadata, origin, &label, prefix) {
                    self.objects
                        .authorization_policies
                        .push(AuthorizationPolicy {
                            metadata,
                            spec,
                            status: None,
                        });
                }
            }
        }
    }

    /// Defaults a namespaced object's namespace and reports a duplicate; false if it is one.
    fn namespaced(
        &mut self,
        kind: &str,
        metadata: &mut ObjectMeta,
        origin: Origin,
        label: &str,
        prefix: &str,
    ) -> bool {
        let namespace = metadata
            .namespace
            .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
        if namespace.is_empty() {
            DEFAULT_NAMESPACE.clone_into(namespace);
        }
        let Some(name) = metadata.name.clone().filter(|n| !n.is_empty()) else {
            return true;
        };
        let key = (kind.to_owned(), namespace.clone(), name);
        if let Some(first) = self.seen.get(&key) {
            self.problems.push(
                Problem::new(format!(
                    "defined twice (first in {first}); remove one of them"
                ))
                .at(Some(origin))
                .object(label)
                .field(format!("{prefix}metadata.name")),
            );
            return false;
        }
        self.seen.insert(key, origin);
        true
    }

    /// Adds the items of a `v1` `List` (what `kubectl get -o yaml` prints).
    fn add_list(&mut self, origin: Origin, value: Value, prefix: &str) {
        let Value::Object(mut map) = value else {
            return;
        };
        match map.remove("items") {
            Some(Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    self.add(origin, item, &format!("{prefix}items[{i}]."));
                }
            }
            None | Some(Value::Null) => {}
            Some(other) => self.problems.push(
                Problem::new(format!(
                    "expected a sequence of objects, found {}; write items as a yaml list",
                    describe(&other)
                ))
                .at(Some(origin))
                .object("List")
                .field(format!("{prefix}items")),
            ),
        }
    }

    /// Converts a document to its `k8s-openapi` type, naming the failing field on error.
    fn typed<T: DeserializeOwned>(
        &mut self,
        origin: Origin,
        label: &str,
        value: Value,
        prefix: &str,
    ) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(object) => Some(object),
            Err(err) => {
                let path = err.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let kind = label.split(' ').next().unwrap_or_default().to_lowercase();
                let explain = explain_path(&kind, &path);
                self.problems.push(
                    Problem::new(format!(
                        "{}; see `kubectl explain {explain}` for the expected shape",
                        err.inner()
                    ))
                    .at(Some(origin))
                    .object(label)
                    .field(format!("{prefix}{path}").trim_end_matches('.')),
                );
                None
            }
        }
    }
}

/// The shape of one of our custom resources in a file (status is the control plane's own).
#[derive(Deserialize)]
struct CustomResource<S> {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: S,
}

/// `Pod shop/web-1` or `Namespace shop`, from the raw object, so it is known even when the
/// object fails to convert.
fn object_label(kind: &str, map: &Map<String, Value>) -> String {
    let metadata = map.get("metadata");
    let get = |key| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    let name = get("name").filter(|n| !n.is_empty()).unwrap_or("<no name>");
    match kind {
        "Pod" | "Service" | "TenantPolicy" | "AuthorizationPolicy" => {
            let namespace = get("namespace")
                .filter(|n| !n.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE);
            format!("{kind} {namespace}/{name}")
        }
        "List" => kind.to_owned(),
        _ => format!("{kind} {name}"),
    }
}

/// `pod.spec.containers` for kind `pod` and path `spec.containers[0].image`'s parent fields.
fn explain_path(kind: &str, path: &str) -> String {
    let mut out = kind.to_owned();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let part = part.split('[').next().unwrap_or(part);
        out.push('.');
        out.push_str(part);
    }
    out
}

/// A short description of a JSON value's type for messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => format!("a string ({s:?})"),
        Value::Array(_) => "a sequence".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

/// The lines of `---` document markers, to number documents the way a reader counts them.
///
/// The YAML parser skips empty documents, so counting parsed documents would shift the numbers
/// after an empty one. A `---` at the start of a line always starts a document in YAML (it is
/// not allowed inside scalars at column 0), so counting those lines is exact.
struct DocumentMarkers {
    /// 1-based line numbers of `---` markers.
    lines: Vec<u64>,
    /// Whether content precedes the first marker (an implicit first document).
    implicit_first: bool,
}

impl DocumentMarkers {
    fn scan(text: &str) -> Self {
        let mut lines = Vec::new();
        let mut implicit_first = false;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_start_matches('\u{feff}');
            let is_marker = line
                .strip_prefix("---")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
            if is_marker {
                lines.push(i as u64 + 1);
            } else if lines.is_empty() {
                let trimmed = line.trim();
                if !(trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('%')) {
                    implicit_first = true;
                }
            }
        }
        Self {
            lines,
            implicit_first,
        }
    }

    /// The 1-based number of the document whose content starts on `line`.
    fn document_at(&self, line: u64) -> usize {
        let markers = self.lines.partition_point(|&m| m <= line);
        (markers + usize::from(self.implicit_first)).max(1)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn numbers_documents_as_a_reader_counts_them() {
        let m = DocumentMarkers::scan("# c\na: 1\n---\nb: 2\n---\n---\nc: 3\n");
        assert_eq!(
            [m.document_at(2), m.document_at(4), m.document_at(7)],
            [1, 2, 4]
        );
        let m = DocumentMarkers::scan("---\na: 1\n--- # two\nb: 2\n");
        assert_eq!([m.document_at(2), m.document_at(4)], [1, 2]);
        let m = DocumentMarkers::scan("a: 1\n");
        assert_eq!(m.document_at(1), 1);
    }

    #[test]
    fn loads_namespaces_and_pods_skipping_unknown_kinds_fields_and_empty_documents() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {nodeproxy.io/mesh: enabled}
  futureField: 1
---
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {replicas: 2}
---
# only a comment
---
apiVersion: v1
kind: Pod
metadata: {name: web-0}
spec:
  containers: [{name: web, image: nginx, someNewField: true}]
  nodeName: n1
status: {podIP: 10.0.0.1, phase: Running}
";
        let objects = parse("t.yaml", text).unwrap();
        assert_eq!(objects.namespaces.len(), 1);
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(
            objects.pods[0].metadata.namespace.as_deref(),
            Some(DEFAULT_NAMESPACE)
        );
        assert_eq!(
            objects.skipped_kinds,
            BTreeMap::from([("Deployment".to_owned(), 1)])
        );
        assert_eq!(
            objects.pod_origin(0),
            Some(Origin {
                document: 5,
                line: Some(16)
            })
        );
    }

    #[test]
    fn loads_the_items_of_a_list() {
        let text = "\
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a}}
- {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a}}
- {apiVersion: v1, kind: Service, metadata: {name: s, namespace: a}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c, namespace: a}}
";
        let objects = parse("t.yaml", text).unwrap();
        assert_eq!(objects.namespaces.len(), 1);
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.skipped_kinds.get("ConfigMap"), Some(&1));
    }

    #[test]
    fn reports_every_shape_problem_with_document_object_and_field() {
        let text = "\
apiVersion: v1
metadata: {name: nokind}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: oops
---
kind: Namespace
metadata: {name: shop}
---
just a string
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: 3}}
";
        let err = parse("bad.yaml", text).unwrap_err();
        let Error::Config { file, problems } = &err else {
            panic!("{err}")
        };
        assert_eq!(file, "bad.yaml");
        let summary: Vec<_> = problems
            .iter()
            .map(|p| {
                (
                    p.origin.map(|o| o.document),
                    p.object.as_deref(),
                    p.field.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (Some(1), None, Some("kind")),
                (Some(2), Some("Pod shop/web-1"), Some("spec")),
                (Some(3), Some("Namespace shop"), Some("apiVersion")),
                (Some(4), None, None),
                (
                    Some(5),
                    Some("Pod default/p"),
                    Some("items[0].spec.containers")
                ),
            ]
        );
        let text = err.to_string();
        assert!(text.contains("invalid type: string \"oops\""), "{text}");
        assert!(text.contains("kubectl explain pod.spec"), "{text}");
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    #[test]
    fn reports_duplicate_objects() {
        let text = "\
{apiVersion: v1, kind: Namespace, metadata: {name: a}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: a}}
---
{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a}}
---
{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a}}
";
        let err = parse("dup.yaml", text).unwrap_err().to_string();
        assert!(
            err.contains("document 2, line 3 (Namespace a): metadata.name: defined twice (first in document 1, line 1)"),
            "{err}"
        );
        assert!(err.contains("document 4, line 7 (Pod a/p)"), "{err}");
    }

    #[test]
    fn a_yaml_syntax_error_carries_its_line() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n";
        let err = parse("broken.yaml", text).unwrap_err();
        assert!(matches!(err, Error::Yaml { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with("broken.yaml: yaml error: line 4"),
            "{text}"
        );
        assert!(text.contains("line"), "{text}");
    }
}
