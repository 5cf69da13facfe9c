//! What the webhook does to one object: the decision and the JSON patch
//! (upstream `cmd-admission-webhook-k8s`), without any I/O.
//!
//! # Rules
//! - Only `CREATE` is mutated. Kinds: `Pod` (its spec), and the pod
//!   templates (`/spec/template`) of `Deployment`, `StatefulSet`,
//!   `DaemonSet`, `ReplicaSet` and `Job`. A ReplicaSet owned by a
//!   Deployment is left alone (the Deployment's template was patched).
//! - The NSURL list comes from the object's own annotation (default key
//!   `networkservicemesh.io`); a Pod without one takes its namespace's.
//!   No annotation, or an empty one: no patch.
//! - Every NSURL is checked as a client would parse it; one that is
//!   malformed denies the object with a message naming it.
//! - An object that already has an injected container (by name) gets no
//!   patch, so a patched object is never patched twice.
//! - The patch adds: the init containers and sidecars (name = image
//!   basename without tag or digest; an init container whose name a sidecar
//!   has gets `-init`), each with the env below, the two volume mounts
//!   (read-only) and the configured resources; the volumes
//!   `spire-agent-socket` (hostPath `/run/spire/sockets`) and `nsm-socket`
//!   (hostPath `/var/lib/networkservicemesh`), or CSI volumes of the SPIFFE
//!   and NSM CSI drivers where the namespace's Pod Security level is not
//!   `privileged`; and the configured labels.
//! - Env of each injected container, in this order: the configured extra
//!   env (`NSM_ENVS`), `SPIFFE_ENDPOINT_SOCKET`, `NSM_CONNECT_TO` (unless
//!   the extra env sets them), `POD_NAME` (downward API), the NSURLs
//!   (`NSM_NETWORK_SERVICES`), `NSM_NAME=$(POD_NAME)` (`$(POD_NAME)-<uuid>`
//!   when the pod has no generateName, as upstream).
//! - A `sriovToken=<pool>` label in an NSURL asks for one `<pool>` resource
//!   per use, as a limit on the init containers.
//! - Pod Security `restricted`: injected containers drop all capabilities
//!   and may not escalate privileges.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use nsm_sdk::tools::nsurl::parse_list;
use serde_json::{Value, json};

/// Where the SPIRE agent socket is mounted in injected containers.
pub const SPIRE_SOCKET_DIR: &str = "/run/spire/sockets";
/// Where the nsmgr socket directory is mounted in injected containers.
pub const NSM_SOCKET_DIR: &str = "/var/lib/networkservicemesh";

/// One container to inject.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Empty: the image's entrypoint.
    pub command: Vec<String>,
    pub args: Vec<String>,
}

/// What to inject (from the webhook's configuration).
#[derive(Clone, Debug)]
pub struct Injection {
    /// Annotation key holding the NSURL list.
    pub annotation: String,
    /// Name of the env variable that carries the NSURLs.
    pub nsurl_env: String,
    pub init_containers: Vec<ContainerSpec>,
    pub containers: Vec<ContainerSpec>,
    /// Extra env of every injected container, first.
    pub envs: Vec<(String, String)>,
    /// Labels added to the pod (template).
    pub labels: BTreeMap<String, String>,
    /// `{"limits": {...}, "requests": {...}}` of injected containers.
    pub resources: Value,
}

/// The `(name, image)` pairs of images, named as upstream names them, with
/// init containers renamed where they would collide with a sidecar.
pub fn container_specs(
    init_images: &[String],
    init_cmd: &[String],
    init_args: &[String],
    images: &[String],
    cmd: &[String],
    args: &[String],
) -> (Vec<ContainerSpec>, Vec<ContainerSpec>) {
    let spec = |image: &String, command: &[String], args: &[String], suffix: &str| ContainerSpec {
        name: format!("{}{suffix}", image_name(image)),
        image: image.clone(),
        command: command.to_vec(),
        args: args.to_vec(),
    };
    let sidecars: Vec<ContainerSpec> = images.iter().map(|i| spec(i, cmd, args, "")).collect();
    let inits = init_images
        .iter()
        .map(|i| {
            let clash = sidecars.iter().any(|s| s.name == image_name(i));
            spec(i, init_cmd, init_args, if clash { "-init" } else { "" })
        })
        .collect();
    (inits, sidecars)
}

/// `ghcr.io/x/cmd-nsc-init:v1.2` → `cmd-nsc-init` (also without a tag,
/// with a digest, or with a registry port).
pub fn image_name(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    let base = no_digest.rsplit('/').next().unwrap_or(no_digest);
    base.split(':').next().unwrap_or(base).to_string()
}

/// The kinds the webhook mutates, with where their pod lives.
fn pod_paths(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        "Pod" => Some(("/metadata", "/spec")),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(("/spec/template/metadata", "/spec/template/spec"))
        }
        _ => None,
    }
}

/// What the namespace of the object says.
#[derive(Clone, Debug, Default)]
pub struct NamespaceInfo {
    pub annotations: BTreeMap<String, String>,
    /// `pod-security.kubernetes.io/enforce` (empty: none, i.e. privileged).
    pub enforce: String,
}

/// The outcome for one object.
#[derive(Debug)]
pub enum Decision {
    /// Admit unchanged; why (for the log).
    Skip(String),
    /// Admit with this patch.
    Patch(Patch),
    /// Refuse, with the reason the user sees.
    Deny(String),
}

/// Whether `kind` may need a look at its namespace (the webhook reads it
/// only then).
pub fn handles(kind: &str) -> bool {
    pod_paths(kind).is_some()
}

/// Decides about `obj` (of `kind`, being created in a namespace described
/// by `ns`).
pub fn decide(inj: &Injection, kind: &str, obj: &Value, ns: &NamespaceInfo) -> Decision {
    let Some((meta_path, spec_path)) = pod_paths(kind) else {
        return Decision::Skip(format!("{kind} is not a kind this webhook mutates"));
    };
    if kind == "ReplicaSet" && owned_by(obj, "Deployment") {
        return Decision::Skip("a ReplicaSet of a Deployment (its template was patched)".into());
    }
    let own = obj.pointer("/metadata/annotations").and_then(|a| a.get(&inj.annotation)).and_then(Value::as_str);
    let (value, from) = match own {
        Some(v) => (v.to_string(), "its annotation"),
        None if kind == "Pod" => match ns.annotations.get(&inj.annotation) {
            Some(v) => (v.clone(), "its namespace's annotation"),
            None => return Decision::Skip("no annotation".into()),
        },
        None => return Decision::Skip("no annotation".into()),
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        return Decision::Skip("empty annotation".into());
    }
    let nsurls = match parse_list(&value) {
        Ok(v) => v,
        Err(e) => return Decision::Deny(format!("{from} {}: {e}", inj.annotation)),
    };
    let spec = obj.pointer(spec_path).cloned().unwrap_or(Value::Null);
    let names: Vec<&str> = inj.init_containers.iter().chain(&inj.containers).map(|c| c.name.as_str()).collect();
    let present = |list: &str| {
        spec.get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| c.get("name").and_then(Value::as_str).is_some_and(|n| names.contains(&n)))
    };
    if present("initContainers") || present("containers") {
        return Decision::Skip("already injected".into());
    }

    let generated = obj.pointer("/metadata/generateName").and_then(Value::as_str).is_some_and(|g| !g.is_empty());
    let nsm_name = if generated || kind != "Pod" {
        "$(POD_NAME)".to_string()
    } else {
        format!("$(POD_NAME)-{}", uuid::Uuid::new_v4())
    };
    let env = container_env(inj, &value, &nsm_name);
    let restricted = ns.enforce == "restricted";
    let mut sriov: BTreeMap<String, u64> = BTreeMap::new();
    for u in &nsurls {
        if let Some(pool) = u.labels.get("sriovToken") {
            *sriov.entry(pool.clone()).or_default() += 1;
        }
    }
    let container = |c: &ContainerSpec, extra_limits: &BTreeMap<String, u64>| {
        let mut resources = inj.resources.clone();
        for (pool, n) in extra_limits {
            resources["limits"][pool] = json!(n.to_string());
        }
        let mut v = json!({
            "name": c.name,
            "image": c.image,
            "imagePullPolicy": "IfNotPresent",
            "env": env,
            "volumeMounts": [
                {"name": "spire-agent-socket", "mountPath": SPIRE_SOCKET_DIR, "readOnly": true},
                {"name": "nsm-socket", "mountPath": NSM_SOCKET_DIR, "readOnly": true},
            ],
            "resources": resources,
        });
        if !c.command.is_empty() {
            v["command"] = json!(c.command);
        }
        if !c.args.is_empty() {
            v["args"] = json!(c.args);
        }
        if restricted {
            v["securityContext"] = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
        }
        v
    };
    let none = BTreeMap::new();
    let mut ops = vec![];
    let mut push = |path: String, value: Value| {
        if let Ok(path) = PointerBuf::parse(&path) {
            ops.push(PatchOperation::Add(AddOperation { path, value }));
        }
    };
    let extend = |list: &str, add: Vec<Value>| {
        let mut all = spec.get(list).and_then(Value::as_array).cloned().unwrap_or_default();
        all.extend(add);
        Value::Array(all)
    };
    if !inj.init_containers.is_empty() {
        let add = inj.init_containers.iter().map(|c| container(c, &sriov)).collect();
        push(format!("{spec_path}/initContainers"), extend("initContainers", add));
    }
    if !inj.containers.is_empty() {
        let add = inj.containers.iter().map(|c| container(c, &none)).collect();
        push(format!("{spec_path}/containers"), extend("containers", add));
    }
    let have_volume = |name: &str| {
        spec.get("volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(name))
    };
    let privileged = ns.enforce.is_empty() || ns.enforce == "privileged";
    let volumes: Vec<Value> = [
        ("spire-agent-socket", SPIRE_SOCKET_DIR, "Directory", "csi.spiffe.io"),
        ("nsm-socket", NSM_SOCKET_DIR, "DirectoryOrCreate", "csi.networkservicemesh.io"),
    ]
    .into_iter()
    .filter(|(name, ..)| !have_volume(name))
    .map(|(name, path, ty, driver)| {
        if privileged {
            json!({"name": name, "hostPath": {"path": path, "type": ty}})
        } else {
            json!({"name": name, "csi": {"driver": driver, "readOnly": true}})
        }
    })
    .collect();
    if !volumes.is_empty() {
        push(format!("{spec_path}/volumes"), extend("volumes", volumes));
    }
    if !inj.labels.is_empty() {
        let mut labels = obj.pointer(&format!("{meta_path}/labels")).cloned().unwrap_or_else(|| json!({}));
        for (k, v) in &inj.labels {
            labels[k] = json!(v);
        }
        if obj.pointer(meta_path).is_none() {
            push(meta_path.to_string(), json!({}));
        }
        push(format!("{meta_path}/labels"), labels);
    }
    Decision::Patch(Patch(ops))
}

/// The env of an injected container (see the module docs for the order).
fn container_env(inj: &Injection, nsurls: &str, nsm_name: &str) -> Vec<Value> {
    let mut env: Vec<Value> = inj.envs.iter().map(|(k, v)| json!({"name": k, "value": v})).collect();
    let set = |name: &str| inj.envs.iter().any(|(k, _)| k == name);
    for (name, value) in [
        ("SPIFFE_ENDPOINT_SOCKET", format!("unix://{SPIRE_SOCKET_DIR}/agent.sock")),
        ("NSM_CONNECT_TO", format!("unix://{NSM_SOCKET_DIR}/nsm.io.sock")),
    ] {
        if !set(name) {
            env.push(json!({"name": name, "value": value}));
        }
    }
    env.push(json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}));
    env.push(json!({"name": inj.nsurl_env, "value": nsurls}));
    env.push(json!({"name": "NSM_NAME", "value": nsm_name}));
    env
}

fn owned_by(obj: &Value, kind: &str) -> bool {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|o| o.get("kind").and_then(Value::as_str) == Some(kind))
}

#[cfg(test)]
mod tests;
