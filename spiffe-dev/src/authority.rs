//! The issuing side: one CA per trust domain, the bundles (every CA
//! certificate still trusted per domain), federation, and the published
//! snapshot that Workload API streams watch.
//!
//! A CA is rotated at half its lifetime (or on [`Authority::rotate_ca`]):
//! the new CA signs from then on, the old certificate stays in the bundle
//! until it expires, and every open stream gets a new SVID and bundle. With
//! a CA directory, CAs are loaded from and saved to it under an exclusive
//! `flock` on `<dir>/.lock`, so several servers sharing the directory (one per
//! lab node) use the same CAs; each polls the directory and adopts a CA
//! another server rotated to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca::{Ca, CaError, MintedSvid, hex};
use crate::policy::{Caller, Policy};

/// How a server issues.
#[derive(Debug, Clone)]
pub struct AuthorityOptions {
    pub policy: Policy,
    /// Lifetime of each X.509-SVID; streams rotate at half of it.
    pub svid_ttl: Duration,
    /// Lifetime of a generated CA; it is rotated at half of it.
    pub ca_ttl: Duration,
    /// Load CAs from / save them to this directory (`<td>.pem`, `<td>.key`).
    pub ca_dir: Option<PathBuf>,
    /// Named network namespaces (`/run/netns`).
    pub netns_dir: PathBuf,
}

/// One trust domain's state.
#[derive(Clone)]
pub struct Domain {
    /// The CA that signs now.
    pub ca: Arc<Ca>,
    /// DER of every trusted CA certificate (the current one first).
    pub authorities: Vec<Vec<u8>>,
    /// Expiry of each entry of `authorities`.
    expiries: Vec<SystemTime>,
    pub federate: bool,
}

impl Domain {
    /// The bundle as the Workload API sends it: DER certificates concatenated.
    pub fn bundle_der(&self) -> Vec<u8> {
        self.authorities.concat()
    }
}

/// Everything issuance needs at one moment; replaced as a whole on change.
#[derive(Clone)]
pub struct Snapshot {
    pub domains: BTreeMap<String, Domain>,
}

impl Snapshot {
    /// Bundles a workload of `td` trusts besides its own: those of the other
    /// federating domains, if `td` federates.
    pub fn federated_for(&self, td: &str) -> BTreeMap<String, Vec<u8>> {
        let federates = self.domains.get(td).is_some_and(|d| d.federate);
        self.domains
            .iter()
            .filter(|(name, d)| federates && d.federate && name.as_str() != td)
            .map(|(name, d)| (name.clone(), d.bundle_der()))
            .collect()
    }
}

/// A caller's identity and what was issued to it.
pub struct Issued {
    pub svid: MintedSvid,
    /// Own trust domain's bundle (DER concatenated).
    pub bundle: Vec<u8>,
    /// Trust domain name → bundle.
    pub federated: BTreeMap<String, Vec<u8>>,
}

/// The CAs, the policy, and the snapshot streams watch. Cheap to clone.
#[derive(Clone)]
pub struct Authority {
    inner: Arc<Inner>,
}

struct Inner {
    opts: AuthorityOptions,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Serialises rotations within this process.
    rotate: Mutex<()>,
    /// The SVID last issued per SPIFFE ID, handed out again while it is in
    /// the first half of its life and its CA still signs (as the SPIRE
    /// agent caches one SVID per entry): a workload opening a second stream,
    /// or getting a bundle update, keeps the same SVID.
    issued: Mutex<BTreeMap<String, (Arc<Ca>, MintedSvid)>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("opts", &self.inner.opts).finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads (from `ca_dir`) or generates a CA for every configured trust
    /// domain. A CA on disk that expires within two SVID lifetimes is replaced.
    pub fn new(opts: AuthorityOptions) -> Result<Authority, CaError> {
        let mut domains = BTreeMap::new();
        {
            let _lock = opts.ca_dir.as_deref().map(lock_dir).transpose()?;
            for td in &opts.policy.trust_domains {
                let ca = match &opts.ca_dir {
                    Some(dir) => match Ca::load(dir, &td.name)? {
                        Some(ca) if usable(&ca, opts.svid_ttl) => {
                            tracing::info!(trust_domain = %td.name, dir = %dir.display(), not_after = %fmt_time(ca.not_after()), "CA loaded");
                            ca
                        }
                        old => {
                            if old.is_some() {
                                tracing::warn!(trust_domain = %td.name, "CA in {} expires too soon; generating a new one", dir.display());
                            }
                            let ca = Ca::generate(&td.name, opts.ca_ttl)?;
                            ca.save(dir)?;
                            tracing::info!(trust_domain = %td.name, dir = %dir.display(), not_after = %fmt_time(ca.not_after()), "CA generated and saved");
                            ca
                        }
                    },
                    None => {
                        let ca = Ca::generate(&td.name, opts.ca_ttl)?;
                        tracing::info!(trust_domain = %td.name, not_after = %fmt_time(ca.not_after()), "CA generated");
                        ca
                    }
                };
                let (der, exp) = (ca.cert_der().to_vec(), ca.not_after());
                domains.insert(
                    td.name.clone(),
                    Domain { ca: Arc::new(ca), authorities: vec![der], expiries: vec![exp], federate: td.federate },
                );
            }
        }
        let (snapshot, _) = watch::channel(Arc::new(Snapshot { domains }));
        Ok(Authority {
            inner: Arc::new(Inner { opts, snapshot, rotate: Mutex::new(()), issued: Mutex::new(BTreeMap::new()) }),
        })
    }

    pub fn options(&self) -> &AuthorityOptions {
        &self.inner.opts
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.opts.policy
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.borrow().clone()
    }

    /// A receiver that sees every snapshot change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snapshot.subscribe()
    }

    /// How many open streams watch the snapshot (each FetchX509SVID and
    /// FetchX509Bundles stream holds one watcher until it ends).
    pub fn snapshot_watchers(&self) -> usize {
        self.inner.snapshot.receiver_count()
    }

    /// The CA that signs for `td` now.
    pub fn ca(&self, td: &str) -> Option<Arc<Ca>> {
        self.snapshot().domains.get(td).map(|d| d.ca.clone())
    }

    /// DER of every CA certificate trusted for `td`.
    pub fn bundle(&self, td: &str) -> Option<Vec<Vec<u8>>> {
        self.snapshot().domains.get(td).map(|d| d.authorities.clone())
    }

    /// Attests the caller `pid`/`uid`: its facts and the SPIFFE ID the first
    /// matching rule gives it.
    pub fn identify(&self, pid: i32, uid: u32) -> (Caller, Option<String>) {
        let caller = crate::attest::inspect(pid, uid, &self.inner.opts.netns_dir);
        let id = self.inner.opts.policy.identify(&caller);
        (caller, id)
    }

    /// Mints an SVID for `spiffe_id` from `snap` (its trust domain's current
    /// CA) with the configured TTL, plus the bundles that go with it, and logs
    /// the issuance.
    pub fn issue(&self, snap: &Snapshot, caller: &Caller, spiffe_id: &str) -> Result<Issued, CaError> {
        let td = trust_domain_of(spiffe_id);
        let dom = snap
            .domains
            .get(td)
            .ok_or_else(|| CaError::WrongTrustDomain { id: spiffe_id.to_string(), td: td.to_string() })?;
        let now = SystemTime::now();
        let ttl = self.inner.opts.svid_ttl;
        let mut issued = self.inner.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((ca, svid)) = issued.get(spiffe_id)
            && Arc::ptr_eq(ca, &dom.ca)
            && svid.not_after.duration_since(now).is_ok_and(|left| left > ttl / 2)
        {
            return Ok(Issued { svid: svid.clone(), bundle: dom.bundle_der(), federated: snap.federated_for(td) });
        }
        issued.retain(|_, (_, s)| s.not_after > now);
        let svid = dom.ca.mint(spiffe_id, ttl)?;
        issued.insert(spiffe_id.to_string(), (dom.ca.clone(), svid.clone()));
        drop(issued);
        tracing::info!(
            spiffe_id,
            pid = caller.pid,
            exe = caller.exe.as_deref().unwrap_or("?"),
            serial = %hex(&svid.serial),
            expires = %fmt_time(svid.not_after),
            "X509-SVID issued"
        );
        Ok(Issued { svid, bundle: dom.bundle_der(), federated: snap.federated_for(td) })
    }

    /// Replaces `td`'s signing CA with a new one (or, with a CA directory,
    /// with a newer one another server already saved there). The old CA
    /// certificate stays in the bundle until it expires. Every stream then
    /// gets a new SVID and bundle.
    pub fn rotate_ca(&self, td: &str) -> Result<(), CaError> {
        let _g = self.inner.rotate.lock().unwrap_or_else(|e| e.into_inner());
        let opts = &self.inner.opts;
        let cur = self.ca(td).ok_or_else(|| CaError::BadTrustDomain {
            td: td.to_string(),
            reason: "not a configured trust domain".into(),
        })?;
        let new = match &opts.ca_dir {
            Some(dir) => {
                let _lock = lock_dir(dir)?;
                // Every rotation goes through the directory, so a CA there
                // that is not ours is newer: another server rotated to it.
                match Ca::load(dir, td)? {
                    Some(disk) if disk.cert_der() != cur.cert_der() && usable(&disk, opts.svid_ttl) => disk,
                    _ => {
                        let ca = Ca::generate(td, opts.ca_ttl)?;
                        ca.save(dir)?;
                        ca
                    }
                }
            }
            None => Ca::generate(td, opts.ca_ttl)?,
        };
        self.adopt(td, new);
        Ok(())
    }

    /// Makes `ca` the signing CA of `td`, keeping the previous certificates
    /// that have not expired.
    fn adopt(&self, td: &str, ca: Ca) {
        let now = SystemTime::now();
        tracing::info!(trust_domain = td, not_after = %fmt_time(ca.not_after()), "CA rotated; bundle updated");
        self.inner.snapshot.send_modify(|snap| {
            let mut s = (**snap).clone();
            if let Some(d) = s.domains.get_mut(td) {
                let mut auth = vec![ca.cert_der().to_vec()];
                let mut exp = vec![ca.not_after()];
                for (a, e) in d.authorities.iter().zip(&d.expiries) {
                    if *e > now && *a != auth[0] {
                        auth.push(a.clone());
                        exp.push(*e);
                    }
                }
                d.ca = Arc::new(ca);
                d.authorities = auth;
                d.expiries = exp;
            }
            *snap = Arc::new(s);
        });
    }

    /// Drops expired CA certificates from the bundles (publishing a change
    /// only if there was one).
    fn prune(&self) {
        let now = SystemTime::now();
        self.inner.snapshot.send_if_modified(|snap| {
            let mut s = (**snap).clone();
            let mut changed = false;
            for d in s.domains.values_mut() {
                let keep: Vec<bool> = d.expiries.iter().enumerate().map(|(i, e)| i == 0 || *e > now).collect();
                if keep.iter().any(|k| !k) {
                    changed = true;
                    let mut it = keep.iter();
                    d.authorities.retain(|_| *it.next().unwrap_or(&true));
                    let mut it = keep.iter();
                    d.expiries.retain(|_| *it.next().unwrap_or(&true));
                }
            }
            if changed {
                *snap = Arc::new(s);
            }
            changed
        });
    }

    /// Keeps the CAs fresh until `stop` turns true: rotates each at half its
    /// lifetime, drops expired certificates from the bundles, and (with a CA
    /// directory) adopts CAs other servers rotated to.
    pub async fn maintain(self, mut stop: watch::Receiver<bool>) {
        const POLL: Duration = Duration::from_secs(5);
        loop {
            let now = SystemTime::now();
            let snap = self.snapshot();
            let mut next = now + Duration::from_secs(24 * 3600);
            for d in snap.domains.values() {
                next = next.min(half_life(&d.ca));
                for e in &d.expiries[1..] {
                    next = next.min(*e);
                }
            }
            let mut wait = next.duration_since(now).unwrap_or_default();
            if self.inner.opts.ca_dir.is_some() {
                wait = wait.min(POLL);
            }
            // Never spin (e.g. a rotation that keeps failing).
            wait = wait.max(Duration::from_millis(500));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = SystemTime::now();
            let names: Vec<String> = self.snapshot().domains.keys().cloned().collect();
            for td in names {
                let Some(cur) = self.ca(&td) else { continue };
                if let Some(dir) = &self.inner.opts.ca_dir
                    && let Ok(Some(disk)) = Ca::load(dir, &td)
                    && disk.cert_der() != cur.cert_der()
                    && usable(&disk, self.inner.opts.svid_ttl)
                {
                    self.adopt(&td, disk);
                    continue;
                }
                if half_life(&cur) <= now
                    && let Err(e) = self.rotate_ca(&td)
                {
                    tracing::error!(trust_domain = %td, "CA rotation failed: {e}");
                }
            }
            self.prune();
        }
    }
}

/// `spiffe://<td>/...` → `<td>`.
pub fn trust_domain_of(id: &str) -> &str {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    rest.split('/').next().unwrap_or(rest)
}

fn half_life(ca: &Ca) -> SystemTime {
    let life = ca.not_after().duration_since(ca.not_before()).unwrap_or_default();
    ca.not_before() + life / 2
}

/// A loaded CA is kept when it outlives two SVIDs (past its half-life,
/// [`Authority::maintain`] rotates it soon, keeping it in the bundle).
fn usable(ca: &Ca, svid_ttl: Duration) -> bool {
    ca.not_after() > SystemTime::now() + 2 * svid_ttl
}

/// Exclusive `flock` on `<dir>/.lock` (created with the directory).
fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, CaError> {
    let ferr = |e: String| CaError::File { path: dir.to_path_buf(), reason: e };
    std::fs::create_dir_all(dir).map_err(|e| ferr(e.to_string()))?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(|e| ferr(e.to_string()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| ferr(format!("flock: {e}")))
}

pub(crate) fn fmt_time(t: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(t)
}
