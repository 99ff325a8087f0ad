//! The trigger file format (empty, or TOML with `bucket`, `key`, `force_rebuild`,
//! `clear_cache`, `reason`, `allow_downgrade`) and [`write_trigger`], which drops one safely.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Trigger, TriggerError, TriggerOrigin};

/// The on-disk form of a trigger: the TOML keys a trigger file may hold.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TriggerFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    force_rebuild: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    clear_cache: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    allow_downgrade: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Trigger {
    /// Parses trigger-file text (empty or TOML) and checks it with [`Trigger::validate`].
    ///
    /// The error is one lowercase clause meant to follow "the trigger file is invalid: ".
    pub fn parse(text: &str, origin: TriggerOrigin) -> Result<Self, String> {
        let file: TriggerFile = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        let trigger = Self {
            bucket: file.bucket,
            key: file.key,
            force_rebuild: file.force_rebuild,
            clear_cache: file.clear_cache,
            reason: file.reason,
            allow_downgrade: file.allow_downgrade,
            origin,
        };
        trigger.check()?;
        Ok(trigger)
    }

    /// The TOML a trigger file for this trigger holds (the origin is not written).
    pub fn to_toml(&self) -> String {
        let file = TriggerFile {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            force_rebuild: self.force_rebuild,
            clear_cache: self.clear_cache,
            reason: self.reason.clone(),
            allow_downgrade: self.allow_downgrade,
        };
        // Serializing a struct of strings and booleans has no failure mode in `toml`.
        toml::to_string(&file).unwrap_or_default()
    }
}

/// One line saying where TOML parsing failed and why.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().replace(['\n', '\r'], " ");
    let message = message.trim().trim_end_matches('.');
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("it is not valid trigger TOML at line {line}, column {column}: {message}")
        }
        None => format!("it is not valid trigger TOML: {message}"),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<seconds>.<microseconds>-<pid>-<counter>`: sorts by time, unique per process and call.
pub(super) fn unique_suffix() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{:06}-{}-{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a trigger file for the running daemon: `.<name>.tmp`, fsync, rename to `<name>.toml`.
///
/// Returns the final path. The name is unique (time, pid and a counter), so concurrent
/// writers never collide; the daemon never sees a half-written file.
pub fn write_trigger(dir: &Path, trigger: &Trigger) -> Result<PathBuf, TriggerError> {
    trigger.validate()?;
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(TriggerError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TriggerError::DirMissing {
                path: dir.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(TriggerError::Write {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    let name = unique_suffix();
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(format!("{name}.toml"));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(trigger.to_toml().as_bytes())?;
        file.sync_all()
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(TriggerError::Write { path: tmp, source });
    }
    if let Err(source) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(TriggerError::Write { path, source });
    }
    // Make the rename durable; on tmpfs this is a no-op, elsewhere it matters.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| TriggerError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> TriggerOrigin {
        TriggerOrigin::File(PathBuf::from(name))
    }

    #[test]
    fn parses_empty_and_full_files() {
        assert_eq!(Trigger::parse("", file("a")), Ok(Trigger::new(file("a"))));
        let t = Trigger::parse(
            "bucket = \"b\"\nkey = \"k/x.tar.gz\"\nforce_rebuild = true\nreason = \"r\"\n",
            file("a"),
        )
        .unwrap();
        assert_eq!(t.bucket.as_deref(), Some("b"));
        assert_eq!(t.key.as_deref(), Some("k/x.tar.gz"));
        assert!(t.force_rebuild && !t.clear_cache);
        assert_eq!(t.reason.as_deref(), Some("r"));
    }

    #[test]
    fn rejects_unknown_keys_and_half_sources() {
        let e =
            Trigger::parse("bucket = \"b\"\nkey = \"k\"\nforce = true\n", file("a")).unwrap_err();
        assert!(e.contains("line 3, column 1"), "{e}");
        assert!(e.contains("unknown field `force`"), "{e}");
        let e = Trigger::parse("bucket = \"b\"\n", file("a")).unwrap_err();
        assert!(e.contains("no key"), "{e}");
        let e = Trigger::parse("key = \"k\"\n", file("a")).unwrap_err();
        assert!(e.contains("no bucket"), "{e}");
        let e = Trigger::parse("bucket = \"\"\nkey = \"k\"\n", file("a")).unwrap_err();
        assert!(e.contains("bucket is empty"), "{e}");
        assert!(
            !Trigger::parse("force_rebuild = \"yes\"", file("a"))
                .unwrap_err()
                .contains('\n')
        );
        let e = Trigger::parse("reason = \"fix\\u001b[2Jcleared\"\n", file("a")).unwrap_err();
        assert!(e.contains("reason contains control characters"), "{e}");
        let e = Trigger::parse("reason = \"two\\nlines\"\n", file("a")).unwrap_err();
        assert!(e.contains("reason contains control characters"), "{e}");
    }

    #[test]
    fn toml_round_trips() {
        let mut t = Trigger::new(TriggerOrigin::Signal);
        t.bucket = Some("b".into());
        t.key = Some("k".into());
        t.clear_cache = true;
        t.reason = Some("quote \" and 'apostrophe'".into());
        t.allow_downgrade = true;
        let back = Trigger::parse(&t.to_toml(), TriggerOrigin::Signal).unwrap();
        assert_eq!(back, t);
        assert_eq!(Trigger::new(TriggerOrigin::Poll).to_toml(), "");
    }
}
