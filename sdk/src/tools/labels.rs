//! `NSM_LABELS`-style label lists: `key1:value1,key2:value2` (upstream also
//! accepts `=` as separator in some commands; so do we).

use std::collections::HashMap;

/// Parses a label list; empty input gives an empty map. Errors name the
/// offending item.
pub fn parse_labels(s: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once(':')
            .or_else(|| item.split_once('='))
            .ok_or_else(|| format!("label {item:?} is not key:value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(format!("label {item:?} has an empty key"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses() {
        let m = super::parse_labels("p2p:true, app=fw ,").unwrap();
        assert_eq!(m["p2p"], "true");
        assert_eq!(m["app"], "fw");
        assert!(super::parse_labels("").unwrap().is_empty());
        assert!(super::parse_labels("novalue").unwrap_err().contains("novalue"));
        assert!(super::parse_labels(":x").is_err());
    }
}
