//! Signed model versions: nobody who can merely write to the bucket can swap
//! the model the workers serve.
//!
//! A bundle's `manifest.json` lists the SHA-256 of every other file of the
//! version, and [`super::Bundle::load`] refuses a file that does not match.
//! Signing the manifest therefore covers the whole version. `cinflow
//! publish-model --signing-key` and the training worker write
//! `manifest.sig.json` beside the manifest, before it: an Ed25519 signature
//! over the manifest's exact bytes and the id of the key that made it.
//! Workers given `--trusted-keys` refuse a version whose signature is
//! missing, made by another key or does not verify, and keep serving what
//! they had.
//!
//! Keys are the PEM files OpenSSL writes, so a lab makes and keeps them with
//! its usual tools:
//!
//! ```text
//! openssl genpkey -algorithm ed25519 -out cinflow-signing.pem
//! openssl pkey -in cinflow-signing.pem -pubout -out cinflow-signing.pub.pem
//! ```

use std::path::Path;

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

/// The signature file beside a version's manifest.
pub const SIGNATURE_FILE: &str = "manifest.sig.json";
/// Schema tag of a signature file.
pub const SIGNATURE_SCHEMA: &str = "cinflow.signature/v1";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a key could not be read or a version's signature does not hold.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {detail}")]
    Key { path: String, detail: String },
    #[error("the version is not signed (no {SIGNATURE_FILE})")]
    Unsigned,
    #[error("{SIGNATURE_FILE} is not a cinflow signature: {0}")]
    Malformed(String),
    #[error("signed by key {key_id}, which is not among the trusted keys ({trusted})")]
    UnknownKey { key_id: String, trusted: String },
    #[error("the signature by key {key_id} does not match the manifest (the manifest or the signature was changed after signing)")]
    Mismatch { key_id: String },
}

impl SigningError {
    /// The `reason` label of `cinflow_model_refusals_total`.
    pub fn label(&self) -> &'static str {
        match self {
            SigningError::Key { .. } => "key",
            SigningError::Unsigned => "unsigned",
            SigningError::Malformed(_) => "malformed",
            SigningError::UnknownKey { .. } => "unknown_key",
            SigningError::Mismatch { .. } => "mismatch",
        }
    }
}

/// What `manifest.sig.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignatureFile {
    pub schema: String,
    pub algorithm: String,
    /// [`key_id`] of the public key that verifies it.
    pub key_id: String,
    /// The Ed25519 signature over the manifest's bytes, base64.
    pub signature: String,
    /// SHA-256 of the signed manifest (for people; the signature is what counts).
    pub manifest_sha256: String,
}

/// A public key's short id: the first 16 hex digits of the SHA-256 of its 32 bytes.
pub fn key_id(public: &[u8]) -> String {
    crate::hashing::sha256_hex(public)[..16].to_string()
}

/// The DER inside a PEM block labelled `label` (`PRIVATE KEY`, `PUBLIC KEY`).
fn pem_der(text: &str, label: &str, path: &str) -> Result<Vec<u8>, SigningError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let bad = |detail: String| SigningError::Key {
        path: path.to_string(),
        detail,
    };
    let start = text
        .find(&begin)
        .ok_or_else(|| bad(format!("no {begin} block (an Ed25519 key in PEM, as `openssl genpkey -algorithm ed25519` writes)")))?;
    let body = &text[start + begin.len()..];
    let stop = body
        .find(&end)
        .ok_or_else(|| bad(format!("no {end} line")))?;
    let b64: String = body[..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| bad(format!("the PEM body is not base64: {e}")))
}

fn read_key_file(path: &Path) -> Result<String, SigningError> {
    std::fs::read_to_string(path).map_err(|e| SigningError::Key {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// The private key that signs published versions.
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl SigningKey {
    /// Reads an Ed25519 private key in PKCS#8 PEM.
    pub fn from_pem_file(path: &Path) -> Result<SigningKey, SigningError> {
        let p = path.display().to_string();
        let der = pem_der(&read_key_file(path)?, "PRIVATE KEY", &p)?;
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| SigningError::Key {
                path: p,
                detail: format!("not an Ed25519 private key in PKCS#8: {e}"),
            })?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(SigningKey { pair, key_id })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The signature file for a manifest's bytes.
    pub fn sign(&self, manifest: &[u8]) -> Vec<u8> {
        let sig = self.pair.sign(manifest);
        let file = SignatureFile {
            schema: SIGNATURE_SCHEMA.into(),
            algorithm: "ed25519".into(),
            key_id: self.key_id.clone(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
            manifest_sha256: crate::hashing::sha256_hex(manifest),
        };
        serde_json::to_vec_pretty(&file).expect("signature serialises")
    }
}

/// Which keys sign and which are trusted: the flags of the commands that
/// publish or serve model versions.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModelTrust {
    /// Ed25519 public keys (PEM files, comma-separated) that model versions
    /// must be signed with; a version whose signature does not verify is
    /// refused and the previous one kept. Unset: versions are not checked
    /// (a warning at start).
    #[arg(
        long,
        env = "CINFLOW_TRUSTED_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub trusted_keys: Vec<std::path::PathBuf>,
}

impl ModelTrust {
    /// The trusted keys, read; `None` when none are configured (then one
    /// warning says that versions are not checked).
    pub fn load(&self) -> Result<Option<std::sync::Arc<TrustedKeys>>, SigningError> {
        if self.trusted_keys.is_empty() {
            tracing::warn!("model versions are not verified: anyone who can write to the registry's bucket can change what is served; sign versions (publish-model --signing-key) and give the workers --trusted-keys");
            return Ok(None);
        }
        let keys = TrustedKeys::load(&self.trusted_keys)?;
        tracing::info!(keys = %keys.ids(), "model versions must be signed by one of these keys");
        Ok(Some(std::sync::Arc::new(keys)))
    }
}

/// The key that signs what a command publishes: the flag of `publish-model`,
/// `train` and the training worker.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModelSigning {
    /// Ed25519 private key (PKCS#8 PEM, `openssl genpkey -algorithm
    /// ed25519`) that signs the published version; workers with
    /// --trusted-keys serve only versions signed by a key they trust.
    #[arg(
        long,
        env = "CINFLOW_SIGNING_KEY_FILE",
        value_name = "PEM",
        hide_env_values = true
    )]
    pub signing_key: Option<std::path::PathBuf>,
}

impl ModelSigning {
    /// The signing key, read; `None` when none is configured.
    pub fn load(&self) -> Result<Option<std::sync::Arc<SigningKey>>, SigningError> {
        let Some(path) = &self.signing_key else {
            return Ok(None);
        };
        let key = SigningKey::from_pem_file(path)?;
        tracing::info!(key_id = key.key_id(), "published versions are signed");
        Ok(Some(std::sync::Arc::new(key)))
    }
}

/// The public keys a worker accepts versions from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    /// (key id, raw 32-byte public key).
    keys: Vec<(String, Vec<u8>)>,
}

impl TrustedKeys {
    /// Reads Ed25519 public keys in PEM (SubjectPublicKeyInfo, as `openssl
    /// pkey -pubout` writes); a file may hold several.
    pub fn load(paths: &[std::path::PathBuf]) -> Result<TrustedKeys, SigningError> {
        let mut keys = Vec::new();
        for path in paths {
            let p = path.display().to_string();
            let text = read_key_file(path)?;
            let mut rest = text.as_str();
            let mut found = 0;
            while let Some(i) = rest.find("-----BEGIN PUBLIC KEY-----") {
                let der = pem_der(&rest[i..], "PUBLIC KEY", &p)?;
                let raw = match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
                    Some(raw) if raw.len() == 32 => raw.to_vec(),
                    _ => {
                        return Err(SigningError::Key {
                            path: p,
                            detail: "a public key that is not Ed25519".into(),
                        })
                    }
                };
                keys.push((key_id(&raw), raw));
                found += 1;
                rest = &rest[i + 10..];
            }
            if found == 0 {
                return Err(SigningError::Key {
                    path: p,
                    detail: "no -----BEGIN PUBLIC KEY----- block (an Ed25519 public key in PEM, as `openssl pkey -pubout` writes)".into(),
                });
            }
        }
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The ids of the trusted keys, comma-separated.
    pub fn ids(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        ids.join(", ")
    }

    /// Checks `signature` (the signature file's bytes, if there is one)
    /// over `manifest`; returns the id of the key that made it.
    pub fn verify(
        &self,
        manifest: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<String, SigningError> {
        let bytes = signature.ok_or(SigningError::Unsigned)?;
        let file: SignatureFile =
            serde_json::from_slice(bytes).map_err(|e| SigningError::Malformed(e.to_string()))?;
        if file.schema != SIGNATURE_SCHEMA || file.algorithm != "ed25519" {
            return Err(SigningError::Malformed(format!(
                "schema {:?}, algorithm {:?} (this release reads {SIGNATURE_SCHEMA}, ed25519)",
                file.schema, file.algorithm
            )));
        }
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&file.signature)
            .map_err(|e| SigningError::Malformed(format!("signature is not base64: {e}")))?;
        let Some((_, public)) = self.keys.iter().find(|(id, _)| *id == file.key_id) else {
            return Err(SigningError::UnknownKey {
                key_id: file.key_id,
                trusted: self.ids(),
            });
        };
        UnparsedPublicKey::new(&ED25519, public)
            .verify(manifest, &sig)
            .map_err(|_| SigningError::Mismatch {
                key_id: file.key_id.clone(),
            })?;
        Ok(file.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032 test 1 as OpenSSL writes it: the PKCS#8 private key and the
    /// SubjectPublicKeyInfo of the same key.
    const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n";
    const PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n";

    fn keys(dir: &Path) -> (SigningKey, TrustedKeys) {
        std::fs::write(dir.join("k.pem"), PRIVATE).unwrap();
        std::fs::write(dir.join("k.pub.pem"), PUBLIC).unwrap();
        (
            SigningKey::from_pem_file(&dir.join("k.pem")).unwrap(),
            TrustedKeys::load(&[dir.join("k.pub.pem")]).unwrap(),
        )
    }

    #[test]
    fn the_rfc_8032_empty_message_signature_is_reproduced() {
        let dir = tempfile::tempdir().unwrap();
        let (key, trusted) = keys(dir.path());
        let file: SignatureFile = serde_json::from_slice(&key.sign(b"")).unwrap();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(file.signature)
            .unwrap();
        // RFC 8032 section 7.1, TEST 1: the signature of the empty message.
        assert_eq!(hex::encode(sig), "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b");
        assert_eq!(
            trusted.verify(b"", Some(&key.sign(b""))).unwrap(),
            key.key_id()
        );
    }

    #[test]
    fn changed_unsigned_and_foreign_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (key, trusted) = keys(dir.path());
        let manifest = br#"{"name":"cin4","version":"v1"}"#;
        let sig = key.sign(manifest);
        assert!(trusted.verify(manifest, Some(&sig)).is_ok());
        let changed = br#"{"name":"cin4","version":"v2"}"#;
        assert!(matches!(
            trusted.verify(changed, Some(&sig)),
            Err(SigningError::Mismatch { .. })
        ));
        assert!(matches!(
            trusted.verify(manifest, None),
            Err(SigningError::Unsigned)
        ));
        let mut other: SignatureFile = serde_json::from_slice(&sig).unwrap();
        other.key_id = "0123456789abcdef".into();
        let other = serde_json::to_vec(&other).unwrap();
        let e = trusted.verify(manifest, Some(&other)).unwrap_err();
        assert!(e.to_string().contains("not among the trusted keys"), "{e}");
        assert!(matches!(
            trusted.verify(manifest, Some(b"{}")),
            Err(SigningError::Malformed(_))
        ));
    }

    #[test]
    fn keys_that_are_not_ed25519_pem_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.pem"), "not a key").unwrap();
        let e = TrustedKeys::load(&[dir.path().join("x.pem")]).unwrap_err();
        assert!(e.to_string().contains("BEGIN PUBLIC KEY"), "{e}");
        let e = SigningKey::from_pem_file(&dir.path().join("x.pem")).unwrap_err();
        assert!(e.to_string().contains("ed25519"), "{e}");
    }
}
