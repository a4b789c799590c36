//! The LLM gateway's pure core: the OpenAI and Anthropic dialects, translation between
//! them (whole bodies and streams), the choice of provider, and context fitting.
//!
//! Nothing here does I/O. The proxy decodes a body with [`decode::decode`] into the
//! [`openai`] or [`anthropic`] types, asks [`routing`] which provider to use (passing the
//! time in), fits the request to that provider's context window with [`fitting`],
//! translates it with [`translate`], and maps a streamed answer chunk by chunk through
//! [`stream::StreamMapper`] (which uses the [`sse`] parser and encoder).
//!
//! The dialects are named by [`trimtab_api::balancer_policy::ProviderKind`], both for a
//! provider and for the application's listener.

pub mod anthropic;
pub mod decode;
pub mod fitting;
#[cfg(test)]
mod fixtures;
pub mod openai;
pub mod routing;
pub mod sse;
pub mod stream;
pub mod translate;
