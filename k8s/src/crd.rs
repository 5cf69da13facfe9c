//! The custom resources `networkservicemesh.io/v1` `NetworkService` and
//! `NetworkServiceEndpoint`, with the JSON shape upstream's registry-k8s
//! writes, so upstream YAML applies unchanged and a Go registry-k8s and
//! this one can share the objects.
//!
//! # Shape
//! The spec is the registry message of the API (`registry.NetworkService`,
//! `registry.NetworkServiceEndpoint`) as Go's `encoding/json` writes the
//! generated structs: snake_case keys (`source_selector`,
//! `network_service_names`, ...), empty values left out, timestamps as
//! `{"seconds": N, "nanos": N}`. Both kinds are namespaced; short names
//! `netsvc`/`netsvcs` and `nse`/`nses` as upstream.
//!
//! # Schema
//! Unlike upstream's CRDs (`x-kubernetes-preserve-unknown-fields` on the
//! whole spec), [`crds`] generates a full structural schema from these
//! types, so the API server refuses wrong types (`payload: 5`,
//! `matches: "x"`) and, with kubectl's strict field validation, unknown
//! fields. Nulls (upstream examples write a bare `source_selector:`) are
//! dropped by the API server before validation and read as empty here.
//! `deployments/crd/` holds the generated YAML; a test fails when it
//! differs from what these types generate.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceConversion, CustomResourceDefinition,
};
use kube::CustomResource;
use kube::core::CustomResourceExt;
use nsm_api::registry as api;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// Reads `null` as the type's default (upstream YAML writes bare keys).
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Spec of `NetworkService` (the `registry.NetworkService` message).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networkservicemesh.io",
    version = "v1",
    kind = "NetworkService",
    namespaced,
    plural = "networkservices",
    shortname = "netsvc",
    shortname = "netsvcs",
    doc = "A network service: its payload and how clients are matched to endpoints"
)]
pub struct NetworkServiceSpec {
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "nullable")]
    pub name: String,
    /// `ETHERNET` or `IP` (empty: `IP`).
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "nullable")]
    pub payload: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "nullable")]
    pub matches: Vec<Match>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "nullable")]
    pub path_ids: Vec<String>,
}

/// A `matches` entry: clients whose labels match `source_selector` go to
/// the endpoints the `routes` select.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Match {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub source_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "nullable")]
    pub routes: Vec<Destination>,
    #[serde(default, skip_serializing_if = "is_false", deserialize_with = "nullable")]
    pub fallthrough: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// A route of a match: the endpoints its selector picks.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Destination {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub destination_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_zero", deserialize_with = "nullable")]
    pub weight: u32,
}

/// Labels a match gives the connection (forwarder selection).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
}

/// Spec of `NetworkServiceEndpoint` (the `registry.NetworkServiceEndpoint`
/// message).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networkservicemesh.io",
    version = "v1",
    kind = "NetworkServiceEndpoint",
    namespaced,
    plural = "networkserviceendpoints",
    shortname = "nse",
    shortname = "nses",
    doc = "An endpoint of network services: where it serves and until when its registration lasts"
)]
pub struct NetworkServiceEndpointSpec {
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "nullable")]
    pub network_service_names: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub network_service_labels: BTreeMap<String, ServiceLabels>,
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "nullable")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_registration_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "nullable")]
    pub path_ids: Vec<String>,
}

/// The labels an endpoint has for one of its services.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceLabels {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
}

/// `google.protobuf.Timestamp` as Go's `encoding/json` writes it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Timestamp {
    #[serde(default, skip_serializing_if = "is_zero_i64", deserialize_with = "nullable")]
    pub seconds: i64,
    #[serde(default, skip_serializing_if = "is_zero_i32", deserialize_with = "nullable")]
    pub nanos: i32,
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

fn is_zero_i32(n: &i32) -> bool {
    *n == 0
}

// === conversions to and from the API messages ===

impl From<&api::NetworkService> for NetworkServiceSpec {
    fn from(ns: &api::NetworkService) -> Self {
        NetworkServiceSpec {
            name: ns.name.clone(),
            payload: ns.payload.clone(),
            matches: ns.matches.iter().map(Match::from).collect(),
            path_ids: ns.path_ids.clone(),
        }
    }
}

impl From<&NetworkServiceSpec> for api::NetworkService {
    fn from(s: &NetworkServiceSpec) -> Self {
        api::NetworkService {
            name: s.name.clone(),
            payload: s.payload.clone(),
            matches: s.matches.iter().map(api::Match::from).collect(),
            path_ids: s.path_ids.clone(),
        }
    }
}

impl From<&api::Match> for Match {
    fn from(m: &api::Match) -> Self {
        Match {
            source_selector: m.source_selector.clone().into_iter().collect(),
            routes: m
                .routes
                .iter()
                .map(|r| Destination {
                    destination_selector: r.destination_selector.clone().into_iter().collect(),
                    weight: r.weight,
                })
                .collect(),
            fallthrough: m.fallthrough,
            metadata: m.metadata.as_ref().map(|md| Metadata { labels: md.labels.clone().into_iter().collect() }),
        }
    }
}

impl From<&Match> for api::Match {
    fn from(m: &Match) -> Self {
        api::Match {
            source_selector: m.source_selector.clone().into_iter().collect(),
            routes: m
                .routes
                .iter()
                .map(|r| api::Destination {
                    destination_selector: r.destination_selector.clone().into_iter().collect(),
                    weight: r.weight,
                })
                .collect(),
            fallthrough: m.fallthrough,
            metadata: m.metadata.as_ref().map(|md| api::Metadata { labels: md.labels.clone().into_iter().collect() }),
        }
    }
}

impl From<&prost_types::Timestamp> for Timestamp {
    fn from(t: &prost_types::Timestamp) -> Self {
        Timestamp { seconds: t.seconds, nanos: t.nanos }
    }
}

impl From<&Timestamp> for prost_types::Timestamp {
    fn from(t: &Timestamp) -> Self {
        prost_types::Timestamp { seconds: t.seconds, nanos: t.nanos }
    }
}

impl From<&api::NetworkServiceEndpoint> for NetworkServiceEndpointSpec {
    fn from(e: &api::NetworkServiceEndpoint) -> Self {
        NetworkServiceEndpointSpec {
            name: e.name.clone(),
            network_service_names: e.network_service_names.clone(),
            network_service_labels: e
                .network_service_labels
                .iter()
                .map(|(k, v)| (k.clone(), ServiceLabels { labels: v.labels.clone().into_iter().collect() }))
                .collect(),
            url: e.url.clone(),
            expiration_time: e.expiration_time.as_ref().map(Timestamp::from),
            initial_registration_time: e.initial_registration_time.as_ref().map(Timestamp::from),
            path_ids: e.path_ids.clone(),
        }
    }
}

impl From<&NetworkServiceEndpointSpec> for api::NetworkServiceEndpoint {
    fn from(s: &NetworkServiceEndpointSpec) -> Self {
        api::NetworkServiceEndpoint {
            name: s.name.clone(),
            network_service_names: s.network_service_names.clone(),
            network_service_labels: s
                .network_service_labels
                .iter()
                .map(|(k, v)| (k.clone(), api::NetworkServiceLabels { labels: v.labels.clone().into_iter().collect() }))
                .collect(),
            url: s.url.clone(),
            expiration_time: s.expiration_time.as_ref().map(prost_types::Timestamp::from),
            initial_registration_time: s.initial_registration_time.as_ref().map(prost_types::Timestamp::from),
            path_ids: s.path_ids.clone(),
        }
    }
}

// === the CRD manifests ===

/// Where the generated CRD manifests live in the repository.
pub const CRD_DIR: &str = "deployments/crd";

/// The two CustomResourceDefinitions with the file names they have under
/// [`CRD_DIR`]: generated from the types above, with the `listKind` and
/// `conversion` upstream's manifests spell out.
pub fn crd_objects() -> Vec<(&'static str, CustomResourceDefinition)> {
    let mut out = vec![];
    for (file, mut crd) in [
        ("networkservices.yaml", NetworkService::crd()),
        ("networkserviceendpoints.yaml", NetworkServiceEndpoint::crd()),
    ] {
        crd.spec.names.list_kind = Some(format!("{}List", crd.spec.names.kind));
        crd.spec.conversion = Some(CustomResourceConversion { strategy: "None".into(), webhook: None });
        out.push((file, crd));
    }
    out
}

/// [`crd_objects`] as `(file name, YAML)`, exactly as committed under
/// [`CRD_DIR`] (a test keeps the two equal).
pub fn crds() -> Vec<(&'static str, String)> {
    crd_objects()
        .into_iter()
        .map(|(file, crd)| {
            let yaml = serde_yaml::to_string(&crd).unwrap_or_default();
            (
                file,
                format!(
                    "# Generated from the Rust types in k8s/src/crd.rs; do not edit. Print them with\n\
                     # `nsm-registry-k8s --print-crds`; rewrite these files with\n\
                     # `NSM_UPDATE_CRDS=1 cargo test -p nsm-k8s --lib committed_crds`.\n{yaml}"
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_yaml_with_nulls_and_templates_reads_and_writes_back_as_go_would() {
        let y = r#"
apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: scale-from-zero
spec:
  payload: ETHERNET
  matches:
    - source_selector:
      fallthrough: true
      routes:
        - destination_selector:
            app: nse-icmp-responder
            nodeName: "{{.nodeName}}"
    - source_selector:
      routes:
        - destination_selector:
            app: icmp-responder-supplier
"#;
        let ns: NetworkService = serde_yaml::from_str(y).unwrap();
        assert_eq!(ns.spec.matches.len(), 2);
        assert!(ns.spec.matches[0].fallthrough && ns.spec.matches[0].source_selector.is_empty());
        assert_eq!(ns.spec.matches[0].routes[0].destination_selector["nodeName"], "{{.nodeName}}");
        let api = api::NetworkService::from(&ns.spec);
        assert_eq!(NetworkServiceSpec::from(&api), ns.spec, "round trip through the API message");
        let j = serde_json::to_value(&ns.spec).unwrap();
        assert_eq!(
            j["matches"][1],
            serde_json::json!({"routes": [{"destination_selector": {"app": "icmp-responder-supplier"}}]})
        );
    }

    #[test]
    fn endpoints_keep_every_field_and_timestamps_are_go_shaped() {
        let e = api::NetworkServiceEndpoint {
            name: "nse-1".into(),
            network_service_names: vec!["a".into()],
            network_service_labels: [(
                "a".to_string(),
                api::NetworkServiceLabels { labels: [("k".into(), "v".into())].into() },
            )]
            .into(),
            url: "tcp://10.0.0.1:5001".into(),
            expiration_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            initial_registration_time: Some(prost_types::Timestamp { seconds: 1_600_000_000, nanos: 0 }),
            path_ids: vec!["spiffe://x/y".into()],
        };
        let spec = NetworkServiceEndpointSpec::from(&e);
        assert_eq!(api::NetworkServiceEndpoint::from(&spec), e);
        let j = serde_json::to_value(&spec).unwrap();
        assert_eq!(j["expiration_time"], serde_json::json!({"seconds": 1_700_000_000, "nanos": 5}));
        assert_eq!(
            j["initial_registration_time"],
            serde_json::json!({"seconds": 1_600_000_000}),
            "zero nanos left out"
        );
        assert_eq!(j["network_service_labels"]["a"]["labels"]["k"], "v");
    }

    /// The committed manifests are what the types generate;
    /// `NSM_UPDATE_CRDS=1` rewrites them.
    #[test]
    fn committed_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(CRD_DIR);
        let update = std::env::var_os("NSM_UPDATE_CRDS").is_some();
        for (file, yaml) in crds() {
            let path = dir.join(file);
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &yaml).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{} differs from what k8s/src/crd.rs generates; run `NSM_UPDATE_CRDS=1 cargo test -p nsm-k8s --lib \
                 committed_crds` and commit the result",
                path.display()
            );
        }
    }

    #[test]
    fn the_crds_are_named_and_typed_as_upstream() {
        let all = crds();
        let ns: serde_json::Value = serde_yaml::from_str(&all[0].1).unwrap();
        assert_eq!(ns["metadata"]["name"], "networkservices.networkservicemesh.io");
        assert_eq!(ns["spec"]["scope"], "Namespaced");
        assert_eq!(ns["spec"]["names"]["shortNames"], serde_json::json!(["netsvc", "netsvcs"]));
        assert_eq!(ns["spec"]["names"]["listKind"], "NetworkServiceList");
        let spec = &ns["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["payload"]["type"], "string");
        assert_eq!(spec["properties"]["matches"]["type"], "array");
        let nse: serde_json::Value = serde_yaml::from_str(&all[1].1).unwrap();
        assert_eq!(nse["spec"]["names"]["shortNames"], serde_json::json!(["nse", "nses"]));
        let t = &nse["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["expiration_time"];
        assert_eq!(t["properties"]["seconds"]["type"], "integer");
    }
}
