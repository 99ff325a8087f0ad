//! The environment file, `/etc/deployd/environment`.
//!
//! cloud-init writes it from user-data; systemd loads it as `EnvironmentFile=`. deployd
//! re-reads it at **every** deployment, because `systemctl reload` does not re-read an
//! `EnvironmentFile`, and a new `DEPLOYMENT_KEY` written there must take effect on reload.
//!
//! The syntax is the one systemd accepts and operators write by hand: `KEY=value` lines, blank
//! lines and `#`/`;` comments, an optional `export ` prefix, and values in single quotes
//! (literal) or double quotes (with `\"`, `\\`, `\n` escapes). A missing file is an empty
//! environment; an unreadable one is a configuration error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ExitCode, exit};

/// The environment file is unreadable or malformed (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    /// The file cannot be read.
    #[error("cannot read environment file {path}: {source}")]
    Read {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not `KEY=value`. Never holds the line's text: a value may be a secret.
    #[error("environment file {path}, line {line}: {message}")]
    Syntax {
        /// The path concerned.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming at most the variable.
        message: String,
    },
}

impl ExitCode for EnvFileError {
    fn exit_code(&self) -> i32 {
        exit::CONFIG
    }
}

/// The variables of one environment file, plus where they came from.
#[derive(Debug, Clone, Default)]
pub struct EnvFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its variables.
    pub vars: BTreeMap<String, String>,
}

impl EnvFile {
    /// Reads and parses `path`; a missing file yields an empty environment.
    pub fn load(path: &Path) -> Result<EnvFile, EnvFileError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no environment file");
                Ok(EnvFile {
                    path: path.to_path_buf(),
                    vars: BTreeMap::new(),
                })
            }
            Err(source) => Err(EnvFileError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses environment-file text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<EnvFile, EnvFileError> {
        let mut vars = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let syntax = |message: String| EnvFileError::Syntax {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let Some((key, value)) = line.split_once('=') else {
                return Err(syntax(
                    "expected KEY=value and found no `=` (the line is not shown: it may hold \
                     a secret)"
                        .into(),
                ));
            };
            let key = key.trim();
            if key.is_empty()
                || key.starts_with(|c: char| c.is_ascii_digit())
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(syntax(
                    "the name before `=` is not a valid variable name (letters, digits and `_`, \
                     not starting with a digit; the line is not shown: it may hold a secret)"
                        .into(),
                ));
            }
            // The name last: a scrubber redacts the word after a secret-looking name.
            let value =
                unquote(value.trim()).map_err(|e| syntax(format!("{e} in the value of {key}")))?;
            vars.insert(key.to_string(), value);
        }
        Ok(EnvFile {
            path: path.to_path_buf(),
            vars,
        })
    }

    /// A non-empty value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn unquote(value: &str) -> Result<String, String> {
    if let Some(rest) = value.strip_prefix('\'') {
        return rest
            .strip_suffix('\'')
            .map(str::to_string)
            .ok_or_else(|| "unterminated single quote".to_string());
    }
    if let Some(rest) = value.strip_prefix('"') {
        let mut out = String::with_capacity(rest.len());
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => {
                    return if chars.as_str().trim().is_empty() {
                        Ok(out)
                    } else {
                        Err("text after the closing double quote".into())
                    };
                }
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(c) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        return Err("unterminated double quote".into());
    }
    // Unquoted: a trailing ` # comment` is not part of the value.
    let value = match value.find(" #") {
        Some(i) => value[..i].trim_end(),
        None => value,
    };
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_cloud_init_and_people_write() {
        let text = "# written by cloud-init\n\nDEPLOYMENT_BUCKET=my-bucket\nexport DEPLOYMENT_KEY='app/pr-51/a b.tar.gz'\nPR_NUMBER=\"51\" \nQUOTED=\"say \\\"hi\\\"\"\nEMPTY=\nURL=https://x/?a=b # note\n; also a comment\n";
        let env = EnvFile::parse(text, Path::new("/e")).unwrap();
        assert_eq!(env.get("DEPLOYMENT_BUCKET"), Some("my-bucket"));
        assert_eq!(env.get("DEPLOYMENT_KEY"), Some("app/pr-51/a b.tar.gz"));
        assert_eq!(env.get("PR_NUMBER"), Some("51"));
        assert_eq!(env.get("QUOTED"), Some("say \"hi\""));
        assert_eq!(env.get("EMPTY"), None);
        assert_eq!(env.get("URL"), Some("https://x/?a=b"));
    }

    #[test]
    fn errors_name_the_line() {
        let err = EnvFile::parse("A=1\nDB_PASSWORD hunter2\n", Path::new("/e")).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("/e"), "{err}");
        let err = EnvFile::parse("A='hunter2\n", Path::new("/e")).unwrap_err();
        assert!(
            err.to_string()
                .contains("unterminated single quote in the value of A"),
            "{err}"
        );
        let err = EnvFile::parse("1A hunter2=x\n", Path::new("/e")).unwrap_err();
        assert!(
            err.to_string().contains("not a valid variable name"),
            "{err}"
        );
        for text in [
            "DB_PASSWORD hunter2\n",
            "TOKEN=\"hunter2\n",
            "TOKEN=\"a\" hunter2\n",
            "hunter2 x=1\n",
        ] {
            let err = EnvFile::parse(text, Path::new("/e")).unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
