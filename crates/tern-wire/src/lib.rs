//! tern's migration wire protocol, version 2.
//!
//! ```text
//!  source agent                                   destination agent
//!  ────────────                                   ─────────────────
//!   (HTTP) POST /migrations/incoming  ──────────►  prepare: memory file, listener, token
//!                                     ◄──────────  { memory_port, device_port, ... }
//!   for each of S memory streams and the one device-state stream (TCP, one port):
//!     Hello{magic, version, channel, stream i/S, pages, id, token} ──►  (within 2 s)
//!                                     ◄── Welcome{version}  |  Abort{reason}
//!   round r = 1, 2, ...:
//!     Pages{entries: data page | zero run} ... ──►  written into the destination file
//!     RoundEnd{r}                          ──►
//!                                     ◄── Ack{r}            (every stream; round barrier)
//!   source VM paused; final pass as one more round
//!     Done                                 ──►
//!                                     ◄── Ack{0}
//!   QEMU migrate (x-ignore-shared): CPU + device state only, to a unix socket of the
//!   source agent, relayed as raw bytes over the device-state stream into a unix
//!   socket the destination QEMU listens on
//!   (HTTP) POST /migrations/incoming/{id}/resume ──►  `cont` on the destination
//!   source VM destroyed
//! ```
//!
//! Every message is a frame: an 8-byte header (kind `u8`, flags `u8`, reserved `u16`,
//! payload length `u32`, all little endian) and the payload. A `Pages` payload is a
//! sequence of entries, `index u32, kind u8` followed by 4096 bytes for a data page or a
//! `count u32` for a run of zero pages; with [`FLAG_LZ4`] the payload is one LZ4 block.
//! A stream always finishes one round (the `RoundEnd`/`Ack` barrier) before the next
//! starts, so a page never overtakes an older copy of itself on another stream. After
//! its `Welcome`, the device-state stream carries QEMU's own migration stream, unframed.
//!
//! The reader of a frame bounds it before allocating: a `Hello` by [`MAX_HELLO`], any
//! frame by [`MAX_FRAME`], an LZ4 block's declared size by [`MAX_FRAME`] too.
//!
//! It is a crate of its own, with no dependency on the agent, so that what decodes a
//! stranger's bytes can be fuzzed and reviewed alone.
//!
//! # Layout
//! - [`read_frame`], [`write_frame`], [`expect`]: frames and their bounds.
//! - [`Hello`]: the first frame of every stream, and who may send it.
//! - [`Batch`], [`unseal`], [`entries`]: the pages of a `Pages` frame, plain or LZ4.

use std::io::{Read, Write};

/// The size of a guest page, the unit of transfer and change detection.
pub const PAGE_SIZE: usize = 4096;
/// Identifies a tern memory stream so a stray connection is rejected at once.
pub const MAGIC: [u8; 8] = *b"TERNMIG\0";
/// The protocol version this build speaks; a peer with another version is refused.
pub const VERSION: u16 = 2;
/// `Pages` payload is an LZ4 block (size-prefixed).
pub const FLAG_LZ4: u8 = 1;
/// Bounds a frame so a corrupt length cannot make the receiver allocate gigabytes.
pub const MAX_FRAME: usize = 64 << 20;
/// Bounds the first frame a stranger can send: a `Hello` is a few dozen bytes.
pub const MAX_HELLO: usize = 4096;

const HEADER_LEN: usize = 8;
const ENTRY_DATA: u8 = 0;
const ENTRY_ZERO_RUN: u8 = 1;

/// A protocol violation or an I/O failure on a memory stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed (peer gone, link down).
    #[error("memory stream: {0}")]
    Io(std::io::Error),
    /// The socket's timeout ran out with no byte moved: the peer stopped reading or
    /// answering, or the link is down. (The OS reports this as EAGAIN, which alone
    /// would read like a bug.)
    #[error("memory stream: no byte moved within the stream timeout (peer stalled or link down)")]
    Stalled,
    /// The peer sent bytes that are not a valid frame of this version.
    #[error("memory stream: malformed {0}")]
    Malformed(&'static str),
    /// The peer speaks a protocol version this build does not.
    #[error("memory stream: peer speaks protocol version {0}, this build speaks {VERSION}")]
    Version(u16),
    /// The peer gave up and said why.
    #[error("memory stream aborted by peer: {0}")]
    Aborted(String),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Stalled,
            _ => WireError::Io(e),
        }
    }
}

/// The kinds of frame; the numbers are the wire encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Pages = 3,
    RoundEnd = 4,
    Done = 5,
    Ack = 6,
    Abort = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Pages,
            4 => Kind::RoundEnd,
            5 => Kind::Done,
            6 => Kind::Ack,
            7 => Kind::Abort,
            _ => return None,
        })
    }
}

/// One frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// Writes one frame; returns the bytes put on the wire (header included).
pub fn write_frame(
    w: &mut impl Write,
    kind: Kind,
    flags: u8,
    payload: &[u8],
) -> Result<usize, WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::Malformed("frame longer than the limit"));
    }
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[1] = flags;
    header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)?;
    Ok(HEADER_LEN + payload.len())
}

/// Reads one frame; an `Abort` from the peer becomes [`WireError::Aborted`].
pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    read_frame_within(r, MAX_FRAME)
}

/// Reads one frame whose payload may be at most `max` bytes, checked before allocating.
pub fn read_frame_within(r: &mut impl Read, max: usize) -> Result<Frame, WireError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    let kind = Kind::from_u8(header[0]).ok_or(WireError::Malformed("frame kind"))?;
    let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(WireError::Malformed("frame length"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    if kind == Kind::Abort {
        return Err(WireError::Aborted(
            String::from_utf8_lossy(&payload).into_owned(),
        ));
    }
    Ok(Frame {
        kind,
        flags: header[1],
        payload,
    })
}

/// Reads one frame and insists on its kind.
pub fn expect(r: &mut impl Read, kind: Kind) -> Result<Frame, WireError> {
    let frame = read_frame(r)?;
    if frame.kind != kind {
        return Err(WireError::Malformed("unexpected frame kind"));
    }
    Ok(frame)
}

/// Reads the first frame of a stream, a `Hello` of at most [`MAX_HELLO`] bytes.
pub fn read_hello(r: &mut impl Read) -> Result<Hello, WireError> {
    let frame = read_frame_within(r, MAX_HELLO)?;
    if frame.kind != Kind::Hello {
        return Err(WireError::Malformed("first frame is not a hello"));
    }
    Hello::decode(&frame.payload)
}

/// What a stream carries; the numbers are the wire encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Channel {
    /// Guest pages in `Pages` frames.
    Memory = 0,
    /// QEMU's migration stream (CPU and devices; all of the VM for `qemu-native`),
    /// relayed unframed after the `Welcome`.
    DeviceState = 1,
}

/// The first frame on every stream: who is calling and what it will send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub channel: Channel,
    /// Which of `streams` this connection is (0-based).
    pub stream: u16,
    pub streams: u16,
    /// Guest memory size in pages; must match the destination's memory file.
    pub pages: u64,
    /// The migration this stream belongs to, as handed out by prepare.
    pub migration: String,
    /// The secret handed out by prepare; a stream without it is refused.
    pub token: String,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.migration.len() + self.token.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.channel as u16).to_le_bytes());
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&self.streams.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        put_str(&mut out, &self.migration);
        put_str(&mut out, &self.token);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Hello, WireError> {
        let mut cur = Cursor { buf, pos: 0 };
        if cur.take(MAGIC.len())? != MAGIC {
            return Err(WireError::Malformed("hello: not a tern memory stream"));
        }
        let version = cur.u16()?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let channel = match cur.u16()? {
            0 => Channel::Memory,
            1 => Channel::DeviceState,
            _ => return Err(WireError::Malformed("hello: unknown channel")),
        };
        Ok(Hello {
            version,
            channel,
            stream: cur.u16()?,
            streams: cur.u16()?,
            pages: cur.u64()?,
            migration: cur.string()?,
            token: cur.string()?,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(WireError::Malformed("truncated payload"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| WireError::Malformed("string is not UTF-8"))
    }
    fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

/// Encodes a `u32` payload (round numbers of `RoundEnd`/`Ack`, the version of `Welcome`).
pub fn u32_payload(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// Decodes a `u32` payload.
pub fn parse_u32(payload: &[u8]) -> Result<u32, WireError> {
    let bytes: [u8; 4] = payload
        .try_into()
        .map_err(|_| WireError::Malformed("u32 payload"))?;
    Ok(u32::from_le_bytes(bytes))
}

/// Builds the payload of one `Pages` frame.
#[derive(Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// Data pages in the batch (zero runs are not counted: they carry no page bytes).
    pub data_pages: usize,
    /// Pages covered by zero runs.
    pub zero_pages: u64,
}

impl Batch {
    pub fn with_capacity(pages: usize) -> Batch {
        Batch {
            buf: Vec::with_capacity(pages * (PAGE_SIZE + 5)),
            ..Batch::default()
        }
    }

    pub fn push_data(&mut self, index: u32, page: &[u8]) {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        self.buf.extend_from_slice(&index.to_le_bytes());
        self.buf.push(ENTRY_DATA);
        self.buf.extend_from_slice(page);
        self.data_pages += 1;
    }

    pub fn push_zero_run(&mut self, index: u32, count: u32) {
        self.buf.extend_from_slice(&index.to_le_bytes());
        self.buf.push(ENTRY_ZERO_RUN);
        self.buf.extend_from_slice(&count.to_le_bytes());
        self.zero_pages += u64::from(count);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Uncompressed payload length.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.data_pages = 0;
        self.zero_pages = 0;
    }

    /// The frame flags and payload to send; compresses only when that saves bytes.
    pub fn seal(&self, lz4: bool) -> (u8, std::borrow::Cow<'_, [u8]>) {
        if lz4 {
            let packed = lz4_flex::block::compress_prepend_size(&self.buf);
            if packed.len() < self.buf.len() {
                return (FLAG_LZ4, packed.into());
            }
        }
        (0, self.buf.as_slice().into())
    }
}

/// One entry of a `Pages` payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    Data { index: u32, page: &'a [u8] },
    ZeroRun { index: u32, count: u32 },
}

/// Undoes [`Batch::seal`]: the raw entries of a `Pages` frame.
pub fn unseal(frame: &Frame) -> Result<std::borrow::Cow<'_, [u8]>, WireError> {
    if frame.flags & FLAG_LZ4 != 0 {
        // The size prefix is the peer's word: checked before it sizes an allocation.
        let (size, block) = frame
            .payload
            .split_first_chunk::<4>()
            .ok_or(WireError::Malformed("lz4 block without its size"))?;
        let size = u32::from_le_bytes(*size) as usize;
        if size > MAX_FRAME {
            return Err(WireError::Malformed(
                "lz4 block declares more than the frame limit",
            ));
        }
        let mut raw = vec![0u8; size];
        let n = lz4_flex::block::decompress_into(block, &mut raw)
            .map_err(|_| WireError::Malformed("lz4 block"))?;
        if n != size {
            return Err(WireError::Malformed("lz4 block shorter than its size"));
        }
        Ok(raw.into())
    } else {
        Ok(frame.payload.as_slice().into())
    }
}

/// Parses the entries of an unsealed `Pages` payload.
pub fn entries(raw: &[u8]) -> Result<Vec<Entry<'_>>, WireError> {
    let mut cur = Cursor { buf: raw, pos: 0 };
    let mut out = Vec::new();
    while !cur.done() {
        let index = cur.u32()?;
        match cur.u8()? {
            ENTRY_DATA => out.push(Entry::Data {
                index,
                page: cur.take(PAGE_SIZE)?,
            }),
            ENTRY_ZERO_RUN => out.push(Entry::ZeroRun {
                index,
                count: cur.u32()?,
            }),
            _ => return Err(WireError::Malformed("page entry kind")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trips_and_rejects_other_versions() {
        let hello = Hello {
            version: VERSION,
            channel: Channel::Memory,
            stream: 1,
            streams: 4,
            pages: 131_072,
            migration: "m-1".into(),
            token: "secret".into(),
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let mut bad = hello.encode();
        bad[8] = 9;
        assert!(matches!(Hello::decode(&bad), Err(WireError::Version(9))));
        bad[0] = b'X';
        assert!(matches!(Hello::decode(&bad), Err(WireError::Malformed(_))));
    }

    #[test]
    fn abort_frame_surfaces_as_error_with_reason() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Abort, 0, b"bad token").unwrap();
        match read_frame(&mut buf.as_slice()) {
            Err(WireError::Aborted(reason)) => assert_eq!(reason, "bad token"),
            other => panic!("expected abort, got {other:?}"),
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let mut header = vec![Kind::Pages as u8, 0, 0, 0];
        header.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut header.as_slice()),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn a_hello_longer_than_4_kib_is_refused_before_its_payload_is_read() {
        // Only the header: a reader that believed the length would wait for the rest.
        let mut header = vec![Kind::Hello as u8, 0, 0, 0];
        header.extend_from_slice(&(MAX_HELLO as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_hello(&mut header.as_slice()),
            Err(WireError::Malformed("frame length"))
        ));
    }

    #[test]
    fn an_lz4_size_prefix_above_the_frame_limit_is_refused_before_allocating() {
        let mut payload = (u32::MAX / 2).to_le_bytes().to_vec();
        payload.extend_from_slice(&[0x1f, 0, 1, 0]);
        let frame = Frame {
            kind: Kind::Pages,
            flags: FLAG_LZ4,
            payload,
        };
        match unseal(&frame) {
            Err(WireError::Malformed(m)) => assert!(m.contains("frame limit"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A block shorter than the size it declares is refused too.
        let mut batch = Batch::default();
        batch.push_data(1, &[7u8; PAGE_SIZE]);
        let (_, packed) = batch.seal(true);
        let mut lying = packed.into_owned();
        lying[0..4].copy_from_slice(&(PAGE_SIZE as u32 * 2).to_le_bytes());
        let frame = Frame {
            kind: Kind::Pages,
            flags: FLAG_LZ4,
            payload: lying,
        };
        assert!(unseal(&frame).is_err());
    }

    #[test]
    fn compression_is_skipped_when_it_does_not_help() {
        let mut batch = Batch::default();
        let mut noise = vec![0u8; PAGE_SIZE];
        rand::Rng::fill(
            &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1),
            noise.as_mut_slice(),
        );
        batch.push_data(3, &noise);
        let (flags, payload) = batch.seal(true);
        assert_eq!(flags, 0);
        assert_eq!(payload.len(), batch.len());
        let mut batch = Batch::default();
        batch.push_data(3, &[7u8; PAGE_SIZE]);
        let (flags, payload) = batch.seal(true);
        assert_eq!(flags, FLAG_LZ4);
        assert!(payload.len() < 200);
    }

    proptest! {
        #[test]
        fn batches_round_trip_through_frames(
            items in proptest::collection::vec((any::<u32>(), any::<bool>(), any::<u8>(), 1u32..1000), 0..12),
            lz4 in any::<bool>(),
        ) {
            let mut batch = Batch::default();
            let mut pages = Vec::new();
            for (index, is_data, fill, count) in &items {
                if *is_data {
                    let page = vec![*fill; PAGE_SIZE];
                    batch.push_data(*index, &page);
                    pages.push((*index, Some(page), 0));
                } else {
                    batch.push_zero_run(*index, *count);
                    pages.push((*index, None, *count));
                }
            }
            let (flags, payload) = batch.seal(lz4);
            let mut wire = Vec::new();
            write_frame(&mut wire, Kind::Pages, flags, &payload).unwrap();
            let frame = read_frame(&mut wire.as_slice()).unwrap();
            let raw = unseal(&frame).unwrap();
            let got = entries(&raw).unwrap();
            prop_assert_eq!(got.len(), pages.len());
            for (entry, (index, page, count)) in got.iter().zip(&pages) {
                match (entry, page) {
                    (Entry::Data { index: i, page: p }, Some(want)) => {
                        prop_assert_eq!(i, index);
                        prop_assert_eq!(*p, want.as_slice());
                    }
                    (Entry::ZeroRun { index: i, count: c }, None) => {
                        prop_assert_eq!(i, index);
                        prop_assert_eq!(c, count);
                    }
                    _ => prop_assert!(false, "entry kind changed"),
                }
            }
        }

        #[test]
        fn garbage_never_panics_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_frame(&mut bytes.as_slice());
            let _ = entries(&bytes);
            let _ = Hello::decode(&bytes);
        }
    }
}
