//! Waiting for an interface in this process's own network namespace: it
//! must exist, be administratively up, and carry every expected address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkFlags;

/// Polls (every 20 ms) until `ifname` is up with all of `addrs`
/// (`addr/len` strings; only the address part is compared), or `timeout`.
pub async fn wait_ready(ifname: &str, addrs: &[String], timeout: Duration) -> Result<(), String> {
    if ifname.is_empty() {
        return Err("the connection names no interface".into());
    }
    let want: Vec<IpAddr> = addrs.iter().filter_map(|a| a.split('/').next()?.parse().ok()).collect();
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
    let task = tokio::spawn(conn);
    let deadline = Instant::now() + timeout;
    let mut last;
    let res = loop {
        match check(&handle, ifname, &want).await {
            Ok(()) => break Ok(()),
            Err(why) => last = why,
        }
        if Instant::now() >= deadline {
            break Err(format!("interface {ifname} not ready after {timeout:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    task.abort();
    res
}

async fn check(h: &rtnetlink::Handle, ifname: &str, want: &[IpAddr]) -> Result<(), String> {
    let mut links = h.link().get().match_name(ifname.to_string()).execute();
    let link = match links.try_next().await {
        Ok(Some(l)) => l,
        Ok(None) | Err(_) => return Err("it does not exist".into()),
    };
    if !link.header.flags.contains(LinkFlags::Up) {
        return Err("it is down".into());
    }
    let idx = link.header.index;
    let mut have = vec![];
    let mut s = h.address().get().set_link_index_filter(idx).execute();
    while let Ok(Some(a)) = s.try_next().await {
        for attr in a.attributes {
            if let AddressAttribute::Address(ip) = attr {
                have.push(ip);
            }
        }
    }
    match want.iter().find(|w| !have.contains(w)) {
        Some(missing) => Err(format!("address {missing} is missing")),
        None => Ok(()),
    }
}
