//! Minisign signatures: `publish --sign` writes them, the agent refuses artifacts without one.
//!
//! An artifact at `<key>` is signed by a sibling object `<key>.minisig` in minisign's own
//! format (the file `minisign -S` would write, pre-hashed BLAKE2b-512 mode), so the `minisign`
//! command line can check any artifact by hand: `minisign -V -P RWQ... -m artifact.tar.gz`.
//!
//! ## On the host
//!
//! With `[source] public_key` set (the `RWQ...` line of a `minisign.pub`, or the whole file),
//! every deployment:
//!
//! 1. fetches `<key>.minisig` **before** the artifact (it is a few hundred bytes). A missing,
//!    unreadable or legacy-mode signature, or one made by another key, is refused (exit 65)
//!    before a single byte of the artifact is downloaded;
//! 2. feeds every downloaded byte to `minisign-verify`'s streaming verifier alongside the
//!    SHA-256 while spooling the artifact to a file under `staging/`;
//! 3. checks the signature once the last byte has arrived and only then unpacks the spooled
//!    file, so bytes nobody signed never reach the decompressor or the tar parser. A bad
//!    signature discards the spool exactly as a checksum mismatch does; `current` is never
//!    touched.
//!
//! The signature's trusted comment is signed too (minisign's global signature covers it) and
//! carries the release's identity ([`crate::contract::identity`]: app, environment, key,
//! SHA-256, commit, sequence); the agent checks it against where it found the artifact.
//!
//! Several public keys may be trusted at once (`public_key = ["RWQ...old", "RWQ...new"]`),
//! for a key rotation: a signature is checked with the configured key whose id it names.
//!
//! ## In CI
//!
//! `publish --sign KEYFILE` reads a minisign secret key file. An unencrypted key (`minisign -G
//! -W`) is used as is; an encrypted one needs its password in `DEPLOYD_SIGN_PASSWORD`, and is
//! never prompted for, since CI has no terminal. minisign 0.11 writes `-W` keys with an
//! all-zero checksum, which the `minisign` crate refuses as corrupted; such a key is read
//! directly and proven by signing a probe and checking it with its own public key.

use std::io::Read;
use std::path::Path;

use aws_sdk_s3::Client;
use minisign_verify::{PublicKey, Signature, StreamVerifier};

use crate::error::exit_codes;
use crate::s3::{self, S3Failure, S3Object, SmallBody, read_small_body};

/// The suffix of a signature object.
pub const SUFFIX: &str = ".minisig";
/// A minisig file is a few hundred bytes; anything much larger is not one.
pub const MAX_SIGNATURE_BYTES: usize = 16 * 1024;
/// The decoded size of a minisign secret key: algorithms, salt, limits, key id, key, checksum.
const SECRET_KEY_BYTES: usize = 2 + 2 + 2 + 32 + 8 + 8 + 8 + 64 + 32;
/// The environment variable that holds an encrypted secret key's password.
pub const PASSWORD_ENV: &str = "DEPLOYD_SIGN_PASSWORD";

/// The key of the signature object for the artifact at `key`.
pub fn signature_key(key: &str) -> String {
    format!("{key}{SUFFIX}")
}

/// Parses one public key: a bare `RWQ...` key or the text of a `minisign.pub` file.
pub fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    let text = text.trim();
    let parsed = if text.contains('\n') {
        PublicKey::decode(text)
    } else {
        PublicKey::from_base64(text)
    };
    parsed.map_err(|e| {
        format!("is not a minisign public key ({e}); paste the RWQ... line of minisign.pub")
    })
}

/// `[source] public_key` as written: one key, or a list of keys trusted at once (a rotation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum PublicKeys {
    /// `public_key = "RWQ..."`.
    One(String),
    /// `public_key = ["RWQ...old", "RWQ...new"]`.
    Many(Vec<String>),
}

impl PublicKeys {
    /// The keys, parsed; the error names the entry that is not a key.
    pub fn trusted(&self) -> Result<TrustedKeys, String> {
        let texts: Vec<&str> = match self {
            PublicKeys::One(one) => vec![one.as_str()],
            PublicKeys::Many(many) => many.iter().map(String::as_str).collect(),
        };
        if texts.is_empty() {
            return Err("is an empty list; name at least one key, or remove it".into());
        }
        let mut keys = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let key = parse_public_key(text).map_err(|e| match self {
                PublicKeys::One(_) => e,
                PublicKeys::Many(_) => format!("entry {} {e}", i + 1),
            })?;
            keys.push(key);
        }
        Ok(TrustedKeys(keys))
    }
}

/// The public keys signatures are checked with; a signature is checked with the one whose key
/// id it names.
#[derive(Debug, Clone)]
pub struct TrustedKeys(Vec<PublicKey>);

/// Why a small signed document (a release pointer's statement) is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BytesRefused {
    /// The signature text is not a minisign signature; why.
    NotASignature(String),
    /// No trusted key made it.
    WrongKey,
    /// The bytes or the trusted comment do not match the signature.
    Invalid,
}

impl TrustedKeys {
    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no key is trusted (never, for keys from a valid config).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The trusted key that made `signature`, if any.
    fn key_for(&self, signature: &Signature) -> Option<&PublicKey> {
        self.0.iter().find(|k| {
            !matches!(
                k.verify_stream(signature),
                Err(minisign_verify::Error::UnexpectedKeyId)
            )
        })
    }

    /// Checks `signature_text` (a `.minisig`) over `data`, held in memory; returns the
    /// signature's (now authenticated) trusted comment.
    pub fn verify_bytes(&self, data: &[u8], signature_text: &str) -> Result<String, BytesRefused> {
        let signature = Signature::decode(signature_text)
            .map_err(|e| BytesRefused::NotASignature(e.to_string().to_lowercase()))?;
        let key = self.key_for(&signature).ok_or(BytesRefused::WrongKey)?;
        key.verify(data, &signature, false)
            .map_err(|_| BytesRefused::Invalid)?;
        Ok(signature.trusted_comment().to_string())
    }
}

/// The artifact's signature is missing, unusable, from another key or does not match.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// No `<key>.minisig`.
    #[error(
        "artifact {0} has no signature ({0}{SUFFIX} does not exist) and [source] public_key requires one; publish it with `deployd publish --sign`"
    )]
    Missing(S3Object),
    /// The signature object cannot be used.
    #[error(
        "signature {object}{SUFFIX} cannot be used: {reason}; republish the artifact with `deployd publish --sign`"
    )]
    Unusable {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
    /// Signed with a key that is not trusted.
    #[error(
        "signature {0}{SUFFIX} was made with a key that [source] public_key does not trust; sign with a trusted secret key or add its public key"
    )]
    WrongKey(S3Object),
    /// The bytes do not match the signature.
    #[error(
        "artifact {object} does not match its signature {SUFFIX} ({reason}); it was altered after signing, nothing was activated"
    )]
    Invalid {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
    /// S3 did not answer.
    #[error("S3 did not answer for signature {object}{SUFFIX}: {reason}")]
    Unavailable {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
}

exit_codes!(SignatureError {
    Unavailable { .. } => UNAVAILABLE,
    _ => DATAERR,
});

/// A fetched signature and the public key it must verify against.
#[derive(Clone)]
pub struct Signed {
    /// The artifact (not its signature).
    pub object: S3Object,
    public_key: PublicKey,
    signature: Signature,
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("object", &self.object)
            .field("trusted_comment", &self.trusted_comment())
            .finish_non_exhaustive()
    }
}

impl Signed {
    /// The signature's trusted comment, e.g. `timestamp:... file:... commit:...`.
    pub fn trusted_comment(&self) -> &str {
        self.signature.trusted_comment()
    }

    /// A verifier to feed the artifact's bytes to, in order.
    pub fn verifier(&self) -> Result<StreamVerifier<'_>, SignatureError> {
        self.public_key
            .verify_stream(&self.signature)
            .map_err(|e| self.classify(e))
    }

    /// Checks the signature once every byte has been fed to `verifier`.
    pub fn finish(&self, mut verifier: StreamVerifier<'_>) -> Result<(), SignatureError> {
        verifier.finalize().map_err(|e| SignatureError::Invalid {
            object: self.object.clone(),
            reason: e.to_string().to_lowercase(),
        })
    }

    fn classify(&self, e: minisign_verify::Error) -> SignatureError {
        match e {
            minisign_verify::Error::UnexpectedKeyId => {
                SignatureError::WrongKey(self.object.clone())
            }
            minisign_verify::Error::UnsupportedLegacyMode => SignatureError::Unusable {
                object: self.object.clone(),
                reason: "it is a legacy (not pre-hashed) signature, which cannot be checked while streaming".into(),
            },
            other => SignatureError::Unusable {
                object: self.object.clone(),
                reason: other.to_string().to_lowercase(),
            },
        }
    }
}

/// Fetches `<key>.minisig` and picks the trusted key that made it, before the artifact is
/// downloaded: a missing signature or one from an untrusted key fails here.
pub async fn fetch(
    s3: &Client,
    object: &S3Object,
    keys: &TrustedKeys,
) -> Result<Signed, SignatureError> {
    let sig = object.sibling(signature_key(&object.key));
    let unusable = |reason: String| SignatureError::Unusable {
        object: object.clone(),
        reason,
    };
    let unavailable = |reason: String| SignatureError::Unavailable {
        object: object.clone(),
        reason,
    };
    let resp = match s3
        .get_object()
        .bucket(&sig.bucket)
        .key(&sig.key)
        .send()
        .await
    {
        Ok(resp) => resp,
        Err(e) => {
            return Err(match s3::classify(&e) {
                S3Failure::NotFound => SignatureError::Missing(object.clone()),
                S3Failure::Denied => {
                    unusable("access was denied; the instance needs s3:GetObject on it".into())
                }
                other => unavailable(other.to_string()),
            });
        }
    };
    let body = read_small_body(resp, MAX_SIGNATURE_BYTES)
        .await
        .map_err(|e| match e {
            SmallBody::TooLarge => {
                unusable(format!("it is larger than {MAX_SIGNATURE_BYTES} bytes"))
            }
            SmallBody::Failed(reason) => unavailable(reason),
        })?;
    let text = std::str::from_utf8(&body.bytes)
        .map_err(|_| unusable("it is not text in minisign format".to_string()))?;
    let signature = Signature::decode(text)
        .map_err(|e| unusable(format!("it is not a minisign signature ({e})")))?;
    let public_key = keys
        .key_for(&signature)
        .cloned()
        .ok_or_else(|| SignatureError::WrongKey(object.clone()))?;
    let signed = Signed {
        object: object.clone(),
        public_key,
        signature,
    };
    // Key id and mode are checked now, before the artifact is downloaded.
    signed.verifier()?;
    tracing::info!(
        artifact = %object,
        trusted_comment = signed.trusted_comment(),
        "fetched the artifact's signature"
    );
    Ok(signed)
}

/// Signing in CI failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key file cannot be read.
    #[error("cannot read minisign secret key {path}: {reason}")]
    Read {
        /// The path concerned.
        path: String,
        /// Why, as one clause.
        reason: String,
    },
    /// An encrypted key without `DEPLOYD_SIGN_PASSWORD`.
    #[error(
        "minisign secret key {path} is encrypted and {PASSWORD_ENV} is not set; put its password in {PASSWORD_ENV} (deployd never prompts)"
    )]
    NeedsPassword {
        /// The path concerned.
        path: String,
    },
    /// The file is not a minisign secret key (or the password is wrong).
    #[error("cannot use minisign secret key {path}: {reason}")]
    BadKey {
        /// The path concerned.
        path: String,
        /// Why, as one clause.
        reason: String,
    },
    /// Signing failed.
    #[error("signing {file} failed: {reason}")]
    Sign {
        /// The file being signed.
        file: String,
        /// Why, as one clause.
        reason: String,
    },
}

exit_codes!(SignError {
    Read { .. } => NOINPUT,
    NeedsPassword { .. } | BadKey { .. } => CONFIG,
    Sign { .. } => SOFTWARE,
});

/// A secret key ready to sign.
pub struct SigningKey {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey { .. }")
    }
}

impl SigningKey {
    /// Loads a minisign secret key file; an encrypted key's password comes from `password`.
    ///
    /// The key's second line says whether it is encrypted (`Sc`, scrypt) or not (`minisign
    /// -G -W`); an unencrypted key is read directly, whatever its checksum says, and proven
    /// by signing a probe that its own public key must verify.
    pub fn load(path: &Path, password: Option<String>) -> Result<SigningKey, SignError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SignError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| SignError::BadKey {
            path: shown.clone(),
            reason,
        };
        let raw = text
            .lines()
            .nth(1)
            .and_then(|line| aws_smithy_types::base64::decode(line.trim()).ok())
            .filter(|raw| raw.len() == SECRET_KEY_BYTES)
            .ok_or_else(|| {
                bad(
                    "it is not a minisign secret key file (the second line must be the base64 key)"
                        .into(),
                )
            })?;
        let sk = match &raw[2..4] {
            [0, 0] => minisign::SecretKey::from_bytes(&raw).map_err(|e| bad(e.to_string()))?,
            b"Sc" => match password {
                // `from_box` with `None` would prompt on the terminal; never let it.
                Some(pw) => minisign::SecretKeyBox::from_string(&text)
                    .and_then(|b| b.into_secret_key(Some(pw)))
                    .map_err(|e| bad(e.to_string()))?,
                None => return Err(SignError::NeedsPassword { path: shown }),
            },
            other => {
                return Err(bad(format!(
                    "it uses key derivation {other:?}, which minisign does not define"
                )));
            }
        };
        let pk = minisign::PublicKey::from_secret_key(&sk).map_err(|e| bad(e.to_string()))?;
        // With the public key given, `sign` checks the signature it made against it: a key
        // whose halves do not belong together (a corrupted file) fails here, not on hosts.
        minisign::sign(Some(&pk), &sk, &b"deployd key check"[..], None, None).map_err(|e| {
            bad(format!(
                "it cannot make a signature its public key accepts ({e})"
            ))
        })?;
        Ok(SigningKey { sk, pk })
    }

    /// This key's own public key as the trusted set, to check what it signed earlier.
    pub fn trusted(&self) -> Result<TrustedKeys, String> {
        PublicKeys::One(self.public_key_base64()).trusted()
    }

    /// The public key, as the `RWQ...` string `[source] public_key` takes.
    pub fn public_key_base64(&self) -> String {
        self.pk.to_base64()
    }

    /// Signs everything `data` yields (streaming, pre-hashed mode) and returns the `.minisig`
    /// text. `name` only labels errors.
    pub fn sign<R: Read>(
        &self,
        data: R,
        trusted_comment: &str,
        name: &str,
    ) -> Result<String, SignError> {
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            data,
            Some(trusted_comment),
            Some("signature from deployd publish"),
        )
        .map_err(|e| SignError::Sign {
            file: name.into(),
            reason: e.to_string(),
        })?;
        Ok(sig.into_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ExitCode;

    fn keypair(dir: &Path) -> (std::path::PathBuf, String) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let path = dir.join("key.sec");
        std::fs::write(&path, kp.sk.to_box(None).unwrap().to_string()).unwrap();
        (path, kp.pk.to_base64())
    }

    #[test]
    fn signs_and_verifies_streaming() {
        let dir = tempfile::tempdir().unwrap();
        let (path, pk) = keypair(dir.path());
        let key = SigningKey::load(&path, None).unwrap();
        assert_eq!(key.public_key_base64(), pk);
        let data = vec![42u8; 300_000];
        let text = key.sign(&data[..], "file:x", "x").unwrap();
        let signed = Signed {
            object: S3Object::new("b", "k"),
            public_key: parse_public_key(&pk).unwrap(),
            signature: Signature::decode(&text).unwrap(),
        };
        assert_eq!(signed.trusted_comment(), "file:x");
        let mut v = signed.verifier().unwrap();
        for chunk in data.chunks(7777) {
            v.update(chunk);
        }
        signed.finish(v).unwrap();
        let mut v = signed.verifier().unwrap();
        v.update(&data[1..]);
        let err = signed.finish(v).unwrap_err();
        assert_eq!(err.exit_code(), 65);
        assert!(err.to_string().contains("s3://b/k"), "{err}");
    }

    #[test]
    fn encrypted_key_needs_the_password_and_never_prompts() {
        // An unencrypted key relabelled as scrypt-encrypted: loading must stop at "needs a
        // password" without deriving anything (and without a terminal prompt).
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let text = kp.sk.to_box(None).unwrap().to_string();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let mut raw = aws_smithy_types::base64::decode(&lines[1]).unwrap();
        raw[2..4].copy_from_slice(b"Sc");
        lines[1] = aws_smithy_types::base64::encode(&raw);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enc.sec");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let err = SigningKey::load(&path, None).unwrap_err();
        assert!(matches!(err, SignError::NeedsPassword { .. }), "{err}");
        assert_eq!(err.exit_code(), 78);
        assert!(err.to_string().contains(PASSWORD_ENV));
    }

    #[test]
    fn public_key_forms() {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let b64 = kp.pk.to_base64();
        assert!(parse_public_key(&b64).is_ok());
        let file = kp.pk.to_box().unwrap().to_string();
        assert!(parse_public_key(&file).is_ok(), "{file}");
        assert!(parse_public_key("RWQnope").is_err());
    }
}
