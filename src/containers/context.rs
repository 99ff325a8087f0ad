//! The build context: a tar stream of the context directory that honours `.dockerignore`.
//!
//! The archive is written by a blocking task straight into a bounded channel that feeds the
//! engine's request body, so a large context is never held in memory. Entries carry owner 0:0 and
//! no owner names (as the Docker CLI sends them), their real modes and modification times, and
//! symlinks are sent as symlinks. The Dockerfile and `.dockerignore` are always sent, even when
//! `.dockerignore` lists them, because the builder needs them (again as the CLI does).
//!
//! `.dockerignore` follows Docker's documented rules: one pattern per line, `#` comments, patterns
//! relative to the context root (a leading `/` is ignored), Go `filepath.Match` syntax (`*`, `?`,
//! `[...]`, `\` escapes) plus `**` for any number of directories, `!` for exceptions, the last
//! matching line wins, and a pattern that matches a directory excludes everything below it.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::error::ContainerError;

/// Compiled `.dockerignore` rules.
#[derive(Debug, Clone, Default)]
pub(crate) struct IgnoreRules {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    tokens: Vec<Token>,
    exception: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Literal(char),
    /// `*`: any run of characters except `/`.
    Star,
    /// `?`: one character except `/`.
    Question,
    /// `**/`: zero or more whole directories.
    AnyDirs,
    /// `**` elsewhere: anything, `/` included.
    AnyAll,
    /// `[...]`: (negated, ranges).
    Class(bool, Vec<(char, char)>),
}

impl IgnoreRules {
    /// Parse the text of a `.dockerignore` file.
    pub fn parse(text: &str) -> IgnoreRules {
        let mut patterns = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let mut p = line.trim();
            if p.is_empty() {
                continue;
            }
            let exception = p.starts_with('!');
            if exception {
                p = p[1..].trim();
                if p.is_empty() {
                    continue;
                }
            }
            let cleaned = clean(p);
            if cleaned.is_empty() {
                continue;
            }
            patterns.push(Pattern {
                tokens: tokenize(&cleaned),
                exception,
            });
        }
        IgnoreRules { patterns }
    }

    /// Read `<dir>/.dockerignore`; no file means no rules.
    pub fn load(dir: &Path) -> Result<IgnoreRules, ContainerError> {
        let path = dir.join(".dockerignore");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ContainerError::ReadFile { path, source }),
        }
    }

    fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether a context-relative path (with `/` separators) is excluded.
    pub fn is_excluded(&self, rel: &str) -> bool {
        let mut excluded = false;
        for p in &self.patterns {
            if p.exception != excluded {
                continue;
            }
            if p.matches_or_parent(rel) {
                excluded = !p.exception;
            }
        }
        excluded
    }
}

impl Pattern {
    fn matches_or_parent(&self, rel: &str) -> bool {
        let chars: Vec<char> = rel.chars().collect();
        if glob(&self.tokens, &chars) {
            return true;
        }
        // A pattern matching a parent directory excludes everything below it.
        chars
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == '/')
            .any(|(i, _)| glob(&self.tokens, &chars[..i]))
    }
}

/// `filepath.Clean` for patterns, with a leading `/` dropped.
fn clean(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

fn tokenize(p: &str) -> Vec<Token> {
    let chars: Vec<char> = p.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                if chars.get(i + 2) == Some(&'/') {
                    out.push(Token::AnyDirs);
                    i += 3;
                } else {
                    out.push(Token::AnyAll);
                    i += 2;
                }
            }
            '*' => {
                out.push(Token::Star);
                i += 1;
            }
            '?' => {
                out.push(Token::Question);
                i += 1;
            }
            '\\' if i + 1 < chars.len() => {
                out.push(Token::Literal(chars[i + 1]));
                i += 2;
            }
            '[' => match chars[i + 1..].iter().position(|c| *c == ']') {
                Some(end) => {
                    let body = &chars[i + 1..i + 1 + end];
                    let (negated, body) = match body.first() {
                        Some('^') | Some('!') => (true, &body[1..]),
                        _ => (false, body),
                    };
                    let mut ranges = Vec::new();
                    let mut j = 0;
                    while j < body.len() {
                        if j + 2 < body.len() && body[j + 1] == '-' {
                            ranges.push((body[j], body[j + 2]));
                            j += 3;
                        } else {
                            ranges.push((body[j], body[j]));
                            j += 1;
                        }
                    }
                    out.push(Token::Class(negated, ranges));
                    i += end + 2;
                }
                None => {
                    out.push(Token::Literal('['));
                    i += 1;
                }
            },
            c => {
                out.push(Token::Literal(c));
                i += 1;
            }
        }
    }
    out
}

fn glob(tokens: &[Token], s: &[char]) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return s.is_empty();
    };
    match first {
        Token::Literal(c) => s.first() == Some(c) && glob(rest, &s[1..]),
        Token::Question => s.first().is_some_and(|c| *c != '/') && glob(rest, &s[1..]),
        Token::Class(negated, ranges) => {
            s.first().is_some_and(|c| {
                *c != '/' && ranges.iter().any(|(a, b)| a <= c && c <= b) != *negated
            }) && glob(rest, &s[1..])
        }
        Token::Star => {
            for i in 0..=s.len() {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if i < s.len() && s[i] == '/' {
                    break;
                }
            }
            false
        }
        Token::AnyAll => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Token::AnyDirs => {
            // Zero directories, or any prefix ending in `/`.
            glob(rest, s)
                || s.iter()
                    .enumerate()
                    .filter(|(_, c)| **c == '/')
                    .any(|(i, _)| glob(rest, &s[i + 1..]))
        }
    }
}

/// List the files a context sends, in archive order (for tests and diagnostics).
pub fn context_entries(dir: &Path, dockerfile: &str) -> Result<Vec<String>, ContainerError> {
    let rules = IgnoreRules::load(dir)?;
    let mut out = Vec::new();
    walk(dir, dir, &rules, dockerfile, &mut |rel, _| {
        out.push(rel.to_string());
        Ok(())
    })?;
    Ok(out)
}

/// Walk the context in sorted order, calling `f` for each entry that is sent.
fn walk(
    root: &Path,
    dir: &Path,
    rules: &IgnoreRules,
    dockerfile: &str,
    f: &mut dyn FnMut(&str, &Path) -> Result<(), ContainerError>,
) -> Result<(), ContainerError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ContainerError::ReadFile { path, source }
    };
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_err(dir))?;
    names.sort();
    for path in names {
        let rel = path
            .strip_prefix(root)
            .map_err(|_| ContainerError::Internal {
                action: "walking the build context".into(),
                message: format!("{} is not below {}", path.display(), root.display()),
            })?
            .to_string_lossy()
            .replace('\\', "/");
        let meta = std::fs::symlink_metadata(&path).map_err(read_err(&path))?;
        let always = rel == dockerfile || rel == ".dockerignore";
        let excluded = !always && rules.is_excluded(&rel);
        if meta.is_dir() {
            if excluded && !rules.has_exceptions() {
                continue;
            }
            if !excluded {
                f(&rel, &path)?;
            }
            walk(root, &path, rules, dockerfile, f)?;
        } else if !excluded && (meta.is_file() || meta.file_type().is_symlink()) {
            f(&rel, &path)?;
        }
    }
    Ok(())
}

/// A `Write` that hands 64 KiB chunks to an async channel.
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

const CHUNK: usize = 64 * 1024;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "build aborted"))
    }
}

/// A context being streamed: the body for the engine, and the task writing it.
pub(crate) struct ContextStream {
    /// The archive, in chunks, as the engine reads it.
    pub(crate) body: std::pin::Pin<Box<dyn futures_util::stream::Stream<Item = Bytes> + Send>>,
    /// The task writing the archive: how many entries it sent, or why it stopped.
    pub(crate) writer: tokio::task::JoinHandle<Result<u64, ContainerError>>,
}

/// Start streaming the context directory as a tar archive.
pub(crate) fn stream_context(dir: PathBuf, dockerfile: String) -> ContextStream {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || write_context(&dir, &dockerfile, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    ContextStream {
        body: Box::pin(stream),
        writer,
    }
}

fn write_context(
    dir: &Path,
    dockerfile: &str,
    tx: mpsc::Sender<Bytes>,
) -> Result<u64, ContainerError> {
    let rules = IgnoreRules::load(dir)?;
    let mut builder = tar::Builder::new(ChannelWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
    });
    builder.follow_symlinks(false);
    let mut count = 0u64;
    walk(dir, dir, &rules, dockerfile, &mut |rel, path| {
        append(&mut builder, rel, path)?;
        count += 1;
        Ok(())
    })?;
    let mut inner = builder
        .into_inner()
        .map_err(|source| ContainerError::ReadFile {
            path: dir.to_path_buf(),
            source,
        })?;
    inner.flush().map_err(|source| ContainerError::ReadFile {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(count)
}

fn append(
    builder: &mut tar::Builder<ChannelWriter>,
    rel: &str,
    path: &Path,
) -> Result<(), ContainerError> {
    let err = |source| ContainerError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    header.set_uid(0);
    header.set_gid(0);
    header.set_username("").map_err(err)?;
    header.set_groupname("").map_err(err)?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(err)?;
        header.set_size(0);
        builder.append_link(&mut header, rel, &target).map_err(err)
    } else if meta.is_dir() {
        header.set_size(0);
        builder
            .append_data(&mut header, format!("{rel}/"), std::io::empty())
            .map_err(err)
    } else {
        let file = std::fs::File::open(path).map_err(err)?;
        builder.append_data(&mut header, rel, file).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_rules() {
        let r = IgnoreRules::parse(
            "# comment\nnode_modules\n*.log\n!keep.log\n/secret.txt\n**/*.tmp\ndocs/*.md\n!docs/README.md\nbuild?\n[ab].txt\n",
        );
        assert!(r.is_excluded("node_modules"));
        assert!(r.is_excluded("node_modules/x/y.js"));
        assert!(r.is_excluded("a.log"));
        assert!(!r.is_excluded("keep.log"));
        assert!(
            !r.is_excluded("sub/a.log"),
            "`*.log` is anchored at the root"
        );
        assert!(r.is_excluded("secret.txt"));
        assert!(r.is_excluded("x.tmp"));
        assert!(r.is_excluded("deep/er/x.tmp"));
        assert!(r.is_excluded("docs/a.md"));
        assert!(!r.is_excluded("docs/README.md"));
        assert!(!r.is_excluded("docs/sub/a.md"));
        assert!(r.is_excluded("build1"));
        assert!(!r.is_excluded("build12"));
        assert!(r.is_excluded("a.txt"));
        assert!(!r.is_excluded("c.txt"));
        assert!(!r.is_excluded("src/main.rs"));
    }
}
