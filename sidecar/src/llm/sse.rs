//! Server-sent events (the WHATWG HTML "event stream" format), parsed incrementally
//! and encoded.
//!
//! The parser is fed the body chunk by chunk as it arrives: an event may be split at any
//! byte, lines end in LF, CRLF or CR (a CRLF split between two chunks counts once),
//! `:` lines are comments, several `data:` lines join with `\n`, and one space after
//! the colon is dropped. Nothing is kept but the unfinished line and the unfinished event,
//! bounded by [`MAX_EVENT_BYTES`]. Unlike a browser, which silently drops an unfinished
//! event at the end of the stream, [`SseParser::finish`] reports it as
//! [`SseError::Truncated`] with the byte offset where the unfinished event began: for an
//! LLM stream that means the answer was cut.

/// The largest event accepted, in bytes (16 MiB): far above any real delta, and a bound
/// on what a broken or hostile upstream can make the sidecar hold.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` name; `None` means the default, `message`.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// The `id:` field, if this event set one.
    pub id: Option<String>,
    /// The `retry:` reconnection time in milliseconds, if this event set one.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// An event with a name and data.
    pub fn named(event: &str, data: impl Into<String>) -> Self {
        Self {
            event: Some(event.into()),
            data: data.into(),
            ..Self::default()
        }
    }

    /// An unnamed event (OpenAI's streams use only these).
    pub fn data(data: impl Into<String>) -> Self {
        Self {
            data: data.into(),
            ..Self::default()
        }
    }
}

/// A stream that is not a well-formed event stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// The stream ended inside an event.
    #[error(
        "event stream truncated: the event starting at byte {offset} was not finished by a blank line"
    )]
    Truncated {
        /// Byte offset where the unfinished event (or line) began.
        offset: u64,
    },
    /// A line is not UTF-8.
    #[error("event stream is not UTF-8 at byte {offset}")]
    InvalidUtf8 {
        /// Byte offset of the first invalid byte.
        offset: u64,
    },
    /// One event grew beyond [`MAX_EVENT_BYTES`].
    #[error("event starting at byte {offset} exceeds {limit} bytes")]
    EventTooLarge {
        /// Byte offset where the event began.
        offset: u64,
        /// The limit.
        limit: usize,
    },
}

/// The incremental parser. Feed chunks with [`push`](Self::push), then call
/// [`finish`](Self::finish) at the end of the body.
#[derive(Debug)]
pub struct SseParser {
    /// The current line, not yet terminated.
    line: Vec<u8>,
    /// The previous chunk ended in CR: a LF at the start of the next one belongs to it.
    after_cr: bool,
    /// Bytes consumed so far.
    offset: u64,
    /// Offset of the first byte of `line`.
    line_start: u64,
    /// Offset where the event being built began, once it has a field.
    event_start: Option<u64>,
    /// Bytes of the event being built.
    event_bytes: usize,
    /// At the very start: a UTF-8 byte-order mark is skipped.
    at_start: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    id: Option<String>,
    retry: Option<u64>,
    limit: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }

    /// A parser with another event size limit (tests).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            offset: 0,
            line_start: 0,
            event_start: None,
            event_bytes: 0,
            at_start: true,
            event: None,
            data: String::new(),
            has_data: false,
            id: None,
            retry: None,
            limit,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Parses `chunk`, appending every event it completes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if self.at_start && !chunk.is_empty() {
            // The BOM may itself be split; only a whole one at the very start is skipped,
            // which is what every server sends if it sends one at all.
            if let Some(rest) = chunk.strip_prefix(b"\xEF\xBB\xBF") {
                self.offset += 3;
                self.line_start = self.offset;
                chunk = rest;
            }
            self.at_start = false;
        }
        while !chunk.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[0] == b'\n' {
                    chunk = &chunk[1..];
                    self.offset += 1;
                    self.line_start = self.offset;
                    continue;
                }
            }
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.line.extend_from_slice(&chunk[..end]);
                    self.after_cr = chunk[end] == b'\r';
                    self.offset += end as u64 + 1;
                    chunk = &chunk[end + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, out)?;
                    self.line = line;
                    self.line.clear();
                    self.line_start = self.offset;
                }
                None => {
                    self.line.extend_from_slice(chunk);
                    self.offset += chunk.len() as u64;
                    chunk = &[];
                }
            }
            if self.event_bytes + self.line.len() > self.limit {
                return Err(SseError::EventTooLarge {
                    offset: self.event_start.unwrap_or(self.line_start),
                    limit: self.limit,
                });
            }
        }
        Ok(())
    }

    /// The end of the stream: an unfinished event or line is an error.
    pub fn finish(&mut self) -> Result<(), SseError> {
        if let Some(offset) = self.event_start {
            return Err(SseError::Truncated { offset });
        }
        if !self.line.is_empty() {
            return Err(SseError::Truncated {
                offset: self.line_start,
            });
        }
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|e| SseError::InvalidUtf8 {
            offset: self.line_start + e.valid_up_to() as u64,
        })?;
        if line.starts_with(':') {
            return Ok(());
        }
        self.event_start.get_or_insert(self.line_start);
        self.event_bytes += line.len();
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            "retry" => {
                if let Ok(ms) = value.parse() {
                    self.retry = Some(ms);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        let id = self.id.take();
        let retry = self.retry.take();
        self.event_start = None;
        self.event_bytes = 0;
        // As the spec says: an event without data is not dispatched.
        if self.has_data {
            self.has_data = false;
            out.push(SseEvent {
                event,
                data: std::mem::take(&mut self.data),
                id,
                retry,
            });
        }
    }
}

/// Appends `event` in wire form to `out`: `event:` when named, one `data:` line per line
/// of data, and the blank line that dispatches it.
pub fn encode_into(event: &SseEvent, out: &mut Vec<u8>) {
    if let Some(name) = &event.event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    if let Some(id) = &event.id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    if let Some(retry) = event.retry {
        out.extend_from_slice(format!("retry: {retry}\n").as_bytes());
    }
    // `lines()` would also split at CR and drop a trailing empty line; split at LF only,
    // and write CRs as separate lines as the parser reads them.
    for line in event.data.split('\n') {
        for part in line.split('\r') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(part.as_bytes());
            out.push(b'\n');
        }
    }
    out.push(b'\n');
}

/// `event` in wire form.
pub fn encode(event: &SseEvent) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(event, &mut out);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn parse_in_chunks(input: &[u8], sizes: &[usize]) -> Result<Vec<SseEvent>, SseError> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            parser.push(&rest[..n], &mut out)?;
            rest = &rest[n..];
            i += 1;
        }
        parser.finish()?;
        Ok(out)
    }

    const ANTHROPIC_STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n: keep-alive comment\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello ✓\"}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn events_split_at_every_byte_boundary_parse_the_same() {
        let whole = parse_in_chunks(ANTHROPIC_STREAM.as_bytes(), &[usize::MAX]).unwrap();
        assert_eq!(whole.len(), 4);
        assert_eq!(
            whole[0],
            SseEvent::named("message_start", "{\"type\":\"message_start\"}")
        );
        assert!(whole[2].data.contains("Hello ✓"));
        for sizes in [&[1][..], &[2], &[3, 7], &[5, 1, 11]] {
            assert_eq!(
                parse_in_chunks(ANTHROPIC_STREAM.as_bytes(), sizes).unwrap(),
                whole,
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn crlf_cr_and_lf_line_endings_are_equivalent_even_split_between_chunks() {
        let lf = "data: {\"a\":1}\n\ndata: [DONE]\n\n";
        let expected = vec![SseEvent::data("{\"a\":1}"), SseEvent::data("[DONE]")];
        let crlf = lf.replace('\n', "\r\n");
        let cr = lf.replace('\n', "\r");
        for input in [lf.to_owned(), crlf.clone(), cr] {
            for size in [1, 2, 3, 64] {
                assert_eq!(
                    parse_in_chunks(input.as_bytes(), &[size]).unwrap(),
                    expected,
                    "{input:?} / {size}"
                );
            }
        }
        // CR at the end of one chunk, LF at the start of the next: one line break.
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        parser.push(b"data: x\r", &mut out).unwrap();
        parser.push(b"\n\r", &mut out).unwrap();
        parser.push(b"\n", &mut out).unwrap();
        assert_eq!(out, vec![SseEvent::data("x")]);
    }

    #[test]
    fn multi_line_data_comments_ids_and_fields_without_space() {
        let input = b"\xEF\xBB\xBF: comment\nid: 7\nretry: 1500\nevent:update\ndata:first\ndata: second\ndata\nunknown: x\n\nevent: only-name\n\n";
        let events = parse_in_chunks(input, &[4]).unwrap();
        assert_eq!(
            events,
            vec![SseEvent {
                event: Some("update".into()),
                data: "first\nsecond\n".into(),
                id: Some("7".into()),
                retry: Some(1500),
            }]
        );
    }

    #[test]
    fn a_truncated_stream_names_the_byte_offset_of_the_unfinished_event() {
        let input = b"data: {\"a\":1}\n\ndata: {\"b\":";
        assert_eq!(
            parse_in_chunks(input, &[5]),
            Err(SseError::Truncated { offset: 15 })
        );
        // A data line that ended but was never followed by the blank line.
        let input = b"data: {\"a\":1}\n\nevent: x\ndata: y\n";
        assert_eq!(
            parse_in_chunks(input, &[3]),
            Err(SseError::Truncated { offset: 15 })
        );
        // Ending on a blank line, or on a comment, is fine.
        assert!(parse_in_chunks(b"data: a\n\n: bye\n", &[2]).is_ok());
    }

    #[test]
    fn invalid_utf8_and_oversized_events_are_errors_with_offsets() {
        assert_eq!(
            parse_in_chunks(b"data: ok\n\ndata: \xFF\xFE\n\n", &[3]),
            Err(SseError::InvalidUtf8 { offset: 16 })
        );
        let mut parser = SseParser::with_limit(10);
        let mut out = Vec::new();
        let err = parser.push(b"data: 0123456789abc", &mut out).unwrap_err();
        assert_eq!(
            err,
            SseError::EventTooLarge {
                offset: 0,
                limit: 10
            }
        );
    }

    #[test]
    fn encoded_events_parse_back_to_themselves() {
        let events = [
            SseEvent::named("content_block_delta", "{\"text\":\"a\"}"),
            SseEvent::data("line one\nline two"),
            SseEvent::data(""),
            SseEvent {
                event: Some("e".into()),
                data: "x".into(),
                id: Some("42".into()),
                retry: Some(10),
            },
        ];
        let mut wire = Vec::new();
        for e in &events {
            encode_into(e, &mut wire);
        }
        assert_eq!(
            String::from_utf8(encode(&events[0])).unwrap(),
            "event: content_block_delta\ndata: {\"text\":\"a\"}\n\n"
        );
        assert_eq!(parse_in_chunks(&wire, &[3]).unwrap(), events);
    }
}
