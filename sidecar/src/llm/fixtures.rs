//! Payloads modeled on the examples of the OpenAI and Anthropic API references, shared
//! by the tests of the translation modules.

/// A request using every feature the gateway translates, as the reference shows them.
pub const OPENAI_REQUEST: &str = r#"{
  "model": "gpt-4o",
  "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [
      {"type": "text", "text": "What is in this image, and what's the weather in Boston?"},
      {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/boardwalk.jpg", "detail": "high"}},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    ]},
    {"role": "assistant", "content": null, "tool_calls": [
      {"id": "call_abc123", "type": "function", "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Boston, MA\"}"}}
    ]},
    {"role": "tool", "tool_call_id": "call_abc123", "content": "{\"temperature\": 22, \"unit\": \"celsius\"}"}
  ],
  "tools": [{"type": "function", "function": {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
  }}],
  "tool_choice": {"type": "function", "function": {"name": "get_current_weather"}},
  "parallel_tool_calls": false,
  "stop": ["\n\nHuman:"],
  "max_completion_tokens": 512,
  "temperature": 0.7,
  "top_p": 0.9,
  "stream": true,
  "stream_options": {"include_usage": true},
  "seed": 42,
  "response_format": {"type": "text"}
}"#;

/// A Messages request with a cached system prompt, images both ways, a tool call and
/// its result, as the reference shows them.
pub const ANTHROPIC_REQUEST: &str = r#"{
  "model": "claude-sonnet-4-5",
  "max_tokens": 1024,
  "system": [{"type": "text", "text": "You are a weather assistant.", "cache_control": {"type": "ephemeral"}}],
  "messages": [
    {"role": "user", "content": [
      {"type": "text", "text": "Describe these and tell me the weather in San Francisco."},
      {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}},
      {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/ant.jpg"}}
    ]},
    {"role": "assistant", "content": [
      {"type": "text", "text": "I'll check the weather."},
      {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA"}}
    ]},
    {"role": "user", "content": [
      {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
      {"type": "text", "text": "Thanks. And tomorrow?"}
    ]}
  ],
  "tools": [{
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"}}, "required": ["location"]}
  }],
  "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
  "stop_sequences": ["\n\nHuman:"],
  "temperature": 0.5,
  "top_p": 0.9,
  "top_k": 40,
  "metadata": {"user_id": "user-1234"},
  "thinking": {"type": "enabled", "budget_tokens": 2048}
}"#;

/// A Messages response that calls a tool, as the reference shows it.
pub const ANTHROPIC_TOOL_RESPONSE: &str = r#"{
  "id": "msg_01Aq9w938a90dw8q",
  "type": "message",
  "role": "assistant",
  "model": "claude-sonnet-4-5-20250929",
  "content": [
    {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
    {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA", "unit": "celsius"}}
  ],
  "stop_reason": "tool_use",
  "stop_sequence": null,
  "usage": {"input_tokens": 472, "output_tokens": 89, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100, "service_tier": "standard"}
}"#;
