//! Logging setup shared by every binary.
//!
//! `NSM_LOG_LEVEL` (the upstream name: TRACE, DEBUG, INFO, WARN, ERROR)
//! sets the level of this project's crates; everything else logs at `warn`.
//! `RUST_LOG`, when set, overrides it with full `EnvFilter` syntax.
//! `NSM_LOG_FORMAT=json` switches to one JSON object per line.
//! Logs go to stderr so stdout stays free for command output (nsc prints its
//! summary there).

/// Crates whose level `NSM_LOG_LEVEL` controls.
const OUR_CRATES: &[&str] =
    &["nsm_sdk", "nsmgr", "nsm_forwarder", "nse", "nsc", "nsm_registry", "nsm_k8s", "nsm_lab", "nsm_spiffe_dev"];

/// The `EnvFilter` directive for a level name (case-insensitive).
pub fn directive(level: &str) -> Result<String, String> {
    let l = match level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "fatal" | "panic" => "error",
        other => return Err(format!("unknown log level {other:?} (use TRACE, DEBUG, INFO, WARN or ERROR)")),
    };
    let mut d = String::from("warn");
    for c in OUR_CRATES {
        d.push_str(&format!(",{c}={l}"));
    }
    Ok(d)
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(level: &str, json: bool) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => tracing_subscriber::EnvFilter::try_new(v).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => tracing_subscriber::EnvFilter::try_new(directive(level)?).map_err(|e| e.to_string())?,
    };
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs in files stay greppable.
        .with_ansi(std::io::stderr().is_terminal());
    let r = if json { b.json().try_init() } else { b.with_target(false).try_init() };
    r.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels() {
        assert!(super::directive("INFO").unwrap().contains("nsmgr=info"));
        assert!(super::directive("Trace").unwrap().contains("nsc=trace"));
        assert!(super::directive("loud").unwrap_err().contains("loud"));
    }
}
