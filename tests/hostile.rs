//! Hostile and odd archives, generated here byte for byte: bombs (huge PAX records and GNU long
//! names, many extension headers, gigabytes of data after the end-of-archive marker, a zstd
//! window larger than deployd decodes) must be refused with exit 65 within a flat memory
//! budget and bounded time, the serving release untouched and nothing left in staging; benign
//! archives that exercise tar's corners (PAX size and path, GNU long names, `dir/` regular
//! files, times before 1970, base-256 fields, ustar prefixes) must unpack to exactly the tree
//! GNU tar extracts.
//!
//! `DEPLOYD_HOSTILE_CORPUS=DIR cargo test --test hostile -- --ignored write_corpus` writes the
//! corpus to DIR for `bench/hostile.sh`.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Host, Run, app};

const BLOCK: usize = 512;
/// The peak resident memory allowed for one deployment, whatever the archive holds.
const MAX_RSS_KIB: u64 = 64 << 10;
/// The wall time allowed for one refused bomb (a debug build, on a shared machine).
const MAX_SECS: f64 = 30.0;

/// A tar archive written block by block.
#[derive(Default, Clone)]
struct Raw(Vec<u8>);

fn octal(field: &mut [u8], value: u64) {
    let s = format!("{value:0width$o}", width = field.len() - 1);
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()..].fill(0);
}

/// A POSIX ustar header; `size` goes into the size field as is.
fn header(name: &[u8], flag: u8, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 1000);
    octal(&mut h[116..124], 1000);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    seal(&mut h);
    h
}

/// Recomputes the header checksum.
fn seal(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

/// PAX records, each prefixed with its own length.
fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // " ", "=", "\n"
        let mut len = body + 1;
        while len.to_string().len() + body != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

impl Raw {
    fn block(mut self, h: [u8; BLOCK]) -> Self {
        self.0.extend_from_slice(&h);
        self
    }

    fn data(mut self, data: &[u8]) -> Self {
        self.0.extend_from_slice(data);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.0.resize(self.0.len() + pad, 0);
        self
    }

    fn member(self, name: &str, flag: u8, data: &[u8]) -> Self {
        self.block(header(name.as_bytes(), flag, data.len() as u64))
            .data(data)
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.member(name, b'0', data)
    }

    fn ext(self, flag: u8, data: &[u8]) -> Self {
        self.block(header(b"././@PaxHeader", flag, data.len() as u64))
            .data(data)
    }

    /// Two zero blocks, padded to a 10240-byte record as GNU tar does.
    fn end(mut self) -> Vec<u8> {
        self.0.resize(self.0.len() + 2 * BLOCK, 0);
        let rec = 10240;
        self.0.resize(self.0.len().div_ceil(rec) * rec, 0);
        self.0
    }
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn zst(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// `len` bytes of `byte` after `prefix`, compressed without holding them: gzip members (or
/// zstd frames) of 64 MiB each, concatenated.
fn compressed_run(prefix: &[u8], byte: u8, len: u64, zstd_frames: bool) -> Vec<u8> {
    let chunk = 64u64 << 20;
    let one = |n: u64| -> Vec<u8> {
        let body = vec![byte; n as usize];
        if zstd_frames { zst(&body) } else { gz(&body) }
    };
    let mut out = if zstd_frames { zst(prefix) } else { gz(prefix) };
    let full = one(chunk);
    for _ in 0..len / chunk {
        out.extend_from_slice(&full);
    }
    if !len.is_multiple_of(chunk) {
        out.extend_from_slice(&one(len % chunk));
    }
    out
}

/// A shape deployd must refuse (65), with a phrase its error names.
struct Bomb {
    name: &'static str,
    body: Vec<u8>,
    needle: &'static str,
    /// Run with `max_entries = 50` and `max_bytes = "1MiB"` rather than the defaults.
    small_limits: bool,
}

fn bombs() -> Vec<Bomb> {
    let ok = || Raw::default().file("ok.txt", b"fine");
    let mib = 1u64 << 20;
    // A PAX header claiming 512 MiB, and its bytes: the record is never allocated.
    let pax_head = ok().block(header(b"././@PaxHeader", b'x', 512 * mib)).0;
    let pax_bomb = compressed_run(&pax_head, b'a', 512 * mib, false);
    let long_head = ok().block(header(b"././@LongLink", b'L', 512 * mib)).0;
    let long_bomb = compressed_run(&long_head, b'n', 512 * mib, true);
    let mut many_globals = ok();
    for _ in 0..100_000 {
        many_globals = many_globals.ext(b'g', &pax(&[("comment", b"x")]));
    }
    let many_globals = many_globals.file("late.txt", b"x").end();
    let mut pax_sum = ok();
    for i in 0..40 {
        pax_sum = pax_sum
            .ext(b'x', &pax(&[("comment", &vec![b'c'; 900 << 10])]))
            .file(&format!("f{i}"), b"x");
    }
    let trailing = ok().end();
    let mut appended = ok().end();
    appended.extend_from_slice(&Raw::default().file("evil", b"appended").end());
    let mut big_window = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    big_window.window_log(27).unwrap();
    big_window.write_all(&ok().end()).unwrap();
    let big_window = big_window.finish().unwrap();
    let mut old_sparse = header(b"sparse.bin", b'S', 0);
    octal(&mut old_sparse[483..495], 1 << 30);
    seal(&mut old_sparse);
    let mut dir_with_data = header(b"d", b'5', 5);
    seal(&mut dir_with_data);
    vec![
        Bomb {
            name: "512 MiB PAX record (gzip)",
            body: pax_bomb,
            needle: "PAX header of 536870912 bytes",
            small_limits: false,
        },
        Bomb {
            name: "512 MiB GNU long name (zstd)",
            body: long_bomb,
            needle: "GNU long name of 536870912 bytes",
            small_limits: false,
        },
        Bomb {
            name: "100000 global PAX headers before one member",
            body: gz(&many_globals),
            needle: "extension headers precede one member",
            small_limits: false,
        },
        Bomb {
            name: "PAX headers adding up past the stream cap",
            body: gz(&pax_sum.end()),
            needle: "max_bytes",
            small_limits: true,
        },
        Bomb {
            name: "two PAX headers for one member",
            body: gz(&ok()
                .ext(b'x', &pax(&[("path", b"a")]))
                .ext(b'x', &pax(&[("path", b"b")]))
                .file("c", b"x")
                .end()),
            needle: "two PAX headers",
            small_limits: false,
        },
        Bomb {
            name: "4 GiB of zeros after the end marker (zstd)",
            body: compressed_run(&trailing, 0, 4 << 30, true),
            needle: "bytes of zeros follow the last member",
            small_limits: false,
        },
        Bomb {
            name: "1 GiB of zeros after the end marker (gzip)",
            body: compressed_run(&trailing, 0, 1 << 30, false),
            needle: "bytes of zeros follow the last member",
            small_limits: false,
        },
        Bomb {
            name: "a second archive after the end marker",
            body: gz(&appended),
            needle: "data follows the end-of-archive marker",
            small_limits: false,
        },
        Bomb {
            name: "zstd frame with a 128 MiB window",
            body: big_window,
            needle: "window",
            small_limits: false,
        },
        Bomb {
            name: "old GNU sparse file",
            body: gz(&ok().block(old_sparse).end()),
            needle: "sparse",
            small_limits: false,
        },
        Bomb {
            name: "PAX 1.0 sparse file",
            body: gz(&ok()
                .ext(
                    b'x',
                    &pax(&[
                        ("GNU.sparse.major", b"1"),
                        ("GNU.sparse.minor", b"0"),
                        ("GNU.sparse.name", b"data.bin"),
                        ("GNU.sparse.realsize", b"1048576"),
                    ]),
                )
                .file("GNUSparseFile.0/data.bin", b"1\n0\n4\nabcd")
                .end()),
            needle: "sparse",
            small_limits: false,
        },
        Bomb {
            name: "PAX 0.1 sparse map",
            body: gz(&ok()
                .ext(b'x', &pax(&[("GNU.sparse.map", b"0,4")]))
                .file("data.bin", b"abcd")
                .end()),
            needle: "sparse",
            small_limits: false,
        },
        Bomb {
            name: "directory carrying data",
            body: gz(&ok().block(dir_with_data).data(b"hello").end()),
            needle: "carries 5 bytes",
            small_limits: false,
        },
        Bomb {
            name: "global PAX header naming every member",
            body: gz(&ok()
                .ext(b'g', &pax(&[("path", b"same")]))
                .file("x", b"1")
                .end()),
            needle: "global PAX header sets path",
            small_limits: false,
        },
        Bomb {
            name: "PAX size beyond the data",
            body: gz(&ok()
                .ext(b'x', &pax(&[("size", b"99999")]))
                .file("short", b"x")
                .end()),
            needle: "corrupt or truncated",
            small_limits: false,
        },
        Bomb {
            name: "header checksum wrong",
            body: gz(&{
                let mut h = header(b"bad", b'0', 0);
                h[0] = b'c';
                ok().block(h).end()
            }),
            needle: "fails its checksum",
            small_limits: false,
        },
    ]
}

/// Archives GNU tar extracts without complaint; deployd must produce the same tree.
fn benign() -> Vec<(&'static str, Vec<u8>)> {
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
    let mut neg_mtime = header(b"old.txt", b'0', 3);
    neg_mtime[136..148].fill(0xff);
    neg_mtime[147] = 0x00; // -256 seconds, base-256
    seal(&mut neg_mtime);
    let mut b256_size = header(b"b256.txt", b'0', 0);
    b256_size[124..136].fill(0);
    b256_size[124] = 0x80;
    b256_size[135] = 11;
    seal(&mut b256_size);
    let mut prefixed = header(b"name.txt", b'0', 6);
    prefixed[345..351].copy_from_slice(b"a/b/cc");
    seal(&mut prefixed);
    let mut old_dir = header(b"olddir/", 0, 0);
    old_dir[257..265].fill(0); // a v7 header: no magic
    seal(&mut old_dir);
    let content: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    vec![
        (
            "PAX size over a ustar size of 0 (Go and Python past 8 GiB)",
            Raw::default()
                .ext(b'x', &pax(&[("size", b"3000")]))
                .block(header(b"big.bin", b'0', 0))
                .data(&content)
                .end(),
        ),
        (
            "PAX size disagreeing with the ustar size",
            Raw::default()
                .ext(b'x', &pax(&[("size", b"3000")]))
                .block(header(b"sized.bin", b'0', 10))
                .data(&content)
                .file("after.txt", b"after")
                .end(),
        ),
        (
            "PAX path with a newline and a long name, PAX linkpath",
            Raw::default()
                .ext(b'x', &pax(&[("path", b"odd\nname.txt")]))
                .file("ignored", b"newline")
                .ext(b'x', &pax(&[("path", long.as_bytes())]))
                .file("short", b"long")
                .ext(b'x', &pax(&[("linkpath", b"odd\nname.txt")]))
                .member("link", b'2', b"")
                .end(),
        ),
        (
            "GNU long name and long link",
            Raw::default()
                .ext(b'L', format!("{long}\0").as_bytes())
                .file("trunc", b"gnu long")
                .ext(b'L', b"hl\0")
                .ext(b'K', format!("{long}\0").as_bytes())
                .member("x", b'1', b"")
                .end(),
        ),
        (
            "old-style regular file named dir/",
            Raw::default()
                .block(old_dir)
                .file("olddir/inside.txt", b"in")
                .member("newdir/", b'0', b"")
                .file("newdir/x", b"x")
                .end(),
        ),
        (
            "times before 1970, base-256 and PAX",
            Raw::default()
                .block(neg_mtime)
                .data(b"old")
                .ext(b'x', &pax(&[("mtime", b"-86400.5")]))
                .file("older.txt", b"older")
                .end(),
        ),
        (
            "base-256 size and a ustar prefix",
            Raw::default()
                .block(b256_size)
                .data(b"eleven byte")
                .block(prefixed)
                .data(b"prefix")
                .end(),
        ),
        ("a lone zero block at the end", {
            let mut t = Raw::default().file("a.txt", b"a").0;
            t.resize(t.len() + BLOCK, 0);
            t
        }),
        (
            "later member of the same name replaces the earlier",
            Raw::default()
                .file("same.txt", b"first")
                .file("same.txt", b"second")
                .end(),
        ),
    ]
}

/// Runs `deployd deploy` on `key` under `/usr/bin/time`: the run, peak RSS (KiB), seconds.
fn measured_deploy(host: &Host, key: &str) -> (Run, u64, f64) {
    let cmd = host.command(&["deploy", "--bucket", &host.bucket, "--key", key]);
    let out_file = host.dir.path().join("time.out");
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("%M %e")
        .arg("-o")
        .arg(&out_file)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(std::process::Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let run = Run::from(timed.output().unwrap());
    let text = std::fs::read_to_string(&out_file).unwrap();
    let last = text.lines().last().unwrap_or_default().to_string();
    let (rss, secs) = last.split_once(' ').unwrap();
    (run, rss.parse().unwrap(), secs.parse().unwrap())
}

#[test]
fn bombs_are_refused_in_flat_memory_and_bounded_time() {
    let default = Host::new();
    let small = Host::with(
        false,
        "",
        "[unpack]\nmax_entries = 50\nmax_bytes = \"1MiB\"\n",
    );
    for host in [&default, &small] {
        host.upload("web/good.tar.gz", &app("good").gz(), "1111111111111111");
        host.deploy("web/good.tar.gz", &[]).ok();
    }
    let goods = [default.current(), small.current()];
    let corpus = bombs();
    assert!(corpus.len() >= 15);
    for (i, bomb) in corpus.iter().enumerate() {
        let (host, good) = if bomb.small_limits {
            (&small, &goods[1])
        } else {
            (&default, &goods[0])
        };
        let key = format!("web/bomb-{i}");
        host.s3.put(&host.bucket, &key, &bomb.body, &[]);
        let (run, rss, secs) = measured_deploy(host, &key);
        eprintln!("{}: exit {}, {rss} KiB, {secs}s", bomb.name, run.code);
        assert_eq!(run.code, 65, "{}: expected 65\n{}", bomb.name, run.stderr);
        assert!(
            run.error_line().contains(bomb.needle),
            "{}: expected {:?} in {:?}",
            bomb.name,
            bomb.needle,
            run.error_line()
        );
        assert!(rss <= MAX_RSS_KIB, "{}: peak RSS {rss} KiB", bomb.name);
        assert!(secs <= MAX_SECS, "{}: took {secs}s", bomb.name);
        assert_eq!(
            &host.current(),
            good,
            "{}: serving release changed",
            bomb.name
        );
        assert_eq!(host.staging_entries(), 0, "{}: staging debris", bomb.name);
    }
    assert_eq!(default.served_version(), "good");
    assert_eq!(small.served_version(), "good");
}

/// Every path under `root` with its type and content (files) or target (links).
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new(".deployd-release.json") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &p, out);
                "dir".to_string()
            } else {
                format!(
                    "file {:?}",
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap())
                )
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn benign_corners_unpack_to_the_tree_gnu_tar_extracts() {
    let host = Host::new();
    for (i, (name, archive)) in benign().into_iter().enumerate() {
        let gnu = host.dir.path().join(format!("gnu-{i}"));
        std::fs::create_dir(&gnu).unwrap();
        let file = host.dir.path().join(format!("b{i}.tar"));
        std::fs::write(&file, &archive).unwrap();
        let out = Command::new("tar")
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(&gnu)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: GNU tar failed: {out:?}");
        let key = format!("web/benign-{i}.tar.gz");
        host.s3.put(&host.bucket, &key, &gz(&archive), &[]);
        let (run, rss, _) = measured_deploy(&host, &key);
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        assert!(rss <= MAX_RSS_KIB, "{name}: peak RSS {rss} KiB");
        let ours = tree(&host.current_dir().canonicalize().unwrap());
        let theirs = tree(&gnu);
        assert!(!theirs.is_empty(), "{name}: GNU tar extracted nothing");
        assert_eq!(ours, theirs, "{name}: trees differ");
    }
}

#[test]
fn gnu_tar_archives_of_old_files_and_writable_modes_unpack() {
    let host = Host::new();
    let src = host.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/1960.txt"), b"sixties").unwrap();
    std::fs::write(src.join("open.txt"), b"world writable").unwrap();
    std::fs::set_permissions(src.join("open.txt"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let touched = Command::new("touch")
        .args(["-d", "1960-01-01 00:00:00 UTC"])
        .arg(src.join("sub/1960.txt"))
        .status()
        .unwrap();
    assert!(touched.success());
    for format in ["gnu", "posix"] {
        let file = host.dir.path().join(format!("{format}.tar.gz"));
        let status = Command::new("tar")
            .arg(format!("--format={format}"))
            .arg("-czf")
            .arg(&file)
            .arg("-C")
            .arg(&src)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let key = format!("web/{format}.tar.gz");
        host.s3
            .put(&host.bucket, &key, &std::fs::read(&file).unwrap(), &[]);
        host.deploy(&key, &["--force"]).ok();
        let dir = host.current_dir();
        assert_eq!(tree(&dir.canonicalize().unwrap()), tree(&src), "{format}");
        let meta = std::fs::metadata(dir.join("sub/1960.txt")).unwrap();
        let mtime = std::os::unix::fs::MetadataExt::mtime(&meta);
        assert_eq!(mtime, -315_619_200, "{format}: the 1960 time is kept");
        let mode = std::fs::metadata(dir.join("open.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{format}: group/other write cleared");
    }
}

#[test]
#[ignore = "writes the corpus for bench/hostile.sh"]
fn write_corpus() {
    let dir = PathBuf::from(std::env::var("DEPLOYD_HOSTILE_CORPUS").unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    let bombs = bombs();
    for (i, bomb) in bombs.iter().enumerate() {
        let name: String = bomb
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        std::fs::write(dir.join(format!("{i:02}-{name}")), &bomb.body).unwrap();
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), bombs.len());
}
