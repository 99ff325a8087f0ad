//! The one scrubber for error text that leaves the process: `state.json`, `status.json`, the
//! EC2 tags, the log and the final `deployd: error:` line all carry [`scrub`]bed text.
//!
//! It works on whitespace-separated words and errs on the side of redacting: a value after a
//! secret-looking name (`password=x`, `DB_PASSWORD x`, `password = "x y"`, `Authorization:
//! Bearer x`), credentials in URLs and query strings, and values shaped like well-known tokens
//! (AWS keys, Stripe, GitHub, GitLab, Slack, Google, JWTs, PEM blocks) become `[redacted]`.
//! What operators need stays: object keys, digests, paths, exit reasons.

/// The longest text an EC2 tag value takes.
pub const TAG_CHARS: usize = 255;

const REDACTED: &str = "[redacted]";

/// Names whose value is a secret (matched case-insensitively inside a word).
const SECRET_WORDS: [&str; 17] = [
    "secret",
    "password",
    "passwd",
    "passphrase",
    "token",
    "signature",
    "credential",
    "authorization",
    "session",
    "private",
    "cookie",
    "api_key",
    "apikey",
    "api-key",
    "access_key",
    "auth_key",
    "bearer",
];

/// Prefixes of tokens that are secrets wherever they appear.
const TOKEN_PREFIXES: [&str; 18] = [
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "rk_test_",
    "pk_live_",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "xoxs-",
    "npm_",
    "AIza",
];

/// Words that follow a variable's name in a sentence about it (`DEPLOYD_SIGN_PASSWORD is not
/// set`) rather than its value.
const PROSE: [&str; 32] = [
    "is", "are", "was", "were", "not", "must", "should", "and", "or", "to", "in", "of", "for",
    "with", "from", "as", "at", "on", "by", "the", "a", "an", "has", "have", "had", "set", "unset",
    "missing", "empty", "may", "can", "deployd",
];

/// A word that reads as prose after a name, not as its value.
fn is_prose(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    PROSE.iter().any(|p| w.eq_ignore_ascii_case(p))
}

/// HTTP authorization schemes: the word after one is the credential.
const SCHEMES: [&str; 4] = ["bearer", "basic", "digest", "token"];

fn has_secret_word(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|s| lower.contains(s))
}

/// `DB_PASSWORD`, `API_KEY`: an environment-variable-style name.
fn env_style(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_');
    w.len() >= 3
        && w.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && w.bytes().any(|b| b.is_ascii_uppercase())
}

fn is_scheme(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    SCHEMES.iter().any(|s| w.eq_ignore_ascii_case(s))
}

/// A value shaped like a token: a known prefix, a JWT, an AWS key id or secret key.
fn looks_like_token(word: &str) -> bool {
    let w = word.trim_matches(|c: char| {
        !c.is_ascii_alphanumeric() && c != '/' && c != '+' && c != '_' && c != '-'
    });
    if TOKEN_PREFIXES
        .iter()
        .any(|p| w.starts_with(p) && w.len() >= p.len() + 8)
    {
        return true;
    }
    if w.starts_with("eyJ") && w.matches('.').count() >= 2 {
        return true;
    }
    looks_like_aws_key(w)
}

/// An AWS access key id (`AKIA...`, `ASIA...`) or a 40-character secret access key.
fn looks_like_aws_key(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '/' && c != '+');
    let key_id = w.len() == 20
        && ["AKIA", "ASIA", "AROA", "AIDA", "ANPA", "AGPA"]
            .iter()
            .any(|p| w.starts_with(p))
        && w.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    let secret = w.len() == 40
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'+')
        && w.bytes().any(|b| b.is_ascii_uppercase())
        && w.bytes().any(|b| b.is_ascii_lowercase())
        && w.bytes().any(|b| b.is_ascii_digit());
    key_id || secret
}

/// Opens a quote it does not close: the value runs on to the word that closes it.
fn open_quote(value: &str) -> Option<char> {
    let q = value.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let rest = &value[1..];
    (!rest.contains(q)).then_some(q)
}

/// `message` on one line with every secret-shaped value replaced by `[redacted]`.
pub fn scrub(message: &str) -> String {
    let one_line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words: Vec<&str> = one_line.split(' ').filter(|w| !w.is_empty()).collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    // The next value word is a secret.
    let mut redact_next = false;
    // Inside a quoted secret, until this quote closes it.
    let mut in_quote: Option<char> = None;
    // Inside a PEM block, until its END line.
    let mut in_pem = false;
    for (i, word) in words.iter().enumerate() {
        if in_pem {
            if word.starts_with("-----END") {
                in_pem = false;
            }
            continue;
        }
        if word.starts_with("-----BEGIN") {
            in_pem = true;
            out.push(REDACTED.into());
            continue;
        }
        if let Some(q) = in_quote {
            if word.contains(q) {
                in_quote = None;
            }
            continue;
        }
        if redact_next {
            if *word == "=" || *word == ":" || is_scheme(word) {
                out.push((*word).to_string());
                continue;
            }
            redact_next = false;
            in_quote = open_quote(word);
            out.push(REDACTED.into());
            continue;
        }
        let mut w = (*word).to_string();
        // Query strings (presigned URLs carry signatures and tokens there).
        if let Some(q) = w.find('?')
            && w[q..].contains('=')
        {
            w.truncate(q);
            w.push_str("?[redacted]");
        }
        // Credentials in URLs: scheme://user:password@host
        if let Some(scheme) = w.find("://") {
            let rest = &w[scheme + 3..];
            if let Some(at) = rest.find('@')
                && !rest[..at].contains('/')
            {
                w = format!("{}[redacted]@{}", &w[..scheme + 3], &rest[at + 1..]);
            }
        }
        let next = words.get(i + 1).copied().unwrap_or("");
        // A word with a `/` is a path or URL (`"/etc/passwd":`), not a name with a value.
        if has_secret_word(&w) && !w.contains('/') {
            if let Some(sep) = w.find(['=', ':']).filter(|&s| s + 1 < w.len()) {
                if is_scheme(&w[sep + 1..]) {
                    // `authorization=Basic <credential>`
                    redact_next = true;
                    out.push(w);
                    continue;
                }
                in_quote = open_quote(&w[sep + 1..]);
                w = format!("{}{REDACTED}", &w[..=sep]);
            } else if w.ends_with(':')
                || w.ends_with('=')
                || next == "="
                || next == ":"
                || (env_style(&w) && !is_prose(next))
                || is_scheme(&w)
            {
                redact_next = true;
            }
        } else if is_scheme(&w) && !next.is_empty() && looks_like_credential(next) {
            redact_next = true;
        }
        if looks_like_token(&w) {
            w = REDACTED.into();
        }
        out.push(w);
    }
    out.join(" ")
}

/// What follows `Bearer`/`Basic` in prose is a credential if it has no spaces and is long.
fn looks_like_credential(word: &str) -> bool {
    word.len() >= 8 && !word.contains("://")
}

/// A short category for an exit code, first in the EC2 error tag.
pub fn category(exit_code: i32) -> &'static str {
    match exit_code {
        64 => "usage",
        65 => "bad-artifact",
        66 => "not-found",
        69 => "unavailable",
        70 => "internal",
        73 | 74 => "io",
        75 => "retry",
        77 => "permission",
        78 => "config",
        _ => "error",
    }
}

/// Scrubbed and cut to what an EC2 tag value holds.
pub fn for_tag(message: &str) -> String {
    scrub(message).chars().take(TAG_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each shape: the message, and the secret that must not survive.
    const SHAPES: &[(&str, &str)] = &[
        ("line 3: DB_PASSWORD hunter2", "hunter2"),
        ("PASSWORD s3cr3tvalue", "s3cr3tvalue"),
        ("password = \"x9y8z7\"", "x9y8z7"),
        ("password=\"two words here\" then", "words"),
        (
            "API_KEY=sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "4eC39HqLyjWDarjtT1zdp7dc",
        ),
        (
            "sent Authorization: Bearer abc.def.ghi123",
            "abc.def.ghi123",
        ),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("proxy http://alice:hunter2@proxy:3128/ refused", "hunter2"),
        (
            "GET https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Security-Token=xyz789",
            "xyz789",
        ),
        ("key AKIAIOSFODNN7EXAMPLE leaked", "AKIAIOSFODNN7EXAMPLE"),
        (
            "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY leaked",
            "wJalrXUtnFEMI",
        ),
        ("bad aws_secret_access_key=abc123def", "abc123def"),
        ("password: hunter2 here", "hunter2"),
        (
            "clone with token=ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "16C7e42F292c6912E7710c838347Ae178B4a",
        ),
        (
            "remote ghp_16C7e42F292c6912E7710c838347Ae178B4a rejected",
            "16C7e42F292c6912E7710c838347Ae178B4a",
        ),
        (
            "slack xoxb-123456789012-abcdefABCDEF failed",
            "abcdefABCDEF",
        ),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sflKxwRJSMeKKF2QT4fwpM",
            "sflKxwRJSMeKKF2QT4fwpM",
        ),
        (
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnop in env",
            "abcdefghijklmnop",
        ),
        ("gitlab glpat-xxxxYYYYzzzz1234 expired", "xxxxYYYYzzzz1234"),
        (
            "maps AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe quota",
            "SyDaGmWKa4JsXZ",
        ),
        (
            "key -----BEGIN RSA PRIVATE KEY----- MIIEowIBAAKCAQEA7 -----END RSA PRIVATE KEY----- used",
            "MIIEowIBAAKCAQEA7",
        ),
        ("client_secret: \"c1i3nt\"", "c1i3nt"),
        ("SESSION_TOKEN FQoGZXIvYXdzE", "FQoGZXIvYXdzE"),
        ("body {\"password\":\"hunter2\"}", "hunter2"),
        ("header Cookie: sid=abc123xyz", "abc123xyz"),
        ("passphrase=correct-horse", "correct-horse"),
        (
            "export STRIPE_SECRET_KEY='sk_test_abcdefgh12345678'",
            "abcdefgh12345678",
        ),
    ];

    #[test]
    fn every_secret_shape_is_redacted() {
        assert!(SHAPES.len() >= 20);
        for (message, secret) in SHAPES {
            let out = scrub(message);
            assert!(!out.contains(secret), "{message:?} -> {out:?}");
            assert!(out.contains(REDACTED), "{message:?} -> {out:?}");
            assert!(!for_tag(message).contains(secret));
        }
    }

    #[test]
    fn what_operators_need_stays() {
        let digest = "a".repeat(64);
        for msg in [
            format!(
                "checksum mismatch for s3://bucket/web/prod/622d2103-20250101-120000/web.tar.gz: expected SHA-256 {digest}"
            ),
            "s3://b/web/app.tar.gz does not match its signature".to_string(),
            "Wrong password for the secret key file".to_string(),
            "minisign secret key k is encrypted and DEPLOYD_SIGN_PASSWORD is not set; put its \
             password in DEPLOYD_SIGN_PASSWORD (deployd never prompts)"
                .to_string(),
            "environment file /etc/deployd/environment, line 3: DEPLOYMENT_KEY is not KEY=value"
                .to_string(),
            "refusing archive entry \"a/b\": `..` in paths is not allowed".to_string(),
            "refusing archive entry \"/etc/passwd\": absolute paths are not allowed".to_string(),
        ] {
            assert_eq!(scrub(&msg), msg);
        }
        assert_eq!(scrub("line one\nline two"), "line one line two");
        assert_eq!(for_tag(&"x".repeat(1000)).chars().count(), TAG_CHARS);
    }

    #[test]
    fn categories() {
        assert_eq!(category(65), "bad-artifact");
        assert_eq!(category(78), "config");
        assert_eq!(category(1), "error");
    }
}
