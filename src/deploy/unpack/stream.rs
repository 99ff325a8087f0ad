//! The tar stream: 512-byte blocks read under hard caps, each member's headers and extensions
//! (PAX records, GNU long names) resolved into one [`Member`], the way GNU tar reads them.
//!
//! The framing is deployd's own rather than the `tar` crate's, because the caps have to hold
//! before anything is allocated: the crate reads a PAX record or a GNU long name into memory
//! whatever its size, skips data after the end-of-archive marker unread, splits PAX records at
//! newlines instead of by their length, and reads only the last 8 bytes of a base-256 field.
//! Every one of those is a way for a hostile artifact to cost memory or time, or to be read
//! differently from GNU tar. What GNU tar would read in more than one way (two PAX headers for
//! one member, a directory carrying data, a global header naming a path) is refused.

use std::io::{self, BufReader, Read};

use super::UnpackError;

/// A tar block.
pub(super) const BLOCK: usize = 512;
/// Bytes one extension header (PAX record set, GNU long name or link) may hold.
pub(super) const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Extension headers in front of one member (GNU tar writes at most three: `g`, `x`/`L`, `K`).
pub(super) const MAX_EXTENSIONS: usize = 8;
/// Zero bytes allowed after the last member: the two end-of-archive blocks plus the padding
/// to the end of a 10240-byte record (GNU tar, bsdtar and Python pad to one).
pub(super) const MAX_TRAILING_ZEROS: u64 = 10240 + 2 * BLOCK as u64;
/// Decompressed bytes allowed per entry on top of its content: its header, a PAX header with
/// the usual records, and padding.
pub(super) const OVERHEAD_PER_ENTRY: u64 = 4096;

/// Counts the decompressed bytes and fails the read that would pass `cap`.
pub(super) struct Capped<R> {
    inner: R,
    read: u64,
    cap: u64,
    exceeded: bool,
}

impl<R: Read> Capped<R> {
    pub(super) fn new(inner: R, cap: u64) -> Self {
        Capped {
            inner,
            read: 0,
            cap,
            exceeded: false,
        }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One byte past the cap is read so that a stream ending exactly at it is not refused.
        let room = self.cap.saturating_add(1).saturating_sub(self.read);
        let want = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        if self.read > self.cap {
            self.exceeded = true;
            return Err(io::Error::other("the decompressed size limit"));
        }
        Ok(n)
    }
}

/// What a member is, after GNU tar's reading of the type flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// A type flag deployd does not extract.
    Other(u8),
}

/// One member, its extensions applied.
#[derive(Debug)]
pub(super) struct Member {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Bytes of data that follow the header (the PAX `size` when there is one).
    pub size: u64,
    pub mode: u32,
    /// Seconds since the epoch; negative before 1970.
    pub mtime: Option<i64>,
}

/// Extensions collected for the next member.
#[derive(Default)]
struct Pending {
    count: usize,
    pax: bool,
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    size: Option<u64>,
    mtime: Option<i64>,
}

/// Reads members from a decompressed tar stream.
pub(super) struct TarStream<R> {
    inner: BufReader<Capped<R>>,
    /// Data bytes of the current member not read yet.
    left: u64,
    /// Padding after the current member's data.
    pad: u64,
    /// The `[unpack] max_bytes` limit, for the message when the stream cap is hit.
    max_bytes: u64,
    done: bool,
}

fn refused(reason: impl Into<String>) -> UnpackError {
    UnpackError::Refused {
        reason: reason.into(),
    }
}

fn corrupt(reason: impl Into<String>) -> UnpackError {
    UnpackError::Corrupt {
        reason: reason.into(),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Member {
    /// Refuses data on a member whose type carries none: GNU tar, Python and Go disagree on
    /// whether it is skipped or read as the next header.
    pub(super) fn check_no_data(&self) -> Result<(), UnpackError> {
        if self.size == 0 || matches!(self.kind, Kind::File | Kind::Other(_)) {
            return Ok(());
        }
        Err(refused(format!(
            "{:?} is a {} that carries {} bytes of data, which tar implementations read \
             differently",
            lossy(&self.path),
            match self.kind {
                Kind::Dir => "directory",
                Kind::Symlink => "symlink",
                Kind::Hardlink => "hardlink",
                _ => "device or fifo",
            },
            self.size
        )))
    }
}

impl<R: Read> TarStream<R> {
    /// `cap` bounds the decompressed stream; `max_bytes` is named when it is hit.
    pub(super) fn new(decoded: R, cap: u64, max_bytes: u64) -> Self {
        TarStream {
            inner: BufReader::with_capacity(128 << 10, Capped::new(decoded, cap)),
            left: 0,
            pad: 0,
            max_bytes,
            done: false,
        }
    }

    /// A read error: the cap, a zstd frame needing too large a window, or a broken stream.
    fn stream_err(&self, e: io::Error) -> UnpackError {
        if self.inner.get_ref().exceeded {
            return UnpackError::Limit {
                what: format!(
                    "it decompresses to more than {} bytes of tar data",
                    self.inner.get_ref().cap
                ),
                limit: self.max_bytes,
                key: "max_bytes",
            };
        }
        let text = e.to_string();
        if text.contains("too much memory") {
            return refused(format!(
                "its zstd frames need a window over {} MiB to decompress ({text}); compress with \
                 a level up to 19 and without --long",
                1u32 << (super::ZSTD_WINDOW_LOG_MAX - 20)
            ));
        }
        corrupt(text)
    }

    /// Fills `buf` completely; `Ok(false)` at a clean end of stream before its first byte.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<bool, UnpackError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(corrupt("it ends in the middle of a 512-byte block")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.stream_err(e)),
            }
        }
        Ok(true)
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, mut n: u64) -> Result<(), UnpackError> {
        let mut buf = [0u8; BLOCK];
        while n > 0 {
            let want = usize::try_from(n).unwrap_or(BLOCK).min(BLOCK);
            if !self.read_full(&mut buf[..want])? {
                return Err(corrupt("it ends inside a member's data"));
            }
            n -= want as u64;
        }
        Ok(())
    }

    /// Reads the current member's data; 0 once all of it was read.
    pub(super) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, UnpackError> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.stream_err(e)),
            }
        };
        if n == 0 {
            return Err(corrupt("it ends inside a member's data"));
        }
        self.left -= n as u64;
        Ok(n)
    }

    /// Reads an extension header's data, at most [`MAX_EXTENSION_BYTES`].
    fn read_extension(&mut self, what: &str, size: u64) -> Result<Vec<u8>, UnpackError> {
        if size > MAX_EXTENSION_BYTES {
            return Err(refused(format!(
                "a {what} of {size} bytes is larger than the {MAX_EXTENSION_BYTES} bytes deployd \
                 reads for one"
            )));
        }
        // The size was just checked against a small cap.
        let mut data = vec![0u8; size as usize];
        if !self.read_full(&mut data)? {
            return Err(corrupt(format!("it ends inside a {what}")));
        }
        self.skip(padding(size))?;
        Ok(data)
    }

    /// The next member, or `None` at the end of the archive (after checking what follows).
    pub(super) fn next_member(&mut self) -> Result<Option<Member>, UnpackError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.left + self.pad)?;
        self.left = 0;
        self.pad = 0;
        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            if !self.read_full(&mut block)? {
                self.done = true;
                if pending.count > 0 {
                    return Err(corrupt(
                        "it ends after an extension header, before its member",
                    ));
                }
                return Ok(None);
            }
            if block.iter().all(|b| *b == 0) {
                if pending.count > 0 {
                    return Err(corrupt(
                        "an extension header is followed by the end of the archive",
                    ));
                }
                self.done = true;
                self.check_trailer()?;
                return Ok(None);
            }
            check_checksum(&block)?;
            let header_size = numeric(&block[124..136])
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| {
                    corrupt(format!(
                        "the size field of {:?} is not a number",
                        lossy(&name_field(&block))
                    ))
                })?;
            let flag = block[156];
            match flag {
                b'x' | b'g' | b'L' | b'K' => {
                    pending.count += 1;
                    if pending.count > MAX_EXTENSIONS {
                        return Err(refused(format!(
                            "more than {MAX_EXTENSIONS} extension headers precede one member"
                        )));
                    }
                    let what = match flag {
                        b'x' | b'g' => "PAX header",
                        b'L' => "GNU long name",
                        _ => "GNU long link name",
                    };
                    let data = self.read_extension(what, header_size)?;
                    match flag {
                        b'x' if pending.pax => {
                            return Err(refused("two PAX headers precede one member"));
                        }
                        b'x' => {
                            pending.pax = true;
                            apply_pax(&mut pending, &data)?;
                        }
                        b'g' => check_global(&data)?,
                        b'L' if pending.long_name.is_some() => {
                            return Err(refused("two GNU long names precede one member"));
                        }
                        b'L' => pending.long_name = Some(until_nul(&data).to_vec()),
                        _ if pending.long_link.is_some() => {
                            return Err(refused("two GNU long link names precede one member"));
                        }
                        _ => pending.long_link = Some(until_nul(&data).to_vec()),
                    }
                }
                _ => return self.member(&block, flag, header_size, pending).map(Some),
            }
        }
    }

    /// Resolves a member header with its pending extensions.
    fn member(
        &mut self,
        block: &[u8; BLOCK],
        flag: u8,
        header_size: u64,
        pending: Pending,
    ) -> Result<Member, UnpackError> {
        let path = pending
            .path
            .or(pending.long_name)
            .unwrap_or_else(|| name_field(block));
        let link = pending
            .link
            .or(pending.long_link)
            .unwrap_or_else(|| until_nul(&block[157..257]).to_vec());
        let size = pending.size.unwrap_or(header_size);
        let mut kind = match flag {
            b'0' | 0 | b'7' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            b'S' => {
                return Err(refused(format!(
                    "{:?} is a GNU sparse file, which deployd does not unpack; create the \
                     archive without --sparse",
                    lossy(&path)
                )));
            }
            other => Kind::Other(other),
        };
        // GNU tar (and BSD tar before it) reads a regular file whose name ends in `/` as a
        // directory.
        if kind == Kind::File && path.ends_with(b"/") {
            kind = Kind::Dir;
        }
        let mode = numeric(&block[100..108])
            .and_then(|m| u32::try_from(m & 0o7777).ok())
            .unwrap_or(0o644);
        let mtime = pending
            .mtime
            .or_else(|| numeric(&block[136..148]).and_then(|t| i64::try_from(t).ok()));
        self.left = size;
        self.pad = padding(size);
        Ok(Member {
            path,
            link,
            kind,
            size,
            mode,
            mtime,
        })
    }

    /// After the first zero block: only zeros, at most to the end of one record, then the end
    /// of the stream (which is where a gzip or zstd checksum is checked).
    fn check_trailer(&mut self) -> Result<(), UnpackError> {
        let mut seen = BLOCK as u64;
        let mut buf = [0u8; 4096];
        loop {
            let n = loop {
                match self.inner.read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(match self.stream_err(e) {
                            UnpackError::Corrupt { reason } => {
                                corrupt(format!("after the end-of-archive marker: {reason}"))
                            }
                            other => other,
                        });
                    }
                }
            };
            if n == 0 {
                return Ok(());
            }
            if buf[..n].iter().any(|b| *b != 0) {
                return Err(refused(
                    "data follows the end-of-archive marker (two archives concatenated, or \
                     something appended); publish one archive",
                ));
            }
            seen += n as u64;
            if seen > MAX_TRAILING_ZEROS {
                return Err(refused(format!(
                    "more than {MAX_TRAILING_ZEROS} bytes of zeros follow the last member; tar \
                     pads to one record at most"
                )));
            }
        }
    }
}

/// Padding after `size` bytes of data.
fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes
        .iter()
        .position(|b| *b == 0)
        .map_or(bytes, |i| &bytes[..i])
}

/// The header's own name: `prefix/name` in a POSIX ustar header, `name` otherwise.
fn name_field(block: &[u8]) -> Vec<u8> {
    let name = until_nul(&block[..100]);
    let prefix = until_nul(&block[345..500]);
    if &block[257..263] == b"ustar\0" && !prefix.is_empty() {
        let mut out = prefix.to_vec();
        out.push(b'/');
        out.extend_from_slice(name);
        out
    } else {
        name.to_vec()
    }
}

/// A numeric header field: octal (space or NUL terminated, leading spaces allowed) or GNU's
/// base-256 (first byte 0x80, or 0xff for a negative number).
pub(super) fn numeric(field: &[u8]) -> Option<i128> {
    match field.first()? {
        0x80 | 0xff if field.len() <= 12 => {
            let mut u: u128 = 0;
            for b in field {
                u = (u << 8) | u128::from(*b);
            }
            let bits = 8 * field.len() as u32;
            // At most 96 bits: both casts are exact.
            if field[0] == 0x80 {
                Some((u & !(0x80u128 << (bits - 8))) as i128)
            } else {
                Some(u as i128 - (1i128 << bits))
            }
        }
        b if b & 0x80 != 0 => None,
        _ => {
            let text = field.iter().skip_while(|b| **b == b' ');
            let mut value: i128 = 0;
            let mut digits = 0;
            let mut ended = false;
            for b in text {
                match b {
                    b'0'..=b'7' if !ended => {
                        value = value * 8 + i128::from(b - b'0');
                        digits += 1;
                    }
                    b' ' | 0 => ended = true,
                    _ => return None,
                }
            }
            (digits > 0).then_some(value)
        }
    }
}

/// The stored checksum matches the unsigned or (as old tars computed it) signed byte sum.
pub(super) fn check_checksum(block: &[u8]) -> Result<(), UnpackError> {
    if checksum_ok(block) {
        Ok(())
    } else {
        Err(corrupt(format!(
            "the header of {:?} fails its checksum",
            lossy(&name_field(block))
        )))
    }
}

pub(super) fn checksum_ok(block: &[u8]) -> bool {
    let Some(stored) = numeric(&block[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0i128, 0i128);
    for (i, b) in block[..BLOCK].iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += i128::from(b);
        signed += i128::from(b as i8);
    }
    stored == unsigned || stored == signed
}

/// One PAX record: key and value.
type Record<'a> = (&'a [u8], &'a [u8]);

/// PAX records, by their length prefix (a value may hold newlines).
fn pax_records(data: &[u8]) -> Result<Vec<Record<'_>>, UnpackError> {
    let bad = || corrupt("a PAX header holds a malformed record");
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let space = rest
            .iter()
            .take(21)
            .position(|b| *b == b' ')
            .ok_or_else(bad)?;
        let digits = &rest[..space];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        out.push((&record[..eq], &record[eq + 1..]));
        rest = &rest[len..];
    }
    Ok(out)
}

/// A decimal PAX number; `None` for an empty value (POSIX: the header field applies).
fn pax_decimal(key: &[u8], value: &[u8]) -> Result<Option<i128>, UnpackError> {
    if value.is_empty() {
        return Ok(None);
    }
    let (neg, digits) = match value.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, value),
    };
    let whole = digits.split(|b| *b == b'.').next().unwrap_or(digits);
    let valid = !whole.is_empty()
        && whole.len() <= 30
        && digits.iter().all(|b| b.is_ascii_digit() || *b == b'.')
        && digits.iter().filter(|b| **b == b'.').count() <= 1;
    let parsed = std::str::from_utf8(whole)
        .ok()
        .and_then(|s| s.parse::<i128>().ok())
        .filter(|_| valid)
        .ok_or_else(|| {
            corrupt(format!(
                "the PAX record {} is not a number: {:?}",
                lossy(key),
                lossy(&value[..value.len().min(40)])
            ))
        })?;
    Ok(Some(if neg { -parsed } else { parsed }))
}

fn apply_pax(pending: &mut Pending, data: &[u8]) -> Result<(), UnpackError> {
    for (key, value) in pax_records(data)? {
        match key {
            b"path" => pending.path = (!value.is_empty()).then(|| value.to_vec()),
            b"linkpath" => pending.link = (!value.is_empty()).then(|| value.to_vec()),
            b"size" => {
                pending.size = match pax_decimal(key, value)? {
                    Some(n) => Some(
                        u64::try_from(n)
                            .map_err(|_| corrupt(format!("the PAX size {n} is out of range")))?,
                    ),
                    None => None,
                }
            }
            b"mtime" => {
                pending.mtime = pax_decimal(key, value)?.map(|t| {
                    // Clamped: a time this far out is not worth refusing an archive for.
                    t.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
                });
            }
            k if k.starts_with(b"GNU.sparse.") => {
                return Err(refused(
                    "it holds a GNU sparse file (PAX GNU.sparse records), which deployd does \
                     not unpack; create the archive without --sparse",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A global PAX header may not set what names or sizes members.
fn check_global(data: &[u8]) -> Result<(), UnpackError> {
    for (key, _) in pax_records(data)? {
        if matches!(key, b"path" | b"linkpath" | b"size") || key.starts_with(b"GNU.sparse.") {
            return Err(refused(format!(
                "a global PAX header sets {} for every later member",
                lossy(key)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(numeric(b"0000644\0"), Some(0o644));
        assert_eq!(numeric(b"  644 \0\0"), Some(0o644));
        assert_eq!(numeric(b"\0\0\0\0"), None);
        assert_eq!(numeric(b"12x4\0"), None);
        let mut pos = [0u8; 12];
        pos[0] = 0x80;
        pos[4] = 1; // 2^56: bytes above the last eight count too
        assert_eq!(numeric(&pos), Some(1i128 << 56));
        let neg = [0xffu8; 12];
        assert_eq!(numeric(&neg), Some(-1));
        let mut neg2 = [0xffu8; 12];
        neg2[11] = 0xfe;
        assert_eq!(numeric(&neg2), Some(-2));
    }

    #[test]
    fn pax_records_are_split_by_length() {
        let data = b"20 path=a\nb/c.txt x\n11 size=10\n";
        let records = pax_records(data).unwrap();
        assert_eq!(records[0], (&b"path"[..], &b"a\nb/c.txt x"[..]));
        assert_eq!(records[1], (&b"size"[..], &b"10"[..]));
        assert!(pax_records(b"99 path=x\n").is_err());
        assert!(pax_records(b"x path=x\n").is_err());
        assert!(pax_records(b"9 pathx\n").is_err());
    }

    #[test]
    fn pax_numbers() {
        assert_eq!(pax_decimal(b"mtime", b"-12.5").unwrap(), Some(-12));
        assert_eq!(pax_decimal(b"size", b"").unwrap(), None);
        assert!(pax_decimal(b"size", b"1e9").is_err());
        assert!(pax_decimal(b"size", b"1.2.3").is_err());
    }
}
