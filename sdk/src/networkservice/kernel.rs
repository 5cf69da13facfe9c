//! The KERNEL mechanism's two ends of a hop (upstream
//! `sdk-kernel:pkg/kernel/networkservice/mechanisms/kernel`): the client
//! names the network namespace its interface must land in, the endpoint
//! names its own. Both name it by `netnsInode` and an `inodeURL` of
//! `inode://<nsfs dev>/<ino>`; the client also asks its gRPC tail to pass
//! the namespace's fd ([`PassFiles`], upstream's sendfd client), which an
//! nsmgr that resolves namespaces only by passed fds (as upstream's does)
//! needs.
//!
//! # Chain placement
//! [`KernelClient`] in a client chain before the gRPC tail; [`KernelServer`]
//! as the KERNEL handler of an endpoint's `mechanisms`.

use async_trait::async_trait;
use nsm_api::connection::Mechanism;
use nsm_api::mechanisms::kernel;
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};
use crate::tools::grpcfd::PassFiles;
use crate::tools::netns;

/// Writes this process's network namespace into `m`.
fn put_own_netns(m: &mut Mechanism, who: &str) -> Result<(), Status> {
    let (url, inode) = netns::own_netns_params()
        .map_err(|e| Status::internal(format!("{who} cannot name its own network namespace: {e}")))?;
    m.parameters.insert(kernel::INODE_URL.to_string(), url);
    m.parameters.insert(kernel::NETNS_INODE.to_string(), inode);
    Ok(())
}

/// Client side: adds this process's network namespace to every KERNEL
/// preference and to the connection's KERNEL mechanism (a refresh).
pub struct KernelClient;

#[async_trait]
impl Element for KernelClient {
    fn name(&self) -> &'static str {
        "kernel-client"
    }
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let mechs = req
            .mechanism_preferences
            .iter_mut()
            .chain(req.connection.as_mut().and_then(|c| c.mechanism.as_mut()))
            .filter(|m| m.r#type == kernel::MECHANISM);
        let mut any = false;
        for m in mechs {
            put_own_netns(m, "the client")?;
            any = true;
        }
        if any {
            ctx.ext.get_or_insert_default::<PassFiles>().0.push(netns::THREAD_SELF_NETNS.into());
        }
        next.request(ctx, req).await
    }
}

/// Endpoint side: answers with this process's network namespace so the
/// forwarder can put the endpoint's end of the wire here, and keeps the
/// interface name the forwarder proposed (which must be there).
pub struct KernelServer;

#[async_trait]
impl Element for KernelServer {
    fn name(&self) -> &'static str {
        "kernel-endpoint"
    }
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let m = conn_mut(&mut req).mechanism.get_or_insert_with(Mechanism::default);
        put_own_netns(m, "the endpoint")?;
        if m.parameters.get(kernel::NAME).is_none_or(|n| n.is_empty()) {
            return Err(Status::invalid_argument("KERNEL mechanism without an interface name"));
        }
        next.request(ctx, req).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use nsm_api::connection::Connection;

    use super::*;
    use crate::networkservice::Chain;

    fn kernel_mech(name: &str) -> Mechanism {
        Mechanism {
            cls: "LOCAL".into(),
            r#type: kernel::MECHANISM.into(),
            parameters: HashMap::from([(kernel::NAME.to_string(), name.to_string())]),
        }
    }

    #[tokio::test]
    async fn both_ends_name_this_process_netns() {
        let (url, inode) = netns::own_netns_params().unwrap();
        let req = NetworkServiceRequest {
            connection: Some(Connection::default()),
            mechanism_preferences: vec![
                kernel_mech("nsm-1"),
                Mechanism { r#type: "MEMIF".into(), ..Default::default() },
            ],
        };
        let c = Chain::new(vec![Arc::new(KernelClient), Arc::new(Capture)]);
        let seen = c.request(&mut Context::default(), req).await.unwrap();
        let m = seen.mechanism.unwrap();
        assert_eq!(m.parameters.get(kernel::NETNS_INODE), Some(&inode));
        assert_eq!(m.parameters.get(kernel::INODE_URL), Some(&url));

        let mut req = NetworkServiceRequest::default();
        conn_mut(&mut req).mechanism = Some(kernel_mech("icmp-respo-ab12"));
        let out = Chain::new(vec![Arc::new(KernelServer)]).request(&mut Context::default(), req).await.unwrap();
        assert_eq!(out.mechanism.unwrap().parameters.get(kernel::NETNS_INODE), Some(&inode));
        let mut req = NetworkServiceRequest::default();
        conn_mut(&mut req).mechanism = Some(kernel_mech(""));
        let e = Chain::new(vec![Arc::new(KernelServer)]).request(&mut Context::default(), req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    /// Returns the first KERNEL preference as the connection's mechanism.
    struct Capture;

    #[async_trait]
    impl Element for Capture {
        async fn request(&self, _ctx: &mut Context, req: NetworkServiceRequest, _next: Next) -> ConnResult {
            let mut c = req.connection.clone().unwrap_or_default();
            c.mechanism = req.mechanism_preferences.into_iter().find(|m| m.r#type == kernel::MECHANISM);
            Ok(c)
        }
    }

    /// Records what the client asked its gRPC tail to pass.
    struct Passed(std::sync::Mutex<Vec<std::path::PathBuf>>);

    #[async_trait]
    impl Element for Passed {
        async fn request(&self, ctx: &mut Context, req: NetworkServiceRequest, _next: Next) -> ConnResult {
            *self.0.lock().unwrap() = ctx.ext.get::<PassFiles>().map(|p| p.0.clone()).unwrap_or_default();
            Ok(req.connection.unwrap_or_default())
        }
    }

    #[tokio::test]
    async fn the_client_asks_to_pass_its_netns_fd_only_with_a_kernel_mechanism() {
        let passed = Arc::new(Passed(Default::default()));
        let chain = Chain::new(vec![Arc::new(KernelClient), passed.clone()]);
        let req = |m: Mechanism| NetworkServiceRequest { connection: None, mechanism_preferences: vec![m] };
        chain.request(&mut Context::default(), req(kernel_mech("nsm-1"))).await.unwrap();
        assert_eq!(*passed.0.lock().unwrap(), [std::path::PathBuf::from(netns::THREAD_SELF_NETNS)]);
        let mut vxlan = kernel_mech("nsm-1");
        vxlan.r#type = "VXLAN".into();
        chain.request(&mut Context::default(), req(vxlan)).await.unwrap();
        assert!(passed.0.lock().unwrap().is_empty(), "nothing to pass without a KERNEL mechanism");
    }
}
