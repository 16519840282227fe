//! The manager's routes (`docs/openapi.json`), typed.

use std::time::Duration;

use super::{Client, ClientError, ClientOptions};
use crate::catalog::{FileRole, Image, NewImage, Template};
use crate::manager::{
    BalancePlan, BalancerSettings, CreateVm, Event, HeartbeatReply, Host, LeaseGrant, ListQuery,
    LoadReport, MigrateVm, Migration, MigrationView, RegisterHost, Vm,
};

/// A connection to one manager: the CLI's, and an agent's heartbeats.
#[derive(Clone)]
pub struct ManagerClient {
    http: Client,
}

impl From<Client> for ManagerClient {
    fn from(http: Client) -> Self {
        ManagerClient { http }
    }
}

impl ManagerClient {
    /// Every call waits at most `timeout`; `From<Client>` takes other options.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Self, ClientError> {
        Client::new(base, token, ClientOptions::with_timeout(timeout)).map(Self::from)
    }

    /// The one client underneath, for a route not typed here.
    pub fn http(&self) -> &Client {
        &self.http
    }

    pub async fn images(&self) -> Result<Vec<Image>, ClientError> {
        self.http.get_list("/v1/images").await
    }

    pub async fn image(&self, name: &str) -> Result<Image, ClientError> {
        self.http.get(&format!("/v1/images/{name}")).await
    }

    pub async fn add_image(&self, req: &NewImage) -> Result<Image, ClientError> {
        self.http.post("/v1/images", req).await
    }

    pub async fn delete_image(&self, name: &str) -> Result<Image, ClientError> {
        self.http.delete(&format!("/v1/images/{name}")).await
    }

    /// Uploads one file of an image (`body`: its bytes), within `timeout`.
    pub async fn upload_image_file(
        &self,
        name: &str,
        role: FileRole,
        body: reqwest::Body,
        timeout: Duration,
    ) -> Result<Image, ClientError> {
        let path = format!("/v1/images/{name}/files/{}", role.as_str());
        self.http.upload(&path, body, timeout).await
    }

    /// Opens one file of an image for reading, within `timeout` for the whole file.
    pub async fn image_file(
        &self,
        name: &str,
        role: FileRole,
        timeout: Duration,
    ) -> Result<super::Stream, ClientError> {
        let path = format!("/v1/images/{name}/files/{}", role.as_str());
        self.http.download(&path, timeout).await
    }

    pub async fn templates(&self) -> Result<Vec<Template>, ClientError> {
        self.http.get_list("/v1/templates").await
    }

    pub async fn template(&self, name: &str) -> Result<Template, ClientError> {
        self.http.get(&format!("/v1/templates/{name}")).await
    }

    pub async fn create_template(&self, t: &Template) -> Result<Template, ClientError> {
        self.http.post("/v1/templates", t).await
    }

    pub async fn delete_template(&self, name: &str) -> Result<Template, ClientError> {
        self.http.delete(&format!("/v1/templates/{name}")).await
    }

    pub async fn hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.http.get_list("/v1/hosts").await
    }

    pub async fn host(&self, name: &str) -> Result<Host, ClientError> {
        self.http.get(&format!("/v1/hosts/{name}")).await
    }

    pub async fn register_host(&self, req: &RegisterHost) -> Result<Host, ClientError> {
        self.http.post("/v1/hosts", req).await
    }

    /// Puts the host into maintenance; the manager moves its VMs away.
    pub async fn drain(&self, name: &str) -> Result<Host, ClientError> {
        self.http
            .post_empty(&format!("/v1/hosts/{name}/drain"))
            .await
    }

    pub async fn activate(&self, name: &str) -> Result<Host, ClientError> {
        self.http
            .post_empty(&format!("/v1/hosts/{name}/activate"))
            .await
    }

    pub async fn heartbeat(
        &self,
        name: &str,
        report: &LoadReport,
    ) -> Result<HeartbeatReply, ClientError> {
        self.http
            .post(&format!("/v1/hosts/{name}/heartbeat"), report)
            .await
    }

    /// Renews host `name`'s lease (see docs/ha.md, "Fencing").
    pub async fn renew_lease(&self, name: &str) -> Result<LeaseGrant, ClientError> {
        self.http
            .post_empty(&format!("/v1/hosts/{name}/lease"))
            .await
    }

    pub async fn vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.http.get_list("/v1/vms").await
    }

    pub async fn vm(&self, name: &str) -> Result<Vm, ClientError> {
        self.http.get(&format!("/v1/vms/{name}")).await
    }

    pub async fn create_vm(&self, req: &CreateVm) -> Result<Vm, ClientError> {
        self.http.post("/v1/vms", req).await
    }

    /// Marks the VM for deletion; its host destroys it.
    pub async fn delete_vm(&self, name: &str) -> Result<Vm, ClientError> {
        self.http.delete(&format!("/v1/vms/{name}")).await
    }

    /// Sets how the VM's host schedules its vCPU threads; recorded with the VM and
    /// applied wherever it runs.
    pub async fn set_vcpu_policy(
        &self,
        name: &str,
        policy: crate::vcpu::VcpuPolicy,
    ) -> Result<crate::vcpu::VcpuPolicySetting, ClientError> {
        let body = crate::vcpu::VcpuPolicySetting { policy };
        self.http
            .put(&format!("/v1/vms/{name}/vcpu-policy"), &body)
            .await
    }

    pub async fn migrate_vm(&self, name: &str, req: &MigrateVm) -> Result<Migration, ClientError> {
        self.http
            .post(&format!("/v1/vms/{name}/migrate"), req)
            .await
    }

    pub async fn migrations(&self, q: &ListQuery) -> Result<Vec<MigrationView>, ClientError> {
        let path = format!("/v1/migrations?limit={}&running={}", q.limit, q.running);
        self.http.get_list(&path).await
    }

    pub async fn migration(&self, id: u64) -> Result<MigrationView, ClientError> {
        self.http.get(&format!("/v1/migrations/{id}")).await
    }

    /// What the balancer would do now; nothing is recorded.
    pub async fn plan(&self) -> Result<BalancePlan, ClientError> {
        self.http.get_list("/v1/plan").await
    }

    pub async fn settings(&self) -> Result<BalancerSettings, ClientError> {
        self.http.get("/v1/balancer").await
    }

    pub async fn put_settings(
        &self,
        s: &BalancerSettings,
    ) -> Result<BalancerSettings, ClientError> {
        self.http.put("/v1/balancer", s).await
    }

    pub async fn events(&self, since: u64, limit: usize) -> Result<Vec<Event>, ClientError> {
        self.http
            .get_list(&format!("/v1/events?since={since}&limit={limit}"))
            .await
    }

    /// Follows `/v1/events/stream` from `since`, calling `each` with every event until
    /// the server ends the stream.
    pub async fn follow_events(
        &self,
        since: u64,
        mut each: impl FnMut(Event),
    ) -> Result<(), ClientError> {
        let mut stream = self
            .http
            .open_stream(&format!("/v1/events/stream?since={since}"))
            .await?;
        let mut buf = Vec::new();
        while let Some(chunk) = stream.read_chunk().await? {
            buf.extend_from_slice(&chunk);
            for e in take_events(&mut buf) {
                each(e);
            }
        }
        Ok(())
    }
}

/// The complete server-sent events at the start of `buf`, removed from it (pure); a
/// partial one stays for the next chunk. Data lines that are not an event are skipped.
fn take_events(buf: &mut Vec<u8>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let message: Vec<u8> = buf.drain(..end + 2).collect();
        for line in String::from_utf8_lossy(&message).lines() {
            if let Some(data) = line.strip_prefix("data:") {
                if let Ok(e) = serde_json::from_str(data.trim()) {
                    out.push(e);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_taken_whole_and_a_partial_one_waits() {
        let e1 = r#"{"seq":1,"time":5,"type":"settings_changed"}"#;
        let e2 = r#"{"seq":2,"time":6,"type":"vm_deleted","vm":"a"}"#;
        let mut buf =
            format!("id: 1\ndata: {e1}\n\n: keep-alive\n\nid: 2\ndata: {e2}").into_bytes();
        let got = take_events(&mut buf);
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        buf.extend_from_slice(b"\n\n");
        let got = take_events(&mut buf);
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
        assert!(buf.is_empty());
    }
}
