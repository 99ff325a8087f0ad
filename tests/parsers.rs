//! The parsers under generated input: the config file, the environment file, trigger files,
//! release pointers, compose files and the unpacker's archive handling never panic, whatever
//! they are given, and refuse what they cannot use with an error. Inputs are built from the
//! formats' own structure (known tables, keys and value shapes, tar headers with hostile
//! names, links, sizes and types, compressed or cut short) mixed with arbitrary bytes, so
//! that most cases get past the first syntax check.
//!
//! Each generated case is also mutated `DEPLOYD_FUZZ_MUTANTS` times (bit flips, inserted
//! delimiters, deletions, truncations, duplicated slices; default 8), deterministically from
//! the case, so a failing mutant is reproduced by its case, which proptest shrinks and prints.
//! A normal test run tries `DEPLOYD_FUZZ_CASES` cases per parser (default 256). The budget
//! run is `scripts/fuzz` (ten million executions across the parsers; it prints the count per
//! parser).

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::Config;

use deployd::agent::triggers::{Trigger, TriggerOrigin};
use deployd::config::envfile::EnvFile;
use deployd::config::{Config as DeploydConfig, ContainersConfig};
use deployd::containers::{Engine, ReleaseRef};
use deployd::contract::pointer::Pointer;
use deployd::deploy::unpack::{Limits, unpack};

/// Cases per parser: `DEPLOYD_FUZZ_CASES`, else 256.
fn config() -> Config {
    let cases = std::env::var("DEPLOYD_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Counts the executions of one parser and prints the total when the test ends.
struct Counter(&'static str, AtomicU64);

impl Counter {
    fn report(&self) {
        eprintln!(
            "fuzz {}: {} executions, 0 panics",
            self.0,
            self.1.load(Ordering::Relaxed)
        );
    }

    /// Runs `parse` on `case`, then on its mutants.
    fn run(&self, case: &[u8], mut parse: impl FnMut(&[u8])) {
        parse(case);
        let mutants: u64 = std::env::var("DEPLOYD_FUZZ_MUTANTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(8);
        let seed = case.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..mutants {
            parse(&mutant(case, &mut rng));
        }
        self.1.fetch_add(1 + mutants, Ordering::Relaxed);
    }
}

/// Bytes the formats give meaning to.
const DELIMITERS: &[u8] = b"\"'=\n\r[]{}$\\:#./ \t,-\0\xff";

/// `case` with one to four random edits.
fn mutant(case: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut v = case.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let len = v.len();
        match rng.u8(..6) {
            0 if len > 0 => v[rng.usize(..len)] ^= 1 << rng.u8(..8),
            1 => v.insert(rng.usize(..=len), DELIMITERS[rng.usize(..DELIMITERS.len())]),
            2 => v.insert(rng.usize(..=len), rng.u8(..)),
            3 if len > 0 => {
                v.remove(rng.usize(..len));
            }
            4 if len > 0 => v.truncate(rng.usize(..len)),
            5 => {
                let a = rng.usize(..=len);
                let b = rng.usize(a..=len.min(a + 64));
                let chunk = v[a..b].to_vec();
                let at = rng.usize(..=len);
                v.splice(at..at, chunk);
            }
            _ => {}
        }
    }
    v
}

fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// Arbitrary text: printable, control characters and broken UTF-8 alike.
fn junk() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<u8>(), 0..200)
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Picks one of `items`.
fn one_of(items: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(items).prop_map(str::to_string)
}

/// A TOML value, well-formed or nearly.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\"[ -~]{0,24}\"",
        "-?[0-9]{1,21}",
        one_of(&[
            "true",
            "false",
            "nan",
            "inf",
            "1979-05-27T07:32:00Z",
            "{}",
            "[]",
            "\"\""
        ]),
        "\"[0-9]{0,5} ?(s|m|h|ms|d|parsecs|GiB|MiB|KB|B|)\"",
        "\\[(\"[a-z./_-]{0,10}\", ?){0,4}\\]",
        "'[ -~]{0,16}'",
        "\"\"\"[ -~\n]{0,20}\"\"\"",
        "[ -~]{0,16}",
    ]
}

/// TOML documents of `keys` (`table.key`) and tables, with junk lines among them.
fn toml_doc(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    let line = prop_oneof![
        4 => (prop::sample::select(keys), toml_value()).prop_map(|(k, v)| {
            match k.rsplit_once('.') {
                Some((table, key)) => format!("[{table}]\n{key} = {v}"),
                None => format!("{k} = {v}"),
            }
        }),
        1 => "\\[[a-z_.]{0,12}\\]",
        1 => "[ -~]{0,30}",
    ];
    prop_oneof![
        8 => prop::collection::vec(line, 0..14).prop_map(|l| l.join("\n")),
        1 => junk(),
    ]
}

const CONFIG_KEYS: &[&str] = &[
    "app",
    "environment",
    "state_dir",
    "runtime_dir",
    "environment_file",
    "unknown",
    "source.bucket",
    "source.key",
    "source.legacy_bucket",
    "source.legacy_key",
    "source.wait_for_artifact",
    "source.max_artifact_size",
    "source.required_metadata",
    "source.public_key",
    "source.pointer_key",
    "s3.region",
    "s3.endpoint_url",
    "s3.force_path_style",
    "s3.attempts",
    "s3.connect_timeout",
    "s3.read_timeout",
    "s3.download_deadline",
    "unpack.max_entries",
    "unpack.max_bytes",
    "unpack.max_path_len",
    "releases.keep",
    "containers.enabled",
    "containers.compose_file",
    "containers.health_timeout",
    "containers.health_grace",
    "containers.clear_paths",
    "containers.engine_wait",
    "containers.engine_timeout",
    "containers.build_timeout",
    "report.ec2_tags",
    "report.tag_prefix",
    "report.metrics_file",
    "report.ec2_endpoint_url",
    "triggers.poll_interval",
    "triggers.idle_poll_interval",
    "triggers.trusted_group",
    "daemon.stop_timeout",
    "daemon.bogus",
];

const TRIGGER_KEYS: &[&str] = &[
    "bucket",
    "key",
    "force_rebuild",
    "clear_cache",
    "reason",
    "version",
    "pointer",
];

/// Environment-file text: assignments, exports, quotes, escapes, comments and junk.
fn env_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "(export )?[A-Z_][A-Z0-9_]{0,12}=[ -~]{0,24}",
        "[A-Za-z_ ]{0,6}=\"[ -~]{0,16}\"?[ -~]{0,4}",
        "[A-Z_]{1,6}='[ -~]{0,16}'?",
        "[A-Z_]{1,6}=\"([ -~]|\\\\[nt\"$\\\\])*",
        "[ \t]*#[ -~]{0,20}",
        "[ -~\t]{0,30}",
    ];
    prop_oneof![
        8 => (prop::collection::vec(line, 0..12), any::<bool>())
            .prop_map(|(l, crlf)| l.join(if crlf { "\r\n" } else { "\n" })),
        1 => junk(),
    ]
}

/// JSON for a release pointer: its fields with values of every shape, or junk.
fn pointer_json() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        "\"[ -~]{0,20}\"",
        "\"[0-9a-fA-F]{0,70}\"",
        "\"(\\.\\./|/|[a-z]{1,6}/){0,4}[a-z.]{0,10}\"",
        one_of(&["null", "true", "0", "-1e999", "[]", "{}", "\"\\u0000\""]),
    ];
    let field = (
        one_of(&[
            "key",
            "sha256",
            "commit",
            "published_at",
            "extra",
            "KEY",
            "",
        ]),
        value,
    )
        .prop_map(|(k, v)| format!("\"{k}\": {v}"));
    prop_oneof![
        6 => (prop::collection::vec(field, 0..7), 0usize..400).prop_map(|(f, cut)| {
            let text = format!("{{{}}}", f.join(", "));
            let cut = if cut < 300 { text.len() } else { cut % (text.len() + 1) };
            text.as_bytes()[..cut].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

const SERVICE_KEYS: &[&str] = &[
    "build",
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "restart",
    "healthcheck",
    "depends_on",
    "labels",
    "networks",
    "privileged",
    "deploy",
    "container_name",
    "cap_add",
    "network_mode",
    "build.context",
    "build.dockerfile",
    "build.args",
    "build.cache_from",
    "build.target",
    "build.labels",
    "build.ssh",
    "healthcheck.test",
    "healthcheck.interval",
    "healthcheck.retries",
    "healthcheck.disable",
    "depends_on.db.condition",
];

/// A YAML value: scalars with interpolations, lists and maps, flow or block.
fn yaml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9./:_-]{0,20}",
        "\"[ -~]{0,20}\"",
        "\\$\\{[A-Z_]{0,6}(:?[-?+][ -~]{0,8})?\\}?[a-z/]{0,6}",
        "\\$\\$[A-Z]{0,4}",
        "\\[([a-z0-9.:/\"${}_-]{0,12}, ?){0,4}\\]",
        "\\{([a-z_]{1,8}: [a-z0-9${}_-]{0,8}, ?){0,3}\\}",
        one_of(&[
            "null",
            "~",
            "true",
            "0",
            "-1",
            "1.5",
            "''",
            "[]",
            "{}",
            "*a",
            "&a x",
            "!!binary x"
        ]),
        "[0-9.:/-]{0,20}",
    ]
}

/// Compose files: services with known and unknown keys, top-level tables, junk.
fn compose_yaml() -> impl Strategy<Value = String> {
    let key = (prop::sample::select(SERVICE_KEYS), yaml_value()).prop_map(|(k, v)| {
        let parts: Vec<&str> = k.split('.').collect();
        let mut text = String::new();
        for (depth, p) in parts.iter().enumerate() {
            let pad = "  ".repeat(depth + 2);
            if depth + 1 == parts.len() {
                text.push_str(&format!("{pad}{p}: {v}\n"));
            } else {
                text.push_str(&format!("{pad}{p}:\n"));
            }
        }
        text
    });
    let service = ("[a-z][a-z0-9_-]{0,8}", prop::collection::vec(key, 0..6))
        .prop_map(|(name, keys)| format!("  {name}:\n{}", keys.concat()));
    let top = one_of(&[
        "version: \"3.8\"\n",
        "networks:\n  front: {}\n",
        "networks:\n  ext:\n    external: true\n",
        "volumes:\n  data:\n",
        "x-common: &c\n  image: x\n",
        "configs: {}\n",
        "name: app\n",
        "",
    ]);
    prop_oneof![
        8 => (top, prop::collection::vec(service, 0..4))
            .prop_map(|(top, s)| format!("{top}services:\n{}", s.concat())),
        1 => junk(),
    ]
}

/// One tar entry: a type flag, a name and link name (possibly hostile), a mode and data.
#[derive(Debug, Clone)]
struct Entry {
    kind: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    data: Vec<u8>,
    /// The size field, when it lies about the data.
    size: Option<u64>,
}

fn entry() -> impl Strategy<Value = Entry> {
    let name = prop_oneof![
        "(\\./)?([a-z]{1,6}/){0,3}[a-z.]{1,8}/?",
        one_of(&[
            "..",
            "../x",
            "/etc/passwd",
            "a/../../b",
            ".",
            "./",
            "a//b",
            "a/./b",
            ""
        ]),
        prop::collection::vec(any::<u8>(), 0..100)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    let kind = prop::sample::select(&b"0000055512345677xgLK\0V"[..]);
    (
        kind,
        name.clone(),
        name,
        0u32..0o10000,
        prop::collection::vec(any::<u8>(), 0..600),
        prop::option::weighted(0.1, 0u64..100_000),
    )
        .prop_map(|(kind, name, link, mode, data, size)| Entry {
            kind,
            name: name.into_bytes(),
            link: link.into_bytes(),
            mode,
            data,
            size,
        })
}

/// The bytes of a tar of `entries`, with `flips` (position, xor) applied, `cut` short.
fn tar_bytes(entries: &[Entry], flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let old = h.as_old_mut();
        let n = e.name.len().min(100);
        old.name[..n].copy_from_slice(&e.name[..n]);
        let l = e.link.len().min(100);
        old.linkname[..l].copy_from_slice(&e.link[..l]);
        h.set_entry_type(tar::EntryType::new(e.kind));
        h.set_mode(e.mode);
        h.set_size(e.size.unwrap_or(e.data.len() as u64));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    for &(at, x) in flips {
        let len = out.len();
        out[at % len] ^= x;
    }
    if let Some(cut) = cut {
        out.truncate(cut % (out.len() + 1));
    }
    out
}

/// gzip's and zstd's magic bytes, or none.
const MAGICS: &[&[u8]] = &[&[0x1f, 0x8b], &[0x28, 0xb5, 0x2f, 0xfd], &[]];

/// An archive: a tar (gzip, zstd or plain), or bytes that only start like one.
fn archive() -> impl Strategy<Value = Vec<u8>> {
    let tarred = (
        prop::collection::vec(entry(), 0..8),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        prop::option::weighted(0.15, any::<usize>()),
        0u8..3,
        prop::option::weighted(0.1, any::<usize>()),
    )
        .prop_map(|(entries, flips, cut, compression, cut_compressed)| {
            let tar = tar_bytes(&entries, &flips, cut);
            let mut out = match compression {
                0 => tar,
                1 => {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&tar).unwrap();
                    gz.finish().unwrap()
                }
                _ => zstd::encode_all(&tar[..], 1).unwrap(),
            };
            if let Some(cut) = cut_compressed {
                out.truncate(cut % (out.len() + 1));
            }
            out
        });
    prop_oneof![
        8 => tarred,
        1 => (prop::sample::select(MAGICS), prop::collection::vec(any::<u8>(), 0..600))
            .prop_map(|(magic, rest)| [magic, &rest[..]].concat()),
    ]
}

static CONFIG: Counter = Counter("config", AtomicU64::new(0));
static ENVFILE: Counter = Counter("envfile", AtomicU64::new(0));
static TRIGGER: Counter = Counter("trigger", AtomicU64::new(0));
static POINTER: Counter = Counter("pointer", AtomicU64::new(0));
static COMPOSE: Counter = Counter("compose", AtomicU64::new(0));
static UNPACK: Counter = Counter("unpack", AtomicU64::new(0));

#[test]
fn config_file() {
    proptest!(config(), |(doc in toml_doc(CONFIG_KEYS))| {
        CONFIG.run(doc.as_bytes(), |b| {
            let _ = DeploydConfig::parse(&text(b), Path::new("/etc/deployd/deployd.toml"));
        });
    });
    CONFIG.report();
}

#[test]
fn environment_file() {
    proptest!(config(), |(doc in env_text())| {
        ENVFILE.run(doc.as_bytes(), |b| {
            if let Ok(env) = EnvFile::parse(&text(b), Path::new("/etc/deployd/environment")) {
                // What parsed has names a shell could export.
                for k in env.vars.keys() {
                    assert!(!k.is_empty() && !k.contains('='), "{k:?}");
                }
            }
        });
    });
    ENVFILE.report();
}

#[test]
fn trigger_file() {
    proptest!(config(), |(doc in toml_doc(TRIGGER_KEYS))| {
        TRIGGER.run(doc.as_bytes(), |b| {
            let _ = Trigger::parse(&text(b), TriggerOrigin::Signal);
        });
    });
    TRIGGER.report();
}

#[test]
fn release_pointer() {
    proptest!(config(), |(bytes in pointer_json())| {
        POINTER.run(&bytes, |b| {
            if let Ok(p) = Pointer::parse(b) {
                assert_eq!(p.sha256.len(), 64);
            }
        });
    });
    POINTER.report();
}

/// A scratch directory in memory where there is one (`/dev/shm`): these parsers write and
/// read files at every execution.
fn scratch() -> tempfile::TempDir {
    match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap(),
        false => tempfile::tempdir().unwrap(),
    }
}

#[test]
fn compose_file() {
    let dir = scratch();
    let env: BTreeMap<String, String> = [("HOST_PORT".to_string(), "8080".to_string())].into();
    let settings = ContainersConfig::default();
    proptest!(config(), |(yaml in compose_yaml())| {
        COMPOSE.run(yaml.as_bytes(), |b| {
            std::fs::write(dir.path().join("docker-compose.yml"), b).unwrap();
            let release = ReleaseRef { id: "r1", dir: dir.path(), commit: None };
            let _ = Engine::load_project("fuzz", &release, &env, &settings);
        });
    });
    COMPOSE.report();
}

#[test]
fn unpacker() {
    let limits = Limits {
        max_entries: 64,
        max_bytes: 1 << 20,
        max_path_len: 256,
        keep_group_world_write: false,
    };
    let root = scratch();
    proptest!(config(), |(bytes in archive())| {
        UNPACK.run(&bytes, |b| {
            let dest = tempfile::tempdir_in(root.path()).unwrap();
            if unpack(b, dest.path(), &limits).is_ok() {
                // Nothing was written outside the destination.
                assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
            }
        });
    });
    UNPACK.report();
}
