// Load test recipe for orchgate with k6 (https://k6.io): streaming chat through the OpenAI
// route and the OrchQueue task API.
//
//   k6 run loadtest/k6.js                                   # 32 users, 1 minute
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e MODEL=smollm2-135m -e TOKEN=... \
//          -e VUS=64 -e DURATION=5m loadtest/k6.js
//
// k6 reads a streamed response whole, so `http_req_waiting` is the time to the first byte
// (TTFT for streams) and `http_req_duration` the time to [DONE]. 429/503 from admission
// count as failed checks, so overload shows in the summary.
import http from "k6/http";
import { check, sleep } from "k6";

const BASE_URL = __ENV.BASE_URL || "http://127.0.0.1:8080";
const MODEL = __ENV.MODEL || "smollm2-135m";
const MAX_TOKENS = parseInt(__ENV.MAX_TOKENS || "64", 10);
const HEADERS = Object.assign(
  { "Content-Type": "application/json" },
  __ENV.TOKEN ? { Authorization: `Bearer ${__ENV.TOKEN}` } : {},
);

export const options = {
  scenarios: {
    chat: { executor: "constant-vus", exec: "chat", vus: parseInt(__ENV.VUS || "32", 10),
            duration: __ENV.DURATION || "1m" },
    tasks: { executor: "constant-vus", exec: "tasks", vus: Math.max(1, Math.floor(parseInt(__ENV.VUS || "32", 10) / 4)),
             duration: __ENV.DURATION || "1m" },
  },
  thresholds: { checks: ["rate>0.99"] },
};

export function chat() {
  const body = JSON.stringify({
    model: MODEL, stream: true, max_tokens: MAX_TOKENS,
    messages: [{ role: "user", content: "Write two sentences about the sea." }],
  });
  const res = http.post(`${BASE_URL}/v1/chat/completions`, body, { headers: HEADERS, tags: { name: "chat stream" } });
  check(res, {
    "chat: 200": (r) => r.status === 200,
    "chat: ends with [DONE]": (r) => typeof r.body === "string" && r.body.trimEnd().endsWith("data: [DONE]"),
    "chat: no in-band error": (r) => typeof r.body === "string" && !r.body.includes('data: {"error"'),
  });
  sleep(0.1 + Math.random() * 0.4);
}

export function tasks() {
  const submit = http.post(`${BASE_URL}/v1/tasks`,
    JSON.stringify({ model_ref: MODEL, prompt: "Once upon a time", max_tokens: MAX_TOKENS }),
    { headers: HEADERS, tags: { name: "task submit" } });
  if (!check(submit, { "task: 202": (r) => r.status === 202 })) {
    sleep(1);
    return;
  }
  const stream = http.get(`${BASE_URL}/v1/tasks/${submit.json("task_id")}/stream`,
    { headers: HEADERS, tags: { name: "task stream" } });
  check(stream, { "task: ends with end": (r) => r.status === 200 && r.body.includes("event: end") });
  sleep(0.2 + Math.random() * 0.8);
}
