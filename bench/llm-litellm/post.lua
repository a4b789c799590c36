-- wrk script for bench/llm-litellm.sh: one OpenAI chat completion per request, the same
-- body for every target. BENCH_STREAM=1 asks for an SSE stream (wrk times each request to
-- the stream's last byte); BENCH_AUTH, when set, is sent as `Authorization: Bearer …`.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end
local stream = os.getenv("BENCH_STREAM") == "1"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":64,"stream":' .. (stream and "true" or "false")
  .. ',"messages":[{"role":"user","content":"Say hello in twelve words."}]}'
