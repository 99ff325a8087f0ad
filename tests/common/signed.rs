//! Hosts that require signatures and the CI that signs for them: `deployd publish --sign` with
//! keys from the minisign command line ([`super::keys`]), and the check every refusal is held
//! to (exit 65, the attempt recorded, the serving release untouched).

use super::keys::{Keys, ci_keys};
use super::{Host, Published, Run, app, sha256_hex, write_file};

pub const C1: &str = "1111111111111111111111111111111111111111";
pub const C2: &str = "2222222222222222222222222222222222222222";
pub const C3: &str = "3333333333333333333333333333333333333333";
/// The pointer `publish --pointer` writes for web/prod.
pub const POINTER: &str = "web/prod/current.json";

/// Writes a config trusting `keys`, with `source` lines added to `[source]`.
pub fn trust(host: &Host, keys: &[&Keys], source: &str, extra: &str) {
    let list: Vec<String> = keys.iter().map(|k| format!("\"{}\"", k.public)).collect();
    host.write_config(
        &format!("public_key = [{}]\n{source}", list.join(", ")),
        extra,
    );
}

/// A host following the signed pointer `web/prod/current.json`, trusting `keys`.
pub fn pointer_host(keys: &[&Keys], source: &str, extra: &str) -> Host {
    let host = Host::new();
    let source = format!(
        "bucket = \"{}\"\npointer_key = \"{POINTER}\"\n{source}",
        host.bucket
    );
    trust(&host, keys, &source, extra);
    host
}

/// `deployd publish` of `app(version)` for `app_name`/`env`, signed with `keys`.
pub fn publish(
    host: &Host,
    keys: &Keys,
    app_name: &str,
    env: &str,
    version: &str,
    commit: &str,
    extra: &[&str],
) -> Run {
    let body = app(version).gz();
    let file = write_file(host, &format!("{app_name}-{env}-{version}.tar.gz"), &body);
    let mut cmd = host.command(&[
        "publish",
        file.to_str().unwrap(),
        "--bucket",
        &host.bucket,
        "--app",
        app_name,
        "--environment",
        env,
        "--commit",
        commit,
        "--sign",
        keys.secret.to_str().unwrap(),
    ]);
    cmd.args(extra).env_remove("DEPLOYD_SIGN_PASSWORD");
    for (k, v) in keys.env() {
        cmd.env(k, v);
    }
    Run::from(cmd.output().unwrap())
}

/// A signed release of `app(version)` for web/`env`, with its pointer when `pointer`.
pub fn release(
    host: &Host,
    keys: &Keys,
    env: &str,
    version: &str,
    commit: &str,
    pointer: bool,
) -> Published {
    let extra: &[&str] = if pointer { &["--pointer"] } else { &[] };
    let run = publish(host, keys, "web", env, version, commit, extra);
    Published {
        key: Host::published_key(&run),
        sha256: sha256_hex(&app(version).gz()),
    }
}

/// The object at `key` in the host's bucket.
pub fn get(host: &Host, key: &str) -> Vec<u8> {
    host.s3.get(&host.bucket, key)
}

/// Writes `bytes` at `key` in the host's bucket, as someone with write access would.
pub fn put(host: &Host, key: &str, bytes: &[u8]) {
    host.s3.put(&host.bucket, key, bytes, &[]);
}

/// `deployd deploy --no-containers EXTRA`.
pub fn deploy(host: &Host, extra: &[&str]) -> Run {
    let mut args = vec!["deploy", "--no-containers"];
    args.extend_from_slice(extra);
    host.run(&args)
}

/// Refused with 65 and `needle`, recorded as such, `release` (`version`) still serving.
#[track_caller]
pub fn refused(run: &Run, needle: &str, host: &Host, release: &str, version: &str) {
    run.fails_with(65, needle);
    host.assert_serving(release, version);
    assert_eq!(host.state()["last_attempt"]["exit_code"], 65);
    assert_eq!(host.state()["current"]["id"], release);
}

/// A host trusting a new `minisign -G -W` key and serving `app("v1")` signed with it, deployed
/// through the pointer when `pointer`, else by key.
pub struct Serving {
    pub host: Host,
    pub key: Keys,
    pub v1: Published,
    /// The release serving v1.
    pub release: String,
}

/// [`Serving`], with `extra` after the config's other tables; `None` (skip) without the
/// minisign command line outside CI.
pub fn serving_v1(pointer: bool, extra: &str) -> Option<Serving> {
    let key = ci_keys("ci", None)?;
    let host = if pointer {
        pointer_host(&[&key], "", extra)
    } else {
        let host = Host::new();
        trust(&host, &[&key], "", extra);
        host
    };
    let v1 = release(&host, &key, "prod", "v1", C1, pointer);
    if pointer {
        deploy(&host, &[]).ok();
    } else {
        host.deploy(&v1.key, &["--no-containers"]).ok();
    }
    let release = host.current().unwrap();
    Some(Serving {
        host,
        key,
        v1,
        release,
    })
}
