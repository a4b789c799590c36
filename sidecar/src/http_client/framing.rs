//! HTTP/1.1 message framing for the client side of the proxy, apart from any I/O:
//! writing a request head, parsing a response head, deciding how long a response body
//! is (RFC 9112 §6.3), and decoding chunked bodies.
//!
//! Parsing is httparse's, the parser hyper uses; this module turns its output into
//! `http` types without copying (header values are slices of the received head) and
//! names what was wrong, and where, when the endpoint's bytes are not HTTP.

use std::{io::Write as _, mem::MaybeUninit};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version,
    header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE},
    request, response,
};
use smallvec::SmallVec;

/// A response head may be at most this long (hyper's default read buffer limit is
/// larger, nginx's `proxy_buffer_size` is 4–8 KiB; a head this large is an attack or a
/// bug).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Response heads may carry at most this many fields (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// A chunk-size line, extensions included, may be at most this long.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Trailer fields after a chunked body may take at most this many bytes.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why an endpoint's bytes are not a valid HTTP/1.1 response.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    /// httparse refused the head.
    #[error("malformed response head ({reason}) within its first {received} bytes")]
    Head {
        /// httparse's reason.
        reason: httparse::Error,
        /// How many bytes of the head had arrived.
        received: usize,
    },
    /// The head did not end within [`MAX_HEAD_BYTES`].
    #[error("response head longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// A field name or value the `http` crate does not accept.
    #[error("response header {name:?} is invalid")]
    Header {
        /// The name as received (lossy).
        name: String,
    },
    /// `Content-Length` is not one non-negative integer (RFC 9112 §6.3, rule 5).
    #[error("response content-length {value:?} is invalid")]
    ContentLength {
        /// The value(s) as received (lossy).
        value: String,
    },
    /// A chunk-size line was not a hex size and optional extensions ending in CRLF.
    #[error("invalid chunk-size line at body byte {offset}")]
    ChunkSize {
        /// Offset of the line in the encoded body.
        offset: u64,
    },
    /// The CRLF after a chunk's data was something else.
    #[error("chunk data not followed by CRLF at body byte {offset}")]
    ChunkEnd {
        /// Offset of the expected CRLF in the encoded body.
        offset: u64,
    },
    /// The trailer section was malformed or too large.
    #[error("invalid trailer section at body byte {offset}")]
    Trailers {
        /// Offset of the trailer section in the encoded body.
        offset: u64,
    },
}

/// How the end of a response body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body: a response to HEAD, a 1xx, 204 or 304.
    Empty,
    /// `Content-Length` bytes.
    Known(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the endpoint closes the connection; the connection cannot be reused.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and headers.
    pub parts: response::Parts,
    /// Where the body ends.
    pub body: BodyLength,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// Nothing follows the head.
    Empty,
    /// Exactly this many bytes follow.
    Length(u64),
    /// Chunks follow, ended by a zero-size chunk.
    Chunked,
}

/// Fields a proxy adds to a request on its way to an endpoint (`Forwarded`,
/// `X-Forwarded-*`), written after the request's own. Not inserted into the request's
/// header map: hyper sizes that map to the request, so inserting grew and rehashed it,
/// on every request.
#[derive(Debug, Clone, Default)]
pub struct Additions {
    /// Written after the request's own fields, in this order.
    pub fields: SmallVec<[(HeaderName, HeaderValue); 4]>,
    /// The request's `Host` names the proxy, not the service: the endpoint's address
    /// is sent instead, as for a request without one.
    pub replace_host: bool,
}

/// Appends the request line and headers of `head` and `additions` to `out`, with
/// `Host: default_host` when they have none (or `additions` replaces it), and the
/// framing headers its body needs, and says which framing that is. `exact_length` is
/// the body's exact size when known and `ends_at_once` whether it is already over (an
/// empty body). Framing headers the request carried are replaced: the body decides.
/// The target is sent in origin form (path and query), whatever form the head's URI
/// has.
pub fn encode_request_head(
    head: &request::Parts,
    additions: &Additions,
    default_host: &HeaderValue,
    exact_length: Option<u64>,
    ends_at_once: bool,
    out: &mut Vec<u8>,
) -> RequestFraming {
    let method = &head.method;
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        head.uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    let mut has_length = false;
    // The length the request declares, when it declares exactly one.
    let mut declared = None;
    for (name, value) in &head.headers {
        if name == CONTENT_LENGTH {
            declared = (!has_length)
                .then(|| parse_decimal(value.as_bytes().trim_ascii()))
                .flatten();
            has_length = true;
            continue;
        }
        if name == TRANSFER_ENCODING || (additions.replace_host && name == HOST) {
            continue;
        }
        has_host |= name == HOST;
        encode_field(name, value.as_bytes(), out);
    }
    for (name, value) in &additions.fields {
        has_host |= name == HOST;
        encode_field(name, value.as_bytes(), out);
    }
    if !has_host {
        encode_field(&HOST, default_host.as_bytes(), out);
    }
    let framing = match (ends_at_once, exact_length) {
        // RFC 9110 §8.6: a request with no body sends no Content-Length unless its
        // method gives a body meaning (POST, PUT, PATCH and others) or the client
        // sent one.
        (true, _) | (_, Some(0))
            if !has_length
                && matches!(
                    *method,
                    Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
                ) =>
        {
            RequestFraming::Empty
        }
        (true, _) => RequestFraming::Length(0),
        (false, Some(length)) => RequestFraming::Length(length),
        // A streamed body that does not know its size keeps the length the request
        // declares (many servers refuse chunked uploads); the body is held to it.
        (false, None) => declared.map_or(RequestFraming::Chunked, RequestFraming::Length),
    };
    match framing {
        RequestFraming::Empty => {}
        RequestFraming::Length(length) => {
            encode_field(&CONTENT_LENGTH, itoa(length, &mut [0; 20]), out);
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Appends the chunk-size line of a chunk of `length` bytes.
pub fn encode_chunk_size(length: usize, out: &mut Vec<u8>) {
    // Writing to a `Vec` cannot fail.
    let _ = write!(out, "{length:x}\r\n");
}

/// Appends the last chunk and the trailer section.
pub fn encode_last_chunk(trailers: Option<&HeaderMap>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        encode_field(name, value.as_bytes(), out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one field line.
fn encode_field(name: &HeaderName, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The decimal digits of `n`, written into `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Parses a response head from the front of `buffer`, removing it. `Ok(None)` means
/// more bytes are needed. Informational responses (1xx other than 101) are returned
/// too; the caller skips them. Hop-by-hop fields ([`HOP_BY_HOP`] and those
/// `Connection` names) are consumed here, as they describe this connection, except in
/// a 101, whose `Upgrade` and `Connection` the client needs.
pub fn parse_response_head(
    buffer: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, FramingError> {
    // One head only: nothing to remember its names for.
    parse_head(buffer, request_method, |_, raw| HeaderName::from_bytes(raw))
}

/// Field names remembered from the responses parsed so far, by position, for an
/// endpoint that sends the same fields in the same order response after response (as
/// servers do). A name whose bytes match the one in its place last time is cloned
/// instead of parsed: parsing names was a fifth of a response head's cost. One parser
/// serves one connection.
#[derive(Debug, Default)]
pub struct ResponseHeadParser {
    names: Vec<(Box<[u8]>, HeaderName)>,
}

/// Positions remembered per connection; fields further down are parsed every time.
const REMEMBERED_NAMES: usize = 32;

impl ResponseHeadParser {
    /// [`parse_response_head`], with this connection's remembered names.
    pub fn parse(
        &mut self,
        buffer: &mut BytesMut,
        request_method: &Method,
    ) -> Result<Option<ResponseHead>, FramingError> {
        parse_head(buffer, request_method, |position, raw| {
            self.name(position, raw)
        })
    }

    fn name(
        &mut self,
        position: usize,
        raw: &[u8],
    ) -> Result<HeaderName, http::header::InvalidHeaderName> {
        if let Some((bytes, name)) = self.names.get(position)
            && **bytes == *raw
        {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        let remembered = (Box::from(raw), name.clone());
        if position < self.names.len() {
            self.names[position] = remembered;
        } else if position == self.names.len() && position < REMEMBERED_NAMES {
            self.names.push(remembered);
        }
        Ok(name)
    }
}

fn parse_head(
    buffer: &mut BytesMut,
    request_method: &Method,
    mut field_name: impl FnMut(usize, &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName>,
) -> Result<Option<ResponseHead>, FramingError> {
    // Offsets of names and values in the head: the head becomes `Bytes` after parsing,
    // and values become slices of it. The header slots start uninitialised: zeroing
    // a hundred of them per response cost more than parsing a small head.
    let (length, status, version, fields) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buffer,
            &mut slots,
        );
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buffer.len() >= MAX_HEAD_BYTES => {
                return Err(FramingError::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(reason) => {
                return Err(FramingError::Head {
                    reason,
                    received: buffer.len(),
                });
            }
        };
        let base = buffer.as_ptr() as usize;
        // On the stack: a heap vector here was an allocation per response.
        let fields: SmallVec<[_; 16]> = response
            .headers
            .iter()
            .map(|header| {
                let name = header.name.as_ptr() as usize - base;
                let value = header.value.as_ptr() as usize - base;
                (
                    name..name + header.name.len(),
                    value..value + header.value.len(),
                )
            })
            .collect();
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        (length, response.code.unwrap_or_default(), version, fields)
    };
    let status = StatusCode::from_u16(status).map_err(|_| FramingError::Head {
        reason: httparse::Error::Status,
        received: length,
    })?;
    // After a 101 the upgrade's own fields (`Upgrade`, `Connection: upgrade`) go to the
    // client; otherwise connection-specific fields stay here.
    let keep_hop_by_hop = status == StatusCode::SWITCHING_PROTOCOLS;
    let head = buffer.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    let mut connection = ConnectionFields::default();
    for (position, (name, value)) in fields.into_iter().enumerate() {
        let name = &head[name];
        let invalid = || FramingError::Header {
            name: String::from_utf8_lossy(name).into_owned(),
        };
        let name = field_name(position, name).map_err(|_| invalid())?;
        let value = HeaderValue::from_maybe_shared(head.slice(value)).map_err(|_| invalid())?;
        if connection.observe(&name, &value) && !keep_hop_by_hop {
            continue;
        }
        headers.append(name, value);
    }
    if !keep_hop_by_hop {
        for name in &connection.listed {
            headers.remove(name);
        }
    }
    if connection.chunked_last.is_some() {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an
        // intermediary removes the latter before forwarding (a smuggling vector).
        headers.remove(CONTENT_LENGTH);
    }
    let body = body_length(request_method, status, &connection, &headers)?;
    let keep_alive = body != BodyLength::UntilClose && connection.keeps_alive(version);
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(ResponseHead {
        parts,
        body,
        keep_alive,
    }))
}

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus the obsolete `Proxy-Connection` and
/// `Keep-Alive` that peers still send): they describe one connection and are not
/// forwarded. Fields that `Connection` names are hop-by-hop too. A `static`, not a
/// `const`: every use of a `const` array built and dropped its seven names.
pub static HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// What a response's framing and connection fields say, gathered while its header map
/// is built: looking them up afterwards hashed each name again.
#[derive(Debug, Default)]
struct ConnectionFields {
    /// Whether the last transfer coding is chunked, when any field names one.
    chunked_last: Option<bool>,
    /// The content length all `Content-Length` values agree on.
    content_length: Option<u64>,
    /// `Content-Length` values disagree or are not numbers.
    content_length_invalid: bool,
    close: bool,
    keep_alive: bool,
    /// Other fields `Connection` names, which are hop-by-hop as well.
    listed: Vec<HeaderName>,
}

impl ConnectionFields {
    /// Takes note of one field; says whether it is hop-by-hop.
    fn observe(&mut self, name: &HeaderName, value: &HeaderValue) -> bool {
        if name == CONTENT_LENGTH {
            for item in value.as_bytes().split(|&b| b == b',') {
                match (parse_decimal(item.trim_ascii()), self.content_length) {
                    (Some(n), None) => self.content_length = Some(n),
                    (Some(n), Some(seen)) if n == seen => {}
                    _ => self.content_length_invalid = true,
                }
            }
            return false;
        }
        if !HOP_BY_HOP.contains(name) {
            return false;
        }
        if name == TRANSFER_ENCODING {
            // Chunked must be the final coding; anything else is read until close.
            if let Some(last) = tokens(value).last() {
                self.chunked_last = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name == CONNECTION {
            for token in tokens(value) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
            self.listed.extend(named_by_connection(value));
        }
        true
    }

    /// RFC 9112 §9.3: HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0
    /// closes it unless told `keep-alive`.
    fn keeps_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive && !self.close
        } else {
            !self.close
        }
    }
}

/// The fields a `Connection` value names besides `close` and [`HOP_BY_HOP`]'s own:
/// hop-by-hop as well (RFC 9110 §7.6.1). The usual tokens (`keep-alive`, `close`,
/// `upgrade`) are skipped by their text, before a `HeaderName` (an allocation, for a
/// name the `http` crate does not know) is made.
pub fn named_by_connection(value: &HeaderValue) -> impl Iterator<Item = HeaderName> + '_ {
    tokens(value)
        .filter(|token| {
            !token.eq_ignore_ascii_case(b"close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(token))
        })
        .filter_map(|token| HeaderName::from_bytes(token).ok())
}

/// The non-empty items of a comma-separated field value, trimmed.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// RFC 9112 §6.3: how a response's body is delimited.
fn body_length(
    method: &Method,
    status: StatusCode,
    fields: &ConnectionFields,
    headers: &HeaderMap,
) -> Result<BodyLength, FramingError> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(BodyLength::Empty);
    }
    if let Some(chunked) = fields.chunked_last {
        return Ok(if chunked {
            BodyLength::Chunked
        } else {
            BodyLength::UntilClose
        });
    }
    if fields.content_length_invalid {
        return Err(FramingError::ContentLength {
            value: headers
                .get_all(CONTENT_LENGTH)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(match fields.content_length {
        Some(0) => BodyLength::Empty,
        Some(n) => BodyLength::Known(n),
        None => BodyLength::UntilClose,
    })
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0_u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// What the chunked decoder found next in its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Body bytes.
    Data(Bytes),
    /// The trailer fields after the last chunk; the body is over.
    Trailers(HeaderMap),
    /// The body is over, without trailers.
    End,
    /// More bytes are needed.
    Incomplete,
}

/// Decodes a chunked body incrementally (RFC 9112 §7.1), taking what it consumed from
/// the front of the buffer it is given.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Encoded bytes consumed so far, for error positions.
    offset: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

impl ChunkedDecoder {
    /// The next piece of the body in `buffer`.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Chunk, FramingError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let (used, size) = match httparse::parse_chunk_size(buffer) {
                        Ok(httparse::Status::Complete(found)) => found,
                        Ok(httparse::Status::Partial) if buffer.len() < MAX_CHUNK_LINE => {
                            return Ok(Chunk::Incomplete);
                        }
                        _ => {
                            return Err(FramingError::ChunkSize {
                                offset: self.offset,
                            });
                        }
                    };
                    self.consume(buffer, used);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buffer.is_empty() {
                        return Ok(Chunk::Incomplete);
                    }
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    let data = buffer.split_to(take).freeze();
                    self.offset += take as u64;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Chunk::Data(data));
                }
                ChunkState::DataEnd => {
                    if buffer.len() < 2 {
                        return Ok(Chunk::Incomplete);
                    }
                    if &buffer[..2] != b"\r\n" {
                        return Err(FramingError::ChunkEnd {
                            offset: self.offset,
                        });
                    }
                    self.consume(buffer, 2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => return self.trailers(buffer),
                ChunkState::Done => return Ok(Chunk::End),
            }
        }
    }

    fn trailers(&mut self, buffer: &mut BytesMut) -> Result<Chunk, FramingError> {
        let invalid = FramingError::Trailers {
            offset: self.offset,
        };
        if buffer.starts_with(b"\r\n") {
            self.consume(buffer, 2);
            self.state = ChunkState::Done;
            return Ok(Chunk::End);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (used, trailers) = match httparse::parse_headers(buffer, &mut fields) {
            Ok(httparse::Status::Complete((used, fields))) => {
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for field in fields.iter() {
                    let name = HeaderName::from_bytes(field.name.as_bytes())
                        .map_err(|_| invalid.clone())?;
                    let value =
                        HeaderValue::from_bytes(field.value).map_err(|_| invalid.clone())?;
                    trailers.append(name, value);
                }
                (used, trailers)
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_TRAILER_BYTES => {
                return Ok(Chunk::Incomplete);
            }
            _ => return Err(invalid),
        };
        self.consume(buffer, used);
        self.state = ChunkState::Done;
        Ok(Chunk::Trailers(trailers))
    }

    fn consume(&mut self, buffer: &mut BytesMut, count: usize) {
        let _ = buffer.split_to(count);
        self.offset += count as u64;
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn encode(
        request: Request<()>,
        exact: Option<u64>,
        ended: bool,
        out: &mut Vec<u8>,
    ) -> RequestFraming {
        let host = HeaderValue::from_static("10.0.0.1:80");
        encode_request_head(
            &request.into_parts().0,
            &Additions::default(),
            &host,
            exact,
            ended,
            out,
        )
    }

    fn head(text: &str, method: &Method) -> Result<Option<ResponseHead>, FramingError> {
        parse_response_head(&mut BytesMut::from(text), method)
    }

    fn length_of(text: &str) -> BodyLength {
        head(text, &Method::GET)
            .expect("valid")
            .expect("complete")
            .body
    }

    #[test]
    fn a_get_without_a_body_is_sent_without_framing_headers() {
        let request = Request::get("http://shop/a?b=1")
            .header(HOST, "shop")
            .body(())
            .expect("request");
        let mut out = Vec::new();
        assert_eq!(
            encode(request, Some(0), true, &mut out),
            RequestFraming::Empty
        );
        assert_eq!(out, b"GET /a?b=1 HTTP/1.1\r\nhost: shop\r\n\r\n");
        out.clear();
        let without_host = Request::get("/").body(()).expect("request");
        encode(without_host, Some(0), true, &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: 10.0.0.1:80\r\n\r\n");
    }

    #[test]
    fn a_body_sets_its_own_framing_over_what_the_request_said() {
        let request = || {
            Request::post("/")
                .header(HOST, "h")
                .header(CONTENT_LENGTH, "99")
                .header(TRANSFER_ENCODING, "gzip")
                .body(())
                .expect("request")
        };
        let mut out = Vec::new();
        assert_eq!(
            encode(request(), Some(12), false, &mut out),
            RequestFraming::Length(12)
        );
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 12\r\n\r\n"
        );
        // A body of unknown size keeps the declared length ...
        out.clear();
        assert_eq!(
            encode(request(), None, false, &mut out),
            RequestFraming::Length(99)
        );
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 99\r\n\r\n"
        );
        // ... and is chunked without one.
        out.clear();
        let undeclared = Request::post("/")
            .header(HOST, "h")
            .body(())
            .expect("request");
        assert_eq!(
            encode(undeclared, None, false, &mut out),
            RequestFraming::Chunked
        );
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        out.clear();
        assert_eq!(
            encode(request(), Some(0), true, &mut out),
            RequestFraming::Length(0)
        );
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn chunks_and_the_last_chunk_are_encoded_as_rfc_9112_says() {
        let mut out = Vec::new();
        encode_chunk_size(300, &mut out);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        encode_last_chunk(Some(&trailers), &mut out);
        assert_eq!(out, b"12c\r\n0\r\ngrpc-status: 0\r\n\r\n");
    }

    #[test]
    fn a_response_head_is_parsed_and_removed_from_the_buffer() {
        let mut buffer = BytesMut::from(
            "HTTP/1.1 201 Created\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabc",
        );
        let head = parse_response_head(&mut buffer, &Method::POST)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.parts.status, StatusCode::CREATED);
        assert_eq!(head.body, BodyLength::Known(3));
        assert!(head.keep_alive);
        let values: Vec<_> = head.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&buffer[..], b"abc");
    }

    #[test]
    fn a_partial_head_asks_for_more_and_an_endless_one_is_refused() {
        assert!(
            head("HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
                .expect("valid")
                .is_none()
        );
        let endless = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            head(&endless, &Method::GET).expect_err("too large"),
            FramingError::HeadTooLarge
        );
    }

    #[test]
    fn garbage_is_a_malformed_head_error_that_says_how_much_arrived() {
        let error = head("SSH-2.0-OpenSSH\r\n\r\n", &Method::GET).expect_err("not HTTP");
        assert_eq!(
            error.to_string(),
            "malformed response head (invalid HTTP version) within its first 19 bytes"
        );
    }

    #[test]
    fn body_length_follows_rfc_9112_section_6_3() {
        assert_eq!(length_of("HTTP/1.1 200 OK\r\n\r\n"), BodyLength::UntilClose);
        assert_eq!(
            length_of("HTTP/1.1 204 No Content\r\n\r\n"),
            BodyLength::Empty
        );
        assert_eq!(
            length_of("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            BodyLength::Empty
        );
        let both = head_of(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 4\r\n\r\n",
        );
        assert_eq!(both.body, BodyLength::Chunked);
        assert!(
            !both.parts.headers.contains_key(CONTENT_LENGTH),
            "removed, not forwarded"
        );
        assert_eq!(
            length_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            BodyLength::UntilClose
        );
        assert_eq!(
            length_of("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n"),
            BodyLength::Known(7)
        );
        assert_eq!(
            length_of("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            BodyLength::Empty
        );
        let to_head = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(to_head.body, BodyLength::Empty);
    }

    #[test]
    fn conflicting_or_negative_content_lengths_are_errors_naming_the_values() {
        for value in ["7, 8", "-1", "1e3", ""] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\n");
            let error = head(&text, &Method::GET).expect_err(value);
            assert!(error.to_string().contains("content-length"), "{error}");
        }
    }

    #[test]
    fn hop_by_hop_fields_stay_with_the_connection_except_in_a_101() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
            X-Hop: 1\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\nX-End-To-End: 2\r\n\r\n";
        let head = head(text, &Method::GET).expect("valid").expect("complete");
        let names: Vec<_> = head.parts.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-end-to-end"]);
        assert_eq!(head.body, BodyLength::Chunked);
        let upgrade =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let head = head_of(upgrade);
        assert_eq!(head.parts.headers["upgrade"], "websocket");
        assert_eq!(head.parts.headers["connection"], "upgrade");
    }

    fn head_of(text: &str) -> ResponseHead {
        head(text, &Method::GET).expect("valid").expect("complete")
    }

    #[test]
    fn connection_reuse_follows_the_version_and_the_connection_header() {
        let keep = |text: &str| {
            head(text, &Method::GET)
                .expect("valid")
                .expect("complete")
                .keep_alive
        };
        assert!(keep("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 1\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"));
        assert!(keep(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.1 200 OK\r\n\r\n"), "read until close");
    }

    fn decode_all(
        encoded: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), FramingError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buffer)? {
                Chunk::Data(data) => body.extend_from_slice(&data),
                Chunk::Trailers(trailers) => return Ok((body, Some(trailers))),
                Chunk::End => return Ok((body, None)),
                Chunk::Incomplete => {
                    assert!(fed < encoded.len(), "the decoder wants more than there is");
                    let next = (fed + step).min(encoded.len());
                    buffer.extend_from_slice(&encoded[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_the_same_whatever_the_read_sizes() {
        let encoded = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n";
        for step in [1, 2, 3, 7, encoded.len()] {
            let (body, trailers) = decode_all(encoded, step).expect("valid");
            assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.", "step {step}");
            assert!(trailers.is_none());
        }
    }

    #[test]
    fn trailers_after_the_last_chunk_are_returned() {
        let encoded = b"3\r\nabc\r\n0\r\nGrpc-Status: 0\r\nX-T: a\r\n\r\n";
        let (body, trailers) = decode_all(encoded, 5).expect("valid");
        assert_eq!(body, b"abc");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-t"], "a");
    }

    #[test]
    fn broken_chunked_bodies_name_the_byte_where_they_break() {
        assert_eq!(
            decode_all(b"3\r\nabc\r\nzz\r\n", 100).expect_err("bad size"),
            FramingError::ChunkSize { offset: 8 }
        );
        assert_eq!(
            decode_all(b"3\r\nabcd\r\n0\r\n\r\n", 100).expect_err("long chunk"),
            FramingError::ChunkEnd { offset: 6 }
        );
        let endless = format!("{}\r\n", "a".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            decode_all(endless.as_bytes(), 1024).expect_err("endless line"),
            FramingError::ChunkSize { offset: 0 }
        );
    }

    #[test]
    fn a_connection_parser_reads_each_response_by_its_own_names() {
        let mut parser = ResponseHeadParser::default();
        let mut parse = |text: &str| {
            parser
                .parse(&mut BytesMut::from(text), &Method::GET)
                .expect("valid")
                .expect("complete")
                .parts
                .headers
        };
        let first =
            parse("HTTP/1.1 200 OK\r\nServer: a\r\nX-Trace: 1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(first["server"], "a");
        assert_eq!(first["x-trace"], "1");
        // The same names in the same places, then other names in them: each response
        // keeps exactly the names it sent.
        let same = parse("HTTP/1.1 200 OK\r\nServer: b\r\nX-Trace: 2\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(same["server"], "b");
        assert_eq!(same["x-trace"], "2");
        let moved = parse(
            "HTTP/1.1 200 OK\r\nX-Trace: 3\r\nX-Tracer: 4\r\nContent-Length: 0\r\nServer: c\r\n\r\n",
        );
        assert_eq!(moved.len(), 4, "{moved:?}");
        assert_eq!(moved["x-trace"], "3");
        assert_eq!(moved["x-tracer"], "4");
        assert_eq!(moved["server"], "c");
        // A remembered name in another case is the same name.
        let cased =
            parse("HTTP/1.1 200 OK\r\nx-trace: 5\r\nX-TRACER: 6\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(cased["x-trace"], "5");
        assert_eq!(cased["x-tracer"], "6");
    }

    #[test]
    fn a_connection_parser_still_refuses_a_bad_name_where_a_good_one_was() {
        let mut parser = ResponseHeadParser::default();
        parser
            .parse(
                &mut BytesMut::from("HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"),
                &Method::GET,
            )
            .expect("valid");
        // `{` is not a token character.
        let error = parser
            .parse(
                &mut BytesMut::from("HTTP/1.1 204 No Content\r\nX{A: 1\r\n\r\n"),
                &Method::GET,
            )
            .expect_err("invalid name");
        assert!(
            matches!(
                error,
                FramingError::Head {
                    reason: httparse::Error::HeaderName,
                    ..
                }
            ),
            "{error:?}"
        );
    }
}
