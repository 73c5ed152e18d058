//! A FHIR R4 server as a destination: the transaction Bundle of a result is
//! POSTed to the server's base URL, with a bearer token read afresh for every
//! request (so a rotated token file is picked up without a restart).
//!
//! The answer decides: 2xx with every entry 2xx is accepted; 408, 429, 5xx,
//! 401 and 403 (a token that expired or is not yet valid: not the result's
//! fault) and connection failures are tried again; any other 4xx is a refusal
//! whose reason is the server's OperationOutcome.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum Token {
    None,
    /// Read before every request.
    File(PathBuf),
    Value(String),
}

/// How a delivery to the server ended (besides success).
#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    /// The server refused the Bundle: it will refuse it again.
    #[error("FHIR server {url} refused the Bundle (HTTP {status}): {outcome}")]
    Refused {
        url: String,
        status: u16,
        outcome: String,
    },
    /// Worth trying again (unreachable, 5xx, throttled, auth not valid now).
    #[error("FHIR server {url}: {detail}")]
    Unavailable { url: String, detail: String },
    /// The bridge's own settings are wrong (unreadable token file).
    #[error("{0}")]
    Config(String),
}

impl crate::retry::Transient for FhirError {
    fn is_transient(&self) -> bool {
        !matches!(self, FhirError::Refused { .. })
    }
}

/// What an accepted transaction returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub status: u16,
    /// Each entry's `response.status` and `location`.
    pub entries: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct FhirClient {
    base: String,
    token: Token,
    http: reqwest::Client,
}

impl FhirClient {
    /// `ca_file`: a PEM CA added to the system's roots (https with a private CA).
    pub fn new(
        base: &str,
        token: Token,
        ca_file: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<FhirClient, FhirError> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10).min(timeout));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                FhirError::Config(format!("cannot read CA file {}: {e}", ca.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| FhirError::Config(format!("CA file {}: {e}", ca.display())))?;
            b = b.add_root_certificate(cert);
        }
        let http = b
            .build()
            .map_err(|e| FhirError::Config(format!("HTTP client: {e}")))?;
        Ok(FhirClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn token(&self) -> Result<Option<String>, FhirError> {
        match &self.token {
            Token::None => Ok(None),
            Token::Value(v) => Ok(Some(v.trim().to_string())),
            Token::File(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| {
                    FhirError::Config(format!("cannot read the token file {}: {e}", p.display()))
                }),
        }
    }

    /// POSTs a transaction Bundle to the base URL.
    pub async fn transaction(&self, bundle: &Value) -> Result<Accepted, FhirError> {
        let url = self.base.clone();
        let unavailable = |detail: String| FhirError::Unavailable {
            url: url.clone(),
            detail,
        };
        let mut req = self
            .http
            .post(&url)
            .header("Content-Type", "application/fhir+json")
            .header("Accept", "application/fhir+json")
            .body(serde_json::to_vec(bundle).expect("a Bundle serialises"));
        if let Some(t) = self.token()? {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| unavailable(format!("{e}")))?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| unavailable(format!("reading the answer: {e}")))?;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        let outcome = || {
            json.as_ref().and_then(outcome_text).unwrap_or_else(|| {
                String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned()
            })
        };
        match status {
            200..=299 => {
                let entries: Vec<(String, String)> = json
                    .as_ref()
                    .and_then(|j| j["entry"].as_array())
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        let r = &e["response"];
                        (
                            r["status"].as_str().unwrap_or_default().to_string(),
                            r["location"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                if let Some((s, _)) = entries.iter().find(|(s, _)| !s.starts_with('2')) {
                    return Err(FhirError::Refused {
                        url,
                        status,
                        outcome: format!("an entry answered {s:?}"),
                    });
                }
                Ok(Accepted { status, entries })
            }
            401 | 403 => Err(unavailable(format!(
                "HTTP {status}: the token was not accepted ({}); check --fhir-token-file",
                outcome()
            ))),
            408 | 429 | 500..=599 => Err(unavailable(format!("HTTP {status}: {}", outcome()))),
            _ => Err(FhirError::Refused {
                url,
                status,
                outcome: outcome(),
            }),
        }
    }
}

/// The texts of an OperationOutcome's issues.
fn outcome_text(v: &Value) -> Option<String> {
    if v["resourceType"] != "OperationOutcome" {
        return None;
    }
    let texts: Vec<String> = v["issue"]
        .as_array()?
        .iter()
        .map(|i| {
            let text = i["diagnostics"]
                .as_str()
                .or_else(|| i["details"]["text"].as_str())
                .unwrap_or("no text");
            format!(
                "{} {}: {text}",
                i["severity"].as_str().unwrap_or("error"),
                i["code"].as_str().unwrap_or("unknown")
            )
        })
        .collect();
    Some(texts.join("; "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn operation_outcomes_become_the_reason() {
        let v = serde_json::json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": "unknown patient"},
            {"severity": "warning", "code": "business", "details": {"text": "late"}}
        ]});
        assert_eq!(
            super::outcome_text(&v).unwrap(),
            "error invalid: unknown patient; warning business: late"
        );
        assert!(super::outcome_text(&serde_json::json!({"resourceType": "Bundle"})).is_none());
    }
}
