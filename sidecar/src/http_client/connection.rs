//! One HTTP/1.1 connection to a backend, driven by the task of the request that holds
//! it: the request task writes the request and reads the response head, and the
//! response body reads the socket when the server side polls it for the next frame.
//!
//! Why not hyper's `client::conn::http1`: there each connection is a task of its own,
//! which a request reaches through a channel and which answers through a oneshot and
//! streams the body through another channel. Per request that hand-off cost as much
//! user-space CPU as parsing the response (docs/benchmarks.md, "Sidecar proxy
//! overhead"). nginx and HAProxy read the upstream socket from the request's own
//! context, and so does this. Framing (what bytes mean) is in [`super::framing`];
//! this module only moves bytes.

use std::{
    error::Error as StdError,
    io,
    pin::{Pin, pin},
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::{HeaderValue, Method, StatusCode, request};
use hyper::body::{Body, Frame};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{
    ClientError,
    framing::{
        self, Additions, BodyLength, Chunk, ChunkedDecoder, FramingError, RequestFraming,
        ResponseHead, ResponseHeadParser,
    },
};

/// Reads ask for at least this much free buffer space.
const READ_CHUNK: usize = 16 * 1024;

/// Request body frames up to this size are copied behind the head or chunk-size line
/// and sent with it in one write; larger ones are written on their own.
const COALESCE_LIMIT: usize = 16 * 1024;

/// Why an exchange on an open connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The endpoint closed the connection before its response head was complete.
    #[error("connection closed by the endpoint after {received} bytes of the response head")]
    Closed {
        /// Bytes of the head that had arrived.
        received: usize,
    },
    /// Reading or writing the socket failed (reset, broken pipe).
    #[error("connection failed: {0}")]
    Io(#[source] io::Error),
    /// The endpoint's bytes are not an HTTP/1.1 response.
    #[error(transparent)]
    Framing(FramingError),
    /// The request body (from the client) failed while it was being sent.
    #[error("request body failed: {0}")]
    RequestBody(#[source] Box<dyn StdError + Send + Sync>),
    /// The request body's length and its announced length differ.
    #[error("request body had {sent} bytes where {declared} were announced")]
    RequestBodyLength {
        /// Bytes the body yielded (so far, when it was too long).
        sent: u64,
        /// The announced length.
        declared: u64,
    },
}

impl ExchangeError {
    /// Whether nothing at all came back: the failure a connection the endpoint closed
    /// while it sat idle shows.
    pub fn nothing_received(&self) -> bool {
        match self {
            Self::Closed { received } => *received == 0,
            Self::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// Why a response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The endpoint closed the connection before the body's end.
    #[error("connection closed by the endpoint {missing}")]
    Closed {
        /// What was missing, in words.
        missing: String,
    },
    /// Reading the socket failed.
    #[error("connection failed while reading the response body: {0}")]
    Io(#[source] io::Error),
    /// The chunked encoding was broken.
    #[error(transparent)]
    Framing(FramingError),
}

/// An open connection, idle between exchanges.
#[derive(Debug)]
pub struct Connection {
    io: TcpStream,
    /// Bytes received and not yet consumed.
    read: BytesMut,
    /// The head (and small body frames) being written; kept to reuse its allocation.
    write: Vec<u8>,
    parser: ResponseHeadParser,
}

impl Connection {
    /// Connects to `address` within `timeout` (zero waits as long as the kernel does).
    pub async fn open(address: &str, timeout: Duration) -> Result<Self, ClientError> {
        let connecting = TcpStream::connect(address);
        let connected = if timeout.is_zero() {
            connecting.await
        } else {
            tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| ClientError::ConnectTimeout {
                    address: address.to_owned(),
                    timeout,
                })?
        };
        let io = connected.map_err(|error| ClientError::Connect {
            address: address.to_owned(),
            error,
        })?;
        // Small requests and responses are the common case: no Nagle delay.
        let _ = io.set_nodelay(true);
        Ok(Self {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            parser: ResponseHeadParser::default(),
        })
    }

    /// Whether an idle connection can carry a request: the endpoint has neither closed
    /// it nor sent anything unasked. Costs no system call unless the socket became
    /// readable while idle (the endpoint's close shows as readiness).
    pub fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0_u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes the request of `head` and `body` and reads the response head. The body
    /// is sent while the head is awaited, so an endpoint that answers before reading
    /// the whole body is heard; the connection then cannot be reused. `Host` is
    /// `default_host` when the head has none.
    pub async fn exchange<B>(
        &mut self,
        head: &request::Parts,
        additions: &Additions,
        body: &mut B,
        default_host: &HeaderValue,
    ) -> Result<ResponseHead, ExchangeError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let Self {
            io,
            read,
            write,
            parser,
        } = self;
        let (mut reader, mut writer) = io.split();
        write.clear();
        let body_ended = body.is_end_stream();
        let framing = framing::encode_request_head(
            head,
            additions,
            default_host,
            body.size_hint().exact(),
            body_ended,
            write,
        );
        let method = &head.method;
        if body_ended || framing == RequestFraming::Empty {
            writer.write_all(write).await.map_err(ExchangeError::Io)?;
            return read_head(&mut reader, read, parser, method).await;
        }
        let mut sending = pin!(send_body(&mut writer, write, body, framing));
        let mut receiving = pin!(read_head(&mut reader, read, parser, method));
        let mut sent = false;
        let mut write_failed = None;
        loop {
            tokio::select! {
                result = &mut sending, if !sent => {
                    match result {
                        Ok(()) => sent = true,
                        // An endpoint that answers early may close before reading the
                        // rest: its answer, if it sent one, says more than the write.
                        Err(ExchangeError::Io(e)) => {
                            sent = true;
                            write_failed = Some(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                head = &mut receiving => {
                    let written = sent && write_failed.is_none();
                    let mut head = match (head, write_failed) {
                        (Ok(head), _) => head,
                        (Err(_), Some(write_error)) => return Err(ExchangeError::Io(write_error)),
                        (Err(e), None) => return Err(e),
                    };
                    // The endpoint answered before the request was over (or while
                    // writing it failed): the connection cannot carry another request.
                    head.keep_alive &= written;
                    return Ok(head);
                }
            }
        }
    }

    /// The connection after a `101 Switching Protocols`: the socket and what the
    /// endpoint already sent past the head.
    pub fn into_upgraded(self) -> (TcpStream, Bytes) {
        (self.io, self.read.freeze())
    }

    /// Whether the endpoint sent more than its response: such a connection is not
    /// reused.
    pub fn has_unread(&self) -> bool {
        !self.read.is_empty()
    }

    /// Reads the next frame of a response body. `Ready(None)` and a state of
    /// [`BodyState::Done`] mean the body is over and the connection is positioned
    /// after it.
    pub fn poll_body(
        &mut self,
        state: &mut BodyState,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let buffer = &mut self.read;
            match state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Remaining(left) if !buffer.is_empty() => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    *left -= take as u64;
                    if *left == 0 {
                        *state = BodyState::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(buffer.split_to(take).freeze()))));
                }
                BodyState::Chunked(decoder) => match decoder.decode(buffer) {
                    Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Chunk::Trailers(trailers)) => {
                        *state = BodyState::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Chunk::End) => {
                        *state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::Incomplete) => {}
                    Err(e) => return Poll::Ready(Some(Err(BodyError::Framing(e)))),
                },
                BodyState::UntilClose if !buffer.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(buffer.split().freeze()))));
                }
                BodyState::Remaining(_) | BodyState::UntilClose => {}
            }
            make_room(buffer);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                buffer
            ));
            match read {
                Ok(0) => {
                    let missing = match state {
                        BodyState::UntilClose => {
                            *state = BodyState::Done;
                            return Poll::Ready(None);
                        }
                        BodyState::Remaining(left) => {
                            format!("with {left} bytes of the body unread")
                        }
                        _ => "before the chunked body's last chunk".to_owned(),
                    };
                    return Poll::Ready(Some(Err(BodyError::Closed { missing })));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(BodyError::Io(e)))),
            }
        }
    }
}

/// Reads until a final response head is complete, skipping interim (1xx) responses
/// other than 101.
async fn read_head(
    reader: &mut ReadHalf<'_>,
    buffer: &mut BytesMut,
    parser: &mut ResponseHeadParser,
    method: &Method,
) -> Result<ResponseHead, ExchangeError> {
    loop {
        if !buffer.is_empty() {
            match parser
                .parse(buffer, method)
                .map_err(ExchangeError::Framing)?
            {
                Some(head)
                    if head.parts.status.is_informational()
                        && head.parts.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue;
                }
                Some(head) => return Ok(head),
                None => {}
            }
        }
        make_room(buffer);
        let received = buffer.len();
        if reader.read_buf(buffer).await.map_err(ExchangeError::Io)? == 0 {
            return Err(ExchangeError::Closed { received });
        }
    }
}

/// Makes room for a read. Bytes handed out as frames and header values share the
/// buffer's allocation; once they are all dropped, `reserve` takes it back instead of
/// allocating, so a steady connection reads into the same memory.
fn make_room(buffer: &mut BytesMut) {
    if buffer.capacity() - buffer.len() < READ_CHUNK / 4 {
        buffer.reserve(READ_CHUNK);
    }
}

/// Writes the head already in `out`, then the body with `framing`.
async fn send_body<B>(
    writer: &mut WriteHalf<'_>,
    out: &mut Vec<u8>,
    body: &mut B,
    framing: RequestFraming,
) -> Result<(), ExchangeError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    use http_body_util::BodyExt as _;
    let declared = match framing {
        RequestFraming::Length(length) => Some(length),
        _ => None,
    };
    let mut sent = 0_u64;
    loop {
        // What the body has ready goes out with the bytes before it; when it has
        // nothing ready, those are written before waiting.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                flush(writer, out).await?;
                body.frame().await
            }
        };
        let frame = match frame {
            None => break,
            Some(frame) => frame.map_err(|e| ExchangeError::RequestBody(e.into()))?,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Ok(trailers), RequestFraming::Chunked) = (frame.into_trailers(), framing) {
                    framing::encode_last_chunk(Some(&trailers), out);
                    return flush(writer, out).await;
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Some(declared) = declared
            && sent > declared
        {
            return Err(ExchangeError::RequestBodyLength { sent, declared });
        }
        if framing == RequestFraming::Chunked {
            framing::encode_chunk_size(data.len(), out);
        }
        if data.len() <= COALESCE_LIMIT {
            out.extend_from_slice(&data);
        } else {
            flush(writer, out).await?;
            writer.write_all(&data).await.map_err(ExchangeError::Io)?;
        }
        if framing == RequestFraming::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        // A body whose small frames are always ready must not pile up here.
        if out.len() >= COALESCE_LIMIT {
            flush(writer, out).await?;
        }
    }
    match (framing, declared) {
        (RequestFraming::Chunked, _) => framing::encode_last_chunk(None, out),
        (_, Some(declared)) if sent != declared => {
            return Err(ExchangeError::RequestBodyLength { sent, declared });
        }
        _ => {}
    }
    flush(writer, out).await
}

async fn flush(writer: &mut WriteHalf<'_>, out: &mut Vec<u8>) -> Result<(), ExchangeError> {
    if !out.is_empty() {
        writer.write_all(out).await.map_err(ExchangeError::Io)?;
        out.clear();
    }
    Ok(())
}

/// Where a response body's reader stands.
#[derive(Debug)]
pub enum BodyState {
    /// This many bytes are still to come.
    Remaining(u64),
    /// A chunked body, being decoded.
    Chunked(ChunkedDecoder),
    /// Everything until the endpoint closes.
    UntilClose,
    /// Over.
    Done,
}

impl BodyState {
    /// The reader for a body of `length`.
    pub fn new(length: BodyLength) -> Self {
        match length {
            BodyLength::Empty | BodyLength::Known(0) => Self::Done,
            BodyLength::Known(n) => Self::Remaining(n),
            BodyLength::Chunked => Self::Chunked(ChunkedDecoder::default()),
            BodyLength::UntilClose => Self::UntilClose,
        }
    }
}
