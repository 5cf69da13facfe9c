//! A stand-in for the one thing of a kubelet the tests need (no kubelet can
//! run here): starting one container of a stored Pod exactly as its spec
//! says, in a network namespace standing in for the pod's.
//!
//! What is honoured, as the kubelet does it: `command` and `args`; `env`
//! in order, `value` with `$(VAR)` expanded from the variables defined
//! before it (`$$` is a literal `$`, unknown references stay as they are),
//! `valueFrom.fieldRef` for `metadata.name`/`metadata.namespace`; every
//! `volumeMount` of a `hostPath` volume, bind-mounted (read-only if so
//! marked) in a private mount namespace, the host paths mapped to the lab
//! directories that stand for the node's. The image is not pulled: its
//! entrypoint is looked up on the `PATH` given (the workspace binaries).
//! Anything else in the container spec panics as unsupported, so a test
//! never silently runs something other than what is stored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `$(VAR)` expansion as the kubelet does it.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(")
            && let Some(end) = t.find(')')
        {
            let name = &t[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container `name` of `pod` (init containers first).
pub fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|l| pod["spec"][l].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("pod has no container {name}"))
}

/// The container's environment, resolved.
pub fn env(pod: &Value, c: &Value) -> Vec<(String, String)> {
    let mut vars = BTreeMap::new();
    let mut out = vec![];
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_string();
        let value = if let Some(v) = e.get("value") {
            expand(v.as_str().unwrap_or_default(), &vars)
        } else if let Some(path) = e.pointer("/valueFrom/fieldRef/fieldPath").and_then(Value::as_str) {
            match path {
                "metadata.name" => pod["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                "metadata.namespace" => pod["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
                other => panic!("fieldRef {other} is not supported by this kubelet stand-in"),
            }
        } else {
            panic!("env {name}: only value and fieldRef are supported by this kubelet stand-in: {e}")
        };
        vars.insert(name.clone(), value.clone());
        out.push((name, value));
    }
    out
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command that runs container `name` of `pod` in `netns`: host paths
/// of `hostPath` volumes are replaced by `host_paths[path]`, the entrypoint
/// is looked up on `path_dirs`. `scratch` is a directory of the test's for
/// the mount staging.
pub fn command(
    pod: &Value,
    name: &str,
    netns: &str,
    host_paths: &BTreeMap<String, PathBuf>,
    path_dirs: &[&Path],
    scratch: &Path,
) -> Command {
    let c = container(pod, name);
    for key in c.as_object().into_iter().flatten().map(|(k, _)| k.as_str()) {
        let known = [
            "name",
            "image",
            "imagePullPolicy",
            "command",
            "args",
            "env",
            "volumeMounts",
            "resources",
            "securityContext",
            "terminationMessagePath",
            "terminationMessagePolicy",
        ];
        assert!(known.contains(&key), "container field {key} is not supported by this kubelet stand-in");
    }
    let env = env(pod, c);
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let argv: Vec<String> = ["command", "args"]
        .iter()
        .flat_map(|k| c[k].as_array().into_iter().flatten())
        .map(|a| expand(a.as_str().unwrap_or_default(), &vars))
        .collect();
    assert!(!argv.is_empty(), "container {name} has no command: this stand-in cannot run an image's entrypoint");

    // Mounts: stage every source, cover missing mount points' nearest
    // existing ancestor with a tmpfs (private to this mount namespace),
    // create the mount points in it, then bind.
    let volumes: BTreeMap<&str, &Value> = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    let mut script = vec!["set -e".to_string()];
    let mut binds = vec![];
    let mut covers = std::collections::BTreeSet::new();
    for (i, m) in c["volumeMounts"].as_array().into_iter().flatten().enumerate() {
        let vol = volumes[m["name"].as_str().unwrap_or_default()];
        let host = vol
            .pointer("/hostPath/path")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("volume {vol} is not a hostPath: not supported by this kubelet stand-in"));
        let src = host_paths.get(host).unwrap_or_else(|| panic!("no lab directory stands for host path {host}"));
        let dst = PathBuf::from(m["mountPath"].as_str().unwrap_or_default());
        let stage = scratch.join(format!("stage-{i}"));
        std::fs::create_dir_all(&stage).expect("staging directory");
        script.push(format!(
            "mount --bind {} {}",
            quote(&src.display().to_string()),
            quote(&stage.display().to_string())
        ));
        if !dst.exists() {
            let mut a = dst.as_path();
            while !a.exists() {
                a = a.parent().unwrap_or(Path::new("/"));
            }
            covers.insert(a.to_path_buf());
        }
        binds.push((stage, dst, m["readOnly"].as_bool().unwrap_or(false)));
    }
    for a in &covers {
        script.push(format!("mount -t tmpfs nsm-kubelet-stand-in {}", quote(&a.display().to_string())));
    }
    for (stage, dst, ro) in &binds {
        let (s, d) = (quote(&stage.display().to_string()), quote(&dst.display().to_string()));
        script.push(format!("mkdir -p {d}"));
        script.push(format!("mount --bind {s} {d}"));
        if *ro {
            script.push(format!("mount -o remount,bind,ro {d}"));
        }
    }
    script.push("exec \"$@\"".into());

    let path = path_dirs
        .iter()
        .map(|p| p.display().to_string())
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(String::from));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(script.join("\n"))
        .arg("sh")
        .args(&argv)
        .env_clear()
        .env("PATH", path.collect::<Vec<_>>().join(":"))
        .envs(env);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_as_the_kubelet_does() {
        let vars: BTreeMap<String, String> = [("POD_NAME".to_string(), "web-1".to_string())].into();
        assert_eq!(expand("$(POD_NAME)-x", &vars), "web-1-x");
        assert_eq!(expand("$$(POD_NAME)", &vars), "$(POD_NAME)");
        assert_eq!(expand("$(UNKNOWN)/$", &vars), "$(UNKNOWN)/$");
        assert_eq!(expand("a$b", &vars), "a$b");
    }
}
