//! A typed client for the agent API, used by the CLI, the lab, and by one agent calling
//! another (migration).

use crate::error::{AgentError, ErrorBody};
use crate::host::HostReport;
use crate::vms::{CreateVm, VmView};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;
use tern_hv::{Action, VmMetrics};

/// A connection to one agent.
#[derive(Clone)]
pub struct AgentClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AgentClient {
    /// `base` like `http://198.18.0.1:7070`; every call waits at most `timeout`.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<AgentClient, AgentError> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(AgentError::BadRequest(format!(
                "agent URL {base:?} must start with http:// (e.g. http://198.18.0.1:7070)"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| AgentError::Unreachable {
                url: base.to_string(),
                reason: e.to_string(),
            })?;
        Ok(AgentClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and decodes the JSON answer; an error status becomes
    /// [`AgentError::Remote`] carrying the agent's message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, AgentError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |e: reqwest::Error| AgentError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let body = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(AgentError::Remote {
                url,
                status: status.as_u16(),
                body,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Remote {
            url,
            status: status.as_u16(),
            body: format!("unreadable answer: {e}"),
        })
    }

    pub async fn host(&self) -> Result<HostReport, AgentError> {
        self.call(Method::GET, "/v1/host", None).await
    }

    pub async fn list_vms(&self) -> Result<Vec<VmView>, AgentError> {
        self.call(Method::GET, "/v1/vms", None).await
    }

    pub async fn create_vm(&self, req: &CreateVm) -> Result<VmView, AgentError> {
        let body = serde_json::to_value(req).expect("CreateVm serialises");
        self.call(Method::POST, "/v1/vms", Some(&body)).await
    }

    pub async fn show_vm(&self, id: &str) -> Result<VmView, AgentError> {
        self.call(Method::GET, &format!("/v1/vms/{id}"), None).await
    }

    pub async fn delete_vm(&self, id: &str) -> Result<(), AgentError> {
        self.call::<Value>(Method::DELETE, &format!("/v1/vms/{id}"), None)
            .await
            .map(drop)
    }

    pub async fn act(&self, id: &str, action: Action) -> Result<VmView, AgentError> {
        let verb = match action {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Stop => "stop",
            Action::IncomingDone => {
                return Err(AgentError::BadRequest(
                    "incoming_done is not an API action".into(),
                ))
            }
        };
        self.call(Method::POST, &format!("/v1/vms/{id}/{verb}"), None)
            .await
    }

    pub async fn metrics(&self, id: &str) -> Result<VmMetrics, AgentError> {
        self.call(Method::GET, &format!("/v1/vms/{id}/metrics"), None)
            .await
    }

    /// One request to the VM's guest agent; returns the guest's answer.
    pub async fn guest(&self, id: &str, req: &Value) -> Result<Value, AgentError> {
        self.call(Method::POST, &format!("/v1/vms/{id}/guest"), Some(req))
            .await
    }
}
