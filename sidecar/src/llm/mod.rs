//! The LLM gateway's pure core: the OpenAI and Anthropic dialects, translation between
//! them (whole bodies and streams), and the choice of provider.
//!
//! Nothing here does I/O: the proxy decodes a body with [`decode::decode`], translates
//! it with [`translate`], maps a streamed body chunk by chunk through [`stream`], and
//! asks [`routing`] which provider to use, passing the time in.
//!
//! The dialects are named by [`trimtab_api::balancer_policy::ProviderKind`], both for a
//! provider and for the application's listener.

pub mod anthropic;
pub mod decode;
#[cfg(test)]
mod fixtures;
pub mod openai;
pub mod routing;
pub mod sse;
pub mod stream;
pub mod translate;
