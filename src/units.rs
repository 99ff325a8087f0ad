//! Values written the human way in the config file and on the command line: durations
//! (`"5m"`) and sizes (`"4GiB"`). Used by the config and by the S3 client settings.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses a size the human way (`"64MiB"`, `"4GiB"`, or bytes), for command-line flags.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?}: {e}"))
}

/// A duration written the human way: `"5m"`, `"120s"`, `"1h 30m"`, `"0s"`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write a number and a unit, like \"30s\", \"5m\" or \"1h\""
                ))
            })
    }
}

/// A byte size written the human way: `"4GiB"`, `"512 MiB"`, or a plain integer of bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Debug for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| Size(b.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid size {t:?} ({e}); write a number and a unit, like \"512MiB\" or \"4GiB\""
                    ))
                }),
        }
    }
}
