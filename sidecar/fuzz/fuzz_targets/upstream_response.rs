//! What an endpoint sends back: the response head, then a chunked body, read the way
//! the proxy reads them (`http_client::framing`), in pieces of every size.
#![no_main]

use bytes::BytesMut;
use http::Method;
use libfuzzer_sys::fuzz_target;
use trimtab_sidecar::http_client::framing::{
    BodyLength, Chunk, ChunkedDecoder, parse_response_head,
};

fuzz_target!(|data: &[u8]| {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut buffer = BytesMut::new();
    let mut fed = 0;
    let head = loop {
        match parse_response_head(&mut buffer, &Method::GET) {
            Ok(Some(head)) => break head,
            Ok(None) if fed < data.len() => {
                let next = (fed + step).min(data.len());
                buffer.extend_from_slice(&data[fed..next]);
                fed = next;
            }
            _ => return,
        }
    };
    if head.body != BodyLength::Chunked {
        return;
    }
    buffer.extend_from_slice(&data[fed..]);
    let mut decoder = ChunkedDecoder::default();
    while let Ok(Chunk::Data(_)) = decoder.decode(&mut buffer) {}
});
