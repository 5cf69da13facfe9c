//! `updatepath`: gives this hop its path segment and connection id.
//!
//! Upstream algorithm (`common/updatepath`), used by servers and clients
//! alike with the element's name:
//! - no segments: create `{name, id: conn.id or a new uuid}` at index 0;
//! - the current segment already carries my name: keep it (a refresh, or the
//!   client side of a passthrough whose server side created it);
//! - otherwise the current segment must carry `conn.id` (else
//!   `InvalidArgument`); advance the index; reuse the next slot if it has my
//!   name, overwrite it with a fresh uuid if it has another name, or append.
//!
//! `conn.id` becomes my segment's id on the way out. On the way back the
//! connection is restored to the index and id it arrived with, so every hop
//! returns the connection as its caller knows it.
//!
//! # Chain placement
//! First in every server chain (the endpoint prefix, [`super::chains`]) and
//! every client chain.

use std::sync::Arc;

use async_trait::async_trait;
use nsm_api::connection::{Connection, Path, PathSegment};
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Status;

use super::chain::{ConnResult, Context, Element, Next, conn_mut};

/// The `updatepath` element.
pub struct UpdatePath {
    name: String,
}

impl UpdatePath {
    /// `updatepath` with this component's name.
    pub fn new(name: &str) -> Arc<UpdatePath> {
        Arc::new(UpdatePath { name: name.to_string() })
    }
}

/// Applies the upstream algorithm to `conn`; returns the index to restore on
/// the way back.
pub fn update_path(conn: &mut Connection, name: &str) -> Result<u32, Status> {
    let path = conn.path.get_or_insert_with(Path::default);
    if path.path_segments.is_empty() {
        let id = if conn.id.is_empty() { uuid::Uuid::new_v4().to_string() } else { conn.id.clone() };
        path.path_segments.push(PathSegment { name: name.to_string(), id: id.clone(), ..Default::default() });
        path.index = 0;
        conn.id = id;
        return Ok(0);
    }
    let idx = path.index as usize;
    let Some(cur) = path.path_segments.get(idx) else {
        return Err(Status::invalid_argument(format!(
            "path index {} is out of range: the path has {} segments",
            idx,
            path.path_segments.len()
        )));
    };
    if cur.name == name {
        conn.id = cur.id.clone();
        return Ok(idx as u32);
    }
    if cur.id != conn.id {
        return Err(Status::invalid_argument(format!(
            "connection id {:?} does not match the id {:?} of the current path segment {:?} (index {})",
            conn.id, cur.id, cur.name, idx
        )));
    }
    let ni = idx + 1;
    match path.path_segments.get_mut(ni) {
        Some(seg) if seg.name == name => {}
        Some(seg) => {
            *seg = PathSegment { name: name.to_string(), id: uuid::Uuid::new_v4().to_string(), ..Default::default() };
        }
        None => path.path_segments.push(PathSegment {
            name: name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        }),
    }
    path.index = ni as u32;
    conn.id = path.path_segments[ni].id.clone();
    Ok(idx as u32)
}

fn restore(conn: &mut Connection, index: u32) {
    if let Some(p) = conn.path.as_mut()
        && let Some(seg) = p.path_segments.get(index as usize)
    {
        conn.id = seg.id.clone();
        p.index = index;
    }
}

#[async_trait]
impl Element for UpdatePath {
    async fn request(&self, ctx: &mut Context, mut req: NetworkServiceRequest, next: Next) -> ConnResult {
        let back = update_path(conn_mut(&mut req), &self.name)?;
        let mut conn = next.request(ctx, req).await?;
        restore(&mut conn, back);
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Context, mut conn: Connection, next: Next) -> Result<(), Status> {
        update_path(&mut conn, &self.name)?;
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(name: &str, id: &str) -> PathSegment {
        PathSegment { name: name.into(), id: id.into(), ..Default::default() }
    }

    #[test]
    fn new_path_uses_given_id() {
        let mut c = Connection { id: "nsc-0".into(), ..Default::default() };
        assert_eq!(update_path(&mut c, "nsc").unwrap(), 0);
        let p = c.path.as_ref().unwrap();
        assert_eq!((p.index, p.path_segments[0].name.as_str(), p.path_segments[0].id.as_str()), (0, "nsc", "nsc-0"));
        let mut c = Connection::default();
        update_path(&mut c, "nsc").unwrap();
        assert_eq!(c.id.len(), 36, "fresh uuid");
    }

    #[test]
    fn next_hop_appends_and_gets_own_id() {
        let mut c = Connection {
            id: "nsc-0".into(),
            path: Some(Path { index: 0, path_segments: vec![seg("nsc", "nsc-0")] }),
            ..Default::default()
        };
        assert_eq!(update_path(&mut c, "nsmgr").unwrap(), 0);
        let p = c.path.as_ref().unwrap();
        assert_eq!(p.index, 1);
        assert_eq!(p.path_segments[1].name, "nsmgr");
        assert_eq!(c.id, p.path_segments[1].id);
        // The nsmgr's client side uses the same name: same segment.
        let id = c.id.clone();
        assert_eq!(update_path(&mut c, "nsmgr").unwrap(), 1);
        assert_eq!(c.id, id);
        assert_eq!(c.path.as_ref().unwrap().path_segments.len(), 2);
    }

    #[test]
    fn refresh_reuses_segment_and_overwrites_foreign_name() {
        let mut c = Connection {
            id: "nsc-0".into(),
            path: Some(Path {
                index: 0,
                path_segments: vec![seg("nsc", "nsc-0"), seg("nsmgr", "m1"), seg("fwd", "f1")],
            }),
            ..Default::default()
        };
        update_path(&mut c, "nsmgr").unwrap();
        assert_eq!(c.id, "m1", "refresh keeps the id");
        let mut c2 = c.clone();
        update_path(&mut c2, "fwd-other").unwrap();
        let p = c2.path.as_ref().unwrap();
        assert_eq!(p.path_segments[2].name, "fwd-other");
        assert_ne!(p.path_segments[2].id, "f1", "a different hop gets a fresh id");
    }

    #[test]
    fn mismatched_id_is_rejected() {
        let mut c = Connection {
            id: "someone-else".into(),
            path: Some(Path { index: 0, path_segments: vec![seg("nsc", "nsc-0")] }),
            ..Default::default()
        };
        let e = update_path(&mut c, "nsmgr").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("someone-else"));
        let mut c =
            Connection { path: Some(Path { index: 5, path_segments: vec![seg("a", "")] }), ..Default::default() };
        assert!(update_path(&mut c, "x").is_err());
    }

    #[tokio::test]
    async fn response_is_restored_to_callers_view() {
        use crate::networkservice::chain::Chain;
        let chain = Chain::new(vec![UpdatePath::new("nsmgr"), UpdatePath::new("nsmgr"), UpdatePath::new("fwd")]);
        let req = NetworkServiceRequest {
            connection: Some(Connection {
                id: "nsc-0".into(),
                path: Some(Path { index: 0, path_segments: vec![seg("nsc", "nsc-0")] }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let conn = chain.request(&mut Context::default(), req).await.unwrap();
        assert_eq!(conn.id, "nsc-0");
        let p = conn.path.unwrap();
        assert_eq!(p.index, 0);
        let names: Vec<_> = p.path_segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["nsc", "nsmgr", "fwd"]);
    }
}
