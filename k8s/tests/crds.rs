//! The CRDs on a real kube-apiserver: upstream-shaped YAML applies with
//! kubectl unchanged and reads back as our types; wrong types are refused
//! by the schema, naming the field, and nothing is stored.
#![allow(clippy::unwrap_used)]

use kube::api::Api;
use nsm_k8s::crd::{NetworkService, NetworkServiceEndpoint};
use nsm_k8s::testing::ApiServer;
use nsm_sdk::testing::output_text;

/// Shapes of upstream's examples: a match with only metadata
/// (select-forwarder), a `source_selector:` left null and a template in a
/// destination selector (scale-from-zero), an endpoint with Go-shaped
/// timestamps.
const UPSTREAM_SHAPED: &str = r#"
apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: select-forwarder
spec:
  payload: ETHERNET
  matches:
    - metadata:
        labels:
          my_forwarder_capability: "true"
---
apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: autoscale
spec:
  payload: ETHERNET
  matches:
    - source_selector:
      fallthrough: true
      routes:
        - destination_selector:
            app: responder
            nodeName: "{{.nodeName}}"
    - source_selector:
      routes:
        - destination_selector:
            app: responder-supplier
---
apiVersion: networkservicemesh.io/v1
kind: NetworkServiceEndpoint
metadata:
  name: nse-a
spec:
  name: nse-a
  network_service_names: [autoscale]
  network_service_labels:
    autoscale:
      labels: {app: responder}
  url: tcp://10.0.0.7:5003
  expiration_time: {seconds: 4102444800, nanos: 7}
"#;

#[tokio::test]
async fn upstream_shaped_yaml_applies_unchanged_and_reads_back() {
    let k = ApiServer::start().await;
    let out = k.apply(UPSTREAM_SHAPED);
    assert!(out.contains("networkservice.networkservicemesh.io/select-forwarder created"), "{out}");

    let ns: Api<NetworkService> = Api::namespaced(k.client(), "default");
    let sf = ns.get("select-forwarder").await.unwrap();
    assert_eq!(sf.spec.payload, "ETHERNET");
    assert_eq!(sf.spec.matches[0].metadata.as_ref().unwrap().labels["my_forwarder_capability"], "true");
    let auto = ns.get("autoscale").await.unwrap();
    assert_eq!(auto.spec.matches.len(), 2);
    assert!(auto.spec.matches[0].fallthrough && auto.spec.matches[0].source_selector.is_empty());
    assert_eq!(auto.spec.matches[0].routes[0].destination_selector["nodeName"], "{{.nodeName}}");

    let nse: Api<NetworkServiceEndpoint> = Api::namespaced(k.client(), "default");
    let a = nse.get("nse-a").await.unwrap();
    let t = a.spec.expiration_time.unwrap();
    assert_eq!((t.seconds, t.nanos), (4_102_444_800, 7));
    assert_eq!(a.spec.network_service_labels["autoscale"].labels["app"], "responder");

    // kubectl knows the short names and the kinds by their upstream names.
    let got = output_text(&k.kubectl(&["get", "netsvc", "-o", "name"], ""));
    assert!(got.contains("networkservice.networkservicemesh.io/autoscale"), "{got}");
    let got = output_text(&k.kubectl(&["get", "nses", "-o", "jsonpath={.items[*].spec.url}"], ""));
    assert_eq!(got.trim(), "tcp://10.0.0.7:5003");
}

#[tokio::test]
async fn wrong_types_are_refused_by_the_schema_naming_the_field() {
    let k = ApiServer::start().await;
    for (yaml, field) in [
        (
            "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata: {name: bad-payload}\nspec: {payload: 5}\n",
            "spec.payload",
        ),
        (
            "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata: {name: bad-matches}\nspec: {matches: oops}\n",
            "spec.matches",
        ),
        (
            "apiVersion: networkservicemesh.io/v1\nkind: NetworkServiceEndpoint\nmetadata: {name: bad-time}\n\
             spec: {expiration_time: {seconds: soon}}\n",
            "spec.expiration_time.seconds",
        ),
    ] {
        let out = k.kubectl(&["apply", "-f", "-"], yaml);
        let text = output_text(&out);
        assert!(!out.status.success(), "{yaml} was accepted: {text}");
        assert!(text.contains(field), "the refusal names {field}: {text}");
    }
    let left = output_text(&k.kubectl(&["get", "netsvc,nse", "-A", "-o", "name"], ""));
    assert_eq!(left.trim(), "", "nothing stored");
}
