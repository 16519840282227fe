//! The campaign: grant a lease, create the leader key with it if nobody holds it, then
//! renew the lease every third of its TTL for as long as this manager leads.
//!
//! Put-if-absent is one transaction (`create_revision(leader) == 0`), so two managers
//! campaigning at once cannot both win; the winner's term is the revision that created
//! the key. Followers re-read the key every [`Election::poll`] to know whom to forward
//! to and to try again once it is gone (its lease ended or was revoked).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{renewed_until, Leadership};
use crate::error::{Error, Result};
use crate::store::etcd::gateway::{op, Gateway};

/// How one manager campaigns.
pub struct Election {
    pub gateway: Arc<Gateway>,
    /// The key naming the leader, e.g. `/tern/leader`.
    pub key: Vec<u8>,
    /// Lease TTL, seconds: how long a crashed leader blocks a new one at most.
    pub ttl_s: i64,
    /// How often a follower looks at the key again.
    pub poll: Duration,
}

impl Election {
    /// Campaigns until `shutdown`, calling `on_elected` (which reloads the state) after
    /// each win before this manager starts to act. On shutdown a leader revokes its lease
    /// so another manager takes over at once.
    pub async fn run<F, Fut>(
        &self,
        leadership: Arc<Leadership>,
        on_elected: F,
        shutdown: impl Future<Output = ()>,
    ) where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        tokio::pin!(shutdown);
        let mut held: Option<i64> = None;
        loop {
            let round = self.round(&leadership, &on_elected, &mut held);
            tokio::select! {
                _ = &mut shutdown => break,
                r = round => if let Err(e) = r {
                    tracing::warn!("leader election: {e}");
                    leadership.follow(None);
                },
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
        leadership.follow(None);
        if let Some(lease) = held {
            if let Err(e) = self.gateway.revoke(lease).await {
                tracing::warn!("revoking the leader lease at shutdown: {e}");
            }
        }
    }

    /// One attempt: returns when this manager lost (or never won) the leadership.
    async fn round<F, Fut>(
        &self,
        leadership: &Leadership,
        on_elected: &F,
        held: &mut Option<i64>,
    ) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let lease = match *held {
            Some(l) => l,
            None => {
                let (id, _) = self.gateway.grant(self.ttl_s).await?;
                *held = Some(id);
                id
            }
        };
        let mut sent = Instant::now();
        let me = leadership.me().as_bytes();
        let r = self
            .gateway
            .txn(
                vec![op::created_at(&self.key, 0)],
                vec![op::put(&self.key, me, Some(lease))],
                vec![op::get(&self.key)],
            )
            .await?;
        let term = match r.range(0).first() {
            _ if r.succeeded => r.header.revision,
            // An earlier attempt won but its answer was lost: the key is on our lease.
            Some(kv) if kv.lease == lease => {
                sent = Instant::now();
                if self.gateway.keep_alive(lease).await? == 0 {
                    *held = None;
                    return Ok(());
                }
                kv.create_revision
            }
            other => {
                leadership.follow(other.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()));
                // Our unused lease stays ours for the next attempt; keep it alive meanwhile.
                if self.gateway.keep_alive(lease).await? == 0 {
                    *held = None;
                }
                return Ok(());
            }
        };
        // Until the state is reloaded this manager must not act: others see the key, and
        // requests they forward here are refused until `lead`.
        if let Err(e) = on_elected().await {
            // Give the key up, or nobody would lead while this manager keeps the lease.
            self.resign(lease, held).await;
            return Err(e);
        }
        let until = renewed_until(sent, self.ttl_s).expect("a granted TTL is positive");
        if Instant::now() >= until {
            self.resign(lease, held).await;
            return Err(Error::Etcd(
                "loading the state took longer than the lease".into(),
            ));
        }
        leadership.lead(term, until);
        tracing::info!(term, "leading");
        let result = self.keep_leading(leadership, term, lease, until).await;
        leadership.step_down(term);
        tracing::warn!(term, "stepped down");
        self.resign(lease, held).await;
        result
    }

    /// Renews the lease until a renewal fails to arrive before the deadline.
    async fn keep_leading(
        &self,
        leadership: &Leadership,
        term: i64,
        lease: i64,
        mut until: Instant,
    ) -> Result<()> {
        let every = Duration::from_millis((self.ttl_s as u64 * 1000 / 3).max(100));
        loop {
            let next = tokio::time::Instant::now() + every;
            let sent = Instant::now();
            // A renewal that takes past the deadline counts as lost: stop right there.
            let deadline = tokio::time::Instant::from_std(until);
            let renewed = tokio::time::timeout_at(deadline, self.gateway.keep_alive(lease)).await;
            match renewed {
                Err(_) => return Err(Error::Etcd("lease not renewed before it lapsed".into())),
                Ok(Err(e)) => tracing::warn!("renewing the leader lease: {e}"),
                Ok(Ok(ttl)) => match renewed_until(sent, ttl) {
                    Some(u) => {
                        until = u;
                        leadership.lead(term, until);
                    }
                    None => return Err(Error::Etcd("the leader lease expired".into())),
                },
            }
            if leadership.term() != Some(term) {
                // A fenced commit failed: someone else wrote.
                return Ok(());
            }
            tokio::time::sleep_until(next).await;
        }
    }

    /// Gives up the lease (and with it the key) so nobody waits for it to expire.
    async fn resign(&self, lease: i64, held: &mut Option<i64>) {
        *held = None;
        if let Err(e) = self.gateway.revoke(lease).await {
            tracing::warn!("revoking the leader lease: {e}");
        }
    }
}
